"""Masked-language modelling, what the encoder (`model.arch = "encoder"`) is pretrained to do: BERT's recipe.

Of each sequence, 15% of the positions are chosen; a chosen position's input becomes the mask token (80% of
them), a random token (10%) or stays as it is (10%), and the model is asked for the original token there. The
loss covers the chosen positions only: every other target is `IGNORE` (cross-entropy's ignore index), so those
positions get no gradient at all. The random and kept 10% stop the model from learning that only a mask token
ever needs predicting, since fine-tuning and real text never show one.

One variant of BERT's recipe: the number of chosen positions is exactly round(15% of the length) in every
sequence (at least one), not 15% in expectation. A short sequence could otherwise draw no position at all and
its loss would be 0/0; a fixed count also gives every batch the same loss denominator.

The mask token is a reserved id appended to the vocabulary when the model is built, not a token the tokenizer
knows: the last id, `vocab_size - 1` (`model.vocab_size` = the tokenizer's size + 1). So prepared data, its
tokenizer and its shards are the very ones a decoder trains on, and no text can ever encode to the mask: a
literal "[MASK]" in a user's text is ordinary characters.
"""

from __future__ import annotations

import torch

from lmforge.config.sections import ModelConfig

MASK_FRACTION = 0.15  # of each sequence's positions, chosen for the loss
REPLACE_WITH_MASK = 0.8  # of the chosen: the input becomes the mask token
REPLACE_WITH_RANDOM = 0.1  # of the chosen: a random token; the rest keep their own
IGNORE = -100  # torch's cross-entropy ignore index: a target that adds nothing to the loss or its gradient
MASK_WORDS = "the encoder's mask token"  # what the reserved id is, in messages


def mask_token_id(config: ModelConfig) -> int:
    """The reserved mask id: the vocabulary's last (the tokenizer's ids all come before it)."""
    return config.vocab_size - 1


def chosen_count(length: int) -> int:
    """How many positions of a sequence of `length` tokens are chosen: round(15%), at least one."""
    return max(1, round(MASK_FRACTION * length))


def mask_tokens(tokens: torch.Tensor, mask_id: int, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for token ids (B, T): inputs with the chosen positions masked, replaced or kept;
    targets the original token at chosen positions and IGNORE elsewhere. Every draw is made on the CPU from
    `generator` (None: torch's global generator, which the trainer seeds and checkpoints, so a resumed run draws
    the same masks), whatever the tokens' device, so the masks do not depend on the device either."""
    batch, length = tokens.shape
    scores = torch.rand(batch, length, generator=generator)
    chosen_positions = scores.argsort(dim=1)[:, : chosen_count(length)]
    chosen = torch.zeros(batch, length, dtype=torch.bool).scatter_(1, chosen_positions, True)
    how = torch.rand(batch, length, generator=generator)
    random_tokens = torch.randint(0, mask_id, (batch, length), generator=generator)
    chosen, how, random_tokens = (part.to(tokens.device) for part in (chosen, how, random_tokens))
    inputs = torch.where(chosen & (how < REPLACE_WITH_MASK), mask_id, tokens)
    replace = chosen & (how >= REPLACE_WITH_MASK) & (how < REPLACE_WITH_MASK + REPLACE_WITH_RANDOM)
    inputs = torch.where(replace, random_tokens, inputs)
    targets = torch.where(chosen, tokens, IGNORE)
    return inputs, targets
