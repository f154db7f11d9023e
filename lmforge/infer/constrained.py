"""Constrained decoding: answers that follow a JSON schema, a regular expression or a grammar, whatever the model.

Before each token is drawn, a `GrammarConstraint` masks the logits of every token that cannot continue the
format (their logit becomes -inf), and after it is drawn it is told the token. End-of-text is allowed only once
the format is complete, so an answer that ends by itself always parses. An answer that runs out of tokens
(max_tokens, or the context) ends unfinished, with finish reason "length", as OpenAI's structured outputs do.

The grammar engine is llguidance (the `serve` extra): it takes an arbitrary vocabulary as the bytes of each
token, so lmforge's character tokenizer works as well as byte-level BPE and GPT-2's tiktoken encoding, and it
builds its lexer lazily while decoding, so a new schema per request needs no pass over the vocabulary (xgrammar
compiles each grammar against the vocabulary first; outlines-core builds a per-regex index over it and has no
context-free grammars). docs/serve.md, "Structured outputs", says more.

`OutputFormat` names what an answer must be; `compile_format` checks it against a run's tokenizer (a
`FormatError` naming what is wrong, for a 400 or a command-line error) and returns a `CompiledFormat`, which
makes one `GrammarConstraint` per answer. The llguidance view of a tokenizer is built once per tokenizer object
(`guidance_tokenizer`).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmforge.data.tokenizer import EOT_TEXT, BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer
from lmforge.errors import UserError
from lmforge.inputs import refuse_special_file

FormatKind = Literal["json_schema", "json_object", "regex", "grammar", "choice"]
# Compact JSON: no whitespace between tokens. A small model given free whitespace can spend its whole budget on
# spaces and newlines; the answer parses the same.
JSON_OPTIONS = {"whitespace_flexible": False}
SPECIAL = b"\xff"  # llguidance's mark of a special token: never produced by text, only named in a grammar


class FormatError(UserError):
    """A format that cannot be used (not JSON Schema, a feature llguidance lacks, a regex that does not compile,
    a grammar with a syntax error); `param` names the request field it came from."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class OutputFormat:
    """What an answer must be: `source` is a JSON schema (a dict) for json_schema, a regex pattern, a Lark grammar
    (llguidance's dialect) or a list of strings (choice); json_object needs none. `param` names where it came from
    (the request field or the command-line flag), for errors."""

    kind: FormatKind
    source: Any = None
    param: str | None = None

    def grammar(self) -> str:
        """The format as an llguidance grammar (not yet checked)."""
        from llguidance import LLMatcher

        if self.kind in ("json_schema", "json_object"):
            schema = {"type": "object"} if self.kind == "json_object" else self.source
            if not isinstance(schema, dict):
                raise FormatError(f"{self._where()}: a JSON schema must be a JSON object, got "
                                  f"{type(schema).__name__}", self.param)
            try:
                return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            except ValueError as err:
                raise FormatError(f"{self._where()}: not a usable JSON schema ({_one_line(str(err))})",
                                  self.param) from None
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        if self.kind == "grammar":
            return LLMatcher.grammar_from_lark(self.source)
        if not self.source:
            raise FormatError(f"{self._where()}: give at least one choice", self.param)
        # A Lark alternative of string literals: json.dumps writes each one as a quoted literal Lark reads.
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(choice) for choice in self.source))

    def _where(self) -> str:
        return self.param or self.kind


@dataclass(frozen=True)
class CompiledFormat:
    """A checked format for one tokenizer: `constraint()` makes the per-answer state, a copy of the matcher built
    once (building one compiles the grammar, which can take a second for a large one; copying is cheap)."""

    format: OutputFormat
    matcher: Any  # llguidance.LLMatcher at the start of the format
    vocab_size: int  # the tokenizer's
    eot_id: int
    never: tuple[int, ...]  # ids that are no text: never allowed

    def constraint(self) -> GrammarConstraint:
        return GrammarConstraint(self.matcher.deep_copy(), self.vocab_size, self.eot_id, self.never, self.format)


class GrammarConstraint:
    """One answer's place in its format: `mask` the logits before a token is drawn, then `accept` the token.
    Used from one thread at a time (the engine's)."""

    def __init__(self, matcher: Any, vocab_size: int, eot_id: int, never: tuple[int, ...],
                 output_format: OutputFormat):
        self.matcher = matcher
        self.vocab_size = vocab_size  # the tokenizer's: a model's padded vocabulary may be larger
        self.eot_id = eot_id
        self.never = list(never)
        self.format = output_format
        self.finished = False  # end-of-text was drawn: the answer is complete

    def allowed(self) -> np.ndarray:
        """A boolean per token of the tokenizer: may it come next? (llguidance offers a special token when no text
        token can continue; `never` holds those that are not text, such as the char tokenizer's unknown id.)"""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(words, bitorder="little")[: self.vocab_size].astype(bool)
        allowed[self.never] = False
        return allowed

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits (vocab,) with every token the format does not allow next set to -inf (a new tensor); a
        padding id past the tokenizer's vocabulary is never allowed."""
        allowed = np.zeros(logits.numel(), dtype=bool)
        known = min(logits.numel(), self.vocab_size)
        allowed[:known] = self.allowed()[:known]
        if not allowed.any():
            raise FormatError(self._stuck(), self.format.param)
        return logits.masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        """Advance past the drawn token (one that `mask` allowed); end-of-text ends the answer."""
        if token == self.eot_id:
            self.finished = True
        elif not self.matcher.consume_token(token):
            raise RuntimeError(f"the {self.format.kind} constraint refused token {token}: "
                               f"{_one_line(self.matcher.get_error())}")

    def _stuck(self) -> str:
        error = self.matcher.get_error()
        if error:
            return f"{self.format._where()}: the constraint failed: {_one_line(error)}"
        return (f"{self.format._where()}: no token of the run's tokenizer can continue the answer here (the format "
                "needs characters the vocabulary lacks)")


def format_from_flags(json_schema: str | None, regex: str | None) -> OutputFormat | None:
    """The format `sample` and `chat` were given: --json-schema FILE (read here) or --regex PATTERN, or None."""
    if json_schema is not None and regex is not None:
        raise UserError("give either --json-schema or --regex, not both")
    if regex is not None:
        return OutputFormat("regex", regex, param="--regex")
    if json_schema is None:
        return None
    refuse_special_file(json_schema, "--json-schema")
    try:
        schema = json.loads(Path(json_schema).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--json-schema: no such file: {json_schema}") from None
    except OSError as err:
        raise UserError(f"--json-schema: cannot read {json_schema}: {err.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise UserError(f"--json-schema: {json_schema} is not JSON ({_one_line(str(err))})") from None
    return OutputFormat("json_schema", schema, param="--json-schema")


def compile_format(tokenizer: Tokenizer, output_format: OutputFormat) -> CompiledFormat:
    """The format as a checked grammar for this tokenizer: a FormatError naming the problem (an unsupported schema
    keyword by name, where a regex or a grammar fails to parse), or one whose first token no token of the
    tokenizer can write."""
    from llguidance import LLMatcher, LLParserLimits

    guidance = guidance_tokenizer(tokenizer)
    # Short errors: the verbose ones hold the parser state and the whole grammar, many lines of it.
    matcher = LLMatcher(guidance, output_format.grammar(), log_level=0, limits=LLParserLimits(verbose_errors=False))
    if matcher.is_error():
        raise FormatError(f"{output_format._where()}: {_describe(output_format.kind, matcher.get_error())}",
                          output_format.param)
    never = (tokenizer.unknown_id,) if isinstance(tokenizer, CharTokenizer) else ()
    compiled = CompiledFormat(output_format, matcher, guidance.vocab_size, tokenizer.eot_id, never)
    if not compiled.constraint().allowed().any():
        raise FormatError(f"{output_format._where()}: no token of the run's {tokenizer.kind} tokenizer can begin "
                          "this format (it needs characters the vocabulary lacks)", output_format.param)
    return compiled


_guidance_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_guidance_lock = threading.Lock()


def guidance_tokenizer(tokenizer: Tokenizer) -> Any:
    """llguidance's view of the tokenizer (each token's bytes, end-of-text as the end of an answer), built once per
    tokenizer object: a loaded run's answers all share it."""
    with _guidance_lock:
        cached = _guidance_tokenizers.get(tokenizer)
        if cached is None:
            cached = _guidance_tokenizers[tokenizer] = _build_guidance_tokenizer(tokenizer)
        return cached


def _build_guidance_tokenizer(tokenizer: Tokenizer) -> Any:
    from llguidance import LLTokenizer, TokenizerWrapper

    if isinstance(tokenizer, CharTokenizer):
        return LLTokenizer(TokenizerWrapper(_CharVocabulary(tokenizer)), slices=[])
    if isinstance(tokenizer, BPETokenizer):
        # The Hugging Face tokenizer's own JSON: llguidance reads its byte-level (or byte-fallback) pieces.
        return LLTokenizer(tokenizer.hf.to_str(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eot_id)
    if isinstance(tokenizer, GPT2Tokenizer):
        from llguidance.tiktoken import lltokenizer_from_encoding

        return lltokenizer_from_encoding(tokenizer.encoding, eos_token=tokenizer.eot_id)
    raise UserError(f"structured outputs do not support the {tokenizer.kind} tokenizer")


class _CharVocabulary:
    """A character tokenizer as llguidance's TokenizerWrapper reads one: each id's UTF-8 bytes; end-of-text and the
    unknown id are special tokens, so no format ever writes them as text."""

    bos_token_id = None

    def __init__(self, tokenizer: CharTokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eot_id
        self.tokens = [char.encode("utf-8", "surrogatepass") for char in tokenizer.chars]
        self.tokens += [SPECIAL + EOT_TEXT.encode(), SPECIAL + b"<|unknown|>"]
        self.special_token_ids = [tokenizer.eot_id, tokenizer.unknown_id]

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("the char tokenizer encodes text")  # tells the wrapper to hand it strings
        return self.tokenizer.encode(text)


def _describe(kind: FormatKind, message: str) -> str:
    """llguidance's error as one line, said in the format's terms."""
    message = _one_line(message)
    if kind in ("json_schema", "json_object") and message.startswith("Unimplemented keys"):
        return f"this server cannot enforce the schema keywords {message.split(':', 1)[1].strip()} (unsupported)"
    if kind == "regex" and "regex parse error" in message:  # keep the parser's reason, not its excerpt
        message = re.sub(r" \d+ \|.*$", "", message.split(" error: ")[-1])
    what = {"json_schema": "not a usable JSON schema", "json_object": "not a usable JSON schema",
            "regex": "the regex does not compile", "grammar": "the grammar does not parse",
            "choice": "the choices do not compile"}[kind]
    return f"{what}: {message}"


def _one_line(message: str) -> str:
    return " ".join(message.split())
