"""The HTTP app: OpenAI-compatible completions and chat completions over one batched engine, plus the
playground page, health, Prometheus metrics and the tokenizer endpoints evaluation harnesses use.

`create_app` builds it from an engine (the scheduler of the engine process, or a classifier's engine), the chat
template and the settings: the routes (routes.py) on their router, the errors in OpenAI's shape (errors.py), the
`Guard` in front, and the `Server` the routes share on `app.state.server`. With an API key every route except /,
/static, /health and /metrics needs `Authorization: Bearer KEY`. Request bodies are read within the server's
limits (`Server.read_json`: JSON, size, depth, time); the connections themselves are guarded in transport.py
(request-head deadline, connection cap).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.data.template import ChatTemplate
from lmforge.serve.classify import ClassifyEngine
from lmforge.serve.errors import ApiError, add_error_handlers
from lmforge.serve.routes import STATIC_DIR, router
from lmforge.serve.scheduler import Scheduler
from lmforge.serve.server import Server, ServeSettings

PUBLIC_PATHS = ("/", "/health", "/metrics")
COUNTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/classify", "/v1/models", "/health",
                 "/metrics", "/tokenize", "/detokenize", "/tokenizer_info", "/")


class Guard:
    """ASGI middleware in front of every route: notes when the request arrived (`request.state.arrived`, the
    start of its time to first token), asks for the API key on non-public routes, and counts every answer by
    route and status. (Plain ASGI rather than an http middleware, so that a streamed response's disconnect
    reaches the route.)"""

    def __init__(self, app: ASGIApp, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["arrived"] = time.monotonic()
        path = scope["path"]
        status = 500

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if not (path in PUBLIC_PATHS or path.startswith("/static/")):
                self.server.check_auth(Headers(scope=scope))
        except ApiError as err:
            await err.response()(scope, receive, send_counting)
        else:
            await self.app(scope, receive, send_counting)
        finally:
            label = path if path in COUNTED_PATHS else "other"
            self.server.metrics.requests.labels(label, str(status)).inc()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The engine's messages are read while the app runs (a classifier's thread runs); at shutdown it drains (up
    to --drain-timeout) and the engine process stops."""
    server: Server = app.state.server
    server.scheduler.start()
    yield
    await asyncio.to_thread(server.scheduler.stop, server.settings.drain_timeout)


def create_app(engine: Scheduler | ClassifyEngine, template: ChatTemplate, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving one engine: a language model's in its own process (the scheduler started it), a
    classifier's in this one."""
    server = Server(engine, template, settings)
    app = FastAPI(title="lmforge", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Guard, server=server)
    add_error_handlers(app)
    app.include_router(router)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
