"""A trained run's model, ready for inference: built from the run's config, weights from its checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.config import Config
from lmforge.data.tokenizer import Tokenizer
from lmforge.hardware import resolve_device
from lmforge.model.factory import build_model
from lmforge.run import load_weights, read_config, read_tokenizer, read_weights, resolve_checkpoint
from lmforge.scratch.module import ScratchForward


def load_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, Config, Tokenizer, Path]:
    """The trained model of a run (in eval mode), its config and tokenizer, and the checkpoint used."""
    run_dir, checkpoint = resolve_checkpoint(path)
    config = read_config(run_dir)
    tokenizer = read_tokenizer(run_dir)
    model = build_model(config.model)
    load_weights(model, read_weights(checkpoint), checkpoint)
    return model.to(device).eval(), config, tokenizer, checkpoint


def load_for_inference(run: str | Path, device: str = "auto", engine: str = "torch"
                       ) -> tuple[torch.nn.Module, Config, Tokenizer, Path, torch.device]:
    """The run's model on `device` (the scratch engine: its NumPy forward, on the CPU), config, tokenizer,
    checkpoint used, and the device."""
    resolved = torch.device("cpu") if engine == "scratch" else resolve_device(device, "--device")
    model, config, tokenizer, checkpoint = load_model(run, resolved)
    if engine == "scratch":
        model = ScratchForward(model)
    return model, config, tokenizer, checkpoint, resolved
