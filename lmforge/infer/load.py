"""A run's model, ready for inference: built from the run's config, weights from its checkpoint.

Any run loads here: one trained or imported (its newest checkpoint), or a fine-tuning run (its best checkpoint
by the task's validation metric). A LoRA run's checkpoints hold only the adapters (and a classifier's head):
its base model is rebuilt from the base run its [finetune] section names and the adapters are merged in, so
every reader sees a plain model. A classify run's model is a `Classifier` (labels, not next tokens):
`load_language_model` and `load_for_inference`, for commands that need next-token logits, refuse it by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.config import Config, FinetuneConfig
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.hardware import resolve_device
from lmforge.model import lora
from lmforge.model.factory import build_model
from lmforge.model.finetuned import build_finetune_model
from lmforge.model.heads import Classifier
from lmforge.run import (
    STATE_FILE,
    checkpoint_dir,
    list_checkpoints,
    load_weights,
    read_config,
    read_tokenizer,
    read_weights,
    removed_meanwhile,
    resolve_checkpoint,
    weights_fingerprint,
)
from lmforge.scratch.module import ScratchForward


def best_checkpoint(run_dir: Path) -> Path:
    """A fine-tuning run's best checkpoint by the task's validation metric, as its newest checkpoint records
    it (the newest itself if that one is gone)."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise UserError(f"{run_dir} holds no checkpoint")
    try:
        state = json.loads((checkpoints[-1] / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        if not checkpoints[-1].is_dir():
            raise removed_meanwhile(checkpoints[-1]) from None
        raise UserError(f"checkpoint {checkpoints[-1]} is unreadable ({err})") from None
    best = state.get("progress", {}).get("best_step")
    best_path = checkpoint_dir(run_dir, best) if best is not None else checkpoints[-1]
    return best_path if best_path.is_dir() else checkpoints[-1]


def base_body(finetune: FinetuneConfig, run_dir: Path) -> torch.nn.Module:
    """The base model a LoRA run adapts, from the base checkpoint its [finetune] section names."""
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
    return load_model(finetune.base_checkpoint)[0]


def load_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, Config, Tokenizer, Path]:
    """The model of any run (in eval mode), its config and tokenizer, and the checkpoint used. A run directory
    means its newest checkpoint, or a fine-tuning run's best; a checkpoint directory means that one."""
    path = Path(path)
    run_dir, checkpoint = resolve_checkpoint(path)
    config = read_config(run_dir)
    tokenizer = read_tokenizer(run_dir)
    finetune = config.finetune
    if finetune is None:
        model = build_model(config.model)
        load_weights(model, read_weights(checkpoint), checkpoint)
        return model.to(device).eval(), config, tokenizer, checkpoint
    if checkpoint != path:  # given the run: its best checkpoint
        checkpoint = best_checkpoint(run_dir)
    lora_run = finetune.method == "lora"
    model = build_finetune_model(config, finetune, base_body(finetune, run_dir) if lora_run else None)
    weights = read_weights(checkpoint)
    if lora_run:
        lora.load_trainable_state(model, weights, str(checkpoint))
        model = lora.merge_lora(model)
    else:
        load_weights(model, weights, checkpoint)
    return model.to(device).eval(), config, tokenizer, checkpoint


def load_language_model(path: str | Path, device: str | torch.device = "cpu"
                        ) -> tuple[torch.nn.Module, Config, Tokenizer, Path]:
    """`load_model` for commands that need next-token logits (sample, eval, export, chat): a classify run,
    whose head gives labels instead, is a UserError."""
    loaded = load_model(path, device)
    if isinstance(loaded[0], Classifier):
        raise UserError(f"{path} was fine-tuned for classify: it predicts labels (lmforge predict {path} --text "
                        "...), not next tokens")
    return loaded


def load_for_inference(run: str | Path, device: str = "auto", engine: str = "torch"
                       ) -> tuple[torch.nn.Module, Config, Tokenizer, Path, torch.device]:
    """The run's language model on `device` (the scratch engine: its NumPy forward, on the CPU), config,
    tokenizer, checkpoint used, and the device. A LoRA run's model comes merged; a classify run is refused."""
    resolved = torch.device("cpu") if engine == "scratch" else resolve_device(device, "--device")
    model, config, tokenizer, checkpoint = load_language_model(run, resolved)
    if engine == "scratch":
        model = ScratchForward(model)
    return model, config, tokenizer, checkpoint, resolved
