"""Generation: sample one token at a time from a model's next-token distribution, with a cache.

A transformer's cache (KVCache) keeps every layer's keys and values, so each new token costs one token's
forward pass instead of the whole context's. The context is the last `block_size` tokens, as without a
cache: once the window is full, every new token slides it by one, and the window is run through the model
afresh (positions shift, so cached keys no longer apply). A recurrent model's cache is its hidden state
(RecurrentState): the prompt goes in once, then one token per step, and the state carries the whole history.
Models without a cache (bigram, Bengio's MLP) recompute the window.

An encoder-decoder (`model.arch = "encoder-decoder"`) writes from a source: the prompt is the source, which the
encoder reads once (its last block_size tokens, as a decoder's window keeps its last ones); the decoder starts
from its start token and writes at most block_size tokens (its positions), its self-attention cached in a
KVCache and its cross-attention's keys and values of the source computed once. The reserved ids (span
corruption's sentinels, the start token: lmforge/model/spans.py) are never drawn.

`greedy_batch` is greedy decoding of many prompts at once, each row exactly what `generate` at temperature 0
writes alone (task evaluation: lmforge/tasks/evaluate.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from lmforge.config.sections import ModelConfig
from lmforge.errors import UserError
from lmforge.model.gpt import GPT, KVCache
from lmforge.model.recurrent import RecurrentState
from lmforge.model.seq2seq import EncoderDecoder
from lmforge.model.spans import first_sentinel, start_token


class TokenConstraint(Protocol):
    """What limits the tokens an answer may draw (a format: lmforge/infer/constrained.py): `mask` the next-token
    logits before each draw (forbidden tokens at -inf), then `accept` the drawn token."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...


def check_generates(config: ModelConfig, *, from_source: bool = False) -> None:
    """Refuse, by name, a model that does not write text: an encoder predicts masked tokens from both sides, so
    it has no next token to sample. An encoder-decoder writes from a source (`sample` passes `from_source`);
    `chat` and `serve`, whose conversations and batched engine continue one growing text, refuse it."""
    if config.arch == "encoder-decoder" and not from_source:
        raise UserError("model.arch = encoder-decoder: chat and serve are not built for it (they continue one "
                        "growing text; it writes a target from a source): use lmforge sample RUN --prompt SOURCE, "
                        "or fine-tune it with --task translate and use lmforge predict")
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
    yielding it); with a `constraint`, each token is drawn among those it allows. An encoder-decoder writes
    from the prompt as its source (`generate_from_source`)."""
    if not prompt:
        raise ValueError("generation needs a prompt of at least one token (e.g. the end-of-text id)")
    if isinstance(model, EncoderDecoder):
        yield from generate_from_source(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, generator=generator, stop_token=stop_token,
                                        use_cache=use_cache, constraint=constraint)
        return
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
            token = draw(logits[0, -1], constraint, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=generator)
            if token == stop_token:
                return
            tokens.append(token)
            yield token
    finally:
        model.train(was_training)


def draw(logits: torch.Tensor, constraint: TokenConstraint | None, **sampling) -> int:
    """The next token from `logits` (vocab,), among those `constraint` allows, which is told of the draw."""
    if constraint is None:
        return sample_next(logits, **sampling)
    token = sample_next(constraint.mask(logits), **sampling)
    constraint.accept(token)
    return token


def without_reserved(model: EncoderDecoder, logits: torch.Tensor) -> torch.Tensor:
    """The decoder's next-token logits (..., vocab) with the reserved ids (sentinels, start) at -inf."""
    return logits.index_fill(-1, torch.arange(first_sentinel(model.config), model.vocab_size, device=logits.device),
                             float("-inf"))


@torch.no_grad()
def generate_from_source(model: EncoderDecoder, source: Sequence[int], max_new_tokens: int, *,
                         temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                         generator: torch.Generator | None = None, stop_token: int | None = None,
                         use_cache: bool = True, constraint: TokenConstraint | None = None) -> Iterator[int]:
    """An encoder-decoder's target for a source (its last block_size tokens), token by token: up to
    max_new_tokens and at most block_size tokens, stopping after stop_token (not yielded). Without the cache,
    the decoder recomputes its whole input at each token (the reference the cache is checked against)."""
    was_training = model.training
    model.eval()
    device = model.wte.weight.device
    block_size = model.config.block_size
    memory = model.encode(torch.tensor([list(source)[-block_size:]], device=device))
    keys_values = model.source_keys_values(memory)
    tokens = [start_token(model.config)]
    cache = model.new_cache(1, device, model.wte.weight.dtype) if use_cache else None
    try:
        for _ in range(min(max_new_tokens, block_size)):
            decoder_input = tokens if cache is None else tokens[-1:]
            logits = without_reserved(model, model.decode(torch.tensor([decoder_input], device=device), keys_values,
                                                          cache=cache)[0, -1])
            token = draw(logits, constraint, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if token == stop_token:
                return
            tokens.append(token)
            yield token
    finally:
        model.train(was_training)


@torch.no_grad()
def greedy_batch(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int], *,
                 stop_token: int | None, batch_size: int) -> list[list[int]]:
    """Each prompt's greedy continuation (as `generate` at temperature 0 writes it alone), `batch_size` prompts
    at a time: a decoder's rows through one KVCache with a length per row (each prompt filled alone, then one
    token per row per forward; a row whose window is full slides it as `generate` does), an encoder-decoder's
    right-padded sources through one encoder pass and its decoder rows in step. Other models (recurrent,
    bigram, MLP, the scratch engine) write one prompt at a time."""
    if not all(prompts):
        raise ValueError("generation needs prompts of at least one token (e.g. the end-of-text id)")
    if not isinstance(model, GPT | EncoderDecoder):
        return [list(generate(model, prompt, limit, temperature=0.0, stop_token=stop_token))
                for prompt, limit in zip(prompts, max_new_tokens, strict=True)]
    was_training = model.training
    model.eval()
    write = _greedy_from_sources if isinstance(model, EncoderDecoder) else _greedy_decoder
    try:
        replies = []
        for start in range(0, len(prompts), batch_size):
            replies += write(model, [list(p) for p in prompts[start : start + batch_size]],
                             list(max_new_tokens[start : start + batch_size]), stop_token)
        return replies
    finally:
        model.train(was_training)


def _greedy_decoder(model: GPT, prompts: list[list[int]], limits: list[int], stop_token: int | None
                    ) -> list[list[int]]:
    device, block_size = model.wte.weight.device, model.config.block_size
    cache = model.new_cache(len(prompts), device, model.wte.weight.dtype)
    tokens = [prompt[-block_size:] for prompt in prompts]
    replies: list[list[int]] = [[] for _ in prompts]
    active = [row for row, limit in enumerate(limits) if limit > 0]
    logits: dict[int, torch.Tensor] = {}
    while active:
        # A row with no cached tokens (its first step) or a full window runs its window alone, as `generate` does.
        alone = [row for row in active if cache.lengths[row] in (0, block_size)]
        for row in alone:
            cache.reset(row)
            logits[row] = model(torch.tensor([tokens[row][-block_size:]], device=device),
                                cache=cache.select([row]))[0][0, -1]
        stepped = [row for row in active if row not in alone]
        if stepped:
            last = torch.tensor([[tokens[row][-1]] for row in stepped], device=device)
            for row, row_logits in zip(stepped, model(last, cache=cache.select(stepped))[0][:, -1], strict=True):
                logits[row] = row_logits
        drawn = torch.stack([logits[row] for row in active]).argmax(-1).tolist()
        still = []
        for row, token in zip(active, drawn, strict=True):
            if token == stop_token:
                continue
            tokens[row].append(token)
            replies[row].append(token)
            if len(replies[row]) < limits[row]:
                still.append(row)
        active = still
    return replies


def _greedy_from_sources(model: EncoderDecoder, sources: list[list[int]], limits: list[int],
                         stop_token: int | None) -> list[list[int]]:
    device, block_size = model.wte.weight.device, model.config.block_size
    sources = [source[-block_size:] for source in sources]
    lengths = torch.tensor([len(source) for source in sources], device=device)
    padded = torch.zeros(len(sources), max(map(len, sources)), dtype=torch.long, device=device)
    for row, source in enumerate(sources):
        padded[row, : len(source)] = torch.tensor(source, device=device)
    keys_values = model.source_keys_values(model.encode(padded, lengths))
    source_mask = model.source_mask(padded, lengths)
    cache = model.new_cache(len(sources), device, model.wte.weight.dtype)
    last = torch.full((len(sources), 1), start_token(model.config), dtype=torch.long, device=device)
    replies: list[list[int]] = [[] for _ in sources]
    limits = [min(limit, block_size) for limit in limits]
    writing = [limit > 0 for limit in limits]
    # Every row steps together (one decoder length for all); a finished row's further tokens are not kept.
    while any(writing):
        logits = without_reserved(model, model.decode(last, keys_values, source_mask, cache)[:, -1])
        drawn = logits.argmax(-1)
        for row, token in enumerate(drawn.tolist()):
            if not writing[row]:
                continue
            if token == stop_token:
                writing[row] = False
                continue
            replies[row].append(token)
            writing[row] = len(replies[row]) < limits[row]
        last = drawn[:, None]
    return replies
