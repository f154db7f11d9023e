"""`lmforge serve RUN`: its command-line options, loading the run, and running uvicorn until SIGTERM or Ctrl-C.

SIGTERM drains: uvicorn stops accepting connections, in-flight requests finish (up to --drain-timeout
seconds), the engine stops, and the process exits 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from lmforge.errors import UserError

API_KEY_ENV = "LMFORGE_API_KEY"


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("serve", help="serve a run over an OpenAI-compatible HTTP API with a playground page")
    p.set_defaults(func=run_server)
    p.add_argument("run", help="run directory or a checkpoint directory inside one")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on the API (default: ${API_KEY_ENV})")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together in one forward pass")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (else 413)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests")
    p.add_argument("--device", default="auto")


def build_app(run: str | Path, *, device: str = "auto", api_key: str | None = None, max_batch: int = 16,
              max_queue: int = 256, max_tokens_limit: int = 4096, max_body_bytes: int = 1_000_000,
              drain_timeout: float = 30.0):
    """The app serving a run, named after its directory (checks the numbers, loads the model)."""
    from lmforge.infer.batched import BatchedEngine
    from lmforge.infer.load import load_for_inference
    from lmforge.run import resolve_checkpoint
    from lmforge.serve.app import ServeSettings, create_app
    from lmforge.tasks.template import load_chat_template

    for name, value in (("--max-batch", max_batch), ("--max-queue", max_queue),
                        ("--max-tokens-limit", max_tokens_limit), ("--max-body-bytes", max_body_bytes)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if drain_timeout < 0:
        raise UserError(f"--drain-timeout must be 0 or more seconds, got {drain_timeout}")
    run_dir, _ = resolve_checkpoint(run)
    model, _, tokenizer, _, _ = load_for_inference(run, device)
    engine = BatchedEngine(model, tokenizer, max_batch=max_batch)
    settings = ServeSettings(model_name=run_dir.resolve().name, api_key=api_key, max_batch=max_batch,
                             max_queue=max_queue, max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes,
                             drain_timeout=drain_timeout)
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


def run_server(args: argparse.Namespace) -> None:
    import signal

    import uvicorn

    sock = bind(args.host, args.port)
    try:
        app = build_app(args.run, device=args.device, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                        max_batch=args.max_batch, max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                        max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout)
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

    host, port = sock.getsockname()[:2]
    model = app.state.server.model_card()
    print(f"lmforge serve: {model['id']} ({model['arch']}, context {model['context_length']}) on "
          f"http://{host}:{port}  (API at /v1, Ctrl-C or SIGTERM to stop)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(args.drain_timeout) or None,
                            access_log=False)
    DrainingServer(config).run(sockets=[sock])
