"""The HTTP app: OpenAI-compatible completions and chat completions over one batched engine, plus the
playground page, health, Prometheus metrics and the tokenizer endpoints evaluation harnesses use.

| route | what |
|---|---|
| GET /v1/models, /v1/models/{id} | the one model: its context length and how it batches |
| POST /v1/completions | prompt (string, list, token ids), echo, logprobs, n, stop, seed, stream, top_k |
| POST /v1/chat/completions | messages through the run's chat template (lmforge.data.template) |
| GET /tokenizer_info, POST /tokenize, /detokenize | the run's tokenizer (lm-eval's remote tokenizer) |
| GET /health, /metrics, / | liveness, Prometheus text, the playground (lmforge/serve/static/index.html) |

With an API key every route except /, /static, /health and /metrics needs `Authorization: Bearer KEY`.
Request bodies are read within the server's limits (`Server.read_json`: JSON, size, depth, time); the
connections themselves are guarded in transport.py (request-head deadline, connection cap).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lmforge.data.template import ChatTemplate
from lmforge.data.tokenizer import Tokenizer
from lmforge.infer.batched import BatchedEngine, GenerationEvent, GenerationRequest
from lmforge.serve.metrics import Metrics
from lmforge.serve.scheduler import Scheduler
from lmforge.serve.schemas import (
    ApiError,
    LegacyLogprobs,
    Sampling,
    check_fits,
    check_known,
    check_messages,
    check_model,
    check_token_ids,
    parse_prompts,
    parse_sampling,
    refuse_unsupported,
    usage,
)

log = logging.getLogger("lmforge.serve")
STATIC_DIR = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/", "/health", "/metrics")
COUNTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
                 "/detokenize", "/tokenizer_info", "/")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_JSON_DEPTH = 32  # the deepest request is a list of messages (3 levels); deeper bodies are probes
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before its answer: counted, never a 500


@dataclass
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 256
    max_tokens_limit: int = 4096
    max_body_bytes: int = 1_000_000
    body_timeout: float = 30.0
    drain_timeout: float = 30.0


class Server:
    """What the routes share: the engine's scheduler, the tokenizer and template, settings and metrics."""

    def __init__(self, engine: BatchedEngine, template: ChatTemplate, settings: ServeSettings):
        self.engine = engine
        self.tokenizer: Tokenizer = engine.tokenizer
        self.template = template
        self.settings = settings
        self.context = engine.block_size
        self.scheduler = Scheduler(engine, settings.max_queue)
        self.metrics = Metrics(engine.active_count, engine.waiting_count)
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "lmforge",
                "context_length": self.context, "max_model_len": self.context,
                "arch": self.engine.model.config.arch, "vocab_size": self.tokenizer.vocab_size,
                "batching": {"continuous": True, "batched_decoding": self.engine.batches_decoding,
                             "cache": self.engine.cache_kind, "max_batch": self.engine.max_batch}}

    def check_auth(self, headers: Headers) -> None:
        key = self.settings.api_key
        if not key:
            return
        header = headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        """The request's body as a JSON object, read within the server's size and time limits: a JSON
        content type (or none), at most --max-body-bytes, all of it within --body-timeout seconds (a client
        that stalls mid-body gets a 408 and its connection closed), nested at most MAX_JSON_DEPTH deep."""
        media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise ApiError(415, f"the request body must be JSON (Content-Type: application/json), got "
                                f"'{media_type}'", code="unsupported_media_type")
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes, above this server's limit of {limit} "
                                "(lmforge serve --max-body-bytes)", code="body_too_large")
        body = bytearray()

        async def receive_all() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise ApiError(413, f"the request body is over this server's limit of {limit} bytes "
                                        "(lmforge serve --max-body-bytes)", code="body_too_large")

        try:
            await asyncio.wait_for(receive_all(), self.settings.body_timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise ApiError(408, f"the request body did not arrive within {self.settings.body_timeout:g} seconds "
                                "(lmforge serve --body-timeout)", code="request_timeout",
                           headers={"Connection": "close"}) from None
        too_deep = ApiError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep",
                            code="invalid_json")
        try:
            data = json.loads(body)
        except RecursionError:  # nested past Python's own recursion limit
            raise too_deep from None
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
        if _nesting_depth(data) > MAX_JSON_DEPTH:
            raise too_deep
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return data

    def requests_for(self, prompts: list[list[int]], sampling: Sampling, *, stop: list[str],
                     logprobs: int | None = None, prompt_logprobs: bool = False) -> list[GenerationRequest]:
        """One engine request per choice: each prompt n times (choice i of a seeded call draws with seed + i)."""
        requests = []
        for prompt in prompts:
            for copy in range(sampling.n):
                requests.append(GenerationRequest(
                    prompt, sampling.max_tokens, emit=_unset, temperature=sampling.temperature, top_k=sampling.top_k,
                    top_p=sampling.top_p, seed=None if sampling.seed is None else (sampling.seed + copy) % 2**63,
                    stop=stop, stop_token=self.tokenizer.eot_id, logprobs=logprobs, prompt_logprobs=prompt_logprobs))
        return requests

    async def events(self, requests: list[GenerationRequest], arrived: float
                     ) -> AsyncIterator[tuple[int, GenerationEvent]]:
        """The events of all choices as they come, recording metrics; leaving early cancels the unfinished."""
        queue: asyncio.Queue = asyncio.Queue()
        self.scheduler.submit(requests, queue)
        self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in requests))
        last_token = [None] * len(requests)
        finished = [False] * len(requests)
        try:
            while not all(finished):
                index, event = await queue.get()
                if event.token is not None:
                    now = time.monotonic()
                    self.metrics.completion_tokens.inc()
                    if last_token[index] is None:
                        self.metrics.time_to_first_token.observe(now - arrived)
                    else:
                        self.metrics.inter_token_latency.observe(now - last_token[index])
                    last_token[index] = now
                if event.finish_reason:
                    finished[index] = True
                yield index, event
        finally:
            unfinished = [r for r, done in zip(requests, finished, strict=True) if not done]
            if unfinished:
                self.scheduler.cancel(unfinished)


class Guard:
    """ASGI middleware: the API key on non-public routes, and every answer counted by route and status. (Plain
    ASGI rather than an http middleware, so that a streamed response's disconnect reaches the route.)"""

    def __init__(self, app, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = 500

        async def send_counting(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if not (path in PUBLIC_PATHS or path.startswith("/static/")):
                self.server.check_auth(Headers(scope=scope))
        except ApiError as err:
            await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send_counting)
        else:
            await self.app(scope, receive, send_counting)
        finally:
            label = path if path in COUNTED_PATHS else "other"
            self.server.metrics.requests.labels(label, str(status)).inc()


def _nesting_depth(data: object) -> int:
    """How deeply lists and objects nest in parsed JSON (a scalar is 0), without recursion."""
    deepest, pending = 0, [(data, 1)]
    while pending:
        value, depth = pending.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:
            pending.extend((child, depth + 1) for child in children)
    return deepest


def _unset(event: GenerationEvent) -> None:
    raise RuntimeError("the scheduler sets each request's emit when it submits it")


def _engine_error(event: GenerationEvent) -> ApiError:
    return ApiError(500, f"generation failed: {event.error}", type="server_error", code="generation_failed")


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _event_stream(first: tuple[int, GenerationEvent], events: AsyncIterator[tuple[int, GenerationEvent]],
                  render: Callable[[int, GenerationEvent], list[dict]], *, opening: list[dict],
                  closing: Callable[[], list[dict]]) -> StreamingResponse:
    """Server-sent events for a streamed completion: `opening`, then each engine event rendered as chunks (a
    failed request as OpenAI's error body), then `closing()` (the usage, when asked) and `[DONE]`. Leaving early
    (a client that disconnects) closes `events`, which cancels the requests and frees their slots."""

    async def stream() -> AsyncIterator[str]:
        for body in opening:
            yield _sse(body)
        pending = [first]
        try:
            while True:
                for index, event in pending:
                    if event.finish_reason == "error":
                        yield _sse(_engine_error(event).body())
                        continue
                    for body in render(index, event):
                        yield _sse(body)
                pending = [await anext(events)]
        except StopAsyncIteration:
            pass
        finally:
            await events.aclose()
        for body in closing():
            yield _sse(body)
        yield _sse("[DONE]")

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(engine: BatchedEngine, template: ChatTemplate, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving one engine; the scheduler thread starts with the app and drains at shutdown."""
    server = Server(engine, template, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        yield
        await asyncio.to_thread(server.scheduler.stop, settings.drain_timeout)

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    app.add_middleware(Guard, server=server)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        body = ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", type=kind).body()
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, err: ClientDisconnect) -> JSONResponse:
        # Nobody is left to read the answer; it is sent only so that the request is counted as the client's
        # doing, not the server's.
        log.info("%s %s: the client disconnected before sending its whole request", request.method,
                 request.url.path)
        body = ApiError(CLIENT_CLOSED_REQUEST, "the client closed the connection before sending its whole "
                                               "request", code="client_closed_request").body()
        return JSONResponse(body, status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        body = ApiError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "active": engine.active_count(),
                "queued": engine.waiting_count()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        check_model({"model": model_id}, settings.model_name)
        return server.model_card()

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return {"tokenizer_class": f"lmforge-{server.tokenizer.kind}", "eos_token": server.tokenizer.decode(
            [server.tokenizer.eot_id]), "bos_token": None, "pad_token": None, "model_max_length": server.context,
            "vocab_size": server.tokenizer.vocab_size}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await server.read_json(request)
        if "messages" in body:
            tokens, _ = template.encode(check_messages(body, server.tokenizer), server.tokenizer,
                                        add_generation_prompt=True)
        elif body.get("prompt") == server.tokenizer.decode([server.tokenizer.eot_id]):
            # lm-eval's remote tokenizer finds the end-of-text id by tokenizing its text; encode() reads that text
            # as plain characters, so the exact string alone names the special token here.
            tokens = [server.tokenizer.eot_id]
        elif isinstance(body.get("prompt"), str):
            check_known(server.tokenizer, body["prompt"], body, "prompt")
            tokens = server.tokenizer.encode(body["prompt"])
        else:
            raise ApiError(400, "'prompt' must be a string (or give 'messages')", param="prompt")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.context}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await server.read_json(request)
        tokens = check_token_ids(body.get("tokens"), server.tokenizer.vocab_size, "tokens")
        return {"prompt": server.tokenizer.decode(tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrived = time.monotonic()
        body = await server.read_json(request)
        check_model(body, settings.model_name)
        sampling = parse_sampling(body, settings.max_tokens_limit, DEFAULT_COMPLETION_TOKENS)
        refuse_unsupported(body, ("presence_penalty", "frequency_penalty", "logit_bias", "suffix", "best_of"))
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise ApiError(400, "'echo' must be true or false", param="echo")
        logprobs = body.get("logprobs")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= 20):
            raise ApiError(400, "'logprobs' must be an integer from 0 to 20 (alternatives per token) or null",
                           param="logprobs")
        prompts = parse_prompts(body, server.tokenizer)
        for prompt in prompts:
            check_fits(len(prompt), sampling.max_tokens, server.context)
        requests = server.requests_for(prompts, sampling, stop=sampling.stop, logprobs=logprobs,
                                       prompt_logprobs=echo and logprobs is not None)
        prompt_of = [prompts[i // sampling.n] for i in range(len(requests))]
        call_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": call_id, "object": "text_completion", "created": created, "model": settings.model_name,
                    "choices": choices, **extra}

        def start_logprobs(index: int, event: GenerationEvent) -> LegacyLogprobs | None:
            if logprobs is None:
                return None
            record = LegacyLogprobs(server.tokenizer)
            if echo and event.prompt_logprobs is not None:
                record.add_prompt(prompt_of[index], event)
            return record

        def add_token(record: LegacyLogprobs | None, event: GenerationEvent) -> None:
            if record is not None and event.token is not None:
                record.add(event.token, event.logprob, event.top_logprobs)

        if sampling.stream:
            events = server.events(requests, arrived)  # submitted before the response starts: 429 stays a status
            first = await anext(events)

            started = [False] * len(requests)
            offsets = [0] * len(requests)  # text_offset runs on across a choice's chunks
            completion_tokens = 0

            def render(index: int, event: GenerationEvent) -> list[dict]:
                nonlocal completion_tokens
                record = None
                text = event.text
                if not started[index]:
                    started[index] = True
                    record = start_logprobs(index, event)
                    if echo:
                        text = server.tokenizer.decode(prompt_of[index]) + text
                elif logprobs is not None:
                    record = LegacyLogprobs(server.tokenizer, offset=offsets[index])
                add_token(record, event)
                if record is not None:
                    offsets[index] = record.offset
                completion_tokens += event.token is not None
                if not (text or event.finish_reason or (record and record.tokens)):
                    return []
                return [chunk([{"text": text, "index": index, "logprobs": record.body() if record else None,
                                "finish_reason": event.finish_reason}])]

            return _event_stream(first, events, render, opening=[], closing=lambda: [
                chunk([], usage=usage(prompt_tokens, completion_tokens))] if sampling.include_usage else [])

        texts = [""] * len(requests)
        finish = [None] * len(requests)
        records: list[LegacyLogprobs | None] = [None] * len(requests)
        started = [False] * len(requests)
        completion_tokens = 0
        async for index, event in server.events(requests, arrived):
            if event.finish_reason == "error":
                raise _engine_error(event)
            if not started[index]:
                started[index] = True
                records[index] = start_logprobs(index, event)
                if echo:
                    texts[index] = server.tokenizer.decode(prompt_of[index])
            add_token(records[index], event)
            completion_tokens += event.token is not None
            texts[index] += event.text
            finish[index] = event.finish_reason or finish[index]
        choices = [{"text": texts[i], "index": i, "logprobs": records[i].body() if records[i] else None,
                    "finish_reason": finish[i]} for i in range(len(requests))]
        return JSONResponse(chunk(choices, usage=usage(prompt_tokens, completion_tokens)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrived = time.monotonic()
        body = await server.read_json(request)
        check_model(body, settings.model_name)
        messages = check_messages(body, server.tokenizer)
        sampling = parse_sampling(body, settings.max_tokens_limit, None)
        refuse_unsupported(body, ("presence_penalty", "frequency_penalty", "logit_bias", "tools", "functions",
                                  "response_format"))
        if body.get("logprobs") not in (None, False):
            raise ApiError(400, "'logprobs' is not supported for chat completions; use /v1/completions with "
                                "logprobs", param="logprobs")
        prompt, _ = template.encode(messages, server.tokenizer, add_generation_prompt=True)
        if sampling.max_tokens is None:  # as much as the context leaves, within the server's limit
            if len(prompt) >= server.context:
                check_fits(len(prompt), 1, server.context)
            sampling.max_tokens = min(settings.max_tokens_limit, server.context - len(prompt))
        check_fits(len(prompt), sampling.max_tokens, server.context)
        requests = server.requests_for([prompt], sampling, stop=template.stop_texts() + sampling.stop)
        call_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": call_id, "object": "chat.completion.chunk", "created": created,
                    "model": settings.model_name, "choices": choices, **extra}

        if sampling.stream:
            events = server.events(requests, arrived)
            first = await anext(events)

            completion_tokens = 0

            def render(index: int, event: GenerationEvent) -> list[dict]:
                nonlocal completion_tokens
                completion_tokens += event.token is not None
                chunks = []
                if event.text:
                    chunks.append(chunk([{"index": index, "delta": {"content": event.text}, "logprobs": None,
                                          "finish_reason": None}]))
                if event.finish_reason:
                    chunks.append(chunk([{"index": index, "delta": {}, "logprobs": None,
                                          "finish_reason": event.finish_reason}]))
                return chunks

            opening = [chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}]) for index in range(len(requests))]
            return _event_stream(first, events, render, opening=opening, closing=lambda: [
                chunk([], usage=usage(len(prompt), completion_tokens))] if sampling.include_usage else [])

        texts = [""] * len(requests)
        finish = [None] * len(requests)
        completion_tokens = 0
        async for index, event in server.events(requests, arrived):
            if event.finish_reason == "error":
                raise _engine_error(event)
            completion_tokens += event.token is not None
            texts[index] += event.text
            finish[index] = event.finish_reason or finish[index]
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                    "finish_reason": finish[i]} for i in range(len(requests))]
        return JSONResponse({"id": call_id, "object": "chat.completion", "created": created,
                             "model": settings.model_name, "choices": choices,
                             "usage": usage(len(prompt), completion_tokens)})

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        page = STATIC_DIR / "index.html"
        if page.is_file():
            return FileResponse(page)
        return HTMLResponse(f"<!doctype html><title>lmforge</title><p>lmforge is serving "
                            f"<b>{settings.model_name}</b>: the API is at <code>/v1</code> (see /v1/models).</p>")

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
