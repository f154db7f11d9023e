"""Errors in OpenAI's shape: `ApiError` (an HTTP status with {"error": {"message", "type", "param", "code"}}) and
the app's exception handlers, which answer every failure in that shape (a wrong route or method included)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("lmforge.serve")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before its answer: counted, never a 500


class ApiError(Exception):
    """An error answered in OpenAI's shape with its HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def model_not_found(model: str, served: str) -> ApiError:
    return ApiError(404, f"the model '{model}' does not exist; this server serves '{served}'", param="model",
                    code="model_not_found")


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return err.response()


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (no such route, method not allowed) in OpenAI's shape."""
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    error = ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", type=kind,
                     headers=getattr(err, "headers", None))
    return error.response()


async def _client_left(request: Request, err: ClientDisconnect) -> JSONResponse:
    # Nobody is left to read the answer; it is sent only so that the request is counted as the client's doing,
    # not the server's.
    log.info("%s %s: the client disconnected before sending its whole request", request.method, request.url.path)
    return ApiError(CLIENT_CLOSED_REQUEST, "the client closed the connection before sending its whole request",
                    code="client_closed_request").response()


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    return ApiError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").response()


def add_error_handlers(app: FastAPI) -> None:
    """Every failure answered in OpenAI's shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_left)
    app.add_exception_handler(Exception, _internal_error)
