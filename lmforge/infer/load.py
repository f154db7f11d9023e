"""A run, loaded once for a command: `load_run` returns one `LoadedRun` (model, config, tokenizer, checkpoint,
run directory, device and, when asked, the chat template).

Any run loads here: one trained or imported (its newest checkpoint), or a fine-tuning run (its best checkpoint
by the task's validation metric, the rule of `lmforge.run.checkpoints.best_checkpoint`). A LoRA run's
checkpoints hold only the adapters (and a classifier's head): its base model is rebuilt from the base run its
[finetune] section names and the adapters are merged in, so every reader sees a plain model. A classify run's
model is a `Classifier` (labels, not next tokens): commands that need next-token logits (the default,
`language_model=True`) refuse it by name; those that take any fine-tuned model pass `language_model=False`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config.sections import Config, FinetuneConfig
from lmforge.data.template import ChatTemplate, load_chat_template
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.hardware import resolve_device
from lmforge.model import lora
from lmforge.model.factory import build_model
from lmforge.model.finetuned import build_finetune_model
from lmforge.model.heads import Classifier
from lmforge.run.checkpoints import (
    best_checkpoint,
    list_checkpoints,
    load_weights,
    read_weights,
    resolve_checkpoint,
    weights_fingerprint,
)
from lmforge.run.directory import read_config, read_tokenizer
from lmforge.scratch.module import ScratchForward


@dataclass(frozen=True)
class LoadedRun:
    """What a command needs of a run, read once. `model` is in eval mode on `device` (the scratch engine: its
    NumPy forward, on the CPU); `checkpoint` is the one its weights came from; `chat_template` is None unless
    `load_run` was asked for it."""

    model: torch.nn.Module
    config: Config
    tokenizer: Tokenizer
    checkpoint: Path
    run_dir: Path
    device: torch.device
    chat_template: ChatTemplate | None = None


def load_run(path: str | Path, *, device: str | torch.device = "cpu", engine: str = "torch",
             language_model: bool = True, chat_template: bool = False) -> LoadedRun:
    """Load the run at `path`: a run directory means its newest checkpoint, or a fine-tuning run's best; a
    checkpoint directory means that one. `device` is a --device setting ("auto", "cpu", ...; its errors name
    --device) or a torch device already resolved. `language_model`: refuse a classify run, which predicts
    labels, not next tokens. `chat_template`: also read the run's chat template (its default if it has none)."""
    resolved = torch.device("cpu") if engine == "scratch" else (
        device if isinstance(device, torch.device) else resolve_device(device, "--device"))
    model, config, tokenizer, run_dir, checkpoint = _read_model(Path(path))
    if language_model and isinstance(model, Classifier):
        raise UserError(f"{path} was fine-tuned for classify: it predicts labels (lmforge predict {path} --text "
                        "...), not next tokens")
    model = model.to(resolved).eval()
    if engine == "scratch":
        model = ScratchForward(model)
    return LoadedRun(model=model, config=config, tokenizer=tokenizer, checkpoint=checkpoint, run_dir=run_dir,
                     device=resolved, chat_template=load_chat_template(run_dir) if chat_template else None)


def _read_model(path: Path) -> tuple[torch.nn.Module, Config, Tokenizer, Path, Path]:
    """The run's model with its weights (on the CPU, not yet in eval mode), config, tokenizer, run directory
    and the checkpoint used."""
    run_dir, checkpoint = resolve_checkpoint(path)
    config = read_config(run_dir)
    tokenizer = read_tokenizer(run_dir)
    finetune = config.finetune
    if finetune is None:
        model = build_model(config.model)
        load_weights(model, read_weights(checkpoint), checkpoint)
        return model, config, tokenizer, run_dir, checkpoint
    if checkpoint != path:  # given the run: its best checkpoint
        checkpoint = best_checkpoint(run_dir)
    lora_run = finetune.method == "lora"
    model = build_finetune_model(config, finetune, lora_base(finetune, run_dir) if lora_run else None)
    weights = read_weights(checkpoint)
    if lora_run:
        lora.load_trainable_state(model, weights, str(checkpoint))
        model = lora.merge_lora(model)
    else:
        load_weights(model, weights, checkpoint)
    return model, config, tokenizer, run_dir, checkpoint


def lora_base(finetune: FinetuneConfig, run_dir: Path) -> torch.nn.Module:
    """The base model a LoRA run adapts (in eval mode, on the CPU), from the base checkpoint its [finetune]
    section names."""
    if not Path(finetune.base_checkpoint).is_dir():
        left = [path.name for path in list_checkpoints(Path(finetune.base_run))] if finetune.base_run else []
        raise UserError(f"{run_dir} is a LoRA run on {finetune.base_checkpoint}, which is gone (its base run "
                        f"holds {', '.join(left) if left else 'no checkpoint'}): its checkpoints hold only the "
                        "adapters, so fine-tune again from a base that exists")
    # Runs made before fingerprints were recorded have none to compare.
    if finetune.base_fingerprint and weights_fingerprint(Path(finetune.base_checkpoint)) != finetune.base_fingerprint:
        raise UserError(f"{run_dir} is a LoRA run on {finetune.base_checkpoint}, whose weights have changed since "
                        "it was fine-tuned (the base was trained again into the same directory?): its adapters fit "
                        "the old weights only; restore them, or fine-tune again from the new base")
    return load_run(finetune.base_checkpoint, language_model=False).model
