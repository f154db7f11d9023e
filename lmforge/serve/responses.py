"""The answers of the completion routes, built from the engine's events: a text completion (echo and legacy
logprobs included) or a chat completion, whole as one JSON object or streamed as server-sent events
(`respond`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import ClassVar

from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmforge.data.tokenizer import Tokenizer
from lmforge.infer.batched import GenerationEvent, TopLogprobs
from lmforge.serve.errors import ApiError

Events = AsyncIterator[tuple[int, GenerationEvent]]


@dataclass
class LegacyLogprobs:
    """The `logprobs` object of a (non-chat) completion choice: tokens, their log-probabilities (None for the
    first prompt token, which nothing predicts), the alternatives at each, and each token's text offset."""

    tokenizer: Tokenizer
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    offset: int = 0

    def add(self, token: int, logprob: float | None, top: TopLogprobs | None) -> None:
        text = self.tokenizer.decode([token])
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(None if top is None else {self.tokenizer.decode([t]): lp for t, lp in top})
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def add_event(self, event: GenerationEvent) -> None:
        if event.token is not None:
            self.add(event.token, event.logprob, event.top_logprobs)

    def add_prompt(self, prompt: list[int], event: GenerationEvent) -> None:
        self.add(prompt[0], None, None)
        for token, (logprob, top) in zip(prompt[1:], event.prompt_logprobs or [], strict=True):
            self.add(token, logprob, top)

    def body(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


class Completion:
    """An answer being built from the events of its choices: `add` collects an event for the whole answer
    (`whole`), `render` turns one into the chunks streamed for it (after `opening`)."""

    id_prefix: ClassVar[str]
    chunk_object: ClassVar[str]

    def __init__(self, model_name: str, choices: int, prompt_tokens: int):
        self.id, self.created = f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time())
        self.model_name = model_name
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.texts = [""] * choices
        self.finish: list[str | None] = [None] * choices

    def chunk(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model_name,
                "choices": choices, **extra}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def add(self, index: int, event: GenerationEvent) -> None:
        self.completion_tokens += event.token is not None
        self.texts[index] += event.text
        self.finish[index] = event.finish_reason or self.finish[index]

    def opening(self) -> list[dict]:
        return []

    def render(self, index: int, event: GenerationEvent) -> list[dict]:
        raise NotImplementedError

    def whole(self) -> dict:
        raise NotImplementedError


class TextCompletion(Completion):
    """/v1/completions: each choice's text (after its prompt's with echo) and, with logprobs, its tokens'."""

    id_prefix = "cmpl"
    chunk_object = "text_completion"

    def __init__(self, tokenizer: Tokenizer, model_name: str, prompts: list[list[int]], prompt_tokens: int, *,
                 echo: bool, logprobs: int | None):
        super().__init__(model_name, len(prompts), prompt_tokens)
        self.tokenizer = tokenizer
        self.prompts = prompts  # each choice's prompt
        self.echo, self.logprobs = echo, logprobs
        self.started = [False] * len(prompts)
        self.records: list[LegacyLogprobs | None] = [None] * len(prompts)
        self.offsets = [0] * len(prompts)  # a streamed choice's text_offset runs on across its chunks

    def _start(self, index: int, event: GenerationEvent) -> tuple[str, LegacyLogprobs | None]:
        """A choice's first event: the text it begins with (its prompt's, with echo) and its logprobs record."""
        self.started[index] = True
        record = None
        if self.logprobs is not None:
            record = LegacyLogprobs(self.tokenizer)
            if self.echo and event.prompt_logprobs is not None:
                record.add_prompt(self.prompts[index], event)
        return (self.tokenizer.decode(self.prompts[index]) if self.echo else ""), record

    def add(self, index: int, event: GenerationEvent) -> None:
        if not self.started[index]:
            self.texts[index], self.records[index] = self._start(index, event)
        if self.records[index] is not None:
            self.records[index].add_event(event)
        super().add(index, event)

    def render(self, index: int, event: GenerationEvent) -> list[dict]:
        text, record = event.text, None
        if not self.started[index]:
            echoed, record = self._start(index, event)
            text = echoed + text
        elif self.logprobs is not None:
            record = LegacyLogprobs(self.tokenizer, offset=self.offsets[index])
        if record is not None:
            record.add_event(event)
            self.offsets[index] = record.offset
        self.completion_tokens += event.token is not None
        if not (text or event.finish_reason or (record and record.tokens)):
            return []
        return [self.chunk([{"text": text, "index": index, "logprobs": record.body() if record else None,
                             "finish_reason": event.finish_reason}])]

    def whole(self) -> dict:
        return self.chunk([{"text": self.texts[i], "index": i, "logprobs": record.body() if record else None,
                            "finish_reason": self.finish[i]} for i, record in enumerate(self.records)],
                          usage=self.usage())


def chat_token_logprob(tokenizer: Tokenizer, token: int, logprob: float | None, top: TopLogprobs | None) -> dict:
    """One token of a chat choice's `logprobs.content`: its text, log-probability, UTF-8 bytes and the likeliest
    alternatives (OpenAI's shape)."""

    def entry(token_id: int, value: float | None) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return {**entry(token, logprob), "top_logprobs": [entry(t, value) for t, value in top or []]}


class ChatCompletion(Completion):
    """/v1/chat/completions: each choice's reply as an assistant message; with `logprobs_of` (the tokenizer, when
    the request asks for logprobs) the log-probability of every token generated, as /v1/completions reports
    them (the end-of-text token and the tokens of a stop text included)."""

    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def __init__(self, model_name: str, choices: int, prompt_tokens: int, *, logprobs_of: Tokenizer | None = None):
        super().__init__(model_name, choices, prompt_tokens)
        self.tokenizer = logprobs_of
        self.logprobs: list[list[dict]] = [[] for _ in range(choices)]

    def _logprobs(self, event: GenerationEvent) -> list[dict]:
        if self.tokenizer is None or event.token is None:
            return []
        return [chat_token_logprob(self.tokenizer, event.token, event.logprob, event.top_logprobs)]

    def _logprobs_body(self, content: list[dict]) -> dict | None:
        return None if self.tokenizer is None else {"content": content, "refusal": None}

    def add(self, index: int, event: GenerationEvent) -> None:
        super().add(index, event)
        self.logprobs[index] += self._logprobs(event)

    def opening(self) -> list[dict]:
        return [self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for index in range(len(self.texts))]

    def render(self, index: int, event: GenerationEvent) -> list[dict]:
        self.completion_tokens += event.token is not None
        chunks = []
        logprobs = self._logprobs(event)
        if event.text or logprobs:  # a token whose text is held back (a stop text may begin) still has its logprob
            chunks.append(self.chunk([{"index": index, "delta": {"content": event.text},
                                       "logprobs": self._logprobs_body(logprobs) if logprobs else None,
                                       "finish_reason": None}]))
        if event.finish_reason:
            chunks.append(self.chunk([{"index": index, "delta": {}, "logprobs": None,
                                       "finish_reason": event.finish_reason}]))
        return chunks

    def whole(self) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": text},
                    "logprobs": self._logprobs_body(self.logprobs[i]), "finish_reason": self.finish[i]}
                   for i, text in enumerate(self.texts)]
        return {**self.chunk(choices, usage=self.usage()), "object": "chat.completion"}


async def respond(completion: Completion, events: Events, *, stream: bool, include_usage: bool) -> Response:
    """The completion whole once every choice has finished, or streamed as its events come."""
    if stream:
        first = await anext(events)  # submitted before the response starts: a full queue stays a 429 status
        return _event_stream(first, events, completion.render, opening=completion.opening(), closing=lambda: [
            completion.chunk([], usage=completion.usage())] if include_usage else [])
    async for index, event in events:
        if event.finish_reason == "error":
            raise _engine_error(event)
        completion.add(index, event)
    return JSONResponse(completion.whole())


def _engine_error(event: GenerationEvent) -> ApiError:
    return ApiError(500, f"generation failed: {event.error}", type="server_error", code="generation_failed")


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _event_stream(first: tuple[int, GenerationEvent], events: Events,
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
