"""Span corruption, what the encoder-decoder (`model.arch = "encoder-decoder"`) is pretrained to do: T5's recipe.

Of each window of T tokens, 15% are noise, in spans of mean length 3. The encoder reads the window with each
noise span replaced by one sentinel token (a different one per span, in order); the decoder writes, after a
start token, each sentinel followed by the span it replaced: "the <0> on the <1>" -> "<0> cat sat <1> mat".
As in T5, the numbers of noise tokens and spans are fixed by T (only where the spans fall is random), so every
window gives a source and a target of the same lengths and batches need no padding.

The sentinels and the decoder's start token are reserved ids after the tokenizer's, added when the model is
built (like the encoder's mask token, lmforge/model/masking.py): the last `reserved_ids(block_size)` ids of the
vocabulary, the start token last.
"""

from __future__ import annotations

import torch

from lmforge.config.sections import ModelConfig

NOISE_DENSITY = 0.15  # of each window's tokens
MEAN_SPAN_LENGTH = 3


def span_counts(length: int) -> tuple[int, int]:
    """(noise tokens, spans) of a window of `length` tokens: round(15%), at least one, in round(noise / 3) spans."""
    noise = max(1, round(NOISE_DENSITY * length))
    return noise, max(1, round(noise / MEAN_SPAN_LENGTH))


def reserved_ids(block_size: int) -> int:
    """How many ids the model reserves after the tokenizer's: a sentinel per span of a full window, and the
    decoder's start token."""
    return span_counts(block_size)[1] + 1


def first_sentinel(config: ModelConfig) -> int:
    return config.vocab_size - reserved_ids(config.block_size)


def start_token(config: ModelConfig) -> int:
    """The id the decoder starts from (it has written nothing yet)."""
    return config.vocab_size - 1


def _partition(total: int, parts: int, generator: torch.Generator | None, *, positive: bool) -> list[int]:
    """`parts` random lengths adding up to `total`: each at least 1 if `positive`, else at least 0."""
    if positive:  # parts - 1 distinct cuts among the total - 1 gaps between items
        cuts = sorted((torch.randperm(total - 1, generator=generator)[: parts - 1] + 1).tolist())
    else:  # cuts anywhere, repeats allowed: empty parts
        cuts = sorted(torch.randint(0, total + 1, (parts - 1,), generator=generator).tolist())
    return [end - start for start, end in zip([0, *cuts], [*cuts, total], strict=True)]


def corrupt_spans(tokens: torch.Tensor, config: ModelConfig, generator: torch.Generator | None = None
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """((source, decoder input), target) for windows (B, T): the source (B, T - noise + spans) with each noise
    span replaced by its sentinel, the target (B, noise + spans) each sentinel followed by its span, and the
    decoder input the target shifted right after the start token. Draws on the CPU from `generator` (None:
    torch's global generator, which the trainer seeds and checkpoints)."""
    batch, length = tokens.shape
    noise, spans = span_counts(length)
    sentinel, rows = first_sentinel(config), tokens.cpu().tolist()
    sources, targets = [], []
    for row in rows:
        noise_lengths = _partition(noise, spans, generator, positive=True)
        # the kept stretches before, between and after the spans (any may be empty)
        kept_lengths = _partition(length - noise, spans + 1, generator, positive=False)
        source, target, position = [], [], 0
        for span, (kept, noisy) in enumerate(zip(kept_lengths, noise_lengths, strict=False)):
            source += row[position : position + kept] + [sentinel + span]
            position += kept
            target += [sentinel + span] + row[position : position + noisy]
            position += noisy
        sources.append(source + row[position:])
        targets.append(target)
    source = torch.tensor(sources, dtype=torch.long, device=tokens.device)
    target = torch.tensor(targets, dtype=torch.long, device=tokens.device)
    decoder_input = torch.cat([torch.full_like(target[:, :1], start_token(config)), target[:, :-1]], dim=1)
    return (source, decoder_input), target
