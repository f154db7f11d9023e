"""The engine process: `lmforge serve` runs the model in a process of its own, started by the scheduler
(scheduler.py) with the "spawn" method, and this module is what runs there (`run_engine`).

Why a process: in one process the engine's thread and the event loop's thread take turns on one interpreter
lock, and profiled on the demo model, the engine waited about 0.85 ms per token (of 2.3) to take it back after
each torch call. Here the engine has an interpreter to itself, and the server's only work per engine step is one
message to read.

It owns the model, its torch threads (`hardware.decoding_threads`), the batched engine (lmforge/infer/batched.py),
each request's seeded generator and each format's compiled constraint. It loops: read what the server sent
(requests, cancels, stop), run one engine step, send that step's events back as ONE message, a list of
(request id, event) pairs with the engine's counters, as plain tuples (`wire_event`, `StepReport`): pickling a
dataclass goes through its reduce protocol in Python, several times slower (a message of one event: about 14 µs
to pickle and unpickle against 2 µs as tuples), paid on both sides of the pipe at every step. A format (a JSON
schema, a regex, a grammar) arrives as its `OutputFormat` and is compiled here, once per HTTP request, on a
thread of its own so that a slow grammar does not hold up the steps of the others; one that cannot be used comes
back as a `Refusal` (the route's 400).

The process ends when the server says stop (every unfinished request then ends with an error), or when the
server's end of the pipe closes (the server is gone: nobody is left to answer). It ignores SIGINT from its start
(scheduler.start_ignoring_ctrl_c): Ctrl-C in a terminal reaches every process of the group, and the server drains,
then stops it.
"""

from __future__ import annotations

import contextlib
import selectors
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple

from lmforge.errors import UserError
from lmforge.infer.batched import BatchedEngine, GenerationEvent, GenerationRequest
from lmforge.infer.constrained import CompiledFormat, FormatError, OutputFormat, compile_format

IDLE_POLL = 0.5  # seconds an idle engine waits for a message before looking again (a format may be compiling)
COMPILING_POLL = 0.005  # ... while a format compiles and nothing else runs


@dataclass(frozen=True)
class EngineFacts:
    """What the server needs to know of the engine it started (the first message, once the model is loaded)."""

    block_size: int
    batches_decoding: bool
    cache_kind: str
    max_batch: int
    device: str
    threads: int
    pid: int


@dataclass(frozen=True)
class Refusal:
    """A request the engine will not run, as the HTTP status the server answers with (a format it cannot use)."""

    status: int
    message: str
    param: str | None
    code: str


class StepReport(NamedTuple):
    """The engine's state after a step, sent with its events: the server's counts and the tests' counters."""

    active: int
    waiting: int  # requests received and not yet in a slot (compiling their format, or waiting for one)
    received: int  # requests received so far
    steps: int
    cancelled: int
    prompt_tokens: int
    generated_tokens: int
    rows: tuple[int, ...]  # the batch size of each step since the last report


EVENT_FIELDS = tuple(field.name for field in fields(GenerationEvent))  # a field added there travels too


def wire_event(event: GenerationEvent) -> tuple:
    """An event as the tuple of its fields, in their order (`GenerationEvent(*fields)` on the other side)."""
    return tuple(getattr(event, name) for name in EVENT_FIELDS)


def load_engine(run: str | Path, device: str, max_batch: int) -> BatchedEngine:
    """The run's model on its batched engine."""
    from lmforge.infer.generate import check_generates
    from lmforge.infer.load import load_run

    loaded = load_run(run, device=device)
    check_generates(loaded.config.model)
    return BatchedEngine(loaded.model, loaded.tokenizer, max_batch=max_batch)


def run_engine(conn: Connection, load: Callable[[], BatchedEngine], threads: int | None) -> None:
    """The engine process's main: load (an error goes back as one line, for the server to exit with), then serve
    the server's messages on `threads` torch threads (--threads; None: `decoding_threads`' default) until the server
    says stop or goes away."""
    import os

    import torch

    from lmforge.hardware import decoding_threads

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # already, when the server started it from its main thread
    for_life = contextlib.ExitStack()
    try:
        engine = load()
        count = for_life.enter_context(decoding_threads(threads, engine.model.config.n_embd,
                                                        torch.device(engine.device)))
    except UserError as err:
        conn.send(("error", str(err)))
        return
    except Exception as err:  # a bug: the server shows it in one line, and this process's traceback follows
        conn.send(("error", f"the generation engine failed to start: {type(err).__name__}: {err}"))
        raise
    with for_life:
        conn.send(("ready", EngineFacts(engine.block_size, engine.batches_decoding, engine.cache_kind,
                                        engine.max_batch, str(engine.device), count, os.getpid())))
        try:
            EngineLoop(conn, engine).run()
        except (EOFError, BrokenPipeError, ConnectionResetError):  # the server is gone
            pass


class EngineLoop:
    def __init__(self, conn: Connection, engine: BatchedEngine):
        self.conn = conn
        # Registered once: Connection.poll builds and registers a selector at every call, a cost paid per step.
        self.incoming = selectors.DefaultSelector()
        self.incoming.register(conn.fileno(), selectors.EVENT_READ)
        self.engine = engine
        self.outbox: list[tuple[int, tuple | Refusal]] = []  # (request id, wired event or refusal)
        self.requests: dict[int, GenerationRequest] = {}  # by id, until finished
        self.compiling: list[tuple[Future, list[GenerationRequest]]] = []
        self.received = 0
        self.reported_steps = 0
        self.stopping = False

    def run(self) -> None:
        engine = self.engine
        while not self.stopping:
            busy = engine.has_work()
            timeout = 0 if busy else COMPILING_POLL if self.compiling else IDLE_POLL
            if self.incoming.select(timeout):
                self.read_messages()
            self.admit_compiled()
            if not self.stopping and engine.has_work():
                try:
                    engine.step()
                except Exception as err:  # a bug in a step: fail what is in flight, keep serving new requests
                    import traceback

                    traceback.print_exc()
                    engine.fail_all(f"internal error in the generation engine: {type(err).__name__}: {err}")
            self.report()
        message = "the server stopped before this request finished"
        engine.fail_all(message)
        for _, requests in self.compiling:
            for request in requests:
                request.emit(GenerationEvent(finish_reason="error", error=message))
        self.report(force=True)

    def read_messages(self) -> None:
        while self.incoming.select(0):
            kind, *body = self.conn.recv()
            if kind == "submit":
                self.submit(*body)
            elif kind == "cancel":
                for request_id in body[0]:
                    request = self.requests.get(request_id)
                    if request is not None:
                        self.engine.cancel(request)
            elif kind == "stop":
                self.stopping = True
                return

    def submit(self, output: OutputFormat | None, wired: list[tuple]) -> None:
        requests = [self.unwire(*fields) for fields in wired]
        self.received += len(requests)
        if output is None:
            for request in requests:
                self.engine.submit(request)
        else:
            self.compiling.append((self.compile(output), requests))

    def compile(self, output: OutputFormat) -> Future:
        """The format compiled for the engine's tokenizer, on a thread of its own (a daemon: one still compiling
        when the process stops is abandoned)."""
        future: Future = Future()

        def work() -> None:
            try:
                future.set_result(compile_format(self.engine.tokenizer, output))
            except BaseException as err:
                future.set_exception(err)

        threading.Thread(target=work, name="lmforge-format", daemon=True).start()
        return future

    def unwire(self, request_id: int, *fields) -> GenerationRequest:
        outbox, requests = self.outbox, self.requests

        def emit(event: GenerationEvent) -> None:
            outbox.append((request_id, wire_event(event)))
            if event.finish_reason:
                requests.pop(request_id, None)

        request = GenerationRequest(fields[0], fields[1], emit, *fields[2:])
        requests[request_id] = request
        return request

    def admit_compiled(self) -> None:
        """Requests whose format has compiled go to the engine (each with its own constraint), or are refused."""
        done = [(future, requests) for future, requests in self.compiling if future.done()]
        if not done:
            return
        self.compiling = [entry for entry in self.compiling if not entry[0].done()]
        for future, requests in done:
            try:
                compiled: CompiledFormat = future.result()
            except FormatError as err:
                self.refuse(requests, Refusal(400, str(err), err.param, "invalid_format"))
                continue
            except Exception as err:
                for request in requests:
                    request.emit(GenerationEvent(finish_reason="error", error=f"{type(err).__name__}: {err}"))
                continue
            for request in requests:
                if request.cancelled:
                    request.emit(GenerationEvent(finish_reason="cancelled"))
                    continue
                request.constraint = compiled.constraint()
                self.engine.submit(request)

    def refuse(self, requests: list[GenerationRequest], refusal: Refusal) -> None:
        for request in requests:
            request_id = next(key for key, value in self.requests.items() if value is request)
            self.requests.pop(request_id)
            self.outbox.append((request_id, refusal))

    def report(self, force: bool = False) -> None:
        """This step's events and counters, in one message (none when nothing happened)."""
        counters = self.engine.counters
        new_steps = counters.steps - self.reported_steps
        if not (self.outbox or new_steps or force):
            return
        rows = tuple(counters.rows_per_step[-new_steps:]) if new_steps else ()
        self.reported_steps = counters.steps
        waiting = self.engine.waiting_count() + sum(len(requests) for _, requests in self.compiling)
        report = StepReport(self.engine.active_count(), waiting, self.received, counters.steps, counters.cancelled,
                            counters.prompt_tokens, counters.generated_tokens, rows)
        events = list(self.outbox)
        self.outbox.clear()  # the same list: each request's `emit` appends to it
        self.conn.send(("step", events, tuple(report)))
