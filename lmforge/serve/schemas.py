"""The request bodies of the API as pydantic models, and the checks on them that need the served run.

Each body is validated by `validate_request` against the server's settings (the model's name, the
--max-tokens-limit); the first thing wrong becomes a 400 in OpenAI's shape whose `param` names the field
({"error": {"message", "type", "param", "code"}}), with a message built from the field's description. JSON types
are taken as they are (strict: "1" is not a number, true is not 1), null means "not given", unknown keys are
ignored as OpenAI-compatible servers do, and the OpenAI options this server does not implement (penalties, logit
bias, suffix, best_of...) are refused by name when set.

What a schema cannot say, because it needs the run, is checked in one place each: token ids against the
vocabulary (`check_in_vocabulary`), characters the tokenizer does not know (`check_known`), and a prompt with its
max_tokens against the context (`fit_max_tokens`).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from lmforge.data.template import ROLES, ChatTemplate
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.infer.constrained import OutputFormat
from lmforge.infer.sampling import SamplingError, SamplingParams
from lmforge.serve.errors import ApiError, model_not_found
from lmforge.tasks.kinds import encode_texts

if TYPE_CHECKING:
    from lmforge.serve.server import ServeSettings

GENERATOR, CLASSIFIER = "generator", "classifier"  # what a served model does: generate text, or predict labels
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 20
MAX_N = 64
MAX_TEMPERATURE = 2.0  # OpenAI's API refuses more; SamplingParams itself allows any finite temperature
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
ALLOW_UNKNOWN_FIELD = "allow_unknown"
ALLOW_UNKNOWN_HINT = f"set \"{ALLOW_UNKNOWN_FIELD}\": true to read each as the unknown token"
NOT_SUPPORTED = "by this server"
REFUSED = "lmforge_refused"  # the pydantic error type that carries an ApiError raised by a validator

TokenId = Annotated[int, Field(ge=0)]
RequestT = TypeVar("RequestT", bound="ApiRequest")


class ApiRequest(BaseModel):
    """A request body: strict JSON types, null as "not given", unknown keys ignored, the OpenAI options in
    UNSUPPORTED (each with how to say so) refused unless they hold their no-op value, and the other servers' keys
    in FOREIGN refused whatever they hold (ignored, they would change the answer unnoticed)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    UNSUPPORTED: ClassVar[dict[str, str]] = {}
    FOREIGN: ClassVar[dict[str, str]] = {}
    serves: ClassVar[str | None] = None  # GENERATOR or CLASSIFIER: the model the route needs (None: either)

    @model_validator(mode="before")
    @classmethod
    def _given_and_supported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        given = {key: value for key, value in data.items() if value is not None}
        for key, how in cls.UNSUPPORTED.items():
            value = given.get(key)
            if value in (None, 0, "", {}, []) or (key == "best_of" and value == given.get("n", 1)):
                continue
            raise refusal(ApiError(400, f"'{key}' is not supported {how}", param=key))
        for key, how in cls.FOREIGN.items():
            if key in data:  # even null: the sender meant a format
                raise refusal(ApiError(400, f"'{key}' is not supported {how}", param=key))
        return given


class ChatMessage(ApiRequest):
    """One message of a chat: the roles are the chat template's."""

    role: Literal[ROLES]
    content: str

    def as_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


class StreamOptions(ApiRequest):
    """A streamed completion's options: include_usage adds a last chunk with the token counts."""

    include_usage: bool = False


RESPONSE_FORMAT = ('an object: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
                   '{"name": ..., "schema": {...}}}')
STRUCTURED_OUTPUTS = ('an object with one of "json" (a JSON schema), "regex" (a pattern), "grammar" (a Lark grammar) '
                      'or "choice" (a list of strings)')
STRUCTURED_KINDS = {"json": "json_schema", "regex": "regex", "grammar": "grammar", "choice": "choice"}
# Other servers' names for a format (vLLM's before structured_outputs, llama.cpp's server's): refused, since a
# request carrying one would otherwise have it ignored, as every unknown field is, and get an answer not held to it.
OTHER_FORMAT_FIELDS = {field: (f'by this server, which would not hold the answer to it: send "structured_outputs": '
                               f'{{"{key}": ...}} or "response_format"')
                       for field, key in (("guided_json", "json"), ("guided_regex", "regex"),
                                          ("guided_grammar", "grammar"), ("guided_choice", "choice"),
                                          ("json_schema", "json"), ("regex", "regex"), ("grammar", "grammar"))}
MESSAGES = f"a non-empty list of {{role, content}} objects, role one of {', '.join(ROLES)} and content a string"
ALLOW_UNKNOWN = "true or false (true: read unknown characters as the unknown token)"


class SamplingRequest(ApiRequest):
    """What completions and chat completions share: the model, how many tokens, how to sample, how to answer."""

    serves = GENERATOR
    FOREIGN = OTHER_FORMAT_FIELDS
    model: str = Field(description="a string naming the model (GET /v1/models lists it)")
    max_tokens: int | None = Field(None, ge=0, description="an integer, 0 or more")
    max_completion_tokens: int | None = Field(None, ge=0, description="an integer, 0 or more")
    temperature: float = Field(1.0, le=MAX_TEMPERATURE, description=f"a number, at most {MAX_TEMPERATURE:g} "
                                                                    "(OpenAI's range)")
    top_p: float = Field(1.0, description="a number")
    top_k: int = Field(0, ge=0, description="an integer, 0 (no cut-off) or more")
    n: int = Field(1, ge=1, le=MAX_N, description=f"an integer from 1 to {MAX_N}")
    seed: int | None = Field(None, description="an integer")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"a string or a list of at most {MAX_STOP_STRINGS} strings")
    stream: bool = Field(False, description="true or false")
    stream_options: StreamOptions | None = Field(None, description="an object with include_usage true or false")
    allow_unknown: bool = Field(False, description=ALLOW_UNKNOWN)
    response_format: dict | None = Field(None, description=RESPONSE_FORMAT)
    structured_outputs: dict | None = Field(None, description=STRUCTURED_OUTPUTS)

    @field_validator("model")
    @classmethod
    def _served(cls, model: str, info: ValidationInfo) -> str:
        return served_model(model, info)

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _settings(info).max_tokens_limit
        if value is not None and value > limit:
            raise refusal(ApiError(400, f"'{info.field_name}' is {value}, above this server's limit of {limit} "
                                        "(lmforge serve --max-tokens-limit)", param=info.field_name))
        return value

    def output_format(self) -> OutputFormat | None:
        """The format every answer must follow (response_format's json_object or json_schema, or vLLM's
        structured_outputs: json, regex, grammar or choice), or None; a 400 naming what is malformed. Whether the
        schema, regex or grammar itself is usable is checked against the run (lmforge.infer.constrained)."""
        if self.response_format is not None and self.structured_outputs is not None:
            raise ApiError(400, "give either 'response_format' or 'structured_outputs', not both",
                           param="structured_outputs")
        if self.structured_outputs is not None:
            return _structured_outputs(self.structured_outputs)
        if self.response_format is not None:
            return _response_format(self.response_format)
        return None

    def to_sampling_params(self) -> SamplingParams:
        """How each token is drawn (a top_k of 0 and a top_p of 1 mean no cut-off); SamplingParams checks the
        values, and what it refuses is a 400 naming the field."""
        try:
            return SamplingParams(self.temperature, self.top_k or None, None if self.top_p == 1.0 else self.top_p)
        except SamplingError as err:
            raise ApiError(400, str(err), param=err.param) from None

    @property
    def requested_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def stop_texts(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [stop for stop in stops if stop]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def seed_of_choice(self, choice: int) -> int | None:
        """Choice i of a seeded call draws with seed + i (within the engine's 63 bits)."""
        return None if self.seed is None else (self.seed % 2**63 + choice) % 2**63


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    UNSUPPORTED = {key: NOT_SUPPORTED for key in ("presence_penalty", "frequency_penalty", "logit_bias", "suffix",
                                                  "best_of")}
    prompt: (str | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[str | list[TokenId]], Field(min_length=1)]) = Field(
        description="a string, a list of strings, a list of token ids or a list of such lists, and not empty")
    echo: bool = Field(False, description="true or false")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=f"an integer from 0 to {MAX_LOGPROBS} "
                                                                          "(alternatives per token) or null")

    def prompt_ids(self, tokenizer: Tokenizer) -> list[list[int]]:
        """Each prompt as token ids (as evaluation harnesses send them, or encoded); an empty prompt starts from
        end-of-text, as a new document."""
        prompts = [self.prompt] if isinstance(self.prompt, str) or _all_ids(self.prompt) else self.prompt
        encoded = []
        for prompt in prompts:
            if isinstance(prompt, str):
                check_known(tokenizer, prompt, self.allow_unknown, "prompt")
                ids = tokenizer.encode(prompt)
            else:
                ids = check_in_vocabulary(prompt, tokenizer.vocab_size, "prompt")
            encoded.append(ids or [tokenizer.eot_id])
        return encoded

    @property
    def max_tokens_per_choice(self) -> int:
        return DEFAULT_COMPLETION_TOKENS if self.requested_tokens is None else self.requested_tokens


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    UNSUPPORTED = {key: NOT_SUPPORTED for key in ("presence_penalty", "frequency_penalty", "logit_bias", "tools",
                                                  "functions")}
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(description=MESSAGES)
    logprobs: bool = Field(False, description="true or false (true: each reply token's log-probability)")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=f"an integer from 0 to {MAX_LOGPROBS} "
                                                                              "(alternatives per token) or null")

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise refusal(ApiError(400, "'top_logprobs' needs \"logprobs\": true", param="top_logprobs"))
        return self

    @property
    def alternatives(self) -> int | None:
        """The alternatives reported with each token's log-probability; None: no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_ids(self, tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
        return conversation_ids(self.messages, self.allow_unknown, tokenizer, template)


class ClassifyRequest(ApiRequest):
    """POST /v1/classify (and vLLM's /classify): texts for a classify run to label."""

    serves = CLASSIFIER
    UNSUPPORTED = {"response_format": "by a classifier: it answers labels with their probabilities"}
    model: str = Field(description="a string naming the model (GET /v1/models lists it)")
    input: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="a string or a non-empty list of strings (the texts to classify)")
    allow_unknown: bool = Field(False, description=ALLOW_UNKNOWN)

    @field_validator("model")
    @classmethod
    def _served(cls, model: str, info: ValidationInfo) -> str:
        return served_model(model, info)

    @field_validator("input")
    @classmethod
    def _texts_to_queue(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        """At most --max-queue texts (more could never all wait at once: retrying cannot help), none empty."""
        texts = [value] if isinstance(value, str) else value
        limit = _settings(info).max_queue
        if len(texts) > limit:
            raise refusal(ApiError(400, f"'input' holds {len(texts)} texts, more than the {limit} this server "
                                        "queues at once (lmforge serve --max-queue); send fewer per request",
                                   param="input", code="too_many_inputs"))
        empty = next((index for index, text in enumerate(texts) if not text), None)
        if empty is not None:
            where = "" if isinstance(value, str) else f" (input[{empty}])"
            raise refusal(ApiError(400, f"'input' must hold non-empty texts to classify{where}", param="input"))
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input

    def token_ids(self, tokenizer: Tokenizer, block_size: int) -> list[list[int]]:
        """Each text as token ids, a text longer than the context cut to its last `block_size` tokens, as
        `lmforge predict` reads it."""
        for text in self.texts:
            check_known(tokenizer, text, self.allow_unknown, "input")
        return encode_texts(tokenizer, self.texts, block_size)[0]


class TokenizeRequest(ApiRequest):
    """POST /tokenize: a prompt, or the messages of a chat through the run's template."""

    prompt: str | None = Field(None, description="a string (or give 'messages')")
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = Field(None, description=MESSAGES)
    allow_unknown: bool = Field(False, description=ALLOW_UNKNOWN)

    def token_ids(self, tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
        if self.messages is not None:
            return conversation_ids(self.messages, self.allow_unknown, tokenizer, template)
        if self.prompt is None:
            raise ApiError(400, "'prompt' must be a string (or give 'messages')", param="prompt")
        if self.prompt == tokenizer.decode([tokenizer.eot_id]):
            # lm-eval's remote tokenizer finds the end-of-text id by tokenizing its text; encode() reads that text
            # as plain characters, so the exact string alone names the special token here.
            return [tokenizer.eot_id]
        check_known(tokenizer, self.prompt, self.allow_unknown, "prompt")
        return tokenizer.encode(self.prompt)


class DetokenizeRequest(ApiRequest):
    """POST /detokenize."""

    tokens: list[TokenId] = Field(description="a list of token ids (integers from 0)")

    def text(self, tokenizer: Tokenizer) -> str:
        return tokenizer.decode(check_in_vocabulary(self.tokens, tokenizer.vocab_size, "tokens"))


def conversation_ids(messages: list[ChatMessage], allow_unknown: bool, tokenizer: Tokenizer,
                     template: ChatTemplate) -> list[int]:
    """A chat's messages through the run's template, up to where the assistant's reply begins."""
    for message in messages:
        check_known(tokenizer, message.content, allow_unknown, "messages")
    ids, _ = template.encode([m.as_dict() for m in messages], tokenizer, add_generation_prompt=True)
    return ids


def _response_format(value: dict) -> OutputFormat | None:
    """OpenAI's response_format: text (no constraint), json_object, or json_schema with its schema."""
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat("json_object", param="response_format")
    if kind != "json_schema":
        raise ApiError(400, f"'response_format' type must be text, json_object or json_schema, got {_shown(kind)}",
                       param="response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ApiError(400, "'response_format' json_schema must be an object holding the JSON schema as an object "
                            'under "schema": {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
                       param="response_format")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise ApiError(400, f"'response_format' json_schema name must be a string, got {_shown(name)}",
                       param="response_format")
    return OutputFormat("json_schema", spec["schema"], param="response_format")


def _structured_outputs(value: dict) -> OutputFormat:
    """vLLM's structured_outputs: exactly one of json, regex, grammar, choice."""
    given = {key: item for key, item in value.items() if item is not None}
    unknown = [key for key in given if key not in STRUCTURED_KINDS]
    if unknown:
        raise ApiError(400, f"'structured_outputs' option {_shown(unknown[0])} is not supported by this server; it "
                            f"takes one of {', '.join(STRUCTURED_KINDS)}", param="structured_outputs")
    if len(given) != 1:
        raise ApiError(400, f"'structured_outputs' must be {STRUCTURED_OUTPUTS}, exactly one",
                       param="structured_outputs")
    [(key, source)] = given.items()
    if key == "json" and isinstance(source, str):  # vLLM also takes the schema as JSON text
        try:
            source = json.loads(source)
        except ValueError:
            raise ApiError(400, "'structured_outputs' json must be a JSON schema (an object, or its JSON text)",
                           param="structured_outputs") from None
    wanted = {"json": dict, "regex": str, "grammar": str, "choice": list}[key]
    if not isinstance(source, wanted) or (key == "choice" and not (source and all(isinstance(c, str) and c
                                                                                     for c in source))):
        what = {"json": "a JSON schema object", "regex": "a string", "grammar": "a string",
                "choice": "a non-empty list of non-empty strings"}[key]
        raise ApiError(400, f"'structured_outputs' {key} must be {what}, got {_shown(source)}",
                       param="structured_outputs")
    return OutputFormat(STRUCTURED_KINDS[key], source, param="structured_outputs")


def served_model(model: str, info: ValidationInfo) -> str:
    """The request's `model`: the served one, else a 404 naming it."""
    served = _settings(info).model_name
    if model != served:
        raise refusal(model_not_found(model, served))
    return model


def check_known(tokenizer: Tokenizer, text: str, allow_unknown: bool, param: str) -> None:
    """The tokenizer's one unknown-character policy (Tokenizer.check_known) as a 400: characters the run's
    tokenizer does not know are refused by name unless the request sets "allow_unknown": true."""
    try:
        tokenizer.check_known(text, what=f"'{param}'", allow_unknown=allow_unknown, allow_hint=ALLOW_UNKNOWN_HINT)
    except UserError as err:
        raise ApiError(400, str(err), param=param, code="unknown_characters") from None


def check_in_vocabulary(ids: list[int], vocab_size: int, param: str) -> list[int]:
    """The vocabulary bound of every endpoint that takes token ids (completion prompts, /detokenize); the
    request models already hold them to integers from 0."""
    if any(token >= vocab_size for token in ids):
        raise ApiError(400, f"token ids must be below the vocabulary size {vocab_size}", param=param)
    return list(ids)


def fit_max_tokens(prompt_tokens: int, requested: int | None, context: int, limit: int) -> int:
    """The tokens to generate after a prompt: `requested`, or when None as many as the context leaves (within the
    server's limit); a 400 when the prompt and them cannot fit in the context."""
    if requested is None:
        requested = min(limit, context - prompt_tokens) if prompt_tokens < context else 1
    if prompt_tokens + requested > context:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens, more than the {max(context - requested, 0)} "
                            f"that fit in the context of {context} tokens with max_tokens {requested}; "
                            "shorten the prompt or lower max_tokens", param="prompt", code="context_length_exceeded")
    return requested


def validate_request(kind: type[RequestT], data: dict, settings: ServeSettings) -> RequestT:
    """`data` as a `kind`, or the first thing wrong with it as an ApiError."""
    try:
        return kind.model_validate(data, context=settings)
    except ValidationError as err:
        raise _api_error(kind, err.errors()[0]) from None


def refusal(error: ApiError) -> PydanticCustomError:
    """An ApiError raised from a validator, carried through pydantic to `validate_request` as it is."""
    return PydanticCustomError(REFUSED, "{error}", {"error": error})


def _api_error(kind: type[BaseModel], error: ErrorDetails) -> ApiError:
    """A pydantic error as a 400 naming the field, in the words of the field's description."""
    if error["type"] == REFUSED:
        return error["ctx"]["error"]
    param = str(error["loc"][0])
    description = kind.model_fields[param].description
    where = _path(kind, error["loc"])
    if error["type"] == "missing" and where == param:
        return ApiError(400, f"'{param}' is required: {description}", param=param)
    found = "missing" if error["type"] == "missing" else f"got {_shown(error['input'])}"
    detail = f", {found}" if where == param else f" ({where}: {found})"
    return ApiError(400, f"'{param}' must be {description}{detail}", param=param)


def _path(kind: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """Where in the body an error is, as `messages[1].role` (pydantic's names for union members left out)."""
    path, model = "", kind
    for key in loc:
        if isinstance(key, int):
            path += f"[{key}]"
        elif model is not None and key in model.model_fields:
            path += f".{key}" if path else key
            model = _model_in(model.model_fields[key].annotation)
        else:
            break
    return path


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The request model a field holds (itself, in a list, or optional), if any."""
    if get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((model for arg in get_args(annotation) if (model := _model_in(arg)) is not None), None)


def _shown(value: Any) -> str:
    """A request value as a message shows it: short scalars as JSON writes them, else their JSON kind."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, int | float):
        return repr(value) if len(repr(value)) <= 20 else "a long number"
    if isinstance(value, str):
        return repr(value) if len(value) <= 20 else "a string"
    return "an array" if isinstance(value, list) else "an object"


def _all_ids(prompt: list) -> bool:
    return all(isinstance(item, int) for item in prompt)


def _settings(info: ValidationInfo) -> ServeSettings:
    return info.context
