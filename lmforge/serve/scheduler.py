"""The scheduler: one background thread owns the model and steps the batched engine; HTTP handlers (on the
asyncio event loop) hand it requests and receive their events through asyncio queues.

torch releases the GIL inside its kernels, so the event loop keeps answering while a step runs. A handler
submits every choice of one HTTP request together; each choice's events arrive on one shared queue as
(choice index, event). `cancel` marks choices whose client left: the engine drops them at its next step.

The hand-off to the event loop is one wake-up per step, after it, not one per event (`Handoff`): waking the
loop is a write to its self-pipe, and each such write lets the loop thread take the GIL from the engine in the
middle of its step; profiled on the demo model at 1 client, the engine thread spent more time in those writes
than in the model's matrix products.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable

from lmforge.infer.batched import BatchedEngine, GenerationEvent, GenerationRequest
from lmforge.serve.errors import ApiError

log = logging.getLogger("lmforge.serve")


class Scheduler:
    def __init__(self, engine: BatchedEngine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self.handoffs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Handoff] = weakref.WeakKeyDictionary()
        self.handoffs_lock = threading.Lock()

    def start(self) -> None:
        self.thread.start()

    def stop(self, drain_timeout: float) -> None:
        """Let active and waiting requests finish (up to drain_timeout seconds), then end the rest with an
        error and stop the thread."""
        deadline = time.monotonic() + drain_timeout
        while self.engine.has_work() and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.02)
        self.stopping.set()
        self.engine.wake()
        self.thread.join(timeout=10)

    def submit(self, requests: list[GenerationRequest], queue: asyncio.Queue) -> None:
        """Queue the requests (one per choice); their events go to `queue` as (index, event). Refuses with 400
        when they are more than max_queue (they could never all wait: retrying cannot help), 429 when they
        would put more than max_queue requests in the waiting line now, 503 once stopping."""
        if len(requests) > self.max_queue:
            raise ApiError(400, f"this request asks for {len(requests)} completions (n times the prompts), more "
                                f"than the {self.max_queue} this server queues at once (lmforge serve --max-queue); "
                                "send fewer prompts or a smaller n per request", code="too_many_choices")
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        waiting = self.engine.waiting_count()
        if waiting + len(requests) > self.max_queue:
            raise ApiError(429, f"the server is busy: {waiting} requests are waiting (lmforge serve --max-queue "
                                f"{self.max_queue}); retry shortly", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})
        handoff = self._handoff(asyncio.get_running_loop())
        for index, request in enumerate(requests):
            request.emit = handoff.forward_to(queue, index)
            self.engine.submit(request)

    def _handoff(self, loop: asyncio.AbstractEventLoop) -> Handoff:
        with self.handoffs_lock:
            if loop not in self.handoffs:
                self.handoffs[loop] = Handoff(loop)
            return self.handoffs[loop]

    def cancel(self, requests: list[GenerationRequest]) -> None:
        for request in requests:
            self.engine.cancel(request)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.engine.wait_for_work(timeout=0.5)
            if self.stopping.is_set():
                break
            try:
                self.engine.step()
            except Exception:  # a bug in a step: fail what is in flight, keep serving new requests
                log.exception("engine step failed")
                self.engine.fail_all("internal error in the generation engine")
            self._flush()
        self.engine.fail_all("the server stopped before this request finished")
        self._flush()

    def _flush(self) -> None:
        with self.handoffs_lock:
            handoffs = list(self.handoffs.values())
        for handoff in handoffs:
            handoff.flush()


class Handoff:
    """Events from the engine's thread to queues on one event loop: each is held until the engine's step ends
    (`flush`), then one wake-up of the loop delivers every event of that step."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, tuple[int, GenerationEvent]]] = []

    def forward_to(self, queue: asyncio.Queue, index: int) -> Callable[[GenerationEvent], None]:
        def emit(event: GenerationEvent) -> None:
            if self.loop.is_closed():
                raise RuntimeError("the event loop is closed")  # the engine cancels the request
            with self.lock:
                self.pending.append((queue, (index, event)))
        return emit

    def flush(self) -> None:
        """Hand the events held so far to the loop (on the engine's thread, after a step)."""
        with self.lock:
            if not self.pending:
                return
            pending, self.pending = self.pending, []
        try:
            self.loop.call_soon_threadsafe(_deliver, pending)
        except RuntimeError:  # the loop closed since: nobody is left to read these
            pass


def _deliver(pending: list[tuple[asyncio.Queue, tuple[int, GenerationEvent]]]) -> None:
    for queue, item in pending:
        queue.put_nowait(item)
