"""What training needs to know about a data directory: its tokenizer and its splits' token and byte counts.

A directory made by `lmforge prepare` says it all in meta.json and tokenizer.json. A directory of llm.c
shards made elsewhere (`fineweb_train_000001.bin`, ...) has neither: the token counts are read from the
shard headers, the byte counts are unknown (so bits per byte is not reported), and the tokenizer is the
one given (the `--init-from` run's) or GPT-2's, the tokenizer of llm.c's datasets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.data.prepare import load_meta
from lmforge.data.shards import HEADER_INTS, list_shards
from lmforge.data.tokenizer import GPT2Tokenizer, Tokenizer, load_tokenizer
from lmforge.errors import UserError

SPLITS = ("train", "val")


def shard_token_count(path: Path) -> int:
    with open(path, "rb") as file:
        header = np.frombuffer(file.read(HEADER_INTS * 4), dtype="<i4")
    if len(header) < 3:
        raise UserError(f"{path} is not a token shard: shorter than its header")
    return int(header[2])


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
    splits = {split: {"tokens": sum(shard_token_count(path) for path in list_shards(data_dir, split)),
                      "bytes": None, "chars": None} for split in SPLITS}
    return {"splits": splits}, own or tokenizer or GPT2Tokenizer()
