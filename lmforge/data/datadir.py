"""What training needs to know about a data directory: its tokenizer and its splits' token and byte counts.

A directory made by `lmforge prepare` says it all in meta.json and tokenizer.json. A directory of llm.c
shards made elsewhere (`fineweb_train_000001.bin`, ...) has neither: the token counts are read from the
shard headers, the byte counts are unknown (so bits per byte is not reported), and the tokenizer is the
one given (the `--init-from` run's) or GPT-2's, the tokenizer of llm.c's datasets.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.data.shards import SPLITS, list_shards, read_shard
from lmforge.data.tokenizer import GPT2Tokenizer, Tokenizer, load_tokenizer
from lmforge.errors import UserError


def load_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared data directory (or the path of a meta.json itself)."""
    path = Path(data_dir)
    if path.is_dir() or not path.name.endswith(".json"):
        path = path / "meta.json"
    if not path.is_file():
        raise UserError(f"{path} not found: {path.parent} is not a prepared data directory; "
                        f"run lmforge prepare --out {path.parent} first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); run lmforge prepare again") from None
    check_meta(meta, path)
    return meta


def check_meta(meta: object, path: Path) -> None:
    """meta.json must say, for the train and val splits, how many tokens (and bytes and characters, or null)."""
    splits = meta.get("splits") if isinstance(meta, dict) else None
    problem = None
    if not isinstance(splits, dict):
        problem = "no \"splits\" object"
    else:
        for split in SPLITS:
            counts = splits.get(split)
            if not isinstance(counts, dict) or not isinstance(counts.get("tokens"), int) or any(
                    not isinstance(counts.get(key), int | None) or isinstance(counts.get(key), bool)
                    for key in ("bytes", "chars")):
                problem = f"split {split!r} lacks its integer counts (tokens, bytes, chars)"
                break
    if problem:
        raise UserError(f"{path} is not lmforge's meta.json: {problem}; run lmforge prepare again")


def check_token_ids(data_dir: str | Path, vocab_size: int, splits: tuple[str, ...] = SPLITS) -> None:
    """Every token id in the shards must be below the model's vocabulary size: a shard from a larger vocabulary
    (or a corrupt one) would otherwise fail deep inside the model. One NumPy max per memory-mapped shard."""
    for split in splits:
        for path in list_shards(data_dir, split):
            tokens = read_shard(path)
            largest = int(tokens.max()) if len(tokens) else -1
            if largest >= vocab_size:
                raise UserError(f"{path} holds token id {largest}, beyond the model's vocabulary of {vocab_size} "
                                f"(ids 0..{vocab_size - 1}): it was made with another tokenizer, or is corrupt")


def describe_data(data_dir: str | Path, tokenizer: Tokenizer | None = None) -> tuple[dict, Tokenizer]:
    """(meta, tokenizer) of a data directory; meta is meta.json's {"splits": {split: {"tokens", "bytes", ...}}},
    with "bytes" None for bare llm.c shards. A given tokenizer must match the directory's own, if it has one."""
    data_dir = Path(data_dir)
    own = load_tokenizer(data_dir) if (data_dir / "tokenizer.json").is_file() else None
    if own is not None and tokenizer is not None and own.to_dict() != tokenizer.to_dict():
        raise UserError(f"{data_dir} was tokenized with another tokenizer than the model's; prepare it with the "
                        "model's tokenizer")
    if (data_dir / "meta.json").is_file():
        return load_meta(data_dir), own or load_tokenizer(data_dir)  # the latter: a clear "not found"
    splits = {split: {"tokens": sum(len(read_shard(path)) for path in list_shards(data_dir, split)),
                      "bytes": None, "chars": None} for split in SPLITS}
    return {"splits": splits}, own or tokenizer or GPT2Tokenizer()
