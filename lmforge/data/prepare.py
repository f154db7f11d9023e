"""`lmforge prepare`: text sources to one data directory of tokenizer.json, token shards and meta.json.

Three streaming passes over the sources, none of which holds the corpus in memory:
  1. scan: read and clean every document, drop empty ones and exact duplicates, count, and settle how the
     validation split is taken;
  2. train: stream the training split into the tokenizer trainer (gpt2 is fixed and skips this);
  3. encode: tokenize on all cores and append to the train/val shards.
Each document is preceded by the end-of-text token, as in llm.c, so a window that starts at a document
boundary sees what generation from an empty prompt sees. meta.json is written last: a directory without
it is an unfinished dataset.

The validation split is `val_sources` (held-out text) or `val_fraction` of the documents, each document
held out or not by a seeded hash of its index (and the count so far), so the choice streams. When that
gives no validation document (or no training one), as with a single document, the last `val_fraction`
of the characters of the corpus are held out instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from lmforge import __version__
from lmforge.data.corpus import (
    Cleaner,
    CorpusStats,
    Source,
    read_all,
    resolve_source,
    split_document,
    utf8_length,
)
from lmforge.data.shards import SPLITS, ShardWriter, token_dtype
from lmforge.data.tokenizer import (
    DEFAULT_BPE_VOCAB_SIZE,
    GPT2Tokenizer,
    Tokenizer,
    check_bpe_vocab_size,
    check_kind,
    tokenizer_from_dict,
    train_tokenizer,
)
from lmforge.errors import UserError
from lmforge.files import check_output_place, take_directory_lock, write_atomic, writing

DEFAULT_VAL_FRACTION = 0.1
PIECE_CHARS = 1 << 18  # longer documents are trained on and encoded in pieces of 1 to 2 times this
CHUNK_CHARS = 1 << 21  # characters per unit of work handed to an encoding worker
LOCK_FILE = ".lock"  # held by the one prepare writing --out (files.take_directory_lock)
OUR_FILE = re.compile(r"^(meta\.json|tokenizer\.json|(train|val)_\d{6}\.bin)$")
OUR_TEMPORARY = re.compile(r"^\.(meta\.json|tokenizer\.json|(train|val)_\d{6}\.bin)(\.\d+)?\.tmp$")


@dataclass
class SplitPlan:
    """How documents are assigned to train and val."""

    by: str  # val_sources | documents | position
    val_fraction: float = 0.0
    seed: int = 0
    cut: int = 0  # by position: the characters of the concatenated corpus before this go to train


def _uniform(seed: int, index: int) -> float:
    """A number in [0, 1) fixed by the seed and a document's index: the split decides as documents stream."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_documents(sources: list[Source], val_sources: list[Source], plan: SplitPlan, text_field: str,
                    lowercase: bool, stats: CorpusStats) -> Iterator[tuple[str, str, int]]:
    """Clean documents as (split, text, UTF-8 bytes), in corpus order. Deterministic: every pass sees the
    same stream. Duplicates are found across both splits, so held-out text never repeats training text."""
    cleaner = Cleaner(stats, lowercase)
    documents = cleaner.clean(read_all(sources, text_field, stats))
    if plan.by == "val_sources":
        for text, num_bytes in documents:
            yield "train", text, num_bytes
        for text, num_bytes in cleaner.clean(read_all(val_sources, text_field, stats)):
            yield "val", text, num_bytes
    elif plan.by == "documents":
        # Hold a document out with probability equal to how far the held-out count lags the fraction of the
        # documents seen so far: random positions, yet always within one document of the fraction (a coin
        # per document would often hold out none of a few dozen).
        held_out = 0
        for index, (text, num_bytes) in enumerate(documents):
            if _uniform(plan.seed, index) < plan.val_fraction * (index + 1) - held_out:
                held_out += 1
                yield "val", text, num_bytes
            else:
                yield "train", text, num_bytes
    else:
        end = 0
        for text, num_bytes in documents:
            start, end = end, end + len(text)
            if end <= plan.cut:
                yield "train", text, num_bytes
            elif start >= plan.cut:
                yield "val", text, num_bytes
            else:  # the one document that straddles the cut is held in memory, as any document is
                tail = text[plan.cut - start :]
                tail_bytes = utf8_length(tail)
                yield "train", text[: plan.cut - start], num_bytes - tail_bytes
                yield "val", tail, tail_bytes


def _progress(quiet: bool, **kwargs: Any) -> tqdm:
    return tqdm(disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


def _counted(texts: Iterator[str], bar: tqdm) -> Iterator[str]:
    for text in texts:
        bar.update(len(text))
        yield text


def _settings(sources: list[str], val_sources: list[str], val_fraction: float | None, tokenizer: str,
              vocab_size: int | None, text_field: str, lowercase: bool, seed: int,
              shard_tokens: int) -> dict[str, Any]:
    return {"sources": sources, "val_sources": val_sources, "val_fraction": val_fraction,
            "tokenizer": tokenizer, "vocab_size": vocab_size, "text_field": text_field,
            "lowercase": lowercase, "seed": seed, "shard_tokens": shard_tokens}


def _check_out_dir(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to write over a dataset unless asked to, or into a place no dataset goes (a run, the current
    directory, a directory holding a source); never touch files that are not ours."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    sources = [*settings["sources"], *settings["val_sources"]]
    check_output_place(out, directory=True, inputs=[source for source in sources if Path(source).exists()])
    if overwrite or not out.is_dir():
        return
    meta_path = out / "meta.json"
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8")).get("settings")
        except (OSError, ValueError, RecursionError, AttributeError):  # not one of ours
            old = None
        if old == settings:
            raise UserError(f"{out} already holds this dataset (same settings); "
                            "pass --overwrite to rebuild it")
        if isinstance(old, dict):
            changes = "; ".join(f"{key} {old.get(key)!r} -> {value!r}" for key, value in settings.items()
                                if old.get(key) != value)
        else:
            changes = "its meta.json is not one of ours"
        raise UserError(f"{out} already holds a different dataset ({changes}); "
                        "pass --overwrite to replace it, or choose another --out")
    leftovers = sorted(path.name for path in out.iterdir() if OUR_FILE.match(path.name))
    if leftovers:
        shown = ", ".join(leftovers[:3]) + (", ..." if len(leftovers) > 3 else "")
        raise UserError(f"{out} holds {shown} but no meta.json (an interrupted prepare?); "
                        "pass --overwrite to replace them")


def _release(lock: IO, out: Path) -> None:
    """Let go of the output directory's lock and delete its file (a later prepare makes its own)."""
    with suppress(OSError):
        (out / LOCK_FILE).unlink(missing_ok=True)
        lock.close()


def _clear_out_dir(out: Path) -> None:
    """Remove our files of an earlier dataset, meta.json first so that it never looks complete."""
    (out / "meta.json").unlink(missing_ok=True)
    for path in out.iterdir():
        if OUR_TEMPORARY.match(path.name) or (OUR_FILE.match(path.name) and path.suffix == ".bin"):
            path.unlink()


def _chunks(stream: Iterator[tuple[str, str, int]], totals: dict[str, dict[str, int]]
            ) -> Iterator[tuple[str, list[tuple[str, bool]]]]:
    """Group documents into units of work of about CHUNK_CHARS characters, one split per unit; a piece
    is (text, whether it starts a document). Counts characters, bytes and documents as they pass."""
    pending: dict[str, list[tuple[str, bool]]] = {split: [] for split in SPLITS}
    size = dict.fromkeys(SPLITS, 0)
    for split, text, num_bytes in stream:
        totals[split]["documents"] += 1
        totals[split]["chars"] += len(text)
        totals[split]["bytes"] += num_bytes
        for index, piece in enumerate(split_document(text, PIECE_CHARS)):
            pending[split].append((piece, index == 0))
            size[split] += len(piece)
            if size[split] >= CHUNK_CHARS:
                yield split, pending[split]
                pending[split], size[split] = [], 0
    for split in SPLITS:
        if pending[split]:
            yield split, pending[split]


def encode_chunk(tokenizer: Tokenizer, split: str, pieces: list[tuple[str, bool]]
                 ) -> tuple[str, np.ndarray, int, int]:
    """Tokens of one unit of work, end-of-text before each document start, in the shard dtype; also the
    unknown characters met and the characters encoded."""
    before = tokenizer.unknown_chars
    arrays = tokenizer.encode_arrays([text for text, _ in pieces])
    eot = np.array([tokenizer.eot_id], dtype=np.int64)
    parts = []
    for (_, starts_document), ids in zip(pieces, arrays, strict=True):
        if starts_document:
            parts.append(eot)
        parts.append(ids)
    tokens = np.concatenate(parts).astype(token_dtype(tokenizer.vocab_size))
    return split, tokens, tokenizer.unknown_chars - before, sum(len(text) for text, _ in pieces)


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer: dict[str, Any]) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_dict(tokenizer)


def _encode_in_worker(split: str, pieces: list[tuple[str, bool]]) -> tuple[str, np.ndarray, int, int]:
    return encode_chunk(_worker_tokenizer, split, pieces)


def _in_order(executor: Executor, work: Callable[..., Any], chunks: Iterator[tuple[str, Any]],
              in_flight: int) -> Iterator[Any]:
    """Results in submission order, with at most `in_flight` units submitted and unread: the reader can
    never run ahead of the encoders and pile the corpus up in a queue (as Pool.imap's feeder would)."""
    pending: deque[Future] = deque()
    for chunk in chunks:
        pending.append(executor.submit(work, *chunk))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _encoded(tokenizer: Tokenizer, chunks: Iterator[tuple[str, Any]], workers: int, many_chunks: bool
             ) -> Iterator[tuple[str, np.ndarray, int, int]]:
    if tokenizer.kind == "bpe":
        # Hugging Face's encode_batch is already multi-threaded and releases the GIL: one thread runs it
        # while this one reads and cleans the next unit of work.
        with ThreadPoolExecutor(1) as executor:
            yield from _in_order(executor, partial(encode_chunk, tokenizer), chunks, 2)
    elif workers > 1 and many_chunks:
        # forkserver, not fork: forking a process that has started threads (tokenizers' Rust pool, tqdm's
        # monitor) can deadlock the child.
        context = get_context("forkserver")
        context.set_forkserver_preload(["lmforge.data.tokenizer"])
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                 initargs=(tokenizer.to_dict(),)) as executor:
            yield from _in_order(executor, _encode_in_worker, chunks, 2 * workers)
    else:
        for split, pieces in chunks:
            yield encode_chunk(tokenizer, split, pieces)


def _scan(sources: list[Source], val_sources: list[Source], plan: SplitPlan, text_field: str, lowercase: bool,
          quiet: bool) -> tuple[CorpusStats, dict[str, int], dict[str, int]]:
    stats = CorpusStats()
    documents = dict.fromkeys(SPLITS, 0)
    chars = dict.fromkeys(SPLITS, 0)
    with _progress(quiet, desc="reading", unit=" docs") as bar:
        for split, text, _ in split_documents(sources, val_sources, plan, text_field, lowercase, stats):
            documents[split] += 1
            chars[split] += len(text)
            bar.update(1)
    return stats, documents, chars


def _plan_split(plan: SplitPlan, stats: CorpusStats, documents: dict[str, int], chars: dict[str, int],
                source_names: list[str], val_names: list[str]) -> SplitPlan:
    """Check the scan found something to train and validate on; fall back to a split by position."""
    if stats.documents == 0:
        raise UserError(f"no documents in {', '.join(source_names + val_names)} after cleaning "
                        f"({stats.empty_removed} empty, {stats.duplicates_removed} duplicates removed)")
    if plan.by == "val_sources":
        if documents["train"] == 0:
            raise UserError(f"no training documents in {', '.join(source_names)} after cleaning")
        if documents["val"] == 0:
            raise UserError(f"no validation documents in {', '.join(val_names)} after cleaning "
                            f"({stats.duplicates_removed} duplicates, of training documents too, removed)")
        return plan
    if documents["train"] > 0 and documents["val"] > 0:
        return plan
    total = chars["train"] + chars["val"]
    if total < 2:
        raise UserError(f"the corpus has {total} character(s) after cleaning: "
                        "too little for a train and a val split")
    val_chars = min(total - 1, max(1, round(total * plan.val_fraction)))
    return SplitPlan("position", plan.val_fraction, plan.seed, cut=total - val_chars)


def _summary(out: Path, meta: dict[str, Any], stats: CorpusStats) -> str:
    tokenizer, splits = meta["tokenizer"], meta["splits"]
    total = {key: splits["train"][key] + splits["val"][key] for key in ("tokens", "chars", "bytes")}
    if meta["split_by"] == "val_sources":
        split_by = "from --val-source"
    elif meta["split_by"] == "documents":
        split_by = f"{meta['val_fraction']:g} of the documents held out (seed {meta['seed']})"
    else:
        split_by = f"the last {meta['val_fraction']:g} of the characters held out"
    lines = [
        f"prepared {out}: {tokenizer['kind']} tokenizer, vocabulary {tokenizer['vocab_size']:,}, "
        f"end-of-text id {tokenizer['eot_id']}",
        f"  documents   {stats.documents:,} kept; {stats.duplicates_removed:,} duplicates and "
        f"{stats.empty_removed:,} empty removed",
        f"  text        {total['chars']:,} characters, {total['bytes']:,} bytes; "
        f"{meta['replaced_bytes']:,} non-UTF-8 bytes replaced, {meta['unknown_chars']:,} unknown characters",
        f"  tokens      {total['tokens']:,} ({total['bytes'] / total['tokens']:.2f} bytes per token, "
        "end-of-text tokens included)",
        f"  validation  {split_by}",
    ]
    for split in SPLITS:
        part = splits[split]
        shards = f"{part['shards']} shard" + ("s" if part["shards"] != 1 else "")
        lines.append(f"  {split:<5}       {part['tokens']:>13,} tokens {part['documents']:>9,} documents "
                     f"{part['chars']:>13,} chars  {shards}")
    return "\n".join(lines)


def _check_arguments(source_names: list[str], val_names: list[str], tokenizer: str,
                     val_fraction: float | None, vocab_size: int | None, shard_tokens: int,
                     workers: int) -> None:
    check_kind(tokenizer)
    if not source_names:
        raise UserError("give at least one --source")
    if val_names and val_fraction is not None:
        raise UserError("give either --val-source or --val-fraction, not both")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if vocab_size is not None and tokenizer != "bpe":
        fixed_by = "the training text" if tokenizer == "char" else "GPT-2"
        raise UserError(f"--vocab-size applies to the bpe tokenizer only; the {tokenizer} vocabulary is "
                        f"fixed by {fixed_by}")
    if vocab_size is not None:
        check_bpe_vocab_size(vocab_size, "--vocab-size")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")


def _write_shards(tokenizer: Tokenizer, stream: Iterator[tuple[str, str, int]], out: Path, shard_tokens: int,
                  workers: int, total_chars: int, quiet: bool) -> tuple[dict[str, dict[str, int]], int]:
    """The encoding pass: per-split counts (tokens, bytes, chars, documents, shards) and unknown chars."""
    totals = {split: {"tokens": 0, "bytes": 0, "chars": 0, "documents": 0} for split in SPLITS}
    unknown_chars = 0
    writers = {split: ShardWriter(out, split, tokenizer.vocab_size, shard_tokens) for split in SPLITS}
    try:
        with _progress(quiet, desc="encoding", total=total_chars, unit="char", unit_scale=True) as bar:
            encoded = _encoded(tokenizer, _chunks(stream, totals), workers, total_chars > CHUNK_CHARS)
            for split, tokens, unknown, num_chars in encoded:
                writers[split].write(tokens)
                totals[split]["tokens"] += len(tokens)
                unknown_chars += unknown
                bar.update(num_chars)
        for split in SPLITS:
            totals[split]["shards"] = len(writers[split].close())
    finally:
        for writer in writers.values():
            writer.abort()
    return totals, unknown_chars


def prepare(sources: list[str], out: str | Path, tokenizer: str, *, val_sources: list[str] | None = None,
            val_fraction: float | None = None, vocab_size: int | None = None, text_field: str = "text",
            lowercase: bool = False, seed: int = 1337, shard_tokens: int = 100_000_000,
            workers: int | None = None, overwrite: bool = False, quiet: bool = False) -> dict:
    """Clean, split and tokenize `sources` into `out`; prints a summary unless quiet; returns meta.json."""
    source_names = [sources] if isinstance(sources, str) else list(sources)
    val_names = [val_sources] if isinstance(val_sources, str) else list(val_sources or [])
    cores = os.cpu_count() or 1
    workers = cores if workers is None else workers
    _check_arguments(source_names, val_names, tokenizer, val_fraction, vocab_size, shard_tokens, workers)
    # The process pool starts a process for each unit of work in flight (2 * workers): an --workers in the
    # millions would start one per unit and read the whole corpus ahead. Past the cores, more only wait.
    workers = min(workers, cores)
    if tokenizer == "bpe" and vocab_size is None:
        vocab_size = DEFAULT_BPE_VOCAB_SIZE
    fraction = None if val_names else (DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction)
    out = Path(out)
    settings = _settings(source_names, val_names, fraction, tokenizer, vocab_size, text_field, lowercase,
                         seed, shard_tokens)
    _check_out_dir(out, settings, overwrite)
    train_sources = [resolve_source(name) for name in source_names]
    held_out_sources = [resolve_source(name) for name in val_names]
    if tokenizer == "gpt2":
        GPT2Tokenizer()  # fail now, not after the scan, when tiktoken's files are missing

    plan = SplitPlan("val_sources") if val_names else SplitPlan("documents", fraction, seed)
    stats, documents, chars = _scan(train_sources, held_out_sources, plan, text_field, lowercase, quiet)
    plan = _plan_split(plan, stats, documents, chars, source_names, val_names)

    def stream() -> Iterator[tuple[str, str, int]]:
        return split_documents(train_sources, held_out_sources, plan, text_field, lowercase, CorpusStats())

    if tokenizer == "bpe":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        # Sizes tokenizers' Rust thread pool; only read if the pool has not started in this process yet.
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    training_text = (piece for split, text, _ in stream() if split == "train"
                     for piece in split_document(text, PIECE_CHARS))
    if tokenizer == "char":  # bpe draws its own progress bars; gpt2 does not read the text
        train_chars = plan.cut if plan.by == "position" else chars["train"]
        with _progress(quiet, desc="vocabulary", total=train_chars, unit="char", unit_scale=True) as bar:
            fitted = train_tokenizer(tokenizer, _counted(training_text, bar))
    else:
        fitted = train_tokenizer(tokenizer, training_text, vocab_size,
                                 show_progress=not quiet and sys.stderr.isatty())

    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        lock = take_directory_lock(out, out / LOCK_FILE)
    try:
        # Again under the lock: another prepare into the same --out may have finished since the first check.
        _check_out_dir(out, settings, overwrite)
        with writing(out):
            _clear_out_dir(out)
    except BaseException:
        _release(lock, out)
        raise
    # A failure from here on (disk full, interrupted) removes what this prepare wrote, so that running it
    # again needs no --overwrite; the dataset it replaces was already removed above.
    try:
        fitted.save(out / "tokenizer.json")
        totals, unknown_chars = _write_shards(fitted, stream(), out, shard_tokens, workers,
                                              chars["train"] + chars["val"], quiet)
        meta = {
            "lmforge_version": __version__,
            "tokenizer": {"kind": fitted.kind, "vocab_size": fitted.vocab_size, "eot_id": fitted.eot_id},
            "splits": totals,
            "sources": source_names,
            "val_sources": val_names,
            "duplicates_removed": stats.duplicates_removed,
            "replaced_bytes": stats.replaced_bytes,
            "unknown_chars": unknown_chars,
            "lowercase": lowercase,
            "seed": seed,
            "empty_removed": stats.empty_removed,
            "split_by": plan.by,
            "val_fraction": fraction,
            "settings": settings,  # the arguments, to tell a rerun of the same command from a different one
        }
        write_atomic(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    except BaseException:
        with suppress(OSError):  # the first error is the one to report
            _clear_out_dir(out)
            (out / "tokenizer.json").unlink(missing_ok=True)
        raise
    finally:
        _release(lock, out)
    if not quiet:
        print(_summary(out, meta, stats))
    return meta
