"""The OpenAI-shaped side of the server: request bodies checked field by field, errors in OpenAI's shape, and
the response objects (completions, chat completions, their streamed chunks, legacy logprobs).

Requests are plain JSON checked here by hand, not by a schema library, so that every mistake becomes a 400
naming the parameter (`param`) in OpenAI's error shape {"error": {"message", "type", "param", "code"}}.
Unknown keys are ignored, as OpenAI-compatible servers do; known OpenAI options this server does not
implement (penalties, logit bias, suffix, best_of) are refused by name when set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.infer.batched import GenerationEvent, TopLogprobs
from lmforge.infer.sampling import SamplingError, SamplingParams

MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 20
MAX_N = 64
MAX_TEMPERATURE = 2.0  # OpenAI's API refuses more; SamplingParams itself allows any finite temperature
ALLOW_UNKNOWN_FIELD = "allow_unknown"
ALLOW_UNKNOWN_HINT = f"set \"{ALLOW_UNKNOWN_FIELD}\": true to read each as the unknown token"


class ApiError(Exception):
    """An error answered in OpenAI's shape with its HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, key: str, default: float | None) -> float | None:
    """A JSON number (finite: Python's json reads NaN and Infinity literals, which no sampling value may be);
    its range is SamplingParams' to check."""
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"'{key}' must be a number, got {type(value).__name__}", param=key)
    if not math.isfinite(value):
        raise ApiError(400, f"'{key}' must be a finite number, got {value}", param=key)
    return float(value)


def _integer(body: dict, key: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{key}' must be an integer, got {type(value).__name__}", param=key)
    if value < low or (high is not None and value > high):
        raise ApiError(400, f"'{key}' must be at least {low}" + (f" and at most {high}" if high is not None else "")
                       + f", got {value}", param=key)
    return value


def _boolean(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be true or false, got {type(value).__name__}", param=key)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    return [s for s in stops if s]


def refuse_unsupported(body: dict, keys: Sequence[str]) -> None:
    """A 400 naming the first OpenAI option among `keys` that is set to something other than its no-op value."""
    for key in keys:
        value = body.get(key)
        if value in (None, 0, "", {}, []) or (key == "best_of" and value == body.get("n", 1)):
            continue
        raise ApiError(400, f"'{key}' is not supported by this server", param=key)


@dataclass
class Sampling:
    """The sampling options shared by completions and chat completions."""

    max_tokens: int | None
    temperature: float
    top_p: float | None
    top_k: int | None
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


def parse_sampling(body: dict, max_tokens_limit: int, default_max_tokens: int | None) -> Sampling:
    max_tokens = _integer(body, "max_tokens", None, 0)
    if max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", default_max_tokens, 0)
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise ApiError(400, f"'max_tokens' is {max_tokens}, above this server's limit of {max_tokens_limit} "
                            "(lmforge serve --max-tokens-limit)", param="max_tokens")
    temperature = _number(body, "temperature", 1.0)
    if temperature > MAX_TEMPERATURE:
        raise ApiError(400, f"'temperature' must be at most {MAX_TEMPERATURE:g} (OpenAI's range), got {temperature}",
                       param="temperature")
    top_p = _number(body, "top_p", 1.0)
    top_k = _integer(body, "top_k", None, 0)
    try:
        params = SamplingParams(temperature, top_k or None, None if top_p == 1.0 else top_p)
    except SamplingError as err:
        raise ApiError(400, str(err), param=err.param) from None
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = bool(options and _boolean(options, "include_usage"))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {type(seed).__name__}", param="seed")
    return Sampling(max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                    n=_integer(body, "n", 1, 1, MAX_N),
                    stop=_stop(body), seed=None if seed is None else seed % 2**63, stream=stream,
                    include_usage=include_usage)


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required: a string naming the model (GET /v1/models lists it)", param="model")
    if model != model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{model_name}'", param="model",
                       code="model_not_found")


def parse_prompts(body: dict, tokenizer: Tokenizer) -> list[list[int]]:
    """The prompt of a completion request as token-id lists: a string, a list of strings, a list of token ids,
    or a list of such lists (as evaluation harnesses send it)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such "
                            "lists, and not empty", param="prompt")
    encoded = []
    for item in prompts:
        if isinstance(item, str):
            check_known(tokenizer, item, body, "prompt")
            ids = tokenizer.encode(item)
        elif isinstance(item, list) and all(_is_token(t) for t in item):
            ids = check_token_ids(item, tokenizer.vocab_size, "prompt")
        else:
            raise ApiError(400, "each prompt must be a string or a list of token ids", param="prompt")
        encoded.append(ids or [tokenizer.eot_id])  # an empty prompt starts from end-of-text, as a new document
    return encoded


def check_known(tokenizer: Tokenizer, text: str, body: dict, param: str) -> None:
    """The tokenizer's one unknown-character policy (Tokenizer.check_known) as a 400: characters the run's
    tokenizer does not know are refused by name unless the request sets "allow_unknown": true."""
    try:
        tokenizer.check_known(text, what=f"'{param}'", allow_unknown=_boolean(body, ALLOW_UNKNOWN_FIELD),
                              allow_hint=ALLOW_UNKNOWN_HINT)
    except UserError as err:
        raise ApiError(400, str(err), param=param, code="unknown_characters") from None


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_token_ids(value: Any, vocab_size: int, param: str) -> list[int]:
    """The one token-id check of every endpoint that takes ids (completion prompts, /detokenize): a list of
    integers (not booleans) from 0 to vocab_size - 1, else a 400 naming `param`."""
    if not isinstance(value, list) or not all(_is_token(t) for t in value):
        raise ApiError(400, f"'{param}' must be a list of token ids (integers from 0)", param=param)
    if any(t >= vocab_size for t in value):
        raise ApiError(400, f"token ids must be below the vocabulary size {vocab_size}", param=param)
    return list(value)


def check_messages(body: dict, tokenizer: Tokenizer) -> list[dict]:
    """The chat messages of a request: each a {role, content} with a role the template knows and content the
    run's tokenizer can encode (see check_known)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ApiError(400, f"messages[{index}] must be an object with a string 'content'", param="messages")
        if message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{index}] has role {message.get('role')!r}; roles are system, user, "
                                "assistant", param="messages")
        check_known(tokenizer, message["content"], body, "messages")
    return messages


def check_fits(prompt_tokens: int, max_tokens: int, context: int) -> None:
    if prompt_tokens + max_tokens > context:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens, more than the {max(context - max_tokens, 0)} "
                            f"that fit in the context of {context} tokens with max_tokens {max_tokens}; "
                            "shorten the prompt or lower max_tokens", param="prompt", code="context_length_exceeded")


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

    def add_prompt(self, prompt: list[int], event: GenerationEvent) -> None:
        self.add(prompt[0], None, None)
        for token, (logprob, top) in zip(prompt[1:], event.prompt_logprobs or [], strict=True):
            self.add(token, logprob, top)

    def body(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
