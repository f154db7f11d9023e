"""Evaluation: mean next-token loss over a split's windows, with perplexity, bits per byte and per character."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmforge.data.loader import TokenWindows, eval_batches, eval_window_count, to_batch
from lmforge.hardware import autocast


@torch.no_grad()
def evaluate(model: nn.Module, windows: TokenWindows, *, batch_size: int, max_windows: int | None,
             device: torch.device, precision: str, bytes_per_token: float | None, rank: int = 0,
             world_size: int = 1) -> dict:
    """Loss in nats per token; bits per byte = loss / ln 2 * tokens / bytes, comparable across tokenizers
    (None when the byte count of the text is unknown). With several ranks each evaluates a stride of the
    windows and the sums are added up, so every rank returns the loss over all of them."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    batches = 0
    for inputs, targets in eval_batches(windows, batch_size, max_windows, rank=rank, world_size=world_size,
                                        device=device):
        with autocast(device, precision):
            _, loss = model(inputs, targets)
        loss_sum += loss.double() * targets.numel()
        count += targets.numel()
        batches += 1
    if world_size > 1:
        # A sharded model's forward is a collective: a rank with fewer windows runs as many forwards as rank
        # 0 (on a window it does not count), then the ranks add up their sums.
        rank0_batches = math.ceil(math.ceil(eval_window_count(windows, max_windows) / world_size) / batch_size)
        filler = to_batch(windows.gather(np.zeros(1, dtype=np.int64)), device)
        for _ in range(rank0_batches - batches):
            with autocast(device, precision):
                model(*filler)
        totals = torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64, device=device)])
        dist.all_reduce(totals)
        loss_sum, count = totals[0], int(totals[1].item())
    model.train(was_training)
    mean = (loss_sum / count).item()
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)),
            "bpb": mean / math.log(2) / bytes_per_token if bytes_per_token else None, "tokens": count}


def bits_per_character(bits_per_byte: float | None, split: dict) -> float | None:
    """Bits per character of a split, for character-level comparisons (equal to bits per byte on ASCII text);
    None when the split's byte or character count is unknown."""
    if bits_per_byte is None or not split.get("chars"):
        return None
    return bits_per_byte * split["bytes"] / split["chars"]
