"""`lmforge finetune`: continue a run's model on task data (classify, sft, translate, qa), fully or with LoRA.

A fine-tuning run is an ordinary run directory (lmforge/run/): `config.toml` (the base run's [model], this
run's [train] and [optim], and its [finetune] section: task, method, LoRA settings, label names, template, base
run), `tokenizer.json` (the base run's), `log.jsonl` (typed records; eval records carry the task's metric),
`checkpoints/` and, for the chat tasks, `chat_template.json`. A step trains on `train.batch_size` examples
(no accumulation). The run is an ordinary `Trainer` run (lmforge/train/trainer.py) driven by `FinetuneTask`:
the engine sees the task as a module whose forward is the task kind's loss (`TaskLoss`), so the head and LoRA's
adapters are parts of that module, not branches of the loop. Every `train.eval_every` steps and at the end the
run evaluates on the val split and writes a checkpoint. The best checkpoint by the kind's validation metric
(classify: accuracy; the others: loss on the trained tokens) is kept besides the newest `train.keep_last`;
`finetune.patience` evaluations in a row without improvement stop the run early; `--resume` continues the
exact same loss sequence (data order, RNG and optimizer state are in every checkpoint). The run's config comes
from lmforge/tasks/finetune_config.py.

What trains and how records become examples: lmforge/tasks/examples.py and the kinds (lmforge/tasks/kinds.py).
With `--method lora` the base weights stay frozen and the checkpoint's `model.safetensors` holds only what
trains (the adapters, and a classifier's head); lmforge/infer/load.py rebuilds the model from the base run named
in [finetune] and merges the adapters, so every reader sees a plain model, after checking the base's weights
against the fingerprint (SHA-256) the run recorded. The base run's files are only ever read; a LoRA run adds a
note to its `lora_runs/` folder (`run.checkpoints.record_lora_dependent`) so that pruning the base's
checkpoints keeps the one the adapters fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.config.sections import Config
from lmforge.data.template import ChatTemplate, load_chat_template
from lmforge.errors import UserError
from lmforge.infer.load import LoadedRun, load_run, lora_base
from lmforge.model import lora
from lmforge.model.factory import build_model
from lmforge.model.finetuned import build_finetune_model
from lmforge.model.spans import start_token
from lmforge.run import checkpoints as run_checkpoints
from lmforge.run import directory as rundir
from lmforge.run.log import EvalRecord, StartRecord
from lmforge.tasks.examples import (
    Examples,
    check_encodable,
    check_template_encodable,
    encode_examples,
    evaluate_split,
    training_batch,
)
from lmforge.tasks.finetune_config import configure
from lmforge.tasks.kinds import TaskKind, task_kind
from lmforge.tasks.records import data_file, read_records
from lmforge.train.distributed import Cluster
from lmforge.train.schedule import DATA_WARMUPS
from lmforge.train.trainer import Trainer


def load_base(base_run: str | Path) -> LoadedRun:
    """The run to fine-tune from, its model in train mode: a run trained or imported here, or a fine-tuned
    language-model run (merged)."""
    loaded = load_run(base_run, language_model=False)
    if loaded.config.finetune is not None and task_kind(loaded.config.finetune.task).labelled:
        raise UserError(f"{base_run} is a classify run: its language-model head was replaced, so it cannot be "
                        "fine-tuned further; start from its base run")
    loaded.model.train()
    return loaded


class TaskLoss(nn.Module):
    """The task's training loss as a module, the form the torch engine steps: (inputs, targets) -> (None,
    loss). classify: inputs are (token ids, lengths) and targets the label indices; the others: next-token
    loss on the trained targets only."""

    def __init__(self, model: nn.Module, kind: TaskKind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, inputs, targets: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self.kind.loss(self.model, inputs, targets)


def finetune_command(base_run: str, *, task: str | None, data: str, out: str, method: str | None = None,
                     train_blocks: int | None = None, overrides: dict[str, str] | None = None,
                     resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict:
    """`lmforge finetune`: set up (every check before anything is written), train, return the outcome."""
    return finetune_trainer(base_run, task=task, data=data, out=out, method=method, train_blocks=train_blocks,
                            overrides=overrides or {}, resume=resume, overwrite=overwrite, quiet=quiet).run()


def finetune_trainer(base_run: str, *, task: str | None, data: str, out: str, method: str | None,
                     train_blocks: int | None, overrides: dict[str, str], resume: bool, overwrite: bool,
                     quiet: bool, trainer_class: type[Trainer] = Trainer, **trainer_args) -> Trainer:
    """The trainer of a fine-tuning run (`trainer_class`, with `trainer_args`: the sweep's trial trainer)."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: choose one")
    run_dir = Path(out)
    base_dir = run_checkpoints.resolve_checkpoint(base_run)[0]
    if base_dir.resolve() in (run_dir.resolve(), *run_dir.resolve().parents):
        raise UserError(f"--out {out} is inside the base run {base_dir}; fine-tuning writes a new run and never "
                        "changes its base")
    config = configure(base_run, run_dir, task, method, train_blocks, overrides, resume)
    finetune_task = FinetuneTask(config, base_run, Path(data), run_dir, resume=resume,
                                 say=None if quiet else lambda message: print(message, flush=True))
    return trainer_class(**trainer_args, config=None, data_dir=None, run_dir=run_dir, resume=resume,
                         overwrite=overwrite, quiet=quiet, task=finetune_task)


class FinetuneTask:
    """Fine-tuning as the trainer's task: the base model with its head or adapters, the task's examples in a
    fresh seeded order each epoch, and the kind's validation metric: a `TrainingTask` (lmforge/train/task.py)."""

    save_at_eval = True  # every evaluation is saved, so the best by the metric is a checkpoint to keep
    evaluate_when_interrupted = False  # an evaluation counts toward patience: an interrupted run only saves
    final_eval_is_wider = False  # every evaluation reads the whole val split
    accumulation = 1
    flops_per_token = None  # no MFU: the tokens of a batch are not all computed alike (padding, a head)

    def __init__(self, config: Config, base_run: str, data: Path, run_dir: Path, *, resume: bool, say):
        self.config, self.finetune = config, config.finetune
        for option in DATA_WARMUPS:
            if getattr(config.train, option):
                raise UserError(f"train.{option} is a pretraining schedule; fine-tuning reads whole examples: "
                                f"leave train.{option} = 0")
        self.kind = task_kind(self.finetune.task)
        self.metric, self.patience = self.kind.metric, self.finetune.patience
        self.data = data.resolve()
        self.inputs = [self.data, run_checkpoints.resolve_checkpoint(base_run)[0]]
        if resume:  # a full fine-tuning checkpoint holds every weight; a LoRA one needs the base under it
            self.body = lora_base(self.finetune, run_dir) if self.finetune.method == "lora" else None
            self.tokenizer = rundir.read_tokenizer(run_dir)
        else:
            base = load_base(base_run)
            self.body, self.tokenizer, base_checkpoint = base.model, base.tokenizer, base.checkpoint
            self.finetune.base_checkpoint = str(base_checkpoint.resolve())
            self.finetune.base_fingerprint = run_checkpoints.weights_fingerprint(base_checkpoint)
        self.template = load_chat_template(run_dir) if resume else ChatTemplate()
        self.train_examples, self.val_examples = self._read_data(resume, say or (lambda message: None))
        self.epoch_count, self.position = 0, 0  # epochs done, and examples of this epoch's order already read
        self.tokens = 0  # training tokens read since the trainer last asked (padding not counted)

    def _read_data(self, resume: bool, say) -> tuple[Examples, Examples]:
        finetune, kind, data = self.finetune, self.kind, self.data
        train_file, val_file = data_file(data, "train"), data_file(data, "val")
        if train_file == val_file:
            raise UserError(f"--data {data}: fine-tuning needs a directory with train and val files")
        check_template_encodable(self.tokenizer, kind, self.template)
        train_records, val_records = read_records(train_file, kind.name), read_records(val_file, kind.name)
        for records, origin in ((train_records, train_file), (val_records, val_file)):
            check_encodable(self.tokenizer, records, kind.name, origin)
        if kind.labelled:
            labels = sorted({record["label"] for record in train_records})
            if resume and labels != finetune.labels:
                raise UserError(f"--resume: {train_file} has labels {labels}, the run was started with "
                                f"{finetune.labels}")
            if len(labels) < 2:
                raise UserError(f"{train_file}: classify needs at least two labels, found {labels}")
            finetune.labels = labels
        block_size = self.config.model.block_size
        # an encoder-decoder's examples: the prompt to the encoder, the reply to the decoder after its start token
        start_id = start_token(self.config.model) if self.config.model.arch == "encoder-decoder" else None
        encoded = [encode_examples(records, kind.name, self.tokenizer, block_size, finetune.labels, self.template,
                                   origin, start_id)
                   for records, origin in ((train_records, train_file), (val_records, val_file))]
        splits = ("training", "validation")
        say(f"data: {len(encoded[0])} training and {len(encoded[1])} validation examples"
            + "".join(f"; {e.truncated} {split} examples longer than the context ({block_size} tokens) kept "
                      + ("their source's last and their target's first tokens" if start_id is not None
                         else "their last tokens")
                      for e, split in zip(encoded, splits, strict=True) if e.truncated)
            + "".join(f"; {e.untrainable} {split} examples had no reply left after that and were dropped"
                      for e, split in zip(encoded, splits, strict=True) if e.untrainable))
        return encoded[0], encoded[1]

    # ----- the model -----
    def build_model(self, device: torch.device) -> nn.Module:
        self.model = build_finetune_model(self.config, self.finetune, self.body).to(device)
        self.body = None  # the model holds it now
        self.model.train()
        self.trainable, self.total = lora.parameter_counts(self.model)
        return self.model

    def objective(self, model: nn.Module) -> nn.Module:
        return TaskLoss(model, self.kind)

    # ----- the data -----
    def start_data(self, cluster: Cluster, device: torch.device, precision: str) -> None:
        self.device, self.precision = device, precision

    def set_progress(self, progress: float) -> None:
        """Fine-tuning has no data schedule."""

    def next_rows(self) -> list[int]:
        """The next batch's example indices: each epoch reads a fresh permutation (seeded by seed and epoch,
        so a resumed run reads the same order), the last batch of an epoch possibly smaller."""
        count = len(self.train_examples)
        generator = torch.Generator().manual_seed(self.config.train.seed + self.epoch_count)
        order = torch.randperm(count, generator=generator).tolist()
        rows = order[self.position : self.position + self.config.train.batch_size]
        self.position += len(rows)
        if self.position >= count:
            self.epoch_count, self.position = self.epoch_count + 1, 0
        return rows

    def next_batch(self) -> tuple:
        """(inputs, targets) of the next batch, as `TaskLoss` takes them; counts the tokens read."""
        rows, examples = self.next_rows(), self.train_examples
        self.tokens += sum(len(examples.ids[row]) for row in rows)
        return training_batch(examples, rows, self.tokenizer.eot_id, self.device)

    def tokens_read(self) -> int:
        tokens, self.tokens = self.tokens, 0
        return tokens

    @property
    def epoch(self) -> float:
        return self.epoch_count + self.position / len(self.train_examples)

    def data_state(self) -> dict:
        return {"epoch": self.epoch_count, "position": self.position}

    def load_data_state(self, state: dict) -> None:
        self.epoch_count, self.position = state["epoch"], state["position"]

    # ----- checkpoints -----
    def weights(self) -> dict[str, torch.Tensor]:
        """A LoRA run saves only what trains (the adapters, a classifier's head); a full one every weight."""
        return lora.trainable_state(self.model) if self.finetune.method == "lora" else self.model.state_dict()

    def load_weights(self, weights: dict[str, torch.Tensor], path: Path) -> None:
        if self.finetune.method == "lora":
            lora.load_trainable_state(self.model, weights, str(path))
        else:
            run_checkpoints.load_weights(self.model, weights, path)

    def carried_state(self) -> dict[str, torch.Tensor]:
        return {}

    def restore_carried_state(self, hidden: dict[str, torch.Tensor], say) -> None:
        pass

    def create_run(self, run_dir: Path, replace: bool) -> None:
        rundir.create_run(run_dir, self.config, self.tokenizer, replace)
        if self.finetune.method == "lora":  # its checkpoints hold only adapters: the base must keep its weights
            run_checkpoints.record_lora_dependent(Path(self.finetune.base_checkpoint), run_dir)
        if self.finetune.template == "chat":
            self.template.save(run_dir)

    # ----- what the run says -----
    def start_record(self, *, engine: str, device: str, precision: str, resumed_from_step: int,
                     **common) -> StartRecord:
        with torch.device("meta"):  # the base architecture's sizes, without memory or initialization
            plain = build_model(self.config.model)
        finetune = self.finetune
        return StartRecord(
            params=self.total, params_non_embedding=plain.num_params(include_embeddings=False),
            flops_per_token=plain.flops_per_token(), train_tokens=self.train_examples.tokens,
            val_tokens=self.val_examples.tokens, device=device, precision=precision, engine=engine,
            resumed_from_step=resumed_from_step, arch=self.config.model.arch, data=str(self.data),
            task=finetune.task, method=finetune.method, trainable_params=self.trainable, **common)

    def announce(self, start: StartRecord, say) -> None:
        say(f"{self.finetune.task} ({self.finetune.method}): {self.trainable:,} of {self.total:,} parameters train "
            f"({self.trainable / self.total:.2%}); device {start.device}, {start.precision}"
            + (f"; resuming at step {start.resumed_from_step}" if start.resumed_from_step else ""))

    def resume_hint(self, run_dir: Path) -> str:
        return f"lmforge finetune {self.finetune.base_run} --resume --data {self.data} --out {run_dir}"

    # ----- evaluation -----
    def evaluate(self, forward: nn.Module, *, final: bool, step: int, tokens: int, elapsed: float
                 ) -> tuple[EvalRecord, str]:
        """The kind's validation metrics on the whole val split (`forward` is the engine's: the model is ours)."""
        result = evaluate_split(self.model, self.val_examples, self.kind.name, self.config.train.batch_size,
                                self.tokenizer.eot_id, self.device, self.precision)
        record = EvalRecord(step=step, tokens=self.val_examples.tokens, val_loss=result["val_loss"],
                            val_ppl=result["val_ppl"], elapsed=elapsed, final=final,
                            val_accuracy=result.get("val_accuracy"), val_macro_f1=result.get("val_macro_f1"))
        return record, f"step {step}: " + ", ".join(f"{key} {value:.4f}" for key, value in result.items())

    def sample(self, step: int) -> None:
        """Fine-tuning writes no samples during training."""
        return None
