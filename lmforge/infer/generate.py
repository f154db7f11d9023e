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

import torch
from torch import nn

from lmforge.config.sections import ModelConfig
from lmforge.errors import UserError
from lmforge.model.gpt import KVCache
from lmforge.model.recurrent import RecurrentState


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
    """One token id from logits (vocab,): greedy at temperature 0, else softmax(logits / T), optionally
    kept to the k likeliest tokens and to the smallest set whose probability reaches top_p (the likeliest token
    always stays). Defined for every value SamplingParams allows (lmforge/infer/sampling.py): the logits are
    shifted so that their maximum is 0 before the division, in float64, so a tiny temperature sends every other
    logit to -inf instead of turning the maximum into inf - inf = NaN."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.double()
    logits = (logits - logits.max()) / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probabilities = sorted_logits.softmax(-1)
        drop = probabilities.cumsum(-1) - probabilities >= top_p  # tokens entirely beyond the nucleus
        drop[0] = False  # the likeliest token is kept however small top_p is
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(model: nn.Module, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             stop_token: int | None = None, use_cache: bool = True) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids after the prompt (stopping after stop_token, not
    yielding it)."""
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
            token = sample_next(logits[0, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator)
            if token == stop_token:
                return
            tokens.append(token)
            yield token
    finally:
        model.train(was_training)
