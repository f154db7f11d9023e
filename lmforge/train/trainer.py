"""The training loop, steps 4-8 of the recipe: forward, loss, backward, update, and iterate over the data.

One step = `accumulation` micro-batches of `batch_size x block_size` tokens whose gradients add up to
one global batch of `tokens_per_step` tokens, then one clipped optimizer update at the scheduled rate.
Around the loop: evaluation, samples, atomic checkpoints, logs, and exact resume. Under torchrun every rank
runs this same loop on its slice of each batch (DDP or FSDP: lmforge/train/distributed.py).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge import run as rundir
from lmforge.config import Config
from lmforge.data.datadir import check_token_ids, describe_data
from lmforge.data.loader import TokenWindows, TrainLoader
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import TrainingDiverged, UserError
from lmforge.files import missing_directories
from lmforge.hardware import PeakFlops, configure_fast_math
from lmforge.infer.evaluate import evaluate
from lmforge.infer.generate import generate
from lmforge.infer.load import load_language_model
from lmforge.model.factory import build_model
from lmforge.model.recurrent import RECURRENT_ARCHS
from lmforge.run import EndRecord, EvalRecord, LogWriter, Record, SampleRecord, StartRecord, TrainRecord
from lmforge.train.distributed import start_cluster
from lmforge.train.engine import build_engine, engine_device
from lmforge.train.optim import set_lr
from lmforge.train.schedule import limit_reached, lr_multiplier


def accumulation_steps(config: Config, world_size: int = 1) -> int:
    """Micro-steps per optimizer step so that every step sees exactly `tokens_per_step` tokens."""
    micro_tokens = config.train.batch_size * config.model.block_size * world_size
    tokens_per_step = config.train.tokens_per_step or micro_tokens
    if tokens_per_step % micro_tokens:
        raise UserError(
            f"train.tokens_per_step ({tokens_per_step}) must be a multiple of batch_size x block_size x ranks "
            f"= {micro_tokens}"
        )
    return tokens_per_step // micro_tokens


def settle_config(config: Config, tokenizer: Tokenizer) -> Config:
    """A copy of the config with the values the data decides filled in (model.vocab_size = 0: the tokenizer's),
    and checked against the tokenizer; the caller's config is left as it was."""
    config = copy.deepcopy(config)
    model = config.model
    if model.vocab_size == 0:
        model.vocab_size = tokenizer.vocab_size
    elif model.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size {model.vocab_size} is smaller than the data's tokenizer "
                        f"({tokenizer.vocab_size}); leave it at 0 to take the tokenizer's")
    return config


@dataclass
class Progress:
    """What the loop has done so far; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # seconds spent in the loop, summed over launches
    best_val_loss: float = math.inf  # best of all evaluations so far, and its step
    best_step: int | None = None
    best_checkpoint_loss: float = math.inf  # best among saved checkpoints (evaluated at their step): kept
    best_checkpoint_step: int | None = None


class Trainer:
    """One training run: set up in __init__ (data, model, engine, run directory, resume), then `run()`."""

    def __init__(self, config: Config, data_dir: str | Path, run_dir: str | Path, *, resume: bool = False,
                 overwrite: bool = False, quiet: bool = False, init_from: str | Path | None = None):
        self.data_dir = Path(data_dir)
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        # Starting from another run's weights, or continuing this one, means using its tokenizer: the data must
        # have been tokenized with it (bare llm.c shards have none of their own).
        if init_from is not None:
            run_tokenizer = rundir.run_tokenizer(init_from)
        elif resume and (self.run_dir / rundir.TOKENIZER_FILE).is_file():
            run_tokenizer = rundir.read_tokenizer(self.run_dir)
        else:
            run_tokenizer = None
        self.meta, self.tokenizer = describe_data(self.data_dir, run_tokenizer)
        self.config = config = settle_config(config, self.tokenizer)
        if resume:
            rundir.check_same_model(self.run_dir, config.model, "--resume")
        check_token_ids(self.data_dir, config.model.vocab_size)
        train = config.train

        device, self.precision = engine_device(config)
        self.cluster, self.device = start_cluster(train, device)  # torchrun: this rank's place and device
        configure_fast_math(self.device)
        torch.manual_seed(train.seed)
        self.model = build_model(config.model).to(self.device)
        # Truncated BPTT: a recurrent model reading sequentially carries its hidden state from batch to batch.
        self.carries_state = config.model.arch in RECURRENT_ARCHS and config.data.sequential
        if config.model.arch in RECURRENT_ARCHS:
            self.model.carry_state(self.carries_state)
        if init_from is not None:  # a fine-tuning run's weights are its language model's, LoRA merged
            tuned = rundir.read_config(rundir.resolve_checkpoint(init_from)[0]).finetune is not None
            rundir.init_from_run(self.model, init_from,
                                 load_language_model(init_from)[0].state_dict() if tuned else None)
        self.engine = build_engine(config, self.model, self.device, self.precision, self.cluster, self.say)
        self.loader = TrainLoader(self.data_dir, config.model.block_size, train.batch_size,
                                  shuffle=config.data.shuffle, seed=train.seed, rank=self.cluster.rank,
                                  world_size=self.cluster.world_size, device=self.device,
                                  sequential=config.data.sequential)
        self.val_windows = TokenWindows(self.data_dir, "val", config.model.block_size)
        self.accumulation = accumulation_steps(config, self.cluster.world_size)
        self.tokens_per_step = self.accumulation * train.batch_size * config.model.block_size * self.cluster.world_size
        self.progress = Progress()
        self.stop_signal: str | None = None
        self.saving = False  # a second signal during a save waits for the save to finish
        self.kept_for_lora: set[Path] = set()  # checkpoints pruning keeps for a LoRA run, said once each
        self.made = missing_directories(self.run_dir)  # what a failed start removes, with the run's files
        self.lock = None
        self.resumed = resume
        self.wrote_fresh_run = False  # the run's files are this start's: a failure before a checkpoint removes them
        self.log_writer, self.tensorboard = None, None
        self.closed = False
        try:  # last: a failed check leaves no run behind, and a failure from here on removes what it wrote
            inputs = [self.data_dir, *([init_from] if init_from is not None else [])]
            resume_from = self._prepare_run_dir(resume, overwrite, inputs)
            if resume_from is not None:
                self._restore(*resume_from)
            main = self.cluster.is_main
            self.log_writer = LogWriter(self.run_dir) if main else None
            self.tensorboard = self._open_tensorboard() if train.tensorboard and main else None
        except BaseException:
            self._remove_failed_start()
            raise
        self.last_eval: tuple[int, float] = (-1, math.inf)  # (step, val loss) of the latest evaluation

    @property
    def optimizers(self) -> list:
        return self.engine.optimizers

    @property
    def forward(self) -> torch.nn.Module:
        """The forward for evaluation: the model, compiled or not, or the scratch engine's."""
        return self.engine.forward

    # ----- set-up -----
    def _prepare_run_dir(self, resume: bool, overwrite: bool, inputs: list[str | Path]) -> tuple[Path, tuple] | None:
        """Take the run's lock (never where the run's `inputs` are), repair what an interrupted save left, refuse
        to clobber a previous run; return the checkpoint to resume from and its contents, if any."""
        run = self.run_dir
        if not resume:  # refused before the lock is taken, the directory is left as it was (no .lock in it)
            rundir.refuse_existing_run(run, overwrite)
        if self.cluster.is_main:  # one writer per run directory; the other ranks follow rank 0
            self.lock = rundir.lock_run(run, resume=resume, inputs=inputs)
            for repair in rundir.clean_leftovers(run):
                self.say(repair)
        self.cluster.barrier()  # every rank has looked before rank 0 changes anything
        if resume:
            return rundir.newest_readable_checkpoint(run, self.say, {**rundir.STATE_SCHEMA, "loader": dict})
        existing = rundir.refuse_existing_run(run, overwrite)
        self.cluster.barrier()
        if self.cluster.is_main:
            self.wrote_fresh_run = True
            rundir.create_run(run, self.config, self.tokenizer, replace=existing)
        return None

    def _remove_failed_start(self) -> None:
        """Close everything; then a new run that failed before its first checkpoint removes what it wrote (and
        its directory, if this start made it), so the corrected command needs no --overwrite. Only the lock's
        holder removes anything: a run another process writes, or files that were there before, stay."""
        self.close()
        if self.lock is not None and not self.resumed and (self.made or self.wrote_fresh_run) \
                and not rundir.list_checkpoints(self.run_dir):
            rundir.remove_run(self.run_dir, self.made)

    def _restore(self, path: Path, loaded: tuple) -> None:
        weights, optimizer_states, state, hidden = loaded
        rundir.load_weights(self.model, self.cluster.shard_like(weights, self.model.state_dict()), path)
        if len(optimizer_states) != len(self.optimizers):
            raise UserError(f"checkpoint {path} was written with another optim.name; resume with the same one")
        for optimizer, optimizer_state in zip(self.optimizers, optimizer_states, strict=True):
            optimizer.load_state_dict(self.cluster.shard_optimizer(optimizer, optimizer_state))
        self.loader.load_state_dict(state["loader"])
        if self.carries_state:
            self._restore_hidden_state(hidden)
        self.progress = Progress(**state["progress"])
        rundir.set_rng_state(state["rng"])
        if self.cluster.is_main:
            rundir.write_config(self.run_dir, self.config)
            rundir.trim_log(self.run_dir, self.progress.step)

    def _restore_hidden_state(self, hidden: dict[str, torch.Tensor]) -> None:
        """Continue every stream from the hidden state the checkpoint carried (zeros if it has none, or if the
        global batch has another number of rows now: those are other streams)."""
        saved_rows, rows = next(iter(hidden.values())).size(1) if hidden else 0, self.loader.streams
        if hidden and saved_rows != rows:
            self.say(f"the checkpoint's hidden state has {saved_rows} rows, this run's global batch {rows}: "
                     "the recurrent state starts again from zeros")
            hidden = {}
        self.model.restore_carried_state({name: self.cluster.own_rows(value).to(self.device)
                                          for name, value in hidden.items()})

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def data_order(self) -> dict:
        """How the loader reads the windows, and so whether a recurrent model carries its hidden state."""
        data = self.config.data
        order = "sequential" if data.sequential else "shuffled" if data.shuffle else "corpus"
        state = None
        if self.config.model.arch in RECURRENT_ARCHS:
            state = "carried" if self.carries_state else "reset"
        return {"data_order": order, "recurrent_state": state}

    # ----- the loop -----
    def schedule_progress(self, elapsed: float) -> float:
        train = self.config.train
        progress = self.progress.step / train.max_steps
        if train.max_time > 0:
            progress = max(progress, elapsed / train.max_time)
        if train.max_epochs > 0:
            progress = max(progress, self.loader.epoch / train.max_epochs)
        return progress

    def stop_reason(self, elapsed: float) -> str | None:
        """Why the loop should stop now, or None to go on (a subclass may add reasons: the sweep's pruning)."""
        return limit_reached(self.config.train, step=self.progress.step, elapsed=elapsed, epochs=self.loader.epoch,
                             interrupted=bool(self.stop_signal))

    def run(self) -> dict:
        """Train until a limit is reached or a signal arrives; then a checkpoint and a full evaluation.

        SIGINT and SIGTERM are handled from the first step until the last checkpoint is on disk: the first stops
        the loop after its step, a second skips the final evaluation, and neither ever interrupts a save. The
        result names the signal (`signal`: its number, or None), so the command exits 128 + that number.
        A start that fails before its first checkpoint removes what it wrote, so the command can simply be
        run again."""
        previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with self.cluster.collective_failures():
                self._announce()
                return self._finish(self._loop())
        except BaseException as error:
            if isinstance(error, TrainingDiverged):
                self.close()
            else:
                self._remove_failed_start()
            raise
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)

    def _agreed_elapsed(self, launch_start: float) -> float:
        """Seconds since the launch, the same on every rank, which also learn of a signal any rank received."""
        elapsed, stop_requested = self.cluster.agree(time.perf_counter() - launch_start, bool(self.stop_signal))
        if stop_requested and not self.stop_signal:
            self.stop_signal = "another rank's signal"
        return elapsed

    def _announce(self) -> None:
        """The start record, and what the run is about to do, in words."""
        config, train, progress = self.config, self.config.train, self.progress
        self.peak = PeakFlops(self.device, self.precision, self.cluster.world_size)
        self.flops_per_token = self.model.flops_per_token()
        train_tokens = self.meta["splits"]["train"]["tokens"]
        start = StartRecord(
            time=time.time(), params=self.model.num_params(),
            params_non_embedding=self.model.num_params(include_embeddings=False),
            flops_per_token=self.flops_per_token, train_tokens=train_tokens,
            val_tokens=self.meta["splits"]["val"]["tokens"], tokens_per_step=self.tokens_per_step,
            iters_per_epoch=train_tokens / self.tokens_per_step, device=str(self.device),
            precision=self.precision, engine=train.engine, world_size=self.cluster.world_size,
            parallel=train.parallel if self.cluster.distributed else None, resumed_from_step=progress.step,
            **self.data_order(), arch=config.model.arch, data=str(self.data_dir.resolve()))
        self.log(start)
        self.say(f"model: {start.params:,} parameters, {self.flops_per_token / 1e6:.1f} MFLOPs per token; "
                 f"device {self.device}, {self.precision}")
        self.say(f"data: {train_tokens:,} training tokens / {self.tokens_per_step:,} tokens per step "
                 f"({train.batch_size} x {config.model.block_size} x {self.accumulation} accumulation) = "
                 f"{start.iters_per_epoch:.1f} iterations per epoch"
                 + (f"; resuming at step {progress.step}" if progress.step else ""))
        state = {"carried": "carried from batch to batch (truncated BPTT)",
                 "reset": "reset to zeros for every window (data.sequential = true carries it)"}
        self.say(f"data order: {start.data_order}" + (f"; {config.model.arch} hidden state "
                 f"{state[start.recurrent_state]}" if start.recurrent_state else ""))

    def _loop(self) -> str:
        """Optimizer steps, with logging, evaluation, samples and checkpoints between them, until a stop reason;
        returns it."""
        train, progress = self.config.train, self.progress
        bar = tqdm(total=train.max_steps, initial=progress.step,
                   disable=True if self.quiet or not self.cluster.is_main else None,
                   unit="step", dynamic_ncols=True, file=sys.stdout)
        launch_start = time.perf_counter() - progress.elapsed
        self.launch = (progress.step, progress.elapsed)
        self.window = (time.perf_counter(), 0)  # start and tokens of the span the next tokens/s measures
        self.loss: torch.Tensor | None = None
        try:
            while (reason := self.stop_reason(elapsed := self._agreed_elapsed(launch_start))) is None:
                multiplier = lr_multiplier(train.schedule, progress.step, self.schedule_progress(elapsed),
                                           warmup_steps=train.warmup_steps, min_lr_ratio=train.min_lr_ratio,
                                           cooldown_fraction=train.cooldown_fraction)
                lr = set_lr(self.optimizers, multiplier)
                self.loss, grad_norm = self.engine.step(self.loader.next_batch, self.accumulation, train.grad_clip)
                progress.step += 1
                progress.tokens += self.tokens_per_step
                self.window = (self.window[0], self.window[1] + self.tokens_per_step)
                progress.elapsed = time.perf_counter() - launch_start
                self._between_steps(lr, grad_norm, bar)
        finally:
            bar.close()
        return reason

    def _between_steps(self, lr: float, grad_norm: torch.Tensor, bar: tqdm) -> None:
        """After step `progress.step`: whatever of logging, evaluation, sampling and saving falls due."""
        train, step = self.config.train, self.progress.step
        if step % train.log_every == 0 or step == 1:
            loss_value = self.loss.item()  # the one host-device sync of a step, and only when logging
            self._stop_if_not_finite(loss_value)
            window_start, window_tokens = self.window
            tokens_per_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            self.window = (time.perf_counter(), 0)
            record = TrainRecord(step=step, loss=loss_value, lr=lr, grad_norm=grad_norm.item(),
                                 tokens=self.progress.tokens, tokens_per_s=tokens_per_s, epoch=self.loader.epoch,
                                 mfu=self.peak.mfu(self.flops_per_token * tokens_per_s), elapsed=self.progress.elapsed)
            self.log(record)
            self._update_bar(bar, record)
        if train.eval_every and step % train.eval_every == 0 and step < train.max_steps:  # else: the final one
            self.run_eval(max_windows=max(1, train.eval_tokens // self.config.model.block_size), bar=bar)
        if train.sample_every and step % train.sample_every == 0:
            self.run_sample(bar)
        if train.checkpoint_every and step % train.checkpoint_every == 0:
            self._stop_if_not_finite(self.loss.item())
            self.save()

    def _finish(self, reason: str) -> dict:
        """The full evaluation, the last checkpoint and the end record."""
        progress = self.progress
        if progress.step > self.launch[0]:  # the last steps may not have been logged: never save a NaN model
            self._stop_if_not_finite(self.loss.item())
        try:
            final = self.run_eval(max_windows=None, final=True)
        except KeyboardInterrupt:  # a second signal: the user will not wait for the evaluation, but gets the model
            final = None
            self.say("skipping the final evaluation; saving the checkpoint")
        self.save()
        self.log(EndRecord(step=progress.step, tokens=progress.tokens, elapsed=progress.elapsed, reason=reason))
        self.say(f"stopped ({reason}) at step {progress.step}, {progress.tokens:,} tokens, "
                 f"{progress.elapsed:.0f}s; checkpoint saved in {self.run_dir / rundir.CHECKPOINTS}")
        if reason == "interrupted":
            self.say(f"continue with: lmforge train --resume --data {self.data_dir} --out {self.run_dir}")
        self.close()
        signum = signal.Signals[self.stop_signal].value if self.stop_signal in signal.Signals.__members__ else None
        return {"reason": reason, "step": progress.step, "val": final, "signal": signum}

    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal:  # a second one: the user does not want to wait, but a save in progress finishes
            if not self.saving:
                raise KeyboardInterrupt
            return
        self.stop_signal = signal.Signals(signum).name
        print(f"\n{self.stop_signal}: finishing this step, then saving a checkpoint", file=sys.stderr)

    def _stop_if_not_finite(self, loss: float) -> None:
        if math.isfinite(loss):
            return
        saved = rundir.list_checkpoints(self.run_dir)
        kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint had been saved yet"
        self.log(EndRecord(step=self.progress.step, tokens=self.progress.tokens, elapsed=self.progress.elapsed,
                           reason="non_finite_loss"))
        self.close()
        raise TrainingDiverged(f"training loss became {loss} at step {self.progress.step}; {kept}; "
                               f"lower optim.lr or raise train.warmup_steps and resume or restart")

    def _update_bar(self, bar: tqdm, record: TrainRecord) -> None:
        train = self.config.train
        if train.max_time > 0:  # when the clock will end the run first, show the steps it leaves room for
            launch_step, launch_elapsed = self.launch
            seconds_per_step = (record.elapsed - launch_elapsed) / max(record.step - launch_step, 1)
            by_time = record.step + (train.max_time - record.elapsed) / max(seconds_per_step, 1e-9)
            bar.total = int(min(train.max_steps, max(by_time, record.step)))
        bar.n = record.step
        bar.set_postfix(loss=f"{record.loss:.4f}", lr=f"{record.lr:.2e}",
                        tok_s=f"{record.tokens_per_s:,.0f}", mfu="?" if record.mfu is None else f"{record.mfu:.1%}",
                        epoch=f"{record.epoch:.2f}", refresh=False)
        bar.refresh()

    # ----- evaluation, samples, checkpoints -----
    def run_eval(self, max_windows: int | None, *, final: bool = False, bar: tqdm | None = None) -> dict:
        val = self.meta["splits"]["val"]
        result = evaluate(self.forward, self.val_windows, batch_size=self.config.train.batch_size,
                          max_windows=max_windows, device=self.device, precision=self.precision,
                          bytes_per_token=val["bytes"] / val["tokens"] if val["bytes"] else None,
                          rank=self.cluster.rank, world_size=self.cluster.world_size)
        progress = self.progress
        if result["loss"] < progress.best_val_loss:
            progress.best_val_loss, progress.best_step = result["loss"], progress.step
        self.last_eval = (progress.step, result["loss"])
        self.log(EvalRecord(step=progress.step, tokens=progress.tokens, val_loss=result["loss"],
                            val_ppl=result["perplexity"], val_bpb=result["bpb"], elapsed=progress.elapsed,
                            final=final))
        message = (f"step {progress.step}: val loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
                   + (f"{result['bpb']:.4f} bits/byte" if result["bpb"] is not None else "bits/byte unknown (no byte "
                    "counts: not a prepared data directory)") + (" (full validation split)" if final else ""))
        (bar.write(message) if bar is not None and not bar.disable else self.say(message))
        return result

    def run_sample(self, bar: tqdm) -> None:
        if not (self.cluster.is_main or self.cluster.sharded):  # a sharded forward needs every rank
            return
        tokenizer = self.tokenizer
        # A generator of its own: sampling must not move the training RNG (dropout, resume).
        generator = torch.Generator(self.device).manual_seed((self.config.train.seed + self.progress.step) % 2**64)
        ids = list(generate(self.model, [tokenizer.eot_id], self.config.train.sample_tokens, temperature=0.8,
                            top_k=200, generator=generator, stop_token=tokenizer.eot_id))
        text = tokenizer.decode(ids)
        self.log(SampleRecord(step=self.progress.step, prompt="", text=text))
        (bar.write if not bar.disable else self.say)(f"--- sample at step {self.progress.step} ---\n{text}\n---")

    def save(self) -> Path | None:
        progress = self.progress
        eval_step, eval_loss = self.last_eval
        if eval_step == progress.step and eval_loss < progress.best_checkpoint_loss:
            progress.best_checkpoint_loss, progress.best_checkpoint_step = eval_loss, progress.step
        state = {"progress": vars(progress).copy(), "loader": self.loader.state_dict()}
        # Every rank takes part in gathering the shards (FSDP); rank 0 alone writes.
        model_state = self.cluster.gather_full(self.model.state_dict())
        optimizer_states = [self.cluster.gather_optimizer(optimizer.state_dict()) for optimizer in self.optimizers]
        carried = self.model.carried_state() if self.carries_state else {}
        hidden_state = {name: self.cluster.gather_rows(value) for name, value in carried.items()}
        if not self.cluster.is_main:
            return None
        self.saving = True
        try:
            path = rundir.save_checkpoint(self.run_dir, progress.step, model_state, optimizer_states, state,
                                          hidden_state)
            for note in rundir.prune_checkpoints(self.run_dir, self.config.train.keep_last,
                                                 progress.best_checkpoint_step, self.kept_for_lora):
                self.say(note)
        finally:
            self.saving = False
        return path

    # ----- output -----
    def log(self, record: Record) -> None:
        if self.log_writer is None:  # not rank 0
            return
        self.log_writer.write(record)
        if self.tensorboard is not None and isinstance(record, TrainRecord | EvalRecord):
            for field in dataclasses.fields(record):
                value = getattr(record, field.name)
                if field.name not in ("step", "final") and isinstance(value, int | float):
                    self.tensorboard.add_scalar(f"{record.kind}/{field.name}", value, record.step)

    def say(self, message: str) -> None:
        if not self.quiet and self.cluster.is_main:
            print(message, flush=True)

    def close(self) -> None:
        """Close the log and the engine, leave the process group and let go of the run's lock (once)."""
        if self.closed:
            return
        self.closed = True
        if self.log_writer is not None:
            self.log_writer.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.engine.close()
        self.cluster.close()
        if self.lock is not None:
            self.lock.close()
