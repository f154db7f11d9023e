"""Generation: sample one token at a time from a model's next-token distribution, with a cache.

A transformer's cache (KVCache) keeps every layer's keys and values, so each new token costs one token's
forward pass instead of the whole context's. The context is the last `block_size` tokens, as without a
cache: once the window is full, every new token slides it by one, and the window is run through the model
afresh (positions shift, so cached keys no longer apply). A recurrent model's cache is its hidden state
(RecurrentState): the prompt goes in once, then one token per step, and the state carries the whole history.
Models without a cache (bigram, Bengio's MLP) recompute the window.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from lmforge.config.sections import ModelConfig
from lmforge.errors import UserError
from lmforge.model.gpt import KVCache
from lmforge.model.recurrent import RecurrentState


class TokenConstraint(Protocol):
    """What limits the tokens an answer may draw (a format: lmforge/infer/constrained.py): `mask` the next-token
    logits before each draw (forbidden tokens at -inf), then `accept` the drawn token."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...


def check_generates(config: ModelConfig) -> None:
    """Refuse, by name, a model that does not write text: an encoder predicts masked tokens from both sides, so
    it has no next token to sample."""
    if config.arch == "encoder-decoder":
        raise UserError("model.arch = encoder-decoder: generating from a prompt is not implemented yet (the "
                        "model is pretrained by span corruption only); lmforge eval reports its loss")
    if config.arch == "encoder":
        raise UserError("model.arch = encoder does not generate text (it fills in masked tokens from "
                        "both sides, so there is no next token to sample); use lmforge eval on it, fine-tune it "
                        "with --task classify, or sample from a decoder (model.arch = gpt)")


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> int:
    """One token id from logits (vocab,): `sample_rows` for one row."""
    return sample_rows(logits[None], [temperature], [top_k], [top_p], [generator])[0]


def sample_rows(logits: torch.Tensor, temperatures: Sequence[float], top_ks: Sequence[int | None],
                top_ps: Sequence[float | None], generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token id per row of logits (rows, vocab), each row with its own sampling values and generator: greedy
    at temperature 0, else softmax(logits / T), optionally kept to the k likeliest tokens (and any tied with the
    k-th) and then to the smallest set whose probability reaches top_p (the likeliest token always stays).

    Defined for every value SamplingParams allows (lmforge/infer/sampling.py): the logits are shifted so that
    their maximum is 0 before the division, in float64, so a tiny temperature sends every other logit to -inf
    instead of turning the maximum into inf - inf = NaN. Each sampled row draws exactly one uniform number from
    its own generator and takes the token where its cumulative probability (in vocabulary order) passes it, so a
    row's token depends on its logits and its generator alone: the same one row at a time (`generate`) or many at
    once (the batched engine). A cut-off a row does not ask for leaves its logits exactly as they are, so it does
    not matter whether another row of the batch asked for one; the cut-offs are skipped when no row asks."""
    sampled = [row for row, temperature in enumerate(temperatures) if temperature != 0]
    every_row = len(sampled) == len(temperatures)
    tokens = None if every_row else logits.argmax(-1)  # greedy rows keep these
    if not sampled:
        return tokens.tolist()
    device = logits.device
    logits = logits.double() if every_row else logits[sampled].double()
    vocab = logits.size(-1)
    scales = [temperatures[row] for row in sampled]
    scale = scales[0] if len(set(scales)) == 1 else torch.tensor(scales, dtype=torch.float64, device=device)[:, None]
    logits = (logits - logits.max(-1, keepdim=True).values) / scale
    kept = [min(top_ks[row] or vocab, vocab) for row in sampled]
    if min(kept) < vocab:
        kth = torch.tensor([k - 1 for k in kept], device=device)[:, None]
        logits = logits.masked_fill(logits < logits.sort(dim=-1, descending=True).values.gather(1, kth), float("-inf"))
    nucleus = [top_ps[row] or 1.0 for row in sampled]
    if min(nucleus) < 1:
        ordered, order = logits.sort(dim=-1, descending=True, stable=True)
        probabilities = ordered.softmax(-1)
        # Tokens entirely beyond the nucleus; a row at 1 drops nothing (its mass before a token stays below 1).
        drop = probabilities.cumsum(-1) - probabilities >= torch.tensor(nucleus, dtype=torch.float64,
                                                                        device=device)[:, None]
        drop[:, 0] = False  # the likeliest token is kept however small top_p is
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    cumulative = logits.softmax(-1).cumsum(-1)
    draws = [torch.rand(1, generator=generators[row], dtype=torch.float64, device=device) for row in sampled]
    uniform = draws[0] if len(draws) == 1 else torch.cat(draws)
    total = cumulative[:, -1:]
    # The first token whose cumulative probability exceeds the draw: one of positive probability, never a dropped
    # one (the draw stays below the total, in case u * total rounds up to it).
    target = torch.minimum(uniform[:, None] * total, total * (1 - 2**-52))
    drawn = (cumulative <= target).sum(-1)
    if every_row:
        return drawn.tolist()
    tokens[sampled] = drawn
    return tokens.tolist()  # the one wait for the device


@torch.no_grad()
def generate(model: nn.Module, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             stop_token: int | None = None, use_cache: bool = True, constraint: TokenConstraint | None = None
             ) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids after the prompt (stopping after stop_token, not
    yielding it); with a `constraint`, each token is drawn among those it allows."""
    if not prompt:
        raise ValueError("generation needs a prompt of at least one token (e.g. the end-of-text id)")
    was_training = model.training
    model.eval()
    device = model.wte.weight.device
    block_size = model.config.block_size
    tokens = list(prompt)[-block_size:]
    cache: KVCache | RecurrentState | None = None
    try:
        for _ in range(max_new_tokens):
            window = tokens[-block_size:]
            if not use_cache:
                logits, _ = model(torch.tensor([window], device=device))
            elif cache is None or (isinstance(cache, KVCache) and cache.lengths[0] >= block_size):  # first, or slid
                # A model without a cache (bigram, mlp) gets None here and so recomputes the window each token.
                cache = model.new_cache(1, device, model.wte.weight.dtype)
                logits, _ = model(torch.tensor([window], device=device), cache=cache)
            else:
                logits, _ = model(torch.tensor([window[-1:]], device=device), cache=cache)
            next_logits = logits[0, -1] if constraint is None else constraint.mask(logits[0, -1])
            token = sample_next(next_logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if constraint is not None:
                constraint.accept(token)
            if token == stop_token:
                return
            tokens.append(token)
            yield token
    finally:
        model.train(was_training)
