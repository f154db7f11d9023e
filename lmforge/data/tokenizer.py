"""Tokenizers: text to token ids and back, one small class per kind, saved as and loaded from tokenizer.json.

Kinds:
  char  the sorted characters of the training text, then the end-of-text id, then a reserved unknown id
        (characters missing from the vocabulary encode to it and are counted, never an error);
  bpe   byte-level BPE trained with Hugging Face `tokenizers`: round-trips any text exactly;
  gpt2  OpenAI's GPT-2 encoding through tiktoken (50257 ids, end-of-text 50256).

tokenizer.json is one JSON object {"kind", "vocab_size", "eot_id", ...}: char adds "chars" (id i is
chars[i]) and "unknown_id"; bpe adds "hf", the complete Hugging Face tokenizer JSON, so
`tokenizers.Tokenizer.from_str(json.dumps(data["hf"]))` recovers it (an imported Hugging Face tokenizer
whose end-of-text token is not "<|endoftext|>" also has "eot_text"); gpt2 adds nothing.

`encode` never adds the end-of-text token, and treats a literal "<|endoftext|>" in the text as text;
prepare puts the end-of-text id between documents. `decode` writes that id as "<|endoftext|>".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import UserError
from lmforge.files import write_atomic
from lmforge.inputs import refuse_special_file

KINDS = ("char", "bpe", "gpt2")
EOT_TEXT = "<|endoftext|>"
DEFAULT_BPE_VOCAB_SIZE = 4096
MIN_BPE_VOCAB_SIZE = 257  # the 256 byte tokens and end-of-text
# The trainer sizes its tables by the vocabulary up front: a size in the billions aborts the whole process
# in Rust (out of memory) before reading any text. The largest vocabularies in use hold about 256k tokens.
MAX_BPE_VOCAB_SIZE = 1 << 20


def check_bpe_vocab_size(vocab_size: int, name: str = "bpe vocab size") -> None:
    if not MIN_BPE_VOCAB_SIZE <= vocab_size <= MAX_BPE_VOCAB_SIZE:
        raise UserError(f"{name} must be between {MIN_BPE_VOCAB_SIZE} (256 byte tokens and end-of-text) and "
                        f"{MAX_BPE_VOCAB_SIZE:,} (2**20), got {vocab_size}")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UserError(f"unknown tokenizer '{kind}'; choose one of {', '.join(KINDS)}")
    return kind


ALLOW_UNKNOWN_HINT = "pass --allow-unknown to read each as the unknown token"


def name_characters(characters: Sequence[str], shown: int = 10) -> str:
    """The first `shown` characters, quoted (so a space or a control character is visible), then '...'."""
    return ", ".join(repr(c) for c in characters[:shown]) + (", ..." if len(characters) > shown else "")


class Tokenizer:
    """The interface every command uses; `load_tokenizer` returns one of the subclasses below."""

    kind: str
    vocab_size: int
    eot_id: int
    unknown_chars: int = 0  # characters encoded to the unknown id so far (only the char kind has one)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def unknown_characters(self, text: str) -> list[str]:
        """The characters of `text` this tokenizer cannot encode, in order of first appearance (byte-level
        tokenizers encode everything)."""
        return []

    def check_known(self, text: str, *, what: str = "the prompt", allow_unknown: bool = False,
                    allow_hint: str = ALLOW_UNKNOWN_HINT) -> list[str]:
        """The one policy for text a user gives a run's model (sample, predict, chat, plot next-token, the
        server's prompts and messages): a character the tokenizer cannot encode is refused, by name, unless
        `allow_unknown` reads it as the unknown token. Returns the unknown characters that were allowed, for a
        note; `allow_hint` tells the user how to allow them (a flag, or a request field)."""
        unknown = self.unknown_characters(text)
        if unknown and not allow_unknown:
            raise UserError(f"{what} has characters the run's tokenizer does not know ({name_characters(unknown)}); "
                            f"remove them, or {allow_hint}")
        return unknown

    def check_known_data(self, texts: Iterable[tuple[str, str]], origin: str, *, allow_unknown: bool = False,
                         advice: str = "") -> None:
        """check_known for a data file's many texts, each given with where it was read ("FILE line N"): refused
        with how many characters are unknown, the commonest of them and where the first is (unless
        `allow_unknown`); `advice` ends the message."""
        if allow_unknown:
            return
        unknown: dict[str, int] = {}
        first = None
        for text, where in texts:
            for char in self.unknown_characters(text):
                unknown[char] = unknown.get(char, 0) + text.count(char)
                first = first or where
        if unknown:
            commonest = sorted(unknown, key=unknown.get, reverse=True)
            raise UserError(f"{origin}: the run's tokenizer cannot encode {sum(unknown.values())} characters of the "
                            f"data ({len(unknown)} distinct, e.g. {name_characters(commonest, 5)}; the first at "
                            f"{first})" + advice)

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like encode_batch, as int64 arrays; kinds override it where arrays are the fast path."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json (into `path` if it is a directory), atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        write_atomic(path, json.dumps(self.to_dict(), ensure_ascii=False))
        return path


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise UserError("char tokenizer: the vocabulary repeats a character (corrupt tokenizer.json?)")
        self.chars = chars
        self.eot_id = len(chars)
        self.unknown_id = len(chars) + 1
        self.vocab_size = len(chars) + 2
        self.unknown_chars = 0
        # A code point -> id table makes encoding one NumPy gather; the last entry catches every code
        # point above the vocabulary's largest.
        codepoints = np.array([ord(c) for c in chars], dtype=np.int64)
        self._table = np.full(int(codepoints.max(initial=0)) + 2, self.unknown_id, dtype=np.int64)
        self._table[codepoints] = np.arange(len(chars))
        self._pieces = list(chars) + [EOT_TEXT, "\ufffd"]
        self._known = frozenset(chars)

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        arrays = []
        last = len(self._table) - 1
        for text in texts:
            # surrogatepass: a lone surrogate (possible in a command-line prompt) is just an unknown char
            codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            ids = self._table[np.minimum(codepoints, last)]
            self.unknown_chars += int(np.count_nonzero(ids == self.unknown_id))
            arrays.append(ids)
        return arrays

    def encode(self, text: str) -> list[int]:
        return self.encode_arrays([text])[0].tolist()

    def unknown_characters(self, text: str) -> list[str]:
        return list(dict.fromkeys(c for c in text if c not in self._known))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [ids.tolist() for ids in self.encode_arrays(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        pieces, size = self._pieces, len(self._pieces)
        return "".join(pieces[i] if 0 <= i < size else "\ufffd" for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "char", "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "unknown_id": self.unknown_id, "chars": self.chars}


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, hf: Any, eot_text: str = EOT_TEXT):
        self.hf = hf
        # A document that quotes "<|endoftext|>" is text; only prepare places real boundaries.
        hf.encode_special_tokens = True
        self.vocab_size = hf.get_vocab_size()
        # An imported tokenizer (Llama's "</s>", ...) names its own end-of-text token.
        self.eot_text = eot_text
        eot_id = hf.token_to_id(eot_text)
        if eot_id is None:
            raise UserError(f"bpe tokenizer has no {eot_text} token (corrupt tokenizer.json?)")
        self.eot_id = eot_id

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB_SIZE,
              show_progress: bool = False) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        check_bpe_vocab_size(vocab_size)
        hf = HFTokenizer(models.BPE())
        # Byte level with no prefix space and no normalizer: every string maps to bytes and back unchanged.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress)
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Multi-threaded in Rust, and it lets go of the GIL meanwhile.
        return [encoding.ids for encoding in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": "bpe", "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "hf": json.loads(self.hf.to_str())}
        if self.eot_text != EOT_TEXT:
            data["eot_text"] = self.eot_text
        return data


class GPT2Tokenizer(Tokenizer):
    kind = "gpt2"

    def __init__(self) -> None:
        import tiktoken

        try:
            self.encoding = tiktoken.get_encoding("gpt2")
        except Exception as err:  # tiktoken downloads on first use; offline that fails in many ways
            raise UserError(
                "the gpt2 tokenizer needs tiktoken's GPT-2 files, which tiktoken downloads on first use, and "
                f"they could not be loaded ({type(err).__name__}): run once with network access, or set "
                "TIKTOKEN_CACHE_DIR to a directory holding the cached files (copied from a machine where "
                "tiktoken.get_encoding('gpt2') worked)"
            ) from None
        self.vocab_size = self.encoding.n_vocab
        self.eot_id = self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        if all(0 <= i < self.vocab_size for i in ids):
            return self.encoding.decode(ids)
        return "".join(self.encoding.decode([i]) if 0 <= i < self.vocab_size else "\ufffd" for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "gpt2", "vocab_size": self.vocab_size, "eot_id": self.eot_id}


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None,
                    show_progress: bool = False) -> Tokenizer:
    """A tokenizer of this kind fitted to the training texts (streamed once; gpt2 does not read them)."""
    check_kind(kind)
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size or DEFAULT_BPE_VOCAB_SIZE, show_progress)
    return GPT2Tokenizer()


def tokenizer_from_dict(data: dict[str, Any], origin: str = "tokenizer.json") -> Tokenizer:
    if not isinstance(data, dict) or "kind" not in data:
        raise UserError(f"{origin} is not an lmforge tokenizer (no 'kind'; valid kinds: {', '.join(KINDS)})")
    kind = data["kind"]
    if kind not in KINDS:
        raise UserError(f"{origin}: unknown tokenizer kind '{kind}'; valid kinds: {', '.join(KINDS)}")
    try:
        if kind == "char":
            tokenizer: Tokenizer = CharTokenizer(data["chars"])
        elif kind == "bpe":
            from tokenizers import Tokenizer as HFTokenizer

            tokenizer = BPETokenizer(HFTokenizer.from_str(json.dumps(data["hf"])), data.get("eot_text", EOT_TEXT))
        else:
            tokenizer = GPT2Tokenizer()
    except UserError:
        raise
    except Exception as err:  # whatever a damaged file makes the constructors trip over
        raise UserError(f"{origin}: corrupt {kind} tokenizer ({type(err).__name__}: {err})") from None
    expected = (data.get("vocab_size"), data.get("eot_id"))
    if expected != (tokenizer.vocab_size, tokenizer.eot_id):
        raise UserError(f"{origin}: vocab_size/eot_id {expected} do not match the {kind} tokenizer it holds "
                        f"({tokenizer.vocab_size}, {tokenizer.eot_id})")
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved at `path`: a tokenizer.json file or a directory holding one."""
    path = Path(path)
    refuse_special_file(path, "tokenizer")
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path} (lmforge prepare writes it into the data directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    except RecursionError:
        raise UserError(f"{path} is not an lmforge tokenizer (JSON nested too deeply to read)") from None
    return tokenizer_from_dict(data, str(path))
