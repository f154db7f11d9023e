"""The scheduler: the server's side of the engine process (worker.py, which owns the model and steps the batched
engine); HTTP handlers (on the asyncio event loop) hand it requests and receive their events through asyncio
queues.

`Scheduler.launch` spawns the engine process and waits until its model is loaded (a load error is the
`UserError` it sent, for `lmforge serve` to exit with before it serves). A handler submits every choice of one
HTTP request together (with the format they must follow, compiled over there); each choice's events arrive on
one shared queue as (choice index, event). `cancel` marks choices whose client left: the engine drops them at
its next step. The engine sends one message per step with every event of that step; the event loop reads it
when the pipe is readable (`loop.add_reader`), so no thread of this process waits on the engine.

If the engine process dies, the requests in flight end with an error (a 500, or an error event in a stream),
later ones get a 503, and the server says so in one line of its log. `stop` drains, tells the process to stop
and waits for it to exit.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.config.sections import ModelConfig
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.infer.batched import EngineCounters, GenerationEvent, GenerationRequest
from lmforge.infer.constrained import OutputFormat
from lmforge.serve.errors import ApiError
from lmforge.serve.worker import EngineFacts, Refusal, StepReport, run_engine

log = logging.getLogger("lmforge.serve")
STOP_WAIT = 10.0  # seconds the engine process gets to exit once told to stop, before it is killed


@dataclass
class _Pending:
    """A submitted request the engine has not finished: where its events go."""

    request: GenerationRequest
    queue: asyncio.Queue
    index: int


class Scheduler:
    """The engine process and the requests in flight on it. It answers what the server asks of its engine
    (`tokenizer`, `block_size`, `model_config`, `batches_decoding`, `cache_kind`, `max_batch`, `device`,
    `threads`, `active_count`, `waiting_count`, `has_work`, `counters`: the engine's counters as of its last
    step)."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn, facts: EngineFacts, tokenizer: Tokenizer,
                 model_config: ModelConfig, max_queue: int):
        self.process = process
        self.conn = conn
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.block_size = facts.block_size
        self.batches_decoding = facts.batches_decoding
        self.cache_kind = facts.cache_kind
        self.max_batch = facts.max_batch
        self.device = facts.device
        self.threads = facts.threads
        self.pid = facts.pid
        self.max_queue = max_queue
        self.counters = EngineCounters()
        self.messages = 0  # step messages read from the engine
        self.pending: dict[int, _Pending] = {}
        self.ids: dict[int, int] = {}  # id(request) -> its request id, while pending
        self.next_id = 0
        self.submitted = 0
        self.report = StepReport(0, 0, 0, 0, 0, 0, 0, ())
        self.send_lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self.dead: str | None = None  # why the engine process is gone, when it died
        self._finalizer = weakref.finalize(self, _end_process, process, conn)

    @classmethod
    def launch(cls, load: Callable, threads: int | None, tokenizer: Tokenizer, model_config: ModelConfig,
               max_queue: int) -> Scheduler:
        """Start the engine process, which calls `load` (picklable: worker.load_engine with its arguments) to
        build its engine and decodes on `threads` torch threads; return once it is ready, or raise the UserError
        it failed with."""
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold torch's threads
        conn, child_conn = context.Pipe()
        process = context.Process(target=run_engine, args=(child_conn, load, threads), name="lmforge-engine",
                                  daemon=True)
        start_ignoring_ctrl_c(process)
        child_conn.close()
        try:
            kind, body = conn.recv()
        except (EOFError, OSError):
            process.join(STOP_WAIT)
            _end_process(process, conn)
            raise UserError(f"the generation engine exited while loading the model (exit code {process.exitcode})"
                            ) from None
        except BaseException:
            _end_process(process, conn)
            raise
        if kind == "error":
            _end_process(process, conn)
            raise UserError(body)
        return cls(process, conn, body, tokenizer, model_config, max_queue)

    # ---- on the event loop ----
    def start(self) -> None:
        """Read the engine's messages on the running event loop."""
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.conn.fileno(), self._receive)

    def submit(self, requests: list[GenerationRequest], queue: asyncio.Queue,
               output: OutputFormat | None = None) -> None:
        """Queue the requests (one per choice, all to follow `output` when given); their events go to `queue` as
        (index, event), a format the engine cannot use as an ApiError. Refuses with 400 when they are more than
        max_queue (they could never all wait: retrying cannot help), 429 when they would put more than max_queue
        requests in the waiting line now, 503 once stopping or when the engine process is gone."""
        if len(requests) > self.max_queue:
            raise ApiError(400, f"this request asks for {len(requests)} completions (n times the prompts), more "
                                f"than the {self.max_queue} this server queues at once (lmforge serve --max-queue); "
                                "send fewer prompts or a smaller n per request", code="too_many_choices")
        if self.dead is not None:
            raise ApiError(503, f"the generation engine is not running ({self.dead}); restart the server",
                           type="server_error", code="engine_stopped")
        if self.stopping:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        waiting = self.waiting_count()
        if waiting + len(requests) > self.max_queue:
            raise ApiError(429, f"the server is busy: {waiting} requests are waiting (lmforge serve --max-queue "
                                f"{self.max_queue}); retry shortly", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})
        wired = []
        for index, request in enumerate(requests):
            request_id, self.next_id = self.next_id, self.next_id + 1
            self.pending[request_id] = _Pending(request, queue, index)
            self.ids[id(request)] = request_id
            wired.append((request_id, request.prompt, request.max_tokens, request.temperature, request.top_k,
                          request.top_p, request.seed, tuple(request.stop), request.stop_token, request.logprobs,
                          request.prompt_logprobs))
        self.submitted += len(requests)
        self._send(("submit", output, wired))

    def cancel(self, requests: list[GenerationRequest]) -> None:
        ids = [self.ids[id(request)] for request in requests if id(request) in self.ids]
        for request in requests:
            request.cancelled = True
        if ids and self.dead is None:
            self._send(("cancel", ids))

    def _send(self, message: tuple) -> None:
        try:
            with self.send_lock:
                self.conn.send(message)
        except OSError:  # the engine is gone: its end of the pipe reads as closed, and _receive says so
            pass

    def _receive(self) -> bool:
        """The engine's next message: deliver its step's events to their queues; False at the end of the pipe.
        (The event loop calls this while the pipe is readable, so one message per call reads them all without
        polling the pipe in between: a poll builds a selector each time.)"""
        if self.conn.closed:
            return False
        try:
            _, events, report = self.conn.recv()
        except (EOFError, OSError):
            self._engine_gone()
            return False
        self._deliver(events, StepReport(*report))
        return True

    def _receive_rest(self) -> None:
        """Every message the engine sent before it exited, to the end of the pipe (nothing is left to wait for)."""
        while self._receive():
            pass

    def _deliver(self, events: list[tuple[int, tuple | Refusal]], report: StepReport) -> None:
        """Each event (its fields: worker.wire_event) to its request's queue."""
        self.messages += 1
        self.report = report
        counters = self.counters
        counters.steps, counters.cancelled = report.steps, report.cancelled
        counters.prompt_tokens, counters.generated_tokens = report.prompt_tokens, report.generated_tokens
        if report.rows:
            counters.rows_per_step = (counters.rows_per_step + list(report.rows))[-64:]
        for request_id, fields in events:
            pending = self.pending.get(request_id)
            if pending is None:
                continue
            if isinstance(fields, Refusal):
                item = ApiError(fields.status, fields.message, param=fields.param, code=fields.code)
                self._forget(request_id)
            else:
                item = GenerationEvent(*fields)
                if item.finish_reason:
                    self._forget(request_id)
            pending.queue.put_nowait((pending.index, item))

    def _forget(self, request_id: int) -> None:
        pending = self.pending.pop(request_id)
        self.ids.pop(id(pending.request), None)

    def _engine_gone(self) -> None:
        """The engine's end of the pipe closed: expected once told to stop, else it died."""
        if self.loop is not None:
            self.loop.remove_reader(self.conn.fileno())
        if not self.stopping:
            # Its pipe closes as it exits: the exit code comes next. (Once stopping, only `stop` waits for the
            # process: of two threads waiting, one reaps it and the other would take it for still running.)
            self.process.join(1.0)
            self.dead = f"its process {self.pid} exited with code {self.process.exitcode}"
            log.error("lmforge serve: the generation engine stopped unexpectedly (%s); generation requests get 503 "
                      "until the server is restarted", self.dead)
        message = "the server stopped before this request finished" if self.stopping else \
            f"the generation engine stopped unexpectedly ({self.dead})"
        for request_id, pending in list(self.pending.items()):
            self._forget(request_id)
            pending.queue.put_nowait((pending.index, GenerationEvent(finish_reason="error", error=message)))

    # ---- from any thread ----
    def active_count(self) -> int:
        return self.report.active

    def waiting_count(self) -> int:
        """Requests sent and not yet in a slot: those the engine has not received yet, and those it holds."""
        return self.submitted - self.report.received + self.report.waiting

    def has_work(self) -> bool:
        return bool(self.pending)

    def alive(self) -> bool:
        return self.dead is None and self.process.is_alive()

    def stop(self, drain_timeout: float) -> None:
        """Let active and waiting requests finish (up to drain_timeout seconds), then tell the engine to stop (it
        ends the rest with an error) and wait for its process to exit (killed after STOP_WAIT seconds)."""
        deadline = time.monotonic() + drain_timeout
        while self.has_work() and time.monotonic() < deadline and self.alive():
            time.sleep(0.02)
        self.stopping = True
        self._send(("stop",))
        self.process.join(STOP_WAIT)
        if self.process.is_alive():
            log.error("lmforge serve: the generation engine did not stop within %g s; killed it", STOP_WAIT)
            self.process.kill()
            self.process.join(STOP_WAIT)
        if self.loop is not None and not self.loop.is_closed():
            self._on_loop(self._receive_rest)  # what the engine sent last; then the loop lets go of the pipe
        self._finalizer()

    def _on_loop(self, work: Callable[[], None]) -> None:
        """Run `work` on the scheduler's event loop, and wait for it (the caller may be on that loop)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            work()
            return
        done = threading.Event()
        try:
            self.loop.call_soon_threadsafe(lambda: (work(), done.set()))
        except RuntimeError:  # the loop has closed meanwhile
            return
        done.wait(STOP_WAIT)


def start_ignoring_ctrl_c(process: multiprocessing.process.BaseProcess) -> None:
    """Start a spawned process with SIGINT ignored from its first instruction: Ctrl-C in a terminal reaches every
    process of the group, and the engine, still importing torch, would print a KeyboardInterrupt traceback (the
    server stops it after draining). An ignored signal stays ignored across exec, and Python then installs no
    handler of its own. The server ignores Ctrl-C only while it starts the process (milliseconds)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        process.start()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def _end_process(process: multiprocessing.process.BaseProcess, conn) -> None:
    """The engine process ended for good (killed if it is still running), and the pipe closed."""
    if process.is_alive():
        process.kill()
    process.join(STOP_WAIT)
    conn.close()
