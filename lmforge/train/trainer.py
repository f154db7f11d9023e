"""The training loop, steps 4-8 of the recipe: forward, loss, backward, update, and iterate over the data.

One loop for every kind of training: a `Trainer` runs a task, which says what it trains on and how it is
measured: pretraining's (`LanguageModelling`, lmforge/train/language.py; an encoder's `MaskedLanguageModelling`,
lmforge/train/masked.py; an encoder-decoder's `SpanCorruption`, lmforge/train/spans.py) or a fine-tuning task's
(lmforge/tasks/finetune.py). One step = `accumulation` micro-batches whose gradients add up to one global batch,
then one clipped optimizer update at the scheduled rate. Around the loop, the same for every task: the run's
lock and leftover repair, signals, the progress bar, the log, evaluations (the best checkpoint by the task's
metric is kept; `patience` evaluations without improvement stop the run early), samples, atomic checkpoints
and exact resume. Under torchrun every rank runs this same loop on its slice of each batch (DDP or FSDP:
lmforge/train/distributed.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.config.sections import Config
from lmforge.errors import TrainingDiverged, UserError
from lmforge.files import missing_directories
from lmforge.hardware import PeakFlops, configure_fast_math
from lmforge.run import checkpoints as run_checkpoints
from lmforge.run import directory as rundir
from lmforge.run import log as run_log
from lmforge.run.log import EndRecord, EvalRecord, LogWriter, Record, TrainRecord
from lmforge.train.distributed import start_cluster
from lmforge.train.ema import WeightAverage
from lmforge.train.engine import build_engine, engine_device
from lmforge.train.language import LanguageModelling
from lmforge.train.masked import MaskedLanguageModelling
from lmforge.train.optim import set_lr
from lmforge.train.schedule import limit_reached, lr_multiplier
from lmforge.train.spans import SpanCorruption
from lmforge.train.task import TrainingTask

# A launch says how long it will take once it has timed this many steps (at the first logged step after them):
# enough that the first step's one-off costs weigh little, few enough to be said within seconds.
ESTIMATE_AFTER_STEPS = 10


@dataclass
class Progress:
    """What the loop has done so far; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # seconds spent in the loop, summed over launches
    best_metric: float | None = None  # best of all evaluations so far by the task's metric, and its step
    best_step: int | None = None
    best_checkpoint_metric: float | None = None  # best among saved checkpoints (evaluated at their step): kept
    best_checkpoint_step: int | None = None
    evals_without_improvement: int = 0  # early stopping: evaluations in a row that did not beat the best

    @classmethod
    def from_state(cls, saved: dict) -> Progress:
        """The progress a checkpoint saved, also one written before the metric was the task's (pretraining's
        best_val_loss and best_checkpoint_loss, infinite for none)."""
        saved = dict(saved)
        for old, new in (("best_val_loss", "best_metric"), ("best_checkpoint_loss", "best_checkpoint_metric")):
            if old in saved:
                value = saved.pop(old)
                saved[new] = value if math.isfinite(value) else None
        return cls(**{field.name: saved[field.name] for field in dataclasses.fields(cls) if field.name in saved})


def better(value: float, best: float | None, higher: bool) -> bool:
    """Whether a finite metric value beats the best so far (None: nothing yet)."""
    return math.isfinite(value) and (best is None or (value > best if higher else value < best))


class Trainer:
    """One training run: set up in __init__ (task, model, engine, run directory, resume), then `run()`.

    `task` is what the run trains (a `TrainingTask`, lmforge/train/task.py); without one, pretraining on the
    prepared data in `data_dir` (and, with `init_from`, from another run's weights)."""

    def __init__(self, config: Config | None, data_dir: str | Path | None, run_dir: str | Path, *,
                 resume: bool = False, overwrite: bool = False, quiet: bool = False,
                 init_from: str | Path | None = None, task: TrainingTask | None = None):
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        if task is None:
            pretraining = {"encoder": MaskedLanguageModelling,
                           "encoder-decoder": SpanCorruption}.get(config.model.arch, LanguageModelling)
            task = pretraining(config, data_dir, self.run_dir, resume=resume, init_from=init_from)
        self.task = task
        self.config = config = self.task.config
        self.tokenizer = self.task.tokenizer
        train = config.train

        device, self.precision = engine_device(config)
        self.cluster, self.device = start_cluster(train, device)  # torchrun: this rank's place and device
        configure_fast_math(self.device)
        torch.manual_seed(train.seed)  # the model's initial weights (a new head's, LoRA's adapters')
        self.model = self.task.build_model(self.device)
        self.engine = build_engine(config, self.task.objective(self.model), self.device, self.precision,
                                   self.cluster, self.say)
        self.average = self._weight_average()
        self.task.start_data(self.cluster, self.device, self.precision)
        self.progress = Progress()
        self.stop_signal: str | None = None
        self.stopped_early = False
        self.saving = False  # a second signal during a save waits for the save to finish
        self.kept_for_lora: set[Path] = set()  # checkpoints pruning keeps for a LoRA run, said once each
        self.made = missing_directories(self.run_dir)  # what a failed start removes, with the run's files
        self.lock = None
        self.resumed = resume
        self.wrote_fresh_run = False  # the run's files are this start's: a failure before a checkpoint removes them
        self.log_writer, self.tensorboard = None, None
        self.closed = False
        try:  # last: a failed check leaves no run behind, and a failure from here on removes what it wrote
            resume_from = self._prepare_run_dir(resume, overwrite, self.task.inputs)
            if resume_from is not None:
                self._restore(*resume_from)
            main = self.cluster.is_main
            self.log_writer = LogWriter(self.run_dir) if main else None
            self.tensorboard = self._open_tensorboard() if train.tensorboard and main else None
        except BaseException:
            self._remove_failed_start()
            raise
        self.last_eval: EvalRecord | None = None  # the latest evaluation
        self.saved: tuple[int, EvalRecord | None] | None = None  # the step of the latest save, and the eval before

    @property
    def optimizers(self) -> list:
        return self.engine.optimizers

    @property
    def forward(self) -> torch.nn.Module:
        """The forward for evaluation: the model, compiled or not, or the scratch engine's."""
        return self.engine.forward

    @property
    def loader(self):
        """Pretraining's data loader (where the windows come from)."""
        return self.task.loader

    # ----- set-up -----
    def _weight_average(self) -> WeightAverage | None:
        """train.ema_decay's average of the weights, where the run has one."""
        ema_decay = self.config.train.ema_decay
        if not ema_decay:
            return None
        if not isinstance(self.task, LanguageModelling):
            raise UserError("train.ema_decay averages a pretraining run's weights; fine-tuning keeps them as "
                            "trained: leave it at 0")
        if self.cluster.distributed:
            raise UserError("train.ema_decay is not implemented under torchrun yet; leave it at 0")
        return WeightAverage(self.model, ema_decay)

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
            return run_checkpoints.newest_readable_checkpoint(run, self.say,
                                                              {**run_checkpoints.STATE_SCHEMA, "loader": dict})
        existing = rundir.refuse_existing_run(run, overwrite)
        self.cluster.barrier()
        if self.cluster.is_main:
            self.wrote_fresh_run = True
            self.task.create_run(run, existing)
        return None

    def _remove_failed_start(self) -> None:
        """Close everything; then a new run that failed before its first checkpoint removes what it wrote (and
        its directory, if this start made it), so the corrected command needs no --overwrite. Only the lock's
        holder removes anything: a run another process writes, or files that were there before, stay."""
        self.close()
        if self.lock is not None and not self.resumed and (self.made or self.wrote_fresh_run) \
                and not run_checkpoints.list_checkpoints(self.run_dir):
            rundir.remove_run(self.run_dir, self.made)

    def _restore(self, path: Path, loaded: tuple) -> None:
        weights, optimizer_states, state, hidden = loaded
        self.task.load_weights(weights, path)
        trained = run_checkpoints.read_training_weights(path)
        if self.average is not None:  # model.safetensors held the average (or, from a run without one, the weights)
            self.average.restart_from_model()
            if trained is None:
                self.say(f"{path} has no training weights (written without train.ema_decay): the average starts "
                         "from its weights")
        if trained is not None:
            self.task.load_weights(trained, path)
        if len(optimizer_states) != len(self.optimizers):
            raise UserError(f"checkpoint {path} was written with another optim.name; resume with the same one")
        for optimizer, optimizer_state in zip(self.optimizers, optimizer_states, strict=True):
            optimizer.load_state_dict(self.cluster.shard_optimizer(optimizer, optimizer_state))
        self.task.load_data_state(state["loader"])
        self.task.restore_carried_state(hidden, self.say)
        self.progress = Progress.from_state(state["progress"])
        run_checkpoints.set_rng_state(state["rng"])
        if self.cluster.is_main:
            rundir.write_config(self.run_dir, self.config)
            run_log.trim_log(self.run_dir, self.progress.step)

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # ----- the loop -----
    def schedule_progress(self, elapsed: float) -> float:
        train = self.config.train
        progress = self.progress.step / train.max_steps
        if train.max_time > 0:
            progress = max(progress, elapsed / train.max_time)
        if train.max_epochs > 0:
            progress = max(progress, self.task.epoch / train.max_epochs)
        return progress

    def stop_reason(self, elapsed: float) -> str | None:
        """Why the loop should stop now, or None to go on (a subclass may add reasons: the sweep's pruning)."""
        if self.stopped_early:
            return "early_stopping"
        return limit_reached(self.config.train, step=self.progress.step, elapsed=elapsed, epochs=self.task.epoch,
                             interrupted=bool(self.stop_signal))

    def run(self) -> dict:
        """Train until a limit is reached, the task's patience runs out or a signal arrives; then the final
        evaluation (unless the task's last one is at this step, or it skips it on a signal) and a checkpoint.

        SIGINT and SIGTERM are handled from the first step until the last checkpoint is on disk: the first stops
        the loop after its step, a second skips the final evaluation, and neither ever interrupts a save. The
        result names the signal (`signal`: its number, or None), so the command exits 128 + that number.
        A start that fails before its first checkpoint (a non-finite loss too) removes what it wrote, so the
        command can simply be run again."""
        previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with self.cluster.collective_failures():
                self._announce()
                return self._finish(self._loop())
        except BaseException:  # a diverged run too: what it saved stays, a start without a checkpoint goes
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
        train = self.config.train
        self.peak = PeakFlops(self.device, self.precision, self.cluster.world_size)
        start = self.task.start_record(
            time=time.time(), device=str(self.device), precision=self.precision, engine=train.engine,
            world_size=self.cluster.world_size, parallel=train.parallel if self.cluster.distributed else None,
            resumed_from_step=self.progress.step)
        self.log(start)
        self.task.announce(start, self.say)

    def _loop(self) -> str:
        """Optimizer steps, with logging, evaluation, samples and checkpoints between them, until a stop reason;
        returns it."""
        train, progress = self.config.train, self.progress
        bar = tqdm(total=train.max_steps, initial=progress.step,
                   disable=True if self.quiet or not self.cluster.is_main else None,
                   unit="step", dynamic_ncols=True, file=sys.stdout)
        launch_start = time.perf_counter() - progress.elapsed
        self.launch = (progress.step, progress.elapsed)
        self.estimated = False  # the time this launch will take has been said
        self.window = (time.perf_counter(), 0)  # start and tokens of the span the next tokens/s measures
        self.loss: torch.Tensor | None = None
        try:
            while (reason := self.stop_reason(elapsed := self._agreed_elapsed(launch_start))) is None:
                fraction = self.schedule_progress(elapsed)
                self.task.set_progress(fraction)  # the data warmups' stage
                multiplier = lr_multiplier(train.schedule, progress.step, fraction,
                                           warmup_steps=train.warmup_steps, min_lr_ratio=train.min_lr_ratio,
                                           cooldown_fraction=train.cooldown_fraction)
                lr = set_lr(self.optimizers, multiplier)
                self.loss, grad_norm = self.engine.step(self.task.next_batch, self.task.accumulation,
                                                        train.grad_clip)
                if self.average is not None:
                    self.average.update(progress.step + 1)
                tokens = self.task.tokens_read()
                progress.step += 1
                progress.tokens += tokens
                self.window = (self.window[0], self.window[1] + tokens)
                progress.elapsed = time.perf_counter() - launch_start
                self._between_steps(lr, grad_norm, bar)
            progress.elapsed = elapsed  # the clock when the run stopped: a time budget is spent in full
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
            flops_per_token = self.task.flops_per_token
            record = TrainRecord(step=step, loss=loss_value, lr=lr, grad_norm=grad_norm.item(),
                                 tokens=self.progress.tokens, tokens_per_s=tokens_per_s, epoch=self.task.epoch,
                                 mfu=self.peak.mfu(flops_per_token * tokens_per_s) if flops_per_token else None,
                                 elapsed=self.progress.elapsed)
            self.log(record)
            self._update_bar(bar, record)
            if not self.estimated and step - self.launch[0] >= ESTIMATE_AFTER_STEPS:
                self._say_estimate(record, bar)
        evaluated = False
        if train.eval_every and step % train.eval_every == 0 and step < train.max_steps:  # else: the final one
            self.run_eval(bar=bar)
            evaluated = True
        if train.sample_every and step % train.sample_every == 0:
            self.run_sample(bar)
        if train.checkpoint_every and step % train.checkpoint_every == 0 or evaluated and self.task.save_at_eval:
            self._stop_if_not_finite(self.loss.item())
            self.save()

    def _finish(self, reason: str) -> dict:
        """The final evaluation, the last checkpoint and the end record."""
        progress, task = self.progress, self.task
        if progress.step > self.launch[0]:  # the last steps may not have been logged: never save a NaN model
            self._stop_if_not_finite(self.loss.item())
        evaluated_here = self.last_eval is not None and self.last_eval.step == progress.step
        if reason == "interrupted" and not task.evaluate_when_interrupted:
            # No evaluation: it would count toward early stopping, so the resumed run would stop at another step
            # than the uninterrupted one. The checkpoint alone lets --resume continue exactly.
            pass
        elif not evaluated_here or task.final_eval_is_wider:
            try:
                self.run_eval(final=True)
            except KeyboardInterrupt:  # a second signal: the user will not wait for the evaluation, but gets the model
                self.say("skipping the final evaluation; saving the checkpoint")
        if self.saved != (progress.step, self.last_eval):
            self.save()
        self.log(EndRecord(step=progress.step, tokens=progress.tokens, elapsed=progress.elapsed, reason=reason,
                           best_step=progress.best_checkpoint_step if task.save_at_eval else None))
        metric, _ = task.metric
        best = "" if progress.best_step is None or not task.save_at_eval else \
            f"; best {metric} {progress.best_metric:.4f} at step {progress.best_step}"
        self.say(f"stopped ({reason}) at step {progress.step}, {progress.tokens:,} tokens, "
                 f"{progress.elapsed:.0f}s{best}; checkpoint saved in {self.run_dir / rundir.CHECKPOINTS}")
        if reason == "interrupted":
            self.say(f"continue with: {task.resume_hint(self.run_dir)}")
        self.close()
        signum = signal.Signals[self.stop_signal].value if self.stop_signal in signal.Signals.__members__ else None
        final = self.last_eval
        return {"reason": reason, "step": progress.step, "signal": signum,
                "val": dataclasses.asdict(final) if final is not None else None,
                "best_step": progress.best_step, "best": progress.best_metric}

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
        saved = run_checkpoints.list_checkpoints(self.run_dir)
        kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint had been saved yet"
        self.log(EndRecord(step=self.progress.step, tokens=self.progress.tokens, elapsed=self.progress.elapsed,
                           reason="non_finite_loss"))
        self.close()
        raise TrainingDiverged(f"training loss became {loss} at step {self.progress.step}; {kept}; "
                               f"lower optim.lr or raise train.warmup_steps and resume or restart")

    def _say_estimate(self, record: TrainRecord, bar: tqdm) -> None:
        """Once per launch: how long its training takes on this machine, at the pace of its steps so far (a fixed
        number of steps, as `make demo` trains, takes longer on a busy or slower machine)."""
        self.estimated = True
        train = self.config.train
        launch_step, launch_elapsed = self.launch
        seconds_per_step = (record.elapsed - launch_elapsed) / (record.step - launch_step)
        end_step = train.max_steps
        if train.max_epochs > 0 and record.epoch > 0:
            end_step = min(end_step, math.ceil(record.step * train.max_epochs / record.epoch))
        remaining = max(end_step - record.step, 0) * seconds_per_step
        if train.max_time > 0:
            remaining = min(remaining, max(train.max_time - record.elapsed, 0.0))
        message = (f"about {record.elapsed - launch_elapsed + remaining:.0f} s of training on this machine "
                   f"({seconds_per_step * 1000:.0f} ms per step over the first {record.step - launch_step}), "
                   f"then the final evaluation")
        (bar.write(message) if not bar.disable else self.say(message))

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
    def run_eval(self, *, final: bool = False, bar: tqdm | None = None) -> EvalRecord:
        """Evaluate, log it, keep track of the best by the task's metric (and of early stopping)."""
        progress = self.progress
        with self._averaged():
            record, message = self.task.evaluate(self.forward, final=final, step=progress.step,
                                                 tokens=progress.tokens, elapsed=progress.elapsed)
        key, higher = self.task.metric
        if better(getattr(record, key), progress.best_metric, higher):
            progress.best_metric, progress.best_step, progress.evals_without_improvement = \
                getattr(record, key), progress.step, 0
        else:
            progress.evals_without_improvement += 1
        patience = self.task.patience
        self.stopped_early = bool(patience) and progress.evals_without_improvement >= patience
        self.last_eval = record
        self.log(record)
        (bar.write(message) if bar is not None and not bar.disable else self.say(message))
        return record

    def run_sample(self, bar: tqdm) -> None:
        with self._averaged():
            sample = self.task.sample(self.progress.step)
        if sample is None:
            return
        self.log(sample)
        (bar.write if not bar.disable else self.say)(f"--- sample at step {sample.step} ---\n{sample.text}\n---")

    def _averaged(self) -> contextlib.AbstractContextManager:
        """The model holds train.ema_decay's average inside the block, if the run keeps one."""
        return self.average.swapped_in() if self.average is not None else contextlib.nullcontext()

    def save(self) -> Path | None:
        progress, last = self.progress, self.last_eval
        key, higher = self.task.metric
        if last is not None and last.step == progress.step and better(getattr(last, key),
                                                                       progress.best_checkpoint_metric, higher):
            progress.best_checkpoint_metric, progress.best_checkpoint_step = getattr(last, key), progress.step
        state = {"progress": vars(progress).copy(), "loader": self.task.data_state()}
        # Every rank takes part in gathering the shards (FSDP); rank 0 alone writes.
        model_state, training_weights = self.task.weights(), None
        if self.average is not None:  # readers (eval, sample, export, init_from) get the average
            model_state, training_weights = self.average.averaged_state(model_state), model_state
        optimizer_states = [self.cluster.gather_optimizer(optimizer.state_dict()) for optimizer in self.optimizers]
        hidden_state = self.task.carried_state()
        self.saved = (progress.step, last)
        if not self.cluster.is_main:
            return None
        self.saving = True
        try:
            path = run_checkpoints.save_checkpoint(self.run_dir, progress.step, model_state, optimizer_states,
                                                   state, hidden_state, training_weights)
            for note in run_checkpoints.prune_checkpoints(self.run_dir, self.config.train.keep_last,
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
