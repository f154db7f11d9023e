"""The scheduler: one background thread owns the model and steps the batched engine; HTTP handlers (on the
asyncio event loop) hand it requests and receive their events through asyncio queues.

torch releases the GIL inside its kernels, so the event loop keeps answering while a step runs. A handler
submits every choice of one HTTP request together; each choice's events arrive on one shared queue as
(choice index, event). `cancel` marks choices whose client left: the engine drops them at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
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
        loop = asyncio.get_running_loop()
        for index, request in enumerate(requests):
            request.emit = _forward_to(loop, queue, index)
            self.engine.submit(request)

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
        self.engine.fail_all("the server stopped before this request finished")


def _forward_to(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int
                ) -> Callable[[GenerationEvent], None]:
    def emit(event: GenerationEvent) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (index, event))  # raises once the loop is closed: cancels
    return emit
