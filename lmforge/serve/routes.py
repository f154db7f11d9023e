"""The routes, as plain functions on one router: each takes its validated request body (a model from
schemas.py, read within the server's limits) and the app's `Server` as dependencies.

| route | what |
|---|---|
| GET /v1/models, /v1/models/{id} | the one model: its context length and how it batches (a classifier: its labels) |
| POST /v1/completions | prompt (string, list, token ids), echo, logprobs, n, stop, seed, stream, top_k |
| POST /v1/chat/completions | messages through the run's chat template (lmforge.data.template), logprobs |
| (both completion routes) | response_format json_object, json_schema; structured_outputs regex, grammar, choice |
| POST /v1/classify, /classify | a classify run's labels with probabilities for each input (vLLM's shape) |
| GET /tokenizer_info, POST /tokenize, /detokenize | the run's tokenizer (lm-eval's remote tokenizer) |
| GET /health, /metrics, / | liveness, Prometheus text, the playground (lmforge/serve/static/index.html) |
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from lmforge.serve.classify import classification
from lmforge.serve.errors import model_not_found
from lmforge.serve.responses import ChatCompletion, TextCompletion, respond
from lmforge.serve.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestT,
    TokenizeRequest,
    fit_max_tokens,
)
from lmforge.serve.server import Server, get_server, unless_client_leaves

STATIC_DIR = Path(__file__).parent / "static"
router = APIRouter()
ServerDep = Annotated[Server, Depends(get_server)]


def arrival(request: Request) -> float:
    """When the request arrived (app.Guard notes it before the body is read): where its time to first token
    starts."""
    return request.state.arrived


Arrival = Annotated[float, Depends(arrival)]


def body(kind: type[RequestT]):
    """A dependency giving the request's body as a `kind`, read and validated by `Server.read_request`."""

    async def read(request: Request, server: ServerDep) -> RequestT:
        return await server.read_request(request, kind)

    return Depends(read)


@router.get("/health")
async def health(server: ServerDep) -> Response:
    """200 while the server can answer; 503 once its engine process has died (generation cannot)."""
    dead = server.classifier is None and server.scheduler.dead is not None
    return JSONResponse({"status": "engine stopped" if dead else "ok", "model": server.settings.model_name,
                         "active": server.engine.active_count(), "queued": server.engine.waiting_count()},
                        status_code=503 if dead else 200)


@router.get("/metrics")
async def metrics(server: ServerDep) -> Response:
    return Response(server.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
async def models(server: ServerDep) -> dict:
    return {"object": "list", "data": [server.model_card()]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, server: ServerDep) -> dict:
    if model_id != server.settings.model_name:
        raise model_not_found(model_id, server.settings.model_name)
    return server.model_card()


@router.get("/tokenizer_info")
async def tokenizer_info(server: ServerDep) -> dict:
    tokenizer = server.tokenizer
    return {"tokenizer_class": f"lmforge-{tokenizer.kind}", "eos_token": tokenizer.decode([tokenizer.eot_id]),
            "bos_token": None, "pad_token": None, "model_max_length": server.context,
            "vocab_size": tokenizer.vocab_size}


@router.post("/tokenize")
async def tokenize(request: Annotated[TokenizeRequest, body(TokenizeRequest)], server: ServerDep) -> dict:
    tokens = request.token_ids(server.tokenizer, server.template)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": server.context}


@router.post("/detokenize")
async def detokenize(request: Annotated[DetokenizeRequest, body(DetokenizeRequest)], server: ServerDep) -> dict:
    return {"prompt": request.text(server.tokenizer)}


@router.post("/v1/completions")
async def completions(request: Annotated[CompletionRequest, body(CompletionRequest)], server: ServerDep,
                      arrived: Arrival, connection: Request) -> Response:
    sampling = request.to_sampling_params()
    prompts = request.prompt_ids(server.tokenizer)
    max_tokens = request.max_tokens_per_choice
    for prompt in prompts:
        fit_max_tokens(len(prompt), max_tokens, server.context, server.settings.max_tokens_limit)
    with_logprobs = request.logprobs is not None
    # The format is checked against the run and compiled in the engine process: one it cannot use is a 400.
    output = request.output_format()
    requests = server.requests_for(prompts, request, sampling, max_tokens, stop=request.stop_texts,
                                   logprobs=request.logprobs, prompt_logprobs=request.echo and with_logprobs)
    completion = TextCompletion(server.tokenizer, server.settings.model_name,
                                [prompts[i // request.n] for i in range(len(requests))],
                                sum(len(prompt) for prompt in prompts), echo=request.echo, logprobs=request.logprobs)
    return await unless_client_leaves(connection, respond(completion, server.events(requests, arrived, output),
                                                          stream=request.stream, include_usage=request.include_usage))


@router.post("/v1/chat/completions")
async def chat_completions(request: Annotated[ChatCompletionRequest, body(ChatCompletionRequest)],
                           server: ServerDep, arrived: Arrival, connection: Request) -> Response:
    sampling = request.to_sampling_params()
    prompt = request.prompt_ids(server.tokenizer, server.template)
    max_tokens = fit_max_tokens(len(prompt), request.requested_tokens, server.context,
                                server.settings.max_tokens_limit)
    output = request.output_format()
    # A constrained reply ends where its format does; the template's turn markers could be inside a regex's or
    # a grammar's answer, and cutting it there would break it.
    turn_stops = server.template.stop_texts() if output is None else []
    requests = server.requests_for([prompt], request, sampling, max_tokens, stop=turn_stops + request.stop_texts,
                                   logprobs=request.alternatives)
    completion = ChatCompletion(server.settings.model_name, len(requests), len(prompt),
                                logprobs_of=server.tokenizer if request.logprobs else None)
    return await unless_client_leaves(connection, respond(completion, server.events(requests, arrived, output),
                                                          stream=request.stream, include_usage=request.include_usage))


@router.post("/v1/classify")
@router.post("/classify")  # vLLM's path
async def classify(request: Annotated[ClassifyRequest, body(ClassifyRequest)], server: ServerDep,
                   connection: Request) -> Response:
    sequences = request.token_ids(server.tokenizer, server.context)
    prompt_tokens = sum(len(ids) for ids in sequences)
    server.metrics.prompt_tokens.inc(prompt_tokens)

    async def answer() -> Response:
        probabilities = await server.classifier.classify(sequences)
        return JSONResponse(classification(server.settings.model_name, server.classifier.labels, probabilities,
                                           prompt_tokens))

    return await unless_client_leaves(connection, answer())


@router.get("/", include_in_schema=False)
async def playground(server: ServerDep) -> Response:
    page = STATIC_DIR / "index.html"
    if page.is_file():
        return FileResponse(page)
    return HTMLResponse(f"<!doctype html><title>lmforge</title><p>lmforge is serving "
                        f"<b>{server.settings.model_name}</b>: the API is at <code>/v1</code> (see /v1/models).</p>")
