"""What every route shares (`Server`, kept on `app.state.server` and handed to routes by `get_server`): the
scheduler of the engine process (or, serving a classify run, the classifier's engine), the tokenizer and chat
template, the settings, the metrics; and the one way a request body is read (`Server.read_request`: JSON within
the size, depth and time limits, then validated as its pydantic model, on a route for what the served model
does)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response
from starlette.datastructures import Headers

from lmforge.config.sections import ModelConfig
from lmforge.data.template import ChatTemplate
from lmforge.data.tokenizer import Tokenizer
from lmforge.infer.batched import GenerationEvent, GenerationRequest
from lmforge.infer.constrained import OutputFormat
from lmforge.infer.sampling import SamplingParams
from lmforge.serve.classify import ClassifyEngine
from lmforge.serve.errors import CLIENT_CLOSED_REQUEST, ApiError
from lmforge.serve.metrics import Metrics
from lmforge.serve.scheduler import Scheduler
from lmforge.serve.schemas import CLASSIFIER, GENERATOR, RequestT, SamplingRequest, validate_request

log = logging.getLogger("lmforge.serve")
MAX_JSON_DEPTH = 32  # the deepest request is a list of messages (3 levels); deeper bodies are probes


@dataclass
class ServeSettings:
    """The server's own options (lmforge serve's flags); request bodies are validated against them."""

    model_name: str
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 256
    max_tokens_limit: int = 4096
    max_body_bytes: int = 1_000_000
    body_timeout: float = 30.0
    drain_timeout: float = 30.0


class Server:
    """What the routes share: the scheduler of the engine process (as `engine` and `scheduler`), the tokenizer
    and template, settings and metrics. A classify run is served by a `ClassifyEngine` instead (`classifier`),
    which runs its own thread in this process."""

    def __init__(self, engine: Scheduler | ClassifyEngine, template: ChatTemplate, settings: ServeSettings):
        self.engine = engine
        self.tokenizer: Tokenizer = engine.tokenizer
        self.template = template
        self.settings = settings
        self.context = engine.block_size
        self.classifier = engine if isinstance(engine, ClassifyEngine) else None
        self.serves = GENERATOR if self.classifier is None else CLASSIFIER
        # What the app starts and drains with itself: what runs the model.
        self.scheduler = engine
        self.metrics = Metrics(engine.active_count, engine.waiting_count)
        self.created = int(time.time())

    @property
    def model_config(self) -> ModelConfig:
        """The served transformer's [model] settings (a classifier's: its body's)."""
        return self.classifier.model.body.config if self.classifier is not None else self.engine.model_config

    def model_card(self) -> dict:
        card = {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "lmforge",
                "context_length": self.context, "max_model_len": self.context, "task": self.serves,
                "vocab_size": self.tokenizer.vocab_size}
        if self.classifier is not None:
            return {**card, "arch": self.model_config.arch, "labels": self.classifier.labels,
                    "batching": {"max_batch": self.classifier.max_batch}}
        return {**card, "arch": self.model_config.arch,
                "batching": {"continuous": True, "batched_decoding": self.engine.batches_decoding,
                             "cache": self.engine.cache_kind, "max_batch": self.engine.max_batch}}

    def check_serves(self, kind: type[RequestT]) -> None:
        """A 400 for a route the served model cannot answer: text from a classifier, labels from a language
        model."""
        name = self.settings.model_name
        if kind.serves is None or kind.serves == self.serves:
            return
        if self.classifier is not None:
            raise ApiError(400, f"'{name}' is a classifier (fine-tuned with --task classify): it predicts labels "
                                "with their probabilities, not text; send its inputs to POST /v1/classify "
                                '{"model": ..., "input": "text" or ["text", ...]}', code="model_classifies")
        raise ApiError(400, f"'{name}' is a language model: it generates text (/v1/completions, "
                            "/v1/chat/completions); /v1/classify needs a run fine-tuned with lmforge finetune "
                            "--task classify", code="model_generates")

    def check_auth(self, headers: Headers) -> None:
        key = self.settings.api_key
        if not key:
            return
        header = headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    async def read_request(self, request: Request, kind: type[RequestT]) -> RequestT:
        """The request's body as a `kind` (a 400 naming the field that is wrong, see schemas.py), on a route the
        served model answers."""
        self.check_serves(kind)
        return validate_request(kind, await self.read_json(request), self.settings)

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
        return _json_object(body)

    def requests_for(self, prompts: list[list[int]], request: SamplingRequest, sampling: SamplingParams,
                     max_tokens: int, *, stop: list[str], logprobs: int | None = None,
                     prompt_logprobs: bool = False) -> list[GenerationRequest]:
        """One engine request per choice: each prompt n times (choice i of a seeded call draws with seed + i)."""
        requests = []
        for prompt in prompts:
            for copy in range(request.n):
                requests.append(GenerationRequest(
                    prompt, max_tokens, emit=_unset, temperature=sampling.temperature, top_k=sampling.top_k,
                    top_p=sampling.top_p, seed=request.seed_of_choice(copy), stop=stop,
                    stop_token=self.tokenizer.eot_id, logprobs=logprobs, prompt_logprobs=prompt_logprobs))
        return requests

    async def events(self, requests: list[GenerationRequest], arrived: float, output: OutputFormat | None = None
                     ) -> AsyncIterator[tuple[int, GenerationEvent]]:
        """The events of all choices as they come, recording metrics; leaving early cancels the unfinished. Every
        choice follows `output` when given (compiled in the engine process: one it cannot use raises the 400)."""
        queue: asyncio.Queue = asyncio.Queue()
        self.scheduler.submit(requests, queue, output)
        self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in requests))
        last_token = [None] * len(requests)
        finished = [False] * len(requests)
        try:
            while not all(finished):
                index, event = await queue.get()
                if isinstance(event, ApiError):
                    finished[index] = True
                    raise event
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


async def unless_client_leaves(connection: Request, answer: Awaitable[Response]) -> Response:
    """`answer`, awaited while watching the connection: a client that goes away first has its work cancelled
    (its generation's slots freed, its inputs to classify dropped) and is counted with a 499. A streamed answer
    watches its own connection once it has started (responses.py); this covers the wait before it, and the
    whole of an answer sent at once."""
    work = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_disconnected(connection))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself is cancelled (the server is stopping)
        gone.cancel()
        work.cancel()
        raise
    gone.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # nobody is left to tell how it ended
        await work
    log.info("%s %s: the client disconnected before its answer was ready", connection.method, connection.url.path)
    return ApiError(CLIENT_CLOSED_REQUEST, "the client closed the connection before its answer was ready",
                    code="client_closed_request").response()


async def _disconnected(connection: Request) -> None:
    """Returns once the client has closed the connection (the request's body has been read whole, so the
    next ASGI message is the disconnect)."""
    while (await connection.receive())["type"] != "http.disconnect":
        pass


def get_server(request: Request) -> Server:
    """The app's Server (a FastAPI dependency of every route)."""
    return request.app.state.server


def _json_object(body: bytes | bytearray) -> dict:
    """A body parsed as JSON: a 400 unless it is an object nested at most MAX_JSON_DEPTH deep. (Python's json reads
    NaN and Infinity; the request models refuse them where a number is expected.)"""
    too_deep = ApiError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json")
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
