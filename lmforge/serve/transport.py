"""The server's connections: how long a client may take to send a request's head, how large the head may be,
and how many connections are served at once (uvicorn's httptools protocol with these added).

httptools (llhttp, in C) rather than uvicorn's h11 protocol (pure Python): a streamed completion writes one event
per token, and h11's framing showed in the server's profile at every token (with uvloop and the engine pipe's
changes: benchmarks/RESULTS.md, serving round 4).

uvicorn closes a keep-alive connection that sits idle between requests (--keep-alive-timeout), but waits
forever for a request head that never finishes, so half-open connections pile up; and its concurrency limit
answers in plain text. Here a connection that has not sent a whole request head within --header-timeout
seconds is closed (answered 408 in OpenAI's shape if it had started one), a head larger than MAX_HEAD_BYTES is
answered 431 and closed (llhttp sets no limit of its own, so headers would pile up in memory until the deadline;
h11 stopped at the same 16 kB), and a connection beyond --max-connections is answered 503 in OpenAI's shape and
closed. The body has its own deadline where the app reads it (--body-timeout, Server.read_json).
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

from fastapi.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lmforge.serve.errors import ApiError

MAX_HEAD_BYTES = 16 * 1024  # a request line and headers; an OpenAI client sends well under 2 kB


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size limit for each request head, and a cap on
    connections (set by `guarded_protocol`)."""

    header_timeout: float
    max_connections: int

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            self.app = _refuse_over_limit(self.max_connections)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        self.head_started = True
        super().data_received(data)
        if self._in_request():
            self._cancel_deadline()
        elif not self.transport.is_closing():
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._cancel_deadline()
                self.transport.write(_raw_response(ApiError(
                    431, f"the request line and headers are over {MAX_HEAD_BYTES} bytes", code="head_too_large")))
                self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._in_request():
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        """Whether a request's head has arrived and its answer is not complete yet."""
        return self.cycle is not None and not self.cycle.response_complete

    def _await_head(self) -> None:
        self._cancel_deadline()
        self.head_started = False
        self.head_bytes = 0
        self.head_deadline = self.loop.call_later(self.header_timeout, self._head_overdue)

    def _cancel_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_overdue(self) -> None:
        self.head_deadline = None
        if self.transport.is_closing() or self._in_request():
            return
        if self.head_started:  # a client that sent nothing is simply closed, as an idle keep-alive one is
            self.transport.write(_raw_response(ApiError(
                408, f"the request head did not arrive within {self.header_timeout:g} seconds "
                     "(lmforge serve --header-timeout)", code="request_timeout")))
        self.transport.close()


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give uvicorn (`uvicorn.Config(http=...)`) for these limits."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"header_timeout": header_timeout, "max_connections": max_connections})


def _refuse_over_limit(max_connections: int) -> JSONResponse:
    """The ASGI app that answers every request of a connection over the limit (a response is an ASGI app)."""
    error = ApiError(503, f"the server is at its limit of {max_connections} open connections (lmforge serve "
                          "--max-connections); retry shortly", type="server_error", code="too_many_connections")
    return JSONResponse(error.body(), status_code=503, headers={"Connection": "close", "Retry-After": "1"})


def _raw_response(error: ApiError) -> bytes:
    """An HTTP/1.1 answer written straight to the socket: before a request head is complete, h11 has no
    request to answer."""
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body
