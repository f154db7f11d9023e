"""`lmforge finetune`: continue a run's model on task data (classify, sft, translate, qa), fully or with LoRA.

A fine-tuning run is an ordinary run directory (lmforge/run.py): `config.toml` (the base run's [model], this
run's [train] and [optim], and its [finetune] section: task, method, LoRA settings, label names, template, base
run), `tokenizer.json` (the base run's), `log.jsonl` (typed records; eval records carry the task's metric),
`checkpoints/` and, for the chat tasks, `chat_template.json`. A step trains on `train.batch_size` examples
(no accumulation) through the torch engine (lmforge/train/engine.py), which sees the task as a module whose
forward is the task's loss (`TaskLoss`): the head and LoRA's adapters are parts of that module, not branches of
the loop. Every `train.eval_every` steps and at the end the run evaluates on the val split and writes a
checkpoint. The best checkpoint by the task's validation metric (classify: accuracy; the others: loss on the
trained tokens) is kept besides the newest `train.keep_last`; `finetune.patience` evaluations in a row without
improvement stop the run early; `--resume` continues the exact same loss sequence (data order, RNG and
optimizer state are in every checkpoint).

What trains and how records become examples: lmforge/tasks/examples.py. With `--method lora` the base weights
stay frozen and the checkpoint's `model.safetensors` holds only what trains (the adapters, and a classifier's
head); lmforge/infer/load.py rebuilds the model from the base run named in [finetune] and merges the adapters,
so every reader sees a plain model, after checking the base's weights against the fingerprint (SHA-256) the run
recorded. The base run's files are only ever read; a LoRA run adds a note to its `lora_runs/` folder
(`run.record_lora_dependent`) so that pruning the base's checkpoints keeps the one the adapters fit.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lmforge import run as rundir
from lmforge.config import Config, FinetuneConfig, OptimConfig, TrainConfig, canonical_key, check_config, set_value
from lmforge.data.template import ChatTemplate, load_chat_template
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import TrainingDiverged, UserError
from lmforge.files import missing_directories
from lmforge.infer.load import base_body, load_model
from lmforge.model import lora
from lmforge.model.factory import build_model
from lmforge.model.finetuned import build_finetune_model
from lmforge.tasks.examples import (
    Examples,
    check_encodable,
    check_template_encodable,
    encode_examples,
    evaluate_split,
    training_batch,
)
from lmforge.tasks.kinds import TRAINABLE, TaskKind, task_kind
from lmforge.tasks.records import data_file, read_records
from lmforge.train.engine import build_engine, engine_device
from lmforge.train.optim import set_lr
from lmforge.train.schedule import limit_reached, lr_multiplier

# Fine-tuning is short and gentle next to pretraining: these replace the pretraining defaults (a base run's
# own [train] and [optim] are not inherited); --section.key flags override them.
FINETUNE_DEFAULTS = {
    "train.batch_size": 8, "train.max_steps": 300, "train.warmup_steps": 10, "train.eval_every": 25,
    "train.log_every": 5, "train.keep_last": 1, "train.schedule": "cosine", "optim.weight_decay": 0.0,
}
LR_DEFAULTS = {"full": 1e-4, "lora": 1e-3}  # LoRA's few zero-started parameters take a larger step
# The [finetune] keys a user may set (task, method and train_blocks also have flags; the rest is derived);
# all but patience decide which parameters exist and train, so a resumed run keeps them.
USER_KEYS = ("finetune.patience", "finetune.train_blocks", "finetune.lora_rank", "finetune.lora_alpha",
             "finetune.lora_dropout", "finetune.lora_targets")


def user_spelling(key: str) -> str:
    return key.replace("finetune.lora_", "lora.")


def check_method_keys(method: str, keys: list[str]) -> None:
    """Refuse settings that would do nothing with this method: the LoRA keys on a full fine-tuning run (the
    opposite, finetune.train_blocks with LoRA, is also FinetuneConfig.check_combination's, on values). A sweep
    checks its --param keys here before its first trial, as `finetune` checks its flags."""
    keys = [canonical_key(key) for key in keys]
    if method != "lora":
        unused = [user_spelling(key) for key in keys if key.startswith("finetune.lora_")]
        if unused:
            raise UserError(f"--{', --'.join(unused)}: LoRA settings apply to --method lora only; this run's method "
                            f"is {method}, which would ignore them")
    elif "finetune.train_blocks" in keys:
        raise UserError("finetune.train_blocks chooses what full fine-tuning trains; with --method lora the "
                        "adapters train (choose layers with --lora.targets)")


def load_base(base_run: str | Path) -> tuple[nn.Module, Config, Tokenizer, Path]:
    """The model to fine-tune from (in train mode): a run trained or imported here, or a fine-tuned
    language-model run (merged)."""
    model, config, tokenizer, checkpoint = load_model(base_run)
    if config.finetune is not None and task_kind(config.finetune.task).labelled:
        raise UserError(f"{base_run} is a classify run: its language-model head was replaced, so it cannot be "
                        "fine-tuned further; start from its base run")
    return model.train(), config, tokenizer, checkpoint


class TaskLoss(nn.Module):
    """The task's training loss as a module, the form the torch engine steps: (inputs, targets) -> (None,
    loss). classify: inputs are (token ids, lengths) and targets the label indices; the others: next-token
    loss on the trained targets only."""

    def __init__(self, model: nn.Module, kind: TaskKind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, inputs, targets: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self.kind.loss(self.model, inputs, targets)


# ----- the run -----
@dataclass
class Progress:
    step: int = 0
    elapsed: float = 0.0
    epoch: int = 0
    position: int = 0  # examples of this epoch's order already read
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    tokens: int = 0  # training tokens read (padding not counted)


def finetune_command(base_run: str, *, task: str | None, data: str, out: str, method: str | None = None,
                     train_blocks: int | None = None, overrides: dict[str, str] | None = None,
                     resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict:
    """`lmforge finetune`: set up (every check before anything is written), train, return the outcome."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: choose one")
    return FinetuneRun(base_run, task=task, data=data, out=out, method=method, train_blocks=train_blocks,
                       overrides=overrides or {}, resume=resume, overwrite=overwrite, quiet=quiet).run()


class FinetuneRun:
    def __init__(self, base_run: str, *, task: str | None, data: str, out: str, method: str | None,
                 train_blocks: int | None, overrides: dict[str, str], resume: bool, overwrite: bool, quiet: bool):
        self.run_dir, self.quiet = Path(out), quiet
        base_dir = rundir.resolve_checkpoint(base_run)[0]
        if base_dir.resolve() in (self.run_dir.resolve(), *self.run_dir.resolve().parents):
            raise UserError(f"--out {out} is inside the base run {base_dir}; fine-tuning writes a new run and never "
                            "changes its base")
        self.config, self.finetune = self._configure(base_run, task, method, train_blocks, overrides, resume)
        finetune, train = self.finetune, self.config.train

        if resume:  # a full fine-tuning checkpoint holds every weight; a LoRA one needs the base under it
            body = base_body(finetune, self.run_dir) if finetune.method == "lora" else None
            self.tokenizer = rundir.read_tokenizer(self.run_dir)
        else:
            body, _, self.tokenizer, base_checkpoint = load_base(base_run)
            finetune.base_checkpoint = str(base_checkpoint.resolve())
            finetune.base_fingerprint = rundir.weights_fingerprint(base_checkpoint)
        self.template = load_chat_template(self.run_dir) if resume else ChatTemplate()
        self.data = Path(data).resolve()
        self.train_examples, self.val_examples = self._read_data(self.data, resume)

        self.device, self.precision = engine_device(self.config)
        torch.manual_seed(train.seed)  # the new head's and the adapters' initial values
        self.model = build_finetune_model(self.config, finetune, body).to(self.device)
        self.trainable, self.total = lora.parameter_counts(self.model)
        self.engine = build_engine(self.config, TaskLoss(self.model, task_kind(finetune.task)), self.device,
                                   self.precision)
        self.log_writer: rundir.LogWriter | None = None
        self.progress = Progress()
        self.created = False  # the run's files are this start's: a failure before a checkpoint removes them
        self.made = missing_directories(self.run_dir)  # what a failed start removes, with the run's files
        if not resume:  # refused before the lock is taken, the directory is left as it was (no .lock in it)
            rundir.refuse_existing_run(self.run_dir, overwrite)
        # one writer per run, released when it ends; never where it reads its data
        self.lock = rundir.lock_run(self.run_dir, resume=resume, inputs=[self.data, base_dir])
        try:
            for repair in rundir.clean_leftovers(self.run_dir):
                self.say(repair)
            if resume:
                self._restore()
            else:
                self._create_run_dir(overwrite)
        except BaseException:
            self._remove_failed_start()
            raise
        self.stop_signal: str | None = None
        self.last_result: dict = {}
        self.kept_for_lora: set[Path] = set()  # checkpoints pruning keeps for a LoRA run, said once each

    # ----- set-up -----
    def _configure(self, base_run: str, task: str | None, method: str | None, train_blocks: int | None,
                   overrides: dict[str, str], resume: bool) -> tuple[Config, FinetuneConfig]:
        if resume:
            if not rundir.list_checkpoints(self.run_dir):
                raise UserError(f"--resume: {self.run_dir} holds no checkpoint to resume from")
            config = rundir.read_config(self.run_dir)
            finetune = config.finetune
            if finetune is None:
                raise UserError(f"--resume: {self.run_dir} is not a fine-tuning run")
            asked = {"--task": (task, finetune.task), "--method": (method, finetune.method),
                     "--train-blocks": (train_blocks, finetune.train_blocks)}
            for flag, (given, stored) in asked.items():
                if given is not None and given != stored:
                    raise UserError(f"--resume: {self.run_dir} was started with {flag} {stored}, not {given}")
            given_dir, given_checkpoint = (path.resolve() for path in rundir.resolve_checkpoint(base_run))
            named_checkpoint = (Path(base_run) / rundir.WEIGHTS_FILE).is_file()
            if given_dir != Path(finetune.base_run) or (
                    named_checkpoint and given_checkpoint != Path(finetune.base_checkpoint)):
                raise UserError(f"--resume: {self.run_dir} fine-tunes {finetune.base_checkpoint}, not {base_run}; "
                                f"resume it with that base run (lmforge finetune {finetune.base_run} --resume "
                                f"--out {self.run_dir} ...)")
        else:
            if task is None:
                raise UserError(f"finetune needs --task ({', '.join(TRAINABLE[:-1])} or {TRAINABLE[-1]})")
            base_config = rundir.read_config(rundir.resolve_checkpoint(base_run)[0])
            finetune = FinetuneConfig(task=task, method=method or "full", train_blocks=train_blocks or 0,
                                      base_run=str(rundir.resolve_checkpoint(base_run)[0].resolve()),
                                      template=task_kind(task).template)
            config = Config(model=base_config.model, train=TrainConfig(), optim=OptimConfig(), finetune=finetune)
            for dotted, value in {**FINETUNE_DEFAULTS, "optim.lr": LR_DEFAULTS[finetune.method]}.items():
                set_value(config, dotted, value)
        for dotted, value in overrides.items():
            key = canonical_key(dotted)
            if key.startswith("finetune."):
                if key not in USER_KEYS:
                    raise UserError(f"unknown fine-tuning key '{dotted}'; valid keys: "
                                    f"{', '.join(user_spelling(valid) for valid in USER_KEYS)}")
                check_method_keys(finetune.method, [key])
                before = dataclasses.replace(finetune)
                set_value(config, key, value)
                if resume and key != "finetune.patience" and finetune != before:
                    raise UserError(f"--{dotted}: a resumed run keeps the settings it started with (they decide "
                                    "which parameters exist and train); start a new run to change them")
            elif key.startswith("model."):
                raise UserError(f"--{dotted}: a fine-tuning run keeps its base run's model settings")
            else:
                set_value(config, key, value)
        check_config(config)
        train = config.train
        if not train.eval_every and "finetune.patience" in map(canonical_key, overrides) and finetune.patience:
            raise UserError("--finetune.patience counts evaluations without improvement, but train.eval_every is 0 "
                            "(one evaluation, at the end): set --train.eval_every too, or drop --finetune.patience")
        if train.engine != "torch":
            raise UserError(f"fine-tuning runs on the torch engine; train.engine '{train.engine}' is not supported "
                            "(the scratch engine has no backward for heads, masks or LoRA)")
        if config.optim.name != "adamw":  # Muon finds its matrices by the plain model's names ("blocks.")
            raise UserError(f"fine-tuning uses optim.name 'adamw', not '{config.optim.name}'")
        task_kind(finetune.task).check_arch(config.model.arch)
        return config, finetune

    def _read_data(self, data: Path, resume: bool) -> tuple[Examples, Examples]:
        task, finetune = self.finetune.task, self.finetune
        kind = task_kind(task)
        train_file, val_file = data_file(data, "train"), data_file(data, "val")
        if train_file == val_file:
            raise UserError(f"--data {data}: fine-tuning needs a directory with train and val files")
        check_template_encodable(self.tokenizer, kind, self.template)
        train_records, val_records = read_records(train_file, task), read_records(val_file, task)
        for records, origin in ((train_records, train_file), (val_records, val_file)):
            check_encodable(self.tokenizer, records, task, origin)
        if kind.labelled:
            labels = sorted({record["label"] for record in train_records})
            if resume and labels != finetune.labels:
                raise UserError(f"--resume: {train_file} has labels {labels}, the run was started with "
                                f"{finetune.labels}")
            if len(labels) < 2:
                raise UserError(f"{train_file}: classify needs at least two labels, found {labels}")
            finetune.labels = labels
        block_size = self.config.model.block_size
        encoded = [encode_examples(records, task, self.tokenizer, block_size, finetune.labels, self.template, origin)
                   for records, origin in ((train_records, train_file), (val_records, val_file))]
        self.say(f"data: {len(encoded[0])} training and {len(encoded[1])} validation examples"
                 + "".join(f"; {e.truncated} {split} examples longer than the context ({block_size} tokens) kept "
                           "their last tokens" for e, split in zip(encoded, ("training", "validation"), strict=True)
                           if e.truncated)
                 + "".join(f"; {e.untrainable} {split} examples had no reply left after that and were dropped"
                           for e, split in zip(encoded, ("training", "validation"), strict=True) if e.untrainable))
        return encoded[0], encoded[1]

    def _create_run_dir(self, overwrite: bool) -> None:
        run = self.run_dir
        existing = rundir.refuse_existing_run(run, overwrite)
        self.created = True
        rundir.create_run(run, self.config, self.tokenizer, existing)
        if self.finetune.method == "lora":  # its checkpoints hold only adapters: the base must keep its weights
            rundir.record_lora_dependent(Path(self.finetune.base_checkpoint), run)
        if self.finetune.template == "chat":
            self.template.save(run)

    def _restore(self) -> None:
        path = rundir.list_checkpoints(self.run_dir)[-1]
        weights, optimizer_states, state, _ = rundir.load_checkpoint(path)
        if self.finetune.method == "lora":
            lora.load_trainable_state(self.model, weights, str(path))
        else:
            rundir.load_weights(self.model, weights, path)
        for optimizer, optimizer_state in zip(self.engine.optimizers, optimizer_states, strict=True):
            optimizer.load_state_dict(optimizer_state)
        self.progress = Progress(**state["progress"])
        rundir.set_rng_state(state["rng"])
        rundir.write_config(self.run_dir, self.config)
        rundir.trim_log(self.run_dir, self.progress.step)

    # ----- the loop -----
    def next_rows(self) -> list[int]:
        """The next batch's example indices: each epoch reads a fresh permutation (seeded by seed and epoch,
        so a resumed run reads the same order), the last batch of an epoch possibly smaller."""
        progress, count = self.progress, len(self.train_examples)
        generator = torch.Generator().manual_seed(self.config.train.seed + progress.epoch)
        order = torch.randperm(count, generator=generator).tolist()
        rows = order[progress.position : progress.position + self.config.train.batch_size]
        progress.position += len(rows)
        if progress.position >= count:
            progress.epoch, progress.position = progress.epoch + 1, 0
        return rows

    def next_batch(self) -> tuple:
        """(inputs, targets) of the next batch, as `TaskLoss` takes them; counts the tokens read."""
        rows, examples, pad_id = self.next_rows(), self.train_examples, self.tokenizer.eot_id
        self.progress.tokens += sum(len(examples.ids[row]) for row in rows)
        return training_batch(examples, rows, pad_id, self.device)

    def run(self) -> dict:
        """Train until a limit, early stopping or a signal; a run that fails before its first checkpoint
        removes what it wrote. SIGINT and SIGTERM are handled until the last checkpoint is saved; the result's
        `signal` names the one that stopped the run (None otherwise)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            result = self._run()
            stopped_by = self.stop_signal if self.stop_signal in signal.Signals.__members__ else None
            return {**result, "signal": signal.Signals[stopped_by].value if stopped_by else None}
        except BaseException:
            self._remove_failed_start()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.lock.close()

    def _remove_failed_start(self) -> None:
        """Let go of the lock; a new run that failed before its first checkpoint removes what it wrote (and its
        directory, if this start made it), so the corrected command needs no --overwrite."""
        self.lock.close()
        if (self.created or self.made) and not rundir.list_checkpoints(self.run_dir):
            rundir.remove_run(self.run_dir, self.made)

    def _run(self) -> dict:
        config, train, progress, finetune = self.config, self.config.train, self.progress, self.finetune
        key, _ = task_kind(finetune.task).metric
        with torch.device("meta"):  # the base architecture's sizes, without memory or initialization
            plain = build_model(config.model)
        self.log_writer = rundir.LogWriter(self.run_dir)
        self.log(rundir.StartRecord(
            time=time.time(), params=self.total, params_non_embedding=plain.num_params(include_embeddings=False),
            flops_per_token=plain.flops_per_token(), train_tokens=self.train_examples.tokens,
            val_tokens=self.val_examples.tokens, device=str(self.device), precision=self.precision,
            engine=train.engine, resumed_from_step=progress.step, arch=config.model.arch, data=str(self.data),
            task=finetune.task,
            method=finetune.method, trainable_params=self.trainable))
        self.say(f"{finetune.task} ({finetune.method}): {self.trainable:,} of {self.total:,} parameters train "
                 f"({self.trainable / self.total:.2%}); device {self.device}, {self.precision}"
                 + (f"; resuming at step {progress.step}" if progress.step else ""))
        self.bar = tqdm(total=train.max_steps, initial=progress.step, disable=True if self.quiet else None,
                        unit="step", dynamic_ncols=True, file=sys.stdout)
        launch = time.perf_counter() - progress.elapsed
        reason, last_eval_step = None, None
        logged_tokens, logged_elapsed = progress.tokens, progress.elapsed
        self.model.train()
        try:
            while reason is None:
                elapsed = time.perf_counter() - launch
                reason = self.stop_reason(elapsed)
                if reason:
                    break
                schedule_progress = max(progress.step / train.max_steps,
                                        elapsed / train.max_time if train.max_time > 0 else 0.0,
                                        self.epochs() / train.max_epochs if train.max_epochs > 0 else 0.0)
                lr = set_lr(self.engine.optimizers, lr_multiplier(
                    train.schedule, progress.step, schedule_progress, warmup_steps=train.warmup_steps,
                    min_lr_ratio=train.min_lr_ratio, cooldown_fraction=train.cooldown_fraction))
                loss, grad_norm = self.engine.step(self.next_batch, 1, train.grad_clip)
                progress.step += 1
                progress.elapsed = time.perf_counter() - launch
                self.bar.update(1)
                evaluating = train.eval_every and progress.step % train.eval_every == 0
                if progress.step % train.log_every == 0 or progress.step == 1 or evaluating:
                    value = loss.item()  # a host-device sync: only when logging, and before any checkpoint
                    if not math.isfinite(value):
                        raise TrainingDiverged(f"training loss became {value} at step {progress.step}; lower "
                                               "optim.lr and start again or resume from the last checkpoint")
                    tokens_per_s = (progress.tokens - logged_tokens) / max(progress.elapsed - logged_elapsed, 1e-9)
                    logged_tokens, logged_elapsed = progress.tokens, progress.elapsed
                    self.log(rundir.TrainRecord(step=progress.step, loss=value, lr=lr, grad_norm=grad_norm.item(),
                                                tokens=progress.tokens, tokens_per_s=tokens_per_s,
                                                epoch=self.epochs(), elapsed=progress.elapsed))
                    self.bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", epoch=f"{self.epochs():.2f}")
                if evaluating:
                    last_eval_step = progress.step
                    reason = self.evaluate_and_save()
        finally:
            self.bar.close()
        if last_eval_step != progress.step:
            if reason == "interrupted":
                # No evaluation here: one would count toward finetune.patience, so the resumed run would stop
                # at another step than the uninterrupted one. The checkpoint alone lets --resume continue exactly.
                self.save()
            else:
                self.evaluate_and_save()
        final = self.last_result
        self.log(rundir.EndRecord(step=progress.step, tokens=progress.tokens, elapsed=progress.elapsed,
                                  reason=reason, best_step=progress.best_step))
        self.log_writer.close()
        best = "no evaluation yet" if progress.best_metric is None else \
            f"best {key} {progress.best_metric:.4f} at step {progress.best_step}"
        self.say(f"stopped ({reason}) at step {progress.step}; {best}; checkpoints in {self.run_dir / 'checkpoints'}")
        return {"reason": reason, "step": progress.step, "best_step": progress.best_step,
                "best": progress.best_metric, "val": final}

    def stop_reason(self, elapsed: float) -> str | None:
        return limit_reached(self.config.train, step=self.progress.step, elapsed=elapsed, epochs=self.epochs(),
                             interrupted=bool(self.stop_signal))

    def epochs(self) -> float:
        return self.progress.epoch + self.progress.position / len(self.train_examples)

    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal:
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name
        print(f"\n{self.stop_signal}: finishing this step, then saving a checkpoint", file=sys.stderr)

    def evaluate_and_save(self) -> str | None:
        """Evaluate on the validation split, log it, save a checkpoint (keeping the best and the newest), and
        say "early_stopping" when the metric has not improved for `patience` evaluations."""
        progress, task = self.progress, self.finetune.task
        result = evaluate_split(self.model, self.val_examples, task, self.config.train.batch_size,
                                self.tokenizer.eot_id, self.device, self.precision)
        self.last_result = result
        key, higher = task_kind(task).metric
        value = result[key]
        if progress.best_metric is None or (value > progress.best_metric if higher else value < progress.best_metric):
            progress.best_metric, progress.best_step, progress.evals_without_improvement = value, progress.step, 0
        else:
            progress.evals_without_improvement += 1
        self.log(rundir.EvalRecord(step=progress.step, tokens=self.val_examples.tokens, val_loss=result["val_loss"],
                                   val_ppl=result["val_ppl"], elapsed=progress.elapsed, final=True,
                                   val_accuracy=result.get("val_accuracy"), val_macro_f1=result.get("val_macro_f1")))
        message = f"step {progress.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
        self.bar.write(message) if not self.bar.disable else self.say(message)
        self.save()
        patience = self.finetune.patience
        return "early_stopping" if patience and progress.evals_without_improvement >= patience else None

    def save(self) -> None:
        """Write a checkpoint of the current step (keeping the best and the newest `train.keep_last`)."""
        progress = self.progress
        model_state = lora.trainable_state(self.model) if self.finetune.method == "lora" else self.model.state_dict()
        rundir.save_checkpoint(self.run_dir, progress.step, model_state,
                               [optimizer.state_dict() for optimizer in self.engine.optimizers],
                               {"progress": dataclasses.asdict(progress)})
        for note in rundir.prune_checkpoints(self.run_dir, self.config.train.keep_last, progress.best_step,
                                             self.kept_for_lora):
            self.say(note)

    # ----- output -----
    def log(self, record: rundir.Record) -> None:
        self.log_writer.write(record)

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)


