"""Serving a classify run (`lmforge finetune --task classify`): `ClassifyEngine` computes the labels'
probabilities of texts on its own thread, batching whatever inputs are waiting, from every request, into one
forward pass (up to --max-batch texts); `classification` shapes the answer as vLLM's /classify does.

The engine computes exactly what `lmforge predict` does (tasks.kinds.predict_labels: the classifier head on
each text's last token, texts longer than the context cut to their last tokens, the softmax of its logits);
only the padding differs, and padding on the right cannot change a causal model's state at a text's last
token. An HTTP handler awaits its inputs' results; a handler cancelled (its client left) drops its inputs
that no batch has taken yet.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.model.heads import Classifier, classify_ids
from lmforge.serve.errors import ApiError

log = logging.getLogger("lmforge.serve")


@dataclass
class _Input:
    """One text to classify, as token ids, and the future its probabilities go to (on the handler's loop)."""

    ids: list[int]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    dropped: bool = False  # its handler was cancelled before a batch took it


class ClassifyEngine:
    """Label probabilities of token sequences, computed in batches on one background thread (`start`, `stop`).
    `classify` may be awaited from any number of handlers on the event loop."""

    def __init__(self, model: Classifier, tokenizer: Tokenizer, device: torch.device | str, max_batch: int,
                 max_queue: int):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.labels = list(model.labels)
        self.block_size = model.body.config.block_size
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque[_Input] = deque()
        self.computing = 0  # inputs in the batch being computed now
        self.stopping = False
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="lmforge-classify", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, drain_timeout: float) -> None:
        """Let waiting inputs finish (up to drain_timeout seconds), then fail the rest and stop the thread."""
        deadline = time.monotonic() + drain_timeout
        while self.has_work() and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.02)
        with self.lock:
            self.stopping = True
            left = list(self.waiting)
            self.waiting.clear()
            self.lock.notify_all()
        _settle(left, ApiError(503, "the server stopped before this request finished", type="server_error",
                               code="shutting_down"))
        self.thread.join(timeout=10)

    def waiting_count(self) -> int:
        with self.lock:
            return len(self.waiting)

    def active_count(self) -> int:
        with self.lock:
            return self.computing

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.waiting or self.computing)

    async def classify(self, sequences: Sequence[list[int]]) -> list[list[float]]:
        """Each sequence's label probabilities (in the order of `labels`), in order. Refuses with 429 when they
        would put more than max_queue inputs in the waiting line now, 503 once stopping (a request of more than
        max_queue inputs is refused before, by its schema)."""
        loop = asyncio.get_running_loop()
        inputs = [_Input(list(ids), loop.create_future(), loop) for ids in sequences]
        with self.lock:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self.waiting) + len(inputs) > self.max_queue:
                raise ApiError(429, f"the server is busy: {len(self.waiting)} inputs are waiting (lmforge serve "
                                    f"--max-queue {self.max_queue}); retry shortly", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After": "1"})
            self.waiting.extend(inputs)
            self.lock.notify()
        try:
            return list(await asyncio.gather(*(item.future for item in inputs)))
        except asyncio.CancelledError:
            with self.lock:
                for item in inputs:
                    item.dropped = True
            raise

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.stopping:
                    self.lock.wait()
                if self.stopping:
                    return
                batch: list[_Input] = []
                while self.waiting and len(batch) < self.max_batch:
                    item = self.waiting.popleft()
                    if not item.dropped:
                        batch.append(item)
                self.computing = len(batch)
            if batch:
                self._compute(batch)
            with self.lock:
                self.computing = 0

    def _compute(self, batch: list[_Input]) -> None:
        try:
            logits = classify_ids(self.model, [item.ids for item in batch], self.tokenizer.eot_id, len(batch),
                                  self.device)
            rows = logits.softmax(-1).tolist()
        except Exception as err:  # a bug in the forward: fail these inputs, keep serving
            log.exception("classifier forward failed")
            _settle(batch, ApiError(500, f"classification failed: {type(err).__name__}: {err}",
                                    type="server_error", code="classification_failed"))
            return
        for item, row in zip(batch, rows, strict=True):
            _settle([item], row)


def _settle(inputs: list[_Input], result: list[float] | ApiError) -> None:
    """Hand each input its result (or error) on its handler's loop, unless the handler has gone."""

    def resolve(future: asyncio.Future) -> None:
        if future.done():  # cancelled: its client left
            return
        if isinstance(result, ApiError):
            future.set_exception(result)
        else:
            future.set_result(result)

    for item in inputs:
        try:
            item.loop.call_soon_threadsafe(resolve, item.future)
        except RuntimeError:  # the loop has closed: nobody is waiting
            pass


def classification(model_name: str, labels: list[str], probabilities: list[list[float]], prompt_tokens: int
                   ) -> dict:
    """The answer of POST /v1/classify, shaped as vLLM's: per input, its likeliest label and every label's
    probability (in the order /v1/models lists the labels)."""
    data = [{"index": index, "label": labels[max(range(len(row)), key=row.__getitem__)], "probs": row,
             "num_classes": len(labels)} for index, row in enumerate(probabilities)]
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model_name,
            "data": data, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                                    "completion_tokens": 0, "prompt_tokens_details": None}}
