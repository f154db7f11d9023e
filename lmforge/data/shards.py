"""Token shards on disk in llm.c's layout: write them (atomically, rotating at a size), list them, read them.

A shard is a header of 256 little-endian int32 (header[0] magic, header[1] version, header[2] the number
of tokens, the rest 0) followed by the tokens: uint16 (magic 20240520, version 1) while every id fits,
that is while the vocabulary has at most 65,535 tokens; uint32 (magic 20240801, version 7) beyond.
Files are named `{split}_{index:06d}.bin`; llm.c's `fineweb_train_000001.bin` style is read as well.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import numpy as np

from lmforge.errors import UserError
from lmforge.files import temporary_beside, writing

SPLITS = ("train", "val")
HEADER_INTS = 256  # llm.c's header size, for its shards and its model and tokenizer files
HEADER_BYTES = HEADER_INTS * 4
UINT16_MAGIC, UINT16_VERSION = 20240520, 1
UINT32_MAGIC, UINT32_VERSION = 20240801, 7
LAYOUTS = {(UINT16_MAGIC, UINT16_VERSION): np.dtype("<u2"), (UINT32_MAGIC, UINT32_VERSION): np.dtype("<u4")}
MAX_UINT16_VOCAB = 65_535


def token_dtype(vocab_size: int) -> np.dtype:
    return LAYOUTS[(UINT16_MAGIC, UINT16_VERSION)] if vocab_size <= MAX_UINT16_VOCAB else \
        LAYOUTS[(UINT32_MAGIC, UINT32_VERSION)]


def shard_header(num_tokens: int, vocab_size: int) -> bytes:
    magic, version = (UINT16_MAGIC, UINT16_VERSION) if vocab_size <= MAX_UINT16_VOCAB else \
        (UINT32_MAGIC, UINT32_VERSION)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, num_tokens
    return header.tobytes()


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


class ShardWriter:
    """Appends tokens to `{split}_000000.bin`, `{split}_000001.bin`, ... of at most `shard_tokens` each.

    A shard is written under a hidden temporary name and renamed once its header holds the final count,
    so a visible shard is always complete. Memory holds only what one `write` is given.
    """

    def __init__(self, out_dir: str | Path, split: str, vocab_size: int, shard_tokens: int):
        if shard_tokens < 1:
            raise UserError(f"shard size must be at least 1 token, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.vocab_size = vocab_size
        self.shard_tokens = shard_tokens
        self.dtype = token_dtype(vocab_size)
        self.paths: list[Path] = []
        self.num_tokens = 0
        self._file = None
        self._temporary: Path | None = None
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            return
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"token ids outside [0, {self.vocab_size}) cannot go into a {self.split} shard")
        tokens = tokens.astype(self.dtype, copy=False)
        start = 0
        with writing(self._path(), needed=HEADER_BYTES + (self._in_shard + len(tokens)) * self.dtype.itemsize):
            while start < len(tokens):
                if self._file is None:
                    self._open()
                take = min(len(tokens) - start, self.shard_tokens - self._in_shard)
                self._file.write(tokens[start : start + take].tobytes())
                self._in_shard += take
                self.num_tokens += take
                start += take
                if self._in_shard == self.shard_tokens:
                    self._finish()

    def _path(self) -> Path:
        """The shard being written (or next to be)."""
        return self.out_dir / shard_name(self.split, len(self.paths))

    def _open(self) -> None:
        self._temporary = temporary_beside(self.out_dir / shard_name(self.split, len(self.paths)))
        self._file = open(self._temporary, "wb")
        self._file.write(shard_header(0, self.vocab_size))
        self._in_shard = 0

    def _finish(self) -> None:
        self._file.seek(0)
        self._file.write(shard_header(self._in_shard, self.vocab_size))
        self._file.close()
        path = self.out_dir / shard_name(self.split, len(self.paths))
        os.replace(self._temporary, path)
        self.paths.append(path)
        self._file = self._temporary = None

    def close(self) -> list[Path]:
        """Finish the last shard; returns every shard written."""
        if self._file is not None:
            with writing(self._path(), needed=HEADER_BYTES + self._in_shard * self.dtype.itemsize):
                self._finish()
        return self.paths

    def abort(self) -> None:
        """Drop the shard in progress (the finished ones stay)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # flushing the buffer fails again on a full disk: the file goes anyway
                pass
            self._temporary.unlink(missing_ok=True)
            self._file = self._temporary = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of one shard, memory-mapped (read-only), after checking its header against its size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(HEADER_BYTES)
    except FileNotFoundError:
        raise UserError(f"token shard not found: {path}") from None
    except OSError as err:
        raise UserError(f"cannot read token shard {path}: {err.strerror}") from None
    if len(head) < HEADER_BYTES:
        raise UserError(f"{path} is not a token shard: {size} bytes, "
                        f"shorter than the {HEADER_BYTES}-byte header")
    magic, version, count = (int(value) for value in np.frombuffer(head, dtype="<i4")[:3])
    dtype = LAYOUTS.get((magic, version))
    if dtype is None:
        raise UserError(f"{path} is not a token shard: unknown magic {magic} / version {version} "
                        f"(expected {UINT16_MAGIC}/{UINT16_VERSION} or {UINT32_MAGIC}/{UINT32_VERSION})")
    expected = HEADER_BYTES + count * dtype.itemsize
    if count < 0 or size != expected:
        raise UserError(f"{path} is corrupt: its header says {count} tokens ({expected} bytes) "
                        f"but the file has {size} bytes; prepare the data again")
    if count == 0:
        return np.zeros(0, dtype=dtype)  # a zero-length memory map is not allowed
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def list_shards(data_dir: str | Path, split: str) -> list[Path]:
    """The shards of one split in order: `{split}_*.bin`, and llm.c's `*_{split}_*.bin` names."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory not found: {data_dir} (create it with lmforge prepare --out)")
    paths = sorted(path for path in data_dir.glob(f"*{split}_*.bin") if path.is_file())
    if not paths:
        raise UserError(f"no {split} shards ({split}_*.bin) in {data_dir}; "
                        f"run lmforge prepare --out {data_dir}")
    return paths
