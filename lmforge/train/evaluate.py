"""Validation: mean next-token loss over a split's windows, with perplexity and bits per byte."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.data.loader import TokenWindows, eval_batches
from lmforge.train.hardware import autocast


@torch.no_grad()
def evaluate(model: nn.Module, windows: TokenWindows, *, batch_size: int, max_windows: int | None,
             device: torch.device, precision: str, bytes_per_token: float | None) -> dict:
    """Loss in nats per token; bits per byte = loss / ln 2 * tokens / bytes, comparable across tokenizers
    (None when the byte count of the text is unknown)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for inputs, targets in eval_batches(windows, batch_size, max_windows, device=device):
        with autocast(device, precision):
            _, loss = model(inputs, targets)
        loss_sum += loss.double() * targets.numel()
        count += targets.numel()
    model.train(was_training)
    mean = (loss_sum / count).item()
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)),
            "bpb": mean / math.log(2) / bytes_per_token if bytes_per_token else None, "tokens": count}
