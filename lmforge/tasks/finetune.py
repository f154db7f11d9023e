"""`lmforge finetune`: continue a run's model on task data (classify, sft, translate, qa), fully or with LoRA.

A fine-tuning run is an ordinary run directory: `config.toml` (the base run's [model], this run's [train]
and [optim], and a [finetune] table: task, method, LoRA settings, label names, template, base run),
`tokenizer.json` (the base run's), `log.jsonl` (train records; eval records with the task's metric),
`checkpoints/` and, for the chat tasks, `chat_template.json`. A step trains on `train.batch_size` examples
(no accumulation); every `train.eval_every` steps and at the end the run evaluates on the val split and
writes a checkpoint. The best checkpoint by the task's validation metric (classify: accuracy; the others:
loss on the trained tokens) is kept besides the newest `train.keep_last`; `finetune.patience` evaluations in a
row without improvement stop the run early; `--resume` continues the exact same loss sequence (data order,
RNG and optimizer state are in every checkpoint).

What trains:
- classify: a new head on the last real token (lmforge/tasks/heads.py), cross-entropy over the labels.
- sft, qa: next-token loss on the assistant turns only (ChatTemplate.encode's mask; qa records become a
  user turn "Context: ...\\nQuestion: ..." and the first answer).
- translate: `source + TRANSLATE_SEPARATOR + target + end-of-text`, the loss on the target and end-of-text.
With `--method lora` the base weights stay frozen and the checkpoint's `model.safetensors` holds only what
trains (the adapters, and a classifier's head); `load_finetuned` rebuilds the model from the base run named
in [finetune] and merges the adapters, so every reader sees a plain model. The base run is only ever read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from lmforge import run as ckpt
from lmforge.config import Config, OptimConfig, TrainConfig, dumps_config, from_dict, set_value
from lmforge.data.tokenizer import Tokenizer, load_tokenizer
from lmforge.errors import TrainingDiverged, UserError
from lmforge.files import write_atomic
from lmforge.hardware import autocast, resolve_device, resolve_precision
from lmforge.infer.load import load_model
from lmforge.model.factory import build_model
from lmforge.tasks import lora
from lmforge.tasks.heads import Classifier, check_classify_arch, classify_ids, pad_right, train_only_last_blocks
from lmforge.tasks.records import as_messages, data_file, read_records, translate_prompt
from lmforge.tasks.template import ChatTemplate, load_chat_template
from lmforge.train.optim import build_optimizers, set_lr
from lmforge.train.schedule import SCHEDULES, lr_multiplier

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TASKS = ("classify", "sft", "translate", "qa")
METHODS = ("full", "lora")
IGNORE = -100  # cross_entropy's ignore_index: a target that is not trained on
RUN_FILES = ("config.toml", "tokenizer.json", "log.jsonl", "checkpoints", "chat_template.json", "report")

# Fine-tuning is short and gentle next to pretraining: these replace the pretraining defaults (a base run's
# own [train] and [optim] are not inherited); --section.key flags override them.
FINETUNE_DEFAULTS = {
    "train.batch_size": 8, "train.max_steps": 300, "train.warmup_steps": 10, "train.eval_every": 25,
    "train.log_every": 5, "train.keep_last": 1, "train.schedule": "cosine", "optim.weight_decay": 0.0,
}
LR_DEFAULTS = {"full": 1e-4, "lora": 1e-3}  # LoRA's few zero-started parameters take a larger step


@dataclass
class FinetuneConfig:
    """The [finetune] table of a fine-tuning run's config.toml."""

    task: str = "classify"
    method: str = "full"
    base_run: str = ""  # the run fine-tuned from (absolute path), and its checkpoint used
    base_checkpoint: str = ""
    labels: list[str] = field(default_factory=list)  # classify: label names, in the head's output order
    template: str = ""  # chat (chat_template.json: sft, qa) | translate (TRANSLATE_SEPARATOR) | "" (classify)
    train_blocks: int = 0  # full fine-tuning: train only the last N blocks (+ final norm, heads); 0: all
    patience: int = 5  # evaluations without improvement before stopping early; 0: never
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)  # layer names (lmforge/tasks/lora.py); empty: default


FINETUNE_KEYS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
# What --finetune.KEY / --lora.KEY may set (task, method and train_blocks have flags; the rest is derived);
# all but patience decide which parameters exist and train, so a resumed run keeps them.
USER_KEYS = ("patience", "train_blocks", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def set_finetune_value(config: FinetuneConfig, dotted: str, value: Any) -> None:
    """`finetune.KEY` or `lora.KEY` (= finetune.lora_KEY), typed like the field's default."""
    section, _, key = dotted.partition(".")
    name = f"lora_{key}" if section == "lora" else key
    if name not in USER_KEYS:
        valid = [f"lora.{k[5:]}" if k.startswith("lora_") else f"finetune.{k}" for k in USER_KEYS]
        raise UserError(f"unknown fine-tuning key '{dotted}'; valid keys: {', '.join(valid)}")
    current = getattr(config, name)
    try:
        if isinstance(current, list):
            value = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) \
                else [str(part) for part in value]
        elif isinstance(current, int):
            value = int(value)
        elif isinstance(current, float):
            value = float(value)
        else:
            value = str(value)
    except (TypeError, ValueError):
        raise UserError(f"{dotted} expects {type(current).__name__}, got {value!r}") from None
    setattr(config, name, value)


def check_finetune_config(config: FinetuneConfig) -> None:
    if config.task not in TASKS:
        raise UserError(f"unknown --task '{config.task}'; fine-tuning tasks are {', '.join(TASKS)}")
    if config.method not in METHODS:
        raise UserError(f"unknown --method '{config.method}'; choose {' or '.join(METHODS)}")
    if config.train_blocks < 0:
        raise UserError(f"--train-blocks must be 0 (all) or positive, got {config.train_blocks}")
    if config.train_blocks and config.method == "lora":
        raise UserError("--train-blocks chooses what full fine-tuning trains; with --method lora the adapters "
                        "train (choose layers with --lora.targets)")
    if config.patience < 0:
        raise UserError(f"finetune.patience must be 0 (off) or positive, got {config.patience}")


# ----- the run's config file -----
def dumps_run_config(config: Config, finetune: FinetuneConfig) -> str:
    return dumps_config(config) + "\n" + tomli_w.dumps({"finetune": dataclasses.asdict(finetune)})


def load_run_config(run_dir: str | Path) -> tuple[Config, FinetuneConfig | None]:
    """A run's config and, for a fine-tuning run, its [finetune] table (None for any other run)."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None
    table = data.pop("finetune", None)
    finetune = None
    if table is not None:
        finetune = FinetuneConfig()
        for key, value in table.items():
            if key not in FINETUNE_KEYS:
                raise UserError(f"{path}: unknown key finetune.{key}")
            setattr(finetune, key, value)
    return from_dict(data), finetune


def load_finetune_config(run_dir: str | Path) -> FinetuneConfig | None:
    """The [finetune] table of a run (given as the run or a checkpoint inside it); None if not fine-tuned."""
    return load_run_config(ckpt.resolve_checkpoint(run_dir)[0])[1]


def check_task(run_dir: str | Path, finetune: FinetuneConfig | None, task: str) -> None:
    """A UserError unless the run was fine-tuned for `task` (a run never fine-tuned suits every task but
    classify, which needs the head)."""
    trained = finetune.task if finetune else None
    if task == "classify" and trained != "classify":
        raise UserError(f"{run_dir} was not fine-tuned for classify (it was "
                        f"{'fine-tuned for ' + trained if trained else 'never fine-tuned'}); it has no "
                        "classification head: lmforge finetune RUN --task classify ...")
    if trained == "classify" and task != "classify":
        raise UserError(f"{run_dir} was fine-tuned for classify: it predicts labels, not text, so it cannot "
                        f"do {task}")


# ----- loading a fine-tuned model -----
def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint by the task's validation metric, as the newest checkpoint records it (the newest
    itself if that one is gone)."""
    checkpoints = ckpt.list_checkpoints(run_dir)
    if not checkpoints:
        raise UserError(f"{run_dir} holds no checkpoint")
    try:
        state = json.loads((checkpoints[-1] / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint {checkpoints[-1]} is unreadable ({err})") from None
    best = state.get("progress", {}).get("best_step")
    best_path = ckpt.checkpoint_dir(run_dir, best) if best is not None else checkpoints[-1]
    return best_path if best_path.is_dir() else checkpoints[-1]


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path / "model.safetensors")
    except (OSError, SafetensorError) as err:
        raise UserError(f"checkpoint {path} is unreadable ({err})") from None


def load_finetuned(path: str | Path, device: str | torch.device = "cpu"
                   ) -> tuple[nn.Module, Config, Tokenizer, Path]:
    """The model of any run, ready for inference (eval mode): a fine-tuned one with its LoRA adapters merged
    (a classify run gives a `Classifier` whose `.labels` name its outputs), a plain run as `load_model` gives
    it. A run directory means its best checkpoint for a fine-tuning run (its newest for other runs); a
    checkpoint directory means that one. Also returns the config ([finetune] apart: `load_finetune_config`),
    the tokenizer and the checkpoint used."""
    path = Path(path)
    run_dir, checkpoint = ckpt.resolve_checkpoint(path)
    config, finetune = load_run_config(run_dir)
    if finetune is None:
        return load_model(path, device)
    if checkpoint != path:  # given the run: its best checkpoint
        checkpoint = best_checkpoint(run_dir)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    lora_run = finetune.method == "lora"
    model = build_finetune_model(config, finetune, base_body(finetune, run_dir) if lora_run else None)
    weights = _read_weights(checkpoint)
    if lora_run:
        lora.load_trainable_state(model, weights, str(checkpoint))
        model = lora.merge_lora(model)
    else:
        ckpt.load_weights(model, weights, checkpoint)
    return model.to(device).eval(), config, tokenizer, checkpoint


def load_language_model(path: str | Path, device: str | torch.device = "cpu"
                        ) -> tuple[nn.Module, Config, Tokenizer, Path]:
    """`load_finetuned` for commands that need next-token logits (sample, eval, export): a classify run, whose
    head gives labels instead, is a UserError."""
    loaded = load_finetuned(path, device)
    if isinstance(loaded[0], Classifier):
        raise UserError(f"{path} was fine-tuned for classify: it predicts labels (lmforge predict {path} --text "
                        "...), not next tokens")
    return loaded


def base_body(finetune: FinetuneConfig, run_dir: Path) -> nn.Module:
    """The base model a LoRA run adapts, from the base checkpoint its [finetune] table names."""
    if not Path(finetune.base_checkpoint).is_dir():
        raise UserError(f"{run_dir} is a LoRA run on {finetune.base_checkpoint}, which is gone: its checkpoints "
                        "hold only the adapters")
    return load_base(finetune.base_checkpoint)[0]


def load_base(base_run: str | Path) -> tuple[nn.Module, Config, Tokenizer, Path]:
    """The model to fine-tune from (in train mode): a run trained or imported here, or a fine-tuned
    language-model run (merged)."""
    model, config, tokenizer, checkpoint = load_finetuned(base_run)
    finetune = load_run_config(ckpt.resolve_checkpoint(base_run)[0])[1]
    if finetune is not None and finetune.task == "classify":
        raise UserError(f"{base_run} is a classify run: its language-model head was replaced, so it cannot be "
                        "fine-tuned further; start from its base run")
    return model.train(), config, tokenizer, checkpoint


def build_finetune_model(config: Config, finetune: FinetuneConfig, body: nn.Module | None) -> nn.Module:
    """The model a fine-tuning run trains, on `body` (the base model; None: a freshly built one, for loading a
    full fine-tuning checkpoint into): a classifier's new head, LoRA's adapters, the blocks that train."""
    body = build_model(config.model) if body is None else body
    model = Classifier(body, finetune.labels) if finetune.task == "classify" else body
    if finetune.method == "lora":
        model = lora.apply_lora(model, rank=finetune.lora_rank, alpha=finetune.lora_alpha,
                                dropout=finetune.lora_dropout, targets=finetune.lora_targets,
                                arch=config.model.arch)
        if finetune.task == "classify":  # the new head has nothing to adapt: it trains whole
            for param in model.base_model.model.score.parameters():
                param.requires_grad_(True)
    elif finetune.train_blocks:
        train_only_last_blocks(model, body, finetune.train_blocks)
    return model


# ----- examples -----
@dataclass
class Examples:
    """A split encoded for training: token ids per example, and per task either the label index (classify)
    or which positions' next tokens are trained on."""

    ids: list[list[int]]
    labels: list[int] = field(default_factory=list)
    trained: list[list[bool]] = field(default_factory=list)
    truncated: int = 0  # examples cut from the left to fit the context
    untrainable: int = 0  # examples left without a trained token by that cut (dropped)

    def __len__(self) -> int:
        return len(self.ids)


def encode_record(record: dict, task: str, tokenizer: Tokenizer, template: ChatTemplate
                  ) -> tuple[list[int], list[bool]]:
    """Token ids of an sft, qa or translate record and, per id, whether the loss trains on predicting it."""
    if task == "translate":
        prompt = tokenizer.encode(translate_prompt(record["source"]))
        target = tokenizer.encode(record["target"]) + [tokenizer.eot_id]
        return prompt + target, [False] * len(prompt) + [True] * len(target)
    return template.encode(as_messages(record, task), tokenizer)


def encode_examples(records: list[dict], task: str, tokenizer: Tokenizer, block_size: int,
                    labels: list[str], template: ChatTemplate, origin: Path) -> Examples:
    """Encode a split, keeping each example's last tokens when it is longer than the context (classify:
    block_size tokens; the others: block_size + 1, as inputs and targets are shifted by one)."""
    examples = Examples(ids=[])
    limit = block_size if task == "classify" else block_size + 1
    index = {label: i for i, label in enumerate(labels)}
    for number, record in enumerate(records, start=1):
        if task == "classify":
            if record["label"] not in index:
                raise UserError(f"{origin} record {number}: label '{record['label']}' never appears in the "
                                f"training data (its labels: {', '.join(labels)})")
            ids, trained = tokenizer.encode(record["text"]), []
            examples.labels.append(index[record["label"]])
        else:
            ids, trained = encode_record(record, task, tokenizer, template)
            # what follows the last trained token (the template's turn end) is never a target: keep the room
            end = max((i + 1 for i, keep in enumerate(trained) if keep), default=len(ids))
            ids, trained = ids[:end], trained[:end]
        if len(ids) > limit:
            ids, trained, examples.truncated = ids[-limit:], trained[-limit:], examples.truncated + 1
        if task != "classify":
            # A guard: with the tail after the last reply cut above, every record keeps at least its final
            # end-of-text as a target; eval reports the count (always 0 until templates change).
            if not any(trained[1:]):
                examples.untrainable += 1
                continue
            examples.trained.append(trained)
        examples.ids.append(ids)
    if not examples.ids:
        raise UserError(f"{origin}: no record keeps a trained token within the context of {block_size} tokens")
    return examples


def check_encodable(tokenizer: Tokenizer, records: list[dict], task: str, origin: Path) -> None:
    """A character-level tokenizer maps characters it never saw to one 'unknown' id: refuse such data."""
    if getattr(tokenizer, "unknown_id", None) is None:  # byte-level BPE encodes any text
        return
    fields = {"classify": ("text",), "sft": ("prompt", "response"), "translate": ("source", "target"),
              "qa": ("context", "question", "answers")}[task]
    unknown: dict[str, int] = {}
    for record in records:
        texts = [m["content"] for m in record["messages"]] if "messages" in record else \
            [t for name in fields for t in (record[name] if isinstance(record[name], list) else [record[name]])]
        for text in texts:
            for char in set(text) - set(tokenizer.chars):
                unknown[char] = unknown.get(char, 0) + text.count(char)
    if unknown:
        shown = ", ".join(repr(c) for c in sorted(unknown, key=unknown.get, reverse=True)[:5])
        raise UserError(f"{origin}: the base run's character tokenizer cannot encode {sum(unknown.values())} "
                        f"characters of the data ({len(unknown)} distinct, e.g. {shown}); fine-tune a run "
                        "whose tokenizer covers them")


def lm_batch(examples: Examples, rows: list[int], pad_id: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T), right-padded; a target not trained on (or padding) is IGNORE."""
    inputs, targets = [], []
    for row in rows:
        ids, trained = examples.ids[row], examples.trained[row]
        inputs.append(ids[:-1])
        targets.append([t if keep else IGNORE for t, keep in zip(ids[1:], trained[1:], strict=True)])
    idx, _ = pad_right(inputs, pad_id, device)
    target, _ = pad_right(targets, IGNORE, device)
    return idx, target


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the trained targets only (IGNORE elsewhere contributes exactly 0)."""
    logits, _ = model(inputs)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)


# ----- evaluation -----
def macro_f1(predicted: torch.Tensor, truth: torch.Tensor, classes: int) -> float:
    """The mean over classes of F1 = 2·TP / (2·TP + FP + FN) (a class never predicted nor present scores 0)."""
    scores = []
    for label in range(classes):
        true_positive = int(((predicted == label) & (truth == label)).sum())
        wrong = int(((predicted == label) != (truth == label)).sum())
        scores.append(2 * true_positive / (2 * true_positive + wrong) if true_positive + wrong else 0.0)
    return sum(scores) / classes


@torch.no_grad()
def evaluate_split(model: nn.Module, examples: Examples, task: str, batch_size: int, pad_id: int,
                   device: torch.device, precision: str) -> dict:
    """Classify: val_loss, val_accuracy, val_macro_f1; the others: val_loss (per trained token), val_ppl."""
    was_training = model.training
    model.eval()
    try:
        with autocast(device, precision):
            if task == "classify":
                logits = classify_ids(model, examples.ids, pad_id, batch_size, device)
                truth = torch.tensor(examples.labels)
                predicted = logits.argmax(-1)
                return {"val_loss": F.cross_entropy(logits, truth).item(),
                        "val_accuracy": (predicted == truth).float().mean().item(),
                        "val_macro_f1": macro_f1(predicted, truth, logits.size(-1))}
            total, count = 0.0, 0
            for start in range(0, len(examples), batch_size):
                inputs, targets = lm_batch(examples, list(range(start, min(start + batch_size, len(examples)))),
                                           pad_id, device)
                total += lm_loss(model, inputs, targets, reduction="sum").item()
                count += int((targets != IGNORE).sum())
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def task_loss(model: nn.Module, tokenizer: Tokenizer, records: list[dict], task: str, *, template: ChatTemplate,
              batch_size: int, device: torch.device | str, origin: Path = Path("records")) -> dict:
    """The mean loss (and perplexity) on the tokens an sft, qa or translate run trains on, over these
    records: `eval --task sft` reads this. Also how many records were cut to the context."""
    examples = encode_examples(records, task, tokenizer, model.config.block_size, [], template, origin)
    device = torch.device(device)
    result = evaluate_split(model, examples, task, batch_size, tokenizer.eot_id, device, "fp32")
    return {"loss": result["val_loss"], "perplexity": result["val_ppl"], "truncated": examples.truncated,
            "untrainable": examples.untrainable}


def metric_of(task: str) -> tuple[str, bool]:
    """The log key that picks the best checkpoint, and whether higher is better."""
    return ("val_accuracy", True) if task == "classify" else ("val_loss", False)


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


def finetune_command(base_run: str, *, task: str | None, data: str, out: str, method: str | None = None,
                     train_blocks: int | None = None, overrides: dict[str, str] | None = None,
                     resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict:
    """`lmforge finetune`: set up (every check before anything is written), train, return the outcome."""
    return FinetuneRun(base_run, task=task, data=data, out=out, method=method, train_blocks=train_blocks,
                       overrides=overrides or {}, resume=resume, overwrite=overwrite, quiet=quiet).run()


class FinetuneRun:
    def __init__(self, base_run: str, *, task: str | None, data: str, out: str, method: str | None,
                 train_blocks: int | None, overrides: dict[str, str], resume: bool, overwrite: bool, quiet: bool):
        self.run_dir, self.quiet = Path(out), quiet
        base_dir = ckpt.resolve_checkpoint(base_run)[0]
        if base_dir.resolve() in (self.run_dir.resolve(), *self.run_dir.resolve().parents):
            raise UserError(f"--out {out} is inside the base run {base_dir}; fine-tuning writes a new run and never "
                            "changes its base")
        self.config, self.finetune = self._configure(base_run, task, method, train_blocks, overrides, resume)
        finetune, train = self.finetune, self.config.train

        if resume:  # a full fine-tuning checkpoint holds every weight; a LoRA one needs the base under it
            body = base_body(finetune, self.run_dir) if finetune.method == "lora" else None
            self.tokenizer = load_tokenizer(self.run_dir / "tokenizer.json")
        else:
            body, _, self.tokenizer, base_checkpoint = load_base(base_run)
            finetune.base_checkpoint = str(base_checkpoint.resolve())
        self.template = load_chat_template(self.run_dir) if resume else ChatTemplate()
        self.train_examples, self.val_examples = self._read_data(Path(data), resume)

        self.device = resolve_device(train.device)
        self.precision = resolve_precision(train.precision, self.device)
        torch.manual_seed(train.seed)  # the new head's and the adapters' initial values
        self.model = build_finetune_model(self.config, finetune, body).to(self.device)
        self.trainable, self.total = lora.parameter_counts(self.model)
        self.optimizers = build_optimizers(self.model, self.config.optim, self.device)
        self.progress = Progress()
        self.created = not resume
        if resume:
            self._restore()
        else:
            self._create_run_dir(overwrite)
        self.stop_signal: str | None = None
        self.last_result: dict = {}

    # ----- set-up -----
    def _configure(self, base_run: str, task: str | None, method: str | None, train_blocks: int | None,
                   overrides: dict[str, str], resume: bool) -> tuple[Config, FinetuneConfig]:
        if resume:
            if not ckpt.list_checkpoints(self.run_dir):
                raise UserError(f"--resume: {self.run_dir} holds no checkpoint to resume from")
            config, finetune = load_run_config(self.run_dir)
            if finetune is None:
                raise UserError(f"--resume: {self.run_dir} is not a fine-tuning run")
            asked = {"--task": (task, finetune.task), "--method": (method, finetune.method),
                     "--train-blocks": (train_blocks, finetune.train_blocks)}
            for flag, (given, stored) in asked.items():
                if given is not None and given != stored:
                    raise UserError(f"--resume: {self.run_dir} was started with {flag} {stored}, not {given}")
        else:
            if task is None:
                raise UserError("finetune needs --task (classify, sft, translate or qa)")
            base_config, _ = load_run_config(ckpt.resolve_checkpoint(base_run)[0])
            finetune = FinetuneConfig(task=task, method=method or "full", train_blocks=train_blocks or 0,
                                      base_run=str(ckpt.resolve_checkpoint(base_run)[0].resolve()),
                                      template={"sft": "chat", "qa": "chat", "translate": "translate"}.get(task, ""))
            config = Config(model=base_config.model, train=TrainConfig(), optim=OptimConfig())
            for dotted, value in {**FINETUNE_DEFAULTS, "optim.lr": LR_DEFAULTS[finetune.method]}.items():
                set_value(config, dotted, value)
        for dotted, value in overrides.items():
            if dotted.split(".")[0] in ("finetune", "lora"):
                before = dataclasses.replace(finetune)
                set_finetune_value(finetune, dotted, value)
                if resume and dotted != "finetune.patience" and finetune != before:
                    raise UserError(f"--{dotted}: a resumed run keeps the settings it started with (they decide "
                                    "which parameters exist and train); start a new run to change them")
            elif dotted.startswith("model."):
                raise UserError(f"--{dotted}: a fine-tuning run keeps its base run's model settings")
            else:
                set_value(config, dotted, value)
        check_finetune_config(finetune)
        train = config.train
        if train.engine != "torch":
            raise UserError(f"fine-tuning runs on the torch engine; train.engine '{train.engine}' is not supported "
                            "(the scratch engine has no backward for heads, masks or LoRA)")
        if config.optim.name != "adamw":  # Muon finds its matrices by the plain model's names ("blocks.")
            raise UserError(f"fine-tuning uses optim.name 'adamw', not '{config.optim.name}'")
        for key in ("batch_size", "max_steps", "log_every"):
            if getattr(train, key) <= 0:
                raise UserError(f"train.{key} must be positive")
        if train.schedule not in SCHEDULES:
            raise UserError(f"unknown train.schedule '{train.schedule}'; choose one of {', '.join(SCHEDULES)}")
        if finetune.task == "classify":
            check_classify_arch(config.model.arch)
        return config, finetune

    def _read_data(self, data: Path, resume: bool) -> tuple[Examples, Examples]:
        task, finetune = self.finetune.task, self.finetune
        train_file, val_file = data_file(data, "train"), data_file(data, "val")
        if train_file == val_file:
            raise UserError(f"--data {data}: fine-tuning needs a directory with train and val files")
        train_records, val_records = read_records(train_file, task), read_records(val_file, task)
        for records, origin in ((train_records, train_file), (val_records, val_file)):
            check_encodable(self.tokenizer, records, task, origin)
        if task == "classify":
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
        existing = [name for name in RUN_FILES if (run / name).exists()]
        if existing and not overwrite:
            raise UserError(f"{run} already holds a run ({', '.join(existing)}); continue it with --resume or "
                            "replace it with --overwrite")
        for name in existing:
            path = run / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.made_dir = not run.exists()
        run.mkdir(parents=True, exist_ok=True)
        write_atomic(run / "config.toml", dumps_run_config(self.config, self.finetune))
        self.tokenizer.save(run / "tokenizer.json")
        if self.finetune.template == "chat":
            self.template.save(run)

    def _restore(self) -> None:
        path = ckpt.list_checkpoints(self.run_dir)[-1]
        weights, optimizer_states, state, _ = ckpt.load_checkpoint(path)
        if self.finetune.method == "lora":
            lora.load_trainable_state(self.model, weights, str(path))
        else:
            ckpt.load_weights(self.model, weights, path)
        for optimizer, optimizer_state in zip(self.optimizers, optimizer_states, strict=True):
            optimizer.load_state_dict(optimizer_state)
        self.progress = Progress(**state["progress"])
        ckpt.set_rng_state(state["rng"])
        write_atomic(self.run_dir / "config.toml", dumps_run_config(self.config, self.finetune))
        trim_log(self.run_dir / "log.jsonl", self.progress.step)

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

    def loss_on(self, rows: list[int]) -> torch.Tensor:
        examples, pad_id = self.train_examples, self.tokenizer.eot_id
        with autocast(self.device, self.precision):
            if self.finetune.task == "classify":
                idx, lengths = pad_right([examples.ids[row] for row in rows], pad_id, self.device)
                labels = torch.tensor([examples.labels[row] for row in rows], device=self.device)
                return F.cross_entropy(self.model(idx, lengths).float(), labels)
            return lm_loss(self.model, *lm_batch(examples, rows, pad_id, self.device))

    def run(self) -> dict:
        """Train until a limit, early stopping or a signal; a run that fails before its first checkpoint
        removes what it wrote."""
        try:
            return self._run()
        except BaseException:
            if self.created and not ckpt.list_checkpoints(self.run_dir):
                for name in RUN_FILES:
                    path = self.run_dir / name
                    if path.exists():
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
                if self.made_dir and not any(self.run_dir.iterdir()):
                    self.run_dir.rmdir()
            raise

    def _run(self) -> dict:
        config, train, progress, finetune = self.config, self.config.train, self.progress, self.finetune
        key, _ = metric_of(finetune.task)
        self.log({"kind": "start", "time": time.time(), "task": finetune.task, "method": finetune.method,
                  "params": self.total, "trainable_params": self.trainable, "device": str(self.device),
                  "precision": self.precision, "arch": config.model.arch, "resumed_from_step": progress.step,
                  "train_examples": len(self.train_examples), "val_examples": len(self.val_examples),
                  "truncated_examples": self.train_examples.truncated + self.val_examples.truncated})
        self.say(f"{finetune.task} ({finetune.method}): {self.trainable:,} of {self.total:,} parameters train "
                 f"({self.trainable / self.total:.2%}); device {self.device}, {self.precision}"
                 + (f"; resuming at step {progress.step}" if progress.step else ""))
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.bar = tqdm(total=train.max_steps, initial=progress.step, disable=True if self.quiet else None,
                        unit="step", dynamic_ncols=True, file=sys.stdout)
        launch = time.perf_counter() - progress.elapsed
        reason, last_eval_step = None, None
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
                lr = set_lr(self.optimizers, lr_multiplier(
                    train.schedule, progress.step, schedule_progress, warmup_steps=train.warmup_steps,
                    min_lr_ratio=train.min_lr_ratio, cooldown_fraction=train.cooldown_fraction))
                loss = self.loss_on(self.next_rows())
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad],
                    train.grad_clip if train.grad_clip > 0 else math.inf)
                for optimizer in self.optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                progress.elapsed = time.perf_counter() - launch
                self.bar.update(1)
                evaluating = train.eval_every and progress.step % train.eval_every == 0
                if progress.step % train.log_every == 0 or progress.step == 1 or evaluating:
                    value = loss.item()  # a host-device sync: only when logging, and before any checkpoint
                    if not math.isfinite(value):
                        raise TrainingDiverged(f"training loss became {value} at step {progress.step}; lower "
                                               "optim.lr and start again or resume from the last checkpoint")
                    self.log({"kind": "train", "step": progress.step, "loss": value, "lr": lr,
                              "grad_norm": grad_norm.item(), "epoch": self.epochs(), "elapsed": progress.elapsed})
                    self.bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", epoch=f"{self.epochs():.2f}")
                if evaluating:
                    last_eval_step = progress.step
                    reason = self.evaluate_and_save()
        finally:
            self.bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if last_eval_step != progress.step:
            self.evaluate_and_save()
        final = self.last_result
        self.log({"kind": "end", "step": progress.step, "elapsed": progress.elapsed, "reason": reason,
                  "best_step": progress.best_step, f"best_{key}": progress.best_metric})
        self.say(f"stopped ({reason}) at step {progress.step}; best {key} {progress.best_metric:.4f} at step "
                 f"{progress.best_step}; checkpoints in {self.run_dir / 'checkpoints'}")
        return {"reason": reason, "step": progress.step, "best_step": progress.best_step,
                "best": progress.best_metric, "val": final}

    def stop_reason(self, elapsed: float) -> str | None:
        train = self.config.train
        if self.stop_signal:
            return "interrupted"
        if self.progress.step >= train.max_steps:
            return "max_steps"
        if 0 < train.max_time <= elapsed:
            return "max_time"
        if 0 < train.max_epochs <= self.epochs():
            return "max_epochs"
        return None

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
        key, higher = metric_of(task)
        value = result[key]
        if progress.best_metric is None or (value > progress.best_metric if higher else value < progress.best_metric):
            progress.best_metric, progress.best_step, progress.evals_without_improvement = value, progress.step, 0
        else:
            progress.evals_without_improvement += 1
        self.log({"kind": "eval", "step": progress.step, **result, "elapsed": progress.elapsed})
        message = f"step {progress.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
        self.bar.write(message) if not self.bar.disable else self.say(message)
        model_state = lora.trainable_state(self.model) if self.finetune.method == "lora" else self.model.state_dict()
        ckpt.save_checkpoint(self.run_dir, progress.step, model_state,
                             [optimizer.state_dict() for optimizer in self.optimizers],
                             {"progress": dataclasses.asdict(progress)})
        ckpt.prune_checkpoints(self.run_dir, self.config.train.keep_last, progress.best_step)
        patience = self.finetune.patience
        return "early_stopping" if patience and progress.evals_without_improvement >= patience else None

    # ----- output -----
    def log(self, record: dict) -> None:
        with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)


def trim_log(path: Path, step: int) -> None:
    """Drop log records of steps after `step` (they run again on resume) and any line a kill cut short."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") in ("start", "end") or record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))
