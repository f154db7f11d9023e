"""Continuous batching: one engine generates for many requests at once, each at its own length.

The engine owns a fixed number of slots (`max_batch`). A request waits until a slot is free, then its prompt
is prefilled alone (one forward pass over the prompt, exactly as `generate` does it) into its slot's row of a
batched cache. From then on every `step()` runs ONE forward pass over all active rows, one new token per row.
The engine does no model math: it only chooses the rows, and the model's own forward (with the cache) gives
each row its own position and its own view of its cached tokens. A finished or cancelled request frees its
slot between steps, and a waiting one takes it. At temperature 0 a request's tokens are the ones `generate`
gives it alone.

The batched cache per architecture (`BatchedEngine.cache_kind`):
- "kv" (transformer): the model's KVCache with one row per slot, each with its own length; a forward extends
  the rows its `select` names;
- "recurrent" (rnn, lstm, gru): the hidden state (layers, slots, width), gathered for the active rows;
- "none" (bigram, Bengio's MLP): no state to carry; each row recomputes its window, one row at a time
  (`batches_decoding` is False).

Seeded batch invariance: a row's arithmetic must not depend on who else is decoding, or a seeded request's
draws would see slightly different probabilities beside other requests than alone. CPU and GPU matrix products
give each row the same bits only at the same shape (a product of 1 row and one of 16 round differently), and
attention over a longer padded span rounds differently too. So a decode step that holds a seeded request at a
positive temperature runs at one fixed shape (`_decode_fixed`): every slot (a free one decodes a dummy token that
nothing reads) plus an anchor cache row whose length makes every row attend over the whole context under its
mask. Its rows then get the same logits, bit for bit, alone or among any others; each request draws from its
own torch.Generator seeded with its seed, so its tokens are the same too. Other steps run only the active rows.

Text: each row's `TextStream` (lmforge/infer/decode.py) turns its tokens into text deltas that never end inside
a multi-byte character or a possible stop string, and finds stop strings.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.hardware import available_memory_bytes
from lmforge.infer.decode import TextStream
from lmforge.infer.generate import TokenConstraint, sample_rows
from lmforge.infer.sampling import SamplingParams
from lmforge.model.gpt import KVCache
from lmforge.model.recurrent import RecurrentState

TopLogprobs = list[tuple[int, float]]  # (token id, log-probability), likeliest first


@dataclass
class GenerationRequest:
    """What to generate for one prompt; `emit` receives its events, on the engine's thread."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[GenerationEvent], None]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token: int | None = None  # end-of-text: finishes with "stop", not part of the text
    logprobs: int | None = None  # with each new token: its log-probability and this many alternatives
    prompt_logprobs: bool = False  # with the first event: the log-probability of each prompt token after the first
    cancelled: bool = False  # set by `BatchedEngine.cancel` from any thread; the engine drops the row at its next step
    constraint: TokenConstraint | None = None  # masks each draw to a format (lmforge/infer/constrained.py)

    def __post_init__(self) -> None:
        SamplingParams(self.temperature, self.top_k, self.top_p)  # the one check of sampling values


@dataclass
class GenerationEvent:
    """One step of one request: a new token (unless it finished without one) and the text it completes.
    `finish_reason` is None while it continues, else "stop", "length", "cancelled" or "error". The request's
    stop token, when sampled, comes as `token` with `is_stop_token` set: it ends the request and adds no text."""

    text: str = ""
    token: int | None = None
    is_stop_token: bool = False
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None
    prompt_logprobs: list[tuple[float, TopLogprobs]] | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class _Row:
    request: GenerationRequest
    slot: int
    tokens: list[int]  # prompt and generated so far (the window of an architecture without a cache)
    text: TextStream
    generator: torch.Generator
    generated: int = 0
    length: int = 0  # tokens in this slot's cache
    next_token: int = 0  # sampled, not yet fed to the model
    finished: bool = False


@dataclass
class EngineCounters:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    cancelled: int = 0
    rows_per_step: list[int] = field(default_factory=list)  # batch sizes of the last steps (for tests)


class BatchedEngine:
    """Generation for many requests in one batched forward pass per step; drive it with `step()` from one
    thread (`submit` and `cancel` may be called from any)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.block_size = model.config.block_size
        self.device = model.wte.weight.device
        self.dtype = model.wte.weight.dtype
        probe = model.new_cache(1, self.device, self.dtype)
        self.cache_kind = "kv" if isinstance(probe, KVCache) else "recurrent" if isinstance(probe, RecurrentState) \
            else "none"
        self.batches_decoding = self.cache_kind != "none"
        self._check_memory(probe)
        # The last cache row is the anchor of fixed-shape steps (`_decode_fixed`), never a request's.
        self.cache = model.new_cache(max_batch + 1, self.device, self.dtype) if self.cache_kind == "kv" else None
        self.hidden: tuple[torch.Tensor, ...] | None = None  # recurrent: (layers, slots, width) per part
        self.rows: dict[int, _Row] = {}
        self.waiting: deque[GenerationRequest] = deque()
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.counters = EngineCounters()

    def _check_memory(self, probe: KVCache | RecurrentState | None) -> None:
        """Refuse a batch whose state cannot fit in the device's free memory, before allocating it (a huge
        allocation fails with an allocator error, or is granted lazily and killed later)."""
        config = self.model.config
        element = torch.finfo(self.dtype).bits // 8
        if isinstance(probe, KVCache):
            cache_per_row = sum(t.numel() for t in probe.keys + probe.values) * element
        elif isinstance(probe, RecurrentState):
            cache_per_row = 2 * config.n_layer * config.n_embd * element  # an LSTM's hidden and cell state
        else:
            cache_per_row = 0
        per_row = cache_per_row + 2 * self.tokenizer.vocab_size * 4  # each step's logits and probabilities
        available = available_memory_bytes(self.device)
        if available is not None and self.max_batch * per_row > available:
            raise UserError(f"{self.max_batch} sequences decoded at once need about "
                            f"{self.max_batch * per_row / 2**30:.1f} GiB ({per_row} bytes each), more than the "
                            f"{available / 2**30:.1f} GiB free on {self.device}; ask for fewer at once "
                            "(lmforge serve --max-batch, lmforge sample --num-samples)")

    # ---- the thread-safe side ----
    def submit(self, request: GenerationRequest) -> None:
        if not request.prompt:
            raise ValueError("a request needs a prompt of at least one token (e.g. the end-of-text id)")
        with self.wakeup:
            self.waiting.append(request)
            self.wakeup.notify()

    def cancel(self, request: GenerationRequest) -> None:
        request.cancelled = True
        self.wake()

    def wake(self) -> None:
        """Return from `wait_for_work` now (to cancel, or to stop)."""
        with self.wakeup:
            self.wakeup.notify_all()

    def waiting_count(self) -> int:
        with self.lock:
            return len(self.waiting)

    def active_count(self) -> int:
        return len(self.rows)

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.rows or self.waiting)

    def wait_for_work(self, timeout: float) -> None:
        with self.wakeup:
            if not (self.rows or self.waiting):
                self.wakeup.wait(timeout)

    # ---- the engine thread's side ----
    @torch.no_grad()
    def step(self) -> None:
        """Drop cancelled rows, admit waiting requests into free slots (prefill), then one decode step."""
        for row in [r for r in self.rows.values() if r.request.cancelled]:
            self.counters.cancelled += 1
            self._finish(row, GenerationEvent(finish_reason="cancelled"))
        while len(self.rows) < self.max_batch:
            with self.lock:
                if not self.waiting:
                    break
                request = self.waiting.popleft()
            if request.cancelled:
                _deliver(request, GenerationEvent(finish_reason="cancelled"))
                continue
            self._admit(request)
        active = [row for row in self.rows.values() if not row.finished]
        if active:
            try:
                logits = self._decode(active)
            except Exception as err:  # a failed batched step fails its rows, never the engine
                for row in active:
                    self._finish(row, GenerationEvent(finish_reason="error", error=f"{type(err).__name__}: {err}"))
                return
            self.counters.steps += 1
            self.counters.rows_per_step = (self.counters.rows_per_step + [len(active)])[-64:]
            active, logits, allowed = self._allowed(active, logits)
            if not active:
                return
            try:
                tokens = self._sample(active, allowed)  # every row at once: one device sync, a few operations
            except Exception as err:
                for row in active:
                    self._finish(row, GenerationEvent(finish_reason="error", error=f"{type(err).__name__}: {err}"))
                return
            for row, row_logits, token in zip(active, logits, tokens, strict=True):
                self._sampled(row, row_logits, token)

    def fail_all(self, message: str) -> None:
        """End every waiting and active request with an error (the engine is stopping)."""
        for row in list(self.rows.values()):
            self._finish(row, GenerationEvent(finish_reason="error", error=message))
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        for request in waiting:
            _deliver(request, GenerationEvent(finish_reason="error", error=message))

    def _admit(self, request: GenerationRequest) -> None:
        slot = next(index for index in range(self.max_batch) if index not in self.rows)
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        row = _Row(request, slot, list(request.prompt), TextStream(self.tokenizer, request.stop),
                   torch.Generator(device=self.device).manual_seed(seed))
        self.rows[slot] = row
        try:
            logits = self._prefill(row)
            event = GenerationEvent()
            if request.prompt_logprobs:
                event.prompt_logprobs = self._prompt_logprobs(request.prompt, logits[0], request.logprobs or 0)
            self.counters.prompt_tokens += len(request.prompt)
            if request.max_tokens <= 0:
                event.finish_reason = "length"
                self._finish(row, event)
                return
            rows, last, allowed = self._allowed([row], logits[0, -1:])
            if rows:  # else its constraint could not go on, and it is finished
                self._sampled(row, last[0], self._sample(rows, allowed)[0], event)
        except Exception as err:  # this request's failure is its own
            self._finish(row, GenerationEvent(finish_reason="error", error=f"{type(err).__name__}: {err}"))

    def _prefill(self, row: _Row) -> torch.Tensor:
        """The prompt alone through the model, as `generate` runs it; its state goes into the row's slot."""
        prompt = torch.tensor([row.request.prompt], device=self.device)
        if self.cache_kind == "kv":
            if prompt.size(1) > self.block_size:
                raise ValueError(f"prompt of {prompt.size(1)} tokens exceeds the context of {self.block_size}")
            self.cache.reset(row.slot)
            logits, _ = self.model(prompt, cache=self.cache.select([row.slot]))
            row.length = self.cache.lengths[row.slot]
        elif self.cache_kind == "recurrent":
            state = self.model.new_cache(1, self.device, self.dtype)
            logits, _ = self.model(prompt, cache=state)
            parts = state.hidden if isinstance(state.hidden, tuple) else (state.hidden,)
            if self.hidden is None:
                self.hidden = tuple(p.new_zeros((p.size(0), self.max_batch, *p.shape[2:])) for p in parts)
            for store, part in zip(self.hidden, parts, strict=True):
                store[:, row.slot] = part[:, 0]
            row.length = state.length
        else:
            logits, _ = self.model(prompt[:, -self.block_size :])
        return logits

    def _decode(self, rows: list[_Row]) -> torch.Tensor:
        """Next-token logits (rows, vocab) after feeding each row its last sampled token."""
        if self.batches_decoding and any(_needs_fixed_shape(row.request) for row in rows):
            return self._decode_fixed(rows)
        tokens = torch.tensor([[row.next_token] for row in rows], device=self.device)
        if self.cache_kind == "kv":
            logits, _ = self.model(tokens, cache=self.cache.select([row.slot for row in rows]))
            logits = logits[:, -1]
        elif self.cache_kind == "recurrent":
            slots = torch.tensor([row.slot for row in rows], device=self.device)
            parts = tuple(store[:, slots] for store in self.hidden)
            state = RecurrentState(hidden=parts if len(parts) == 2 else parts[0])
            logits, _ = self.model(tokens, cache=state)
            new_parts = state.hidden if isinstance(state.hidden, tuple) else (state.hidden,)
            for store, part in zip(self.hidden, new_parts, strict=True):
                store[:, slots] = part
            logits = logits[:, -1]
        else:  # no state: each row's window, one row at a time
            logits = torch.stack([self.model(torch.tensor([row.tokens[-self.block_size :]],
                                                          device=self.device))[0][0, -1] for row in rows])
        for row in rows:
            row.length += 1
        return logits

    def _decode_fixed(self, rows: list[_Row]) -> torch.Tensor:
        """`_decode` at the one shape every step of this engine shares, whoever is active: all `max_batch` slots
        (and, for a transformer, the anchor row at the end of the context, so that every row attends over the
        whole context under its own mask). A row's logits are then the same bits alone or beside any others."""
        tokens = torch.zeros((self.max_batch + (self.cache_kind == "kv"), 1), dtype=torch.long)
        slots = [row.slot for row in rows]
        tokens[slots, 0] = torch.tensor([row.next_token for row in rows])
        tokens = tokens.to(self.device)
        if self.cache_kind == "kv":
            for slot in range(self.max_batch):
                if slot not in self.rows:
                    self.cache.reset(slot)  # a free slot decodes a dummy token from position 0
            self.cache.lengths[self.max_batch] = self.block_size - 1  # the anchor: the span is the whole context
            logits, _ = self.model(tokens, cache=self.cache)
        else:
            state = RecurrentState(hidden=self.hidden if len(self.hidden) == 2 else self.hidden[0])
            logits, _ = self.model(tokens, cache=state)
            self.hidden = state.hidden if isinstance(state.hidden, tuple) else (state.hidden,)
        for row in rows:
            row.length += 1
        return logits[slots, -1]

    def _allowed(self, rows: list[_Row], logits: torch.Tensor) -> tuple[list[_Row], torch.Tensor, torch.Tensor]:
        """The rows (with their logits) and, for each, the logits its constraint allows (-inf elsewhere; the
        logits themselves for a row without one). A row whose constraint cannot go on is finished with the
        error and left out."""
        if all(row.request.constraint is None for row in rows):
            return rows, logits, logits
        kept, raw, allowed = [], [], []
        for row, row_logits in zip(rows, logits, strict=True):
            try:
                masked = row_logits if row.request.constraint is None else row.request.constraint.mask(row_logits)
            except Exception as err:
                self._finish(row, GenerationEvent(finish_reason="error", error=f"{type(err).__name__}: {err}"))
                continue
            kept.append(row)
            raw.append(row_logits)
            allowed.append(masked)
        if not kept:
            return [], logits[:0], logits[:0]
        return kept, torch.stack(raw), torch.stack(allowed)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token from its logits (rows, vocab), with its own sampling values and generator."""
        requests = [row.request for row in rows]
        return sample_rows(logits, [r.temperature for r in requests], [r.top_k for r in requests],
                           [r.top_p for r in requests], [row.generator for row in rows])

    def _sampled(self, row: _Row, logits: torch.Tensor, token: int, event: GenerationEvent | None = None) -> None:
        """Report the row's sampled token (with its log-probabilities from `logits` when asked), and finish the
        row if it is done."""
        event = event or GenerationEvent()
        request = row.request
        if request.constraint is not None:
            try:
                request.constraint.accept(token)
            except Exception as err:
                self._finish(row, GenerationEvent(finish_reason="error", error=f"{type(err).__name__}: {err}"))
                return
        row.generated += 1
        self.counters.generated_tokens += 1
        if request.logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), -1)
            event.logprob = float(logprobs[token])
            event.top_logprobs = _top(logprobs, request.logprobs)
        event.token = token
        if token == request.stop_token:
            event.is_stop_token = True
            event.finish_reason = "stop"
            event.text = row.text.flush()
            self._finish(row, event)
            return
        row.tokens.append(token)
        row.next_token = token
        event.text = row.text.add(token)
        if row.text.stopped:
            event.finish_reason = "stop"
        elif row.generated >= request.max_tokens or (self.cache_kind == "kv" and row.length >= self.block_size):
            event.finish_reason = "length"
            event.text += row.text.flush()
        if event.finish_reason:
            self._finish(row, event)
        else:
            _deliver(request, event)

    def _prompt_logprobs(self, prompt: list[int], logits: torch.Tensor, top: int
                         ) -> list[tuple[float, TopLogprobs]]:
        logprobs = torch.log_softmax(logits[:-1].float(), -1)  # position i predicts prompt token i + 1
        return [(float(logprobs[i, token]), _top(logprobs[i], top)) for i, token in enumerate(prompt[1:])]

    def _finish(self, row: _Row, event: GenerationEvent) -> None:
        row.finished = True
        self.rows.pop(row.slot, None)
        _deliver(row.request, event)


def _needs_fixed_shape(request: GenerationRequest) -> bool:
    """A seeded request that samples: its tokens must not depend on the batch it shares."""
    return request.seed is not None and request.temperature > 0


def _top(logprobs: torch.Tensor, count: int) -> TopLogprobs:
    if count <= 0:
        return []
    values, ids = torch.topk(logprobs, min(count, logprobs.numel()))
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def _deliver(request: GenerationRequest, event: GenerationEvent) -> None:
    try:
        request.emit(event)
    except Exception:  # a listener that fails (e.g. its client left) must not stop the other rows
        request.cancelled = True


@dataclass
class Completion:
    """The outcome of one request run to the end by `generate_batch`."""

    tokens: list[int]
    text: str
    finish_reason: str


def generate_batch(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], max_tokens: int, *,
                   max_batch: int = 16, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, seeds: Sequence[int | None] | None = None, stop: Sequence[str] = (),
                   stop_token: int | None = None, constraints: Sequence[TokenConstraint | None] | None = None
                   ) -> list[Completion]:
    """Run every prompt to completion on one engine, at most `max_batch` at a time (for `sample
    --num-samples` and evaluation); request i draws from a generator seeded with seeds[i], within constraints[i]."""
    engine = BatchedEngine(model, tokenizer, max_batch=max_batch)
    results: list[dict] = [{"tokens": [], "text": "", "finish_reason": None} for _ in prompts]

    def collect(index: int) -> Callable[[GenerationEvent], None]:
        def emit(event: GenerationEvent) -> None:
            result = results[index]
            if event.token is not None and not event.is_stop_token:
                result["tokens"].append(event.token)
            result["text"] += event.text
            if event.finish_reason:
                result["finish_reason"] = event.finish_reason
                if event.error:
                    raise_later.append(event.error)
        return emit

    raise_later: list[str] = []
    for index, prompt in enumerate(prompts):
        engine.submit(GenerationRequest(list(prompt), max_tokens, collect(index), temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=seeds[index] if seeds else None, stop=stop,
                                        stop_token=stop_token, constraint=constraints[index] if constraints else None))
    while engine.has_work():
        engine.step()
    if raise_later:
        raise RuntimeError(raise_later[0])
    return [Completion(**result) for result in results]
