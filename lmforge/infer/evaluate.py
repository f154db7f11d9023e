"""Evaluation: mean next-token loss over a split's windows, with perplexity, bits per byte and per character;
for an encoder the masked-LM loss (`mask_id`) and the pseudo-perplexity."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmforge.data.loader import TokenWindows, eval_batches, eval_window_count, to_batch
from lmforge.hardware import autocast
from lmforge.model.masking import IGNORE, mask_tokens

EVAL_MASK_SEED = 0  # every masked evaluation draws the same masks, so evaluations at different steps compare
PSEUDO_PERPLEXITY_TOKENS = 1024  # tokens scored one at a time: each costs a whole forward


@torch.no_grad()
def evaluate(model: nn.Module, windows: TokenWindows, *, batch_size: int, max_windows: int | None,
             device: torch.device, precision: str, bytes_per_token: float | None, rank: int = 0,
             world_size: int = 1, mask_id: int | None = None) -> dict:
    """Loss in nats per token; bits per byte = loss / ln 2 * tokens / bytes, comparable across tokenizers
    (None when the byte count of the text is unknown). With several ranks each evaluates a stride of the
    windows and the sums are added up, so every rank returns the loss over all of them.

    With `mask_id` (an encoder), the masked-LM loss instead: each window masked as in training
    (lmforge/model/masking.py) from a generator of its own, seeded the same at every evaluation, and the loss
    over the chosen positions only; no bits per byte (the loss covers 15% of the tokens, each seeing both
    sides, so it measures no compression of the text)."""
    generator = torch.Generator().manual_seed(EVAL_MASK_SEED) if mask_id is not None else None
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    batches = 0
    for inputs, targets in eval_batches(windows, batch_size, max_windows, rank=rank, world_size=world_size,
                                        device=device):
        if mask_id is not None:
            inputs, targets = mask_tokens(inputs, mask_id, generator)
        with autocast(device, precision):
            _, loss = model(inputs, targets)
        scored = int((targets != IGNORE).sum())
        loss_sum += loss.double() * scored
        count += scored
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
            "bpb": mean / math.log(2) / bytes_per_token if bytes_per_token and mask_id is None else None,
            "tokens": count}


@torch.no_grad()
def pseudo_perplexity(model: nn.Module, windows: TokenWindows, *, mask_id: int, device: torch.device,
                      precision: str, batch_size: int, max_tokens: int = PSEUDO_PERPLEXITY_TOKENS) -> dict:
    """An encoder's pseudo-perplexity (Salazar et al., 2020): exp of the mean over tokens of -log p(token | every
    other token of its window), each token masked alone, one forward per token, over the first windows of the
    split up to `max_tokens` tokens. A decoder's perplexity conditions each token on what came before only; this
    conditions on both sides, so the two numbers are not comparable (the encoder's is far lower for the same
    text)."""
    was_training = model.training
    model.eval()
    length = windows.block_size
    loss_sum, count = 0.0, 0
    for tokens, _ in eval_batches(windows, 1, max(1, math.ceil(max_tokens / length)), device=device):
        # Row t of the (T, T) batch is the window with token t masked; its one target is that token.
        inputs = tokens.repeat(length, 1)
        diagonal = torch.arange(length, device=device)
        inputs[diagonal, diagonal] = mask_id
        targets = torch.full_like(inputs, IGNORE)
        targets[diagonal, diagonal] = tokens[0]
        for start in range(0, length, batch_size):
            rows = slice(start, start + batch_size)
            with autocast(device, precision):
                _, loss = model(inputs[rows], targets[rows])
            scored = int((targets[rows] != IGNORE).sum())
            loss_sum += loss.double().item() * scored
            count += scored
    model.train(was_training)
    mean = loss_sum / count
    return {"pseudo_loss": mean, "pseudo_perplexity": math.exp(min(mean, 700.0)), "pseudo_tokens": count}


def bits_per_character(bits_per_byte: float | None, split: dict) -> float | None:
    """Bits per character of a split, for character-level comparisons (equal to bits per byte on ASCII text);
    None when the split's byte or character count is unknown."""
    if bits_per_byte is None or not split.get("chars"):
        return None
    return bits_per_byte * split["bytes"] / split["chars"]
