"""`lmforge serve RUN`: checking its options, loading the run, and running uvicorn until SIGTERM or Ctrl-C.

The flags are declared with every other command's (lmforge/arguments/inference.py); their values are checked here,
where Python callers of `build_app` reach the same checks.

SIGTERM drains: uvicorn stops accepting connections, in-flight requests finish (up to --drain-timeout
seconds), the engine process stops, and the server exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import socket
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from lmforge.errors import UserError

API_KEY_ENV = "LMFORGE_API_KEY"
# Upper bounds on the limits (the batch's bound is the memory its cache needs: BatchedEngine checks it).
MAX_QUEUE = 100_000  # each waiting request holds its prompt; a longer line only makes clients wait longer
MAX_BODY_BYTES = 100_000_000  # a body is held whole, then parsed: several times its size in memory
DEFAULT_MAX_CONNECTIONS = 512
RESERVED_FILES = 64  # descriptors the server needs besides its connections (checkpoints, logs, the listener)


def check_count(name: str, value: int, high: int | None = None, why: str = "") -> None:
    """A count option: at least 1, and at most `high` (`why` says what sets that bound)."""
    if value < 1:
        raise UserError(f"{name} must be at least 1, got {value}")
    if high is not None and value > high:
        raise UserError(f"{name} must be at most {high}{why}, got {value}")


def check_seconds(name: str, value: float, *, zero: bool = False) -> None:
    """A duration option: a finite number of seconds, above 0 (or 0 itself where `zero`)."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise UserError(f"{name} must be a finite number of seconds{', 0 or more' if zero else ' above 0'}, "
                        f"got {value}")


def check_api_key(api_key: str | None) -> None:
    """An empty key would serve everyone without a word; a key with spaces or non-ASCII characters could never
    match an Authorization header."""
    if api_key is None:
        return
    if not api_key.strip():
        raise UserError(f"the API key (--api-key or ${API_KEY_ENV}) is empty; give a real key, or set neither to "
                        "serve without one")
    if not api_key.isascii() or not api_key.isprintable() or any(c.isspace() for c in api_key):
        raise UserError(f"the API key (--api-key or ${API_KEY_ENV}) must be printable ASCII without spaces, "
                        "as an 'Authorization: Bearer KEY' header carries it")


def build_app(run: str | Path, *, device: str = "auto", api_key: str | None = None, max_batch: int = 16,
              max_queue: int = 256, max_tokens_limit: int = 4096, max_body_bytes: int = 1_000_000,
              body_timeout: float = 30.0, drain_timeout: float = 30.0, threads: int | None = None,
              engine_loader: Callable | None = None):
    """The app serving a run, named after its directory (checks the options, starts the engine). A classify run
    is served as a classifier (/v1/classify) in this process; any other as a language model, whose engine process
    loads the model (the engine refuses a batch whose cache does not fit in memory), decodes on `threads` torch
    threads (`hardware.decoding_threads`), and is ready when this returns. `engine_loader` (tests) replaces
    worker.load_engine: a picklable function of the same arguments."""
    from lmforge.data.template import load_chat_template
    from lmforge.infer.load import load_run
    from lmforge.run.checkpoints import resolve_checkpoint
    from lmforge.run.directory import read_config, read_tokenizer
    from lmforge.serve.app import create_app
    from lmforge.serve.classify import ClassifyEngine
    from lmforge.serve.scheduler import Scheduler
    from lmforge.serve.server import ServeSettings
    from lmforge.serve.worker import load_engine

    check_api_key(api_key)
    check_count("--max-batch", max_batch)
    check_count("--max-queue", max_queue, MAX_QUEUE)
    check_count("--max-tokens-limit", max_tokens_limit)
    check_count("--max-body-bytes", max_body_bytes, MAX_BODY_BYTES)
    check_seconds("--body-timeout", body_timeout)
    check_seconds("--drain-timeout", drain_timeout, zero=True)
    run_dir, _ = resolve_checkpoint(Path(run))
    config = read_config(run_dir)
    if config.finetune is not None and config.finetune.labels:  # a classifier: labels, not next tokens
        loaded = load_run(run, device=device, language_model=False, chat_template=True)
        engine = ClassifyEngine(loaded.model, loaded.tokenizer, loaded.device, max_batch, max_queue)
    else:
        load = partial(engine_loader or load_engine, str(run), device, max_batch)
        engine = Scheduler.launch(load, threads, read_tokenizer(run_dir), config.model, max_queue)
    settings = ServeSettings(model_name=run_dir.resolve().name, api_key=api_key, max_batch=max_batch,
                             max_queue=max_queue, max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes,
                             body_timeout=body_timeout, drain_timeout=drain_timeout)
    return create_app(engine, load_chat_template(run_dir), settings)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error (port in use, bad address) before any model loads."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0..65535, got {port}")
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # The protocol number matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets that name TCP, and
        # with Nagle on, each keep-alive request waits ~40 ms for a delayed ACK.
        sock = socket.socket(family, kind, protocol)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err}); is another server using it? "
                        "pick another --port") from None
    sock.set_inheritable(True)
    return sock


def open_files_limit() -> int | None:
    """How many file descriptors this process may open (ulimit -n), or None if unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_limit(requested: int | None) -> int:
    """--max-connections checked against ulimit -n (each connection is a descriptor); the default fits it."""
    files = open_files_limit()
    room = None if files is None else max(files - RESERVED_FILES, 1)
    if requested is None:
        return DEFAULT_MAX_CONNECTIONS if room is None else min(DEFAULT_MAX_CONNECTIONS, room)
    check_count("--max-connections", requested, room,
                f" (ulimit -n is {files}, {RESERVED_FILES} kept for the server's own files; raise ulimit -n)")
    return requested


def server_config(app, *, header_timeout: float = 10.0, keep_alive_timeout: float = 5.0,
                  max_connections: int | None = None, drain_timeout: float = 30.0):
    """uvicorn's configuration for the app: the connection limits (lmforge/serve/transport.py), no access log."""
    import uvicorn

    from lmforge.serve.transport import guarded_protocol

    check_seconds("--header-timeout", header_timeout)
    check_seconds("--keep-alive-timeout", keep_alive_timeout)
    check_seconds("--drain-timeout", drain_timeout, zero=True)
    protocol = guarded_protocol(header_timeout, connection_limit(max_connections))
    return uvicorn.Config(app, http=protocol, log_level="warning", access_log=False,
                          timeout_keep_alive=keep_alive_timeout, timeout_graceful_shutdown=drain_timeout)


def run_server(args: argparse.Namespace) -> None:
    import signal

    import torch
    import uvicorn

    from lmforge.hardware import decoding_threads

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    sock = bind(args.host, args.port)
    try:
        app = build_app(args.run, device=args.device, api_key=api_key, max_batch=args.max_batch,
                        max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                        max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout,
                        drain_timeout=args.drain_timeout, threads=args.threads)
        config = server_config(app, header_timeout=args.header_timeout, keep_alive_timeout=args.keep_alive_timeout,
                               max_connections=args.max_connections, drain_timeout=args.drain_timeout)
    except BaseException:
        sock.close()
        raise

    class DrainingServer(uvicorn.Server):
        """uvicorn re-raises a caught SIGTERM after its graceful shutdown (exit by signal); a drained server
        exits 0 instead."""

        def handle_exit(self, sig: int, frame) -> None:
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals.remove(sig)

    server = app.state.server
    host, port = sock.getsockname()[:2]
    model = server.model_card()
    if server.classifier is None:  # the engine process set its own threads
        threads_in_use = contextlib.nullcontext(server.engine.threads)
    else:
        threads_in_use = decoding_threads(args.threads, server.model_config.n_embd, torch.device(server.engine.device))
    with threads_in_use as threads:
        print(f"lmforge serve: {model['id']} ({model['arch']}, context {model['context_length']}, {threads} "
              f"decoding thread{'s' if threads > 1 else ''}) on http://{host}:{port}  (API at /v1, Ctrl-C or "
              "SIGTERM to stop)", file=sys.stderr, flush=True)
        DrainingServer(config).run(sockets=[sock])
