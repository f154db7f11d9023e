"""Evaluation: mean next-token loss over a split's windows, with perplexity, bits per byte and per character;
for an encoder the masked-LM loss (`mask_id`) and the pseudo-perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmforge.config.sections import ModelConfig
from lmforge.data.datadir import check_token_ids
from lmforge.data.loader import TokenWindows, eval_batches, eval_window_count, to_batch
from lmforge.errors import UserError
from lmforge.hardware import autocast
from lmforge.model.masking import IGNORE, mask_tokens
from lmforge.model.spans import corrupt_spans

EVAL_MASK_SEED = 0  # + a window's index: its masks (or spans) in every evaluation, so evaluations compare
SPAN_NOTE = ("span_loss: nats per target token of span corruption, 15% of each window hidden in spans (fixed seed) "
             "that the decoder writes after sentinels, given the rest of the window; not comparable to a decoder's "
             "next-token loss, which predicts every token from the tokens before it only")
# A pretraining objective's (inputs, targets) for windows (B, T), given their indices in the split
Corruption = Callable[[torch.Tensor, np.ndarray], tuple[Any, torch.Tensor]]
PSEUDO_PERPLEXITY_TOKENS = 1024  # tokens scored one at a time: each costs a whole forward
MASKED_LM_NOTE = ("masked_lm_loss: nats per chosen token, 15% of each window masked (fixed seed) and predicted from "
                  "both sides; pseudo_perplexity: exp of the mean loss of each token masked alone, given every other "
                  "token of its window. Neither is comparable to a decoder's loss or perplexity, which predict each "
                  "token from the tokens before it only")


def span_windows(tokens: torch.Tensor, window_ids: np.ndarray, config: ModelConfig
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """((source, decoder input), target) of span-corruption evaluation for windows (B, T) whose split indices are
    window_ids[:B]: each window's spans drawn by a generator seeded with its own index, as `mask_windows`."""
    corrupted = [corrupt_spans(tokens[row : row + 1], config,
                               torch.Generator().manual_seed(EVAL_MASK_SEED + int(window)))
                 for row, window in enumerate(window_ids[: len(tokens)])]
    return ((torch.cat([source for (source, _), _ in corrupted]), torch.cat([start for (_, start), _ in corrupted])),
            torch.cat([target for _, target in corrupted]))


def mask_windows(tokens: torch.Tensor, window_ids: np.ndarray, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of masked-LM evaluation for windows (B, T) whose split indices are window_ids[:B]: each
    window masked by a generator seeded with its own index, never the training generator, so a window's masks do
    not depend on the batch size, the number of ranks or when the evaluation runs."""
    masked = [mask_tokens(tokens[row : row + 1], mask_id, torch.Generator().manual_seed(EVAL_MASK_SEED + int(window)))
              for row, window in enumerate(window_ids[: len(tokens)])]
    return torch.cat([inputs for inputs, _ in masked]), torch.cat([targets for _, targets in masked])


def check_no_reserved_ids(data_dir: str | Path, first_reserved: int, what: str,
                          splits: tuple[str, ...] | None = None) -> None:
    """The data's ids must all come before the ids a model reserves after the tokenizer's (`what`: an encoder's
    mask token, an encoder-decoder's sentinels): a shard that holds one (made with a larger vocabulary, or
    corrupt) would be read as a mask or sentinel."""
    try:
        check_token_ids(data_dir, first_reserved, *(() if splits is None else (splits,)))
    except UserError:
        raise UserError(f"{data_dir} holds token id {first_reserved} or beyond, which the model reserves for {what} "
                        "(the tokenizer's ids come before it): prepare the data with the run's tokenizer, or leave "
                        "model.vocab_size at 0") from None


@torch.no_grad()
def evaluate(model: nn.Module, windows: TokenWindows, *, batch_size: int, max_windows: int | None,
             device: torch.device, precision: str, bytes_per_token: float | None, rank: int = 0,
             world_size: int = 1, corrupt: Corruption | None = None) -> dict:
    """Loss in nats per token; bits per byte = loss / ln 2 * tokens / bytes, comparable across tokenizers
    (None when the byte count of the text is unknown). With several ranks each evaluates a stride of the
    windows and the sums are added up, so every rank returns the loss over all of them.

    With `corrupt`, the loss of a pretraining objective that corrupts the windows instead (an encoder's masked
    LM: `mask_windows`; an encoder-decoder's span corruption: `span_windows`), the same corruption at every
    evaluation, over the targets it scores only; no bits per byte (such a loss predicts a part of the text from
    the rest, so it measures no compression of it)."""
    window_ids = np.arange(rank, eval_window_count(windows, max_windows), world_size)  # eval_batches' order
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    batches = 0
    for inputs, targets in eval_batches(windows, batch_size, max_windows, rank=rank, world_size=world_size,
                                        device=device):
        if corrupt is not None:
            inputs, targets = corrupt(inputs, window_ids[batches * batch_size :])
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
        if corrupt is not None:
            filler = corrupt(filler[0], np.zeros(1, dtype=np.int64))
        for _ in range(rank0_batches - batches):
            with autocast(device, precision):
                model(*filler)
        totals = torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64, device=device)])
        dist.all_reduce(totals)
        loss_sum, count = totals[0], int(totals[1].item())
    model.train(was_training)
    mean = (loss_sum / count).item()
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)),
            "bpb": mean / math.log(2) / bytes_per_token if bytes_per_token and corrupt is None else None,
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


def evaluate_masked_lm(model: nn.Module, windows: TokenWindows, *, mask_id: int, batch_size: int,
                       device: torch.device, precision: str) -> dict:
    """What `lmforge eval` reports for an encoder: the masked-LM loss over the whole split and the
    pseudo-perplexity over its first windows (MASKED_LM_NOTE says what each is)."""
    masked = evaluate(model, windows, batch_size=batch_size, max_windows=None, device=device, precision=precision,
                      bytes_per_token=None, corrupt=partial(mask_windows, mask_id=mask_id))
    pseudo = pseudo_perplexity(model, windows, mask_id=mask_id, device=device, precision=precision,
                               batch_size=batch_size)
    return {"masked_lm_loss": masked["loss"], "masked_lm_tokens": masked["tokens"], **pseudo}
