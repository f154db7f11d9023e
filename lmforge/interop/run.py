"""A run directory made from weights trained elsewhere: config.toml, tokenizer.json and one checkpoint.

An imported run has no optimizer state or log, so `train --resume` does not apply to it; `sample`, `eval`,
`export` and `train --init-from` read only the config, the tokenizer and `model.safetensors`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.config import Config, ModelConfig, dumps_config
from lmforge.errors import UserError
from lmforge.files import move_into_place, refuse_to_replace
from lmforge.model.gpt import GPT
from lmforge.train.checkpoint import checkpoint_dir


def check_weights(config: ModelConfig, weights: dict[str, torch.Tensor], origin: str) -> None:
    """The weights must be exactly the parameters of GPT(config): same names, same shapes."""
    with torch.device("meta"):  # shapes only: no memory, no initialization cost
        expected = {name: tuple(tensor.shape) for name, tensor in GPT(config).state_dict().items()}
    got = {name: tuple(tensor.shape) for name, tensor in weights.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(name for name in set(got) & set(expected) if got[name] != expected[name])
        raise UserError(f"{origin}: its weights do not make the model its config describes "
                        f"(missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {wrong[:3]})")


def replace_path(temporary: Path, final: Path, overwrite: bool) -> None:
    """Move a finished file or directory into place; an existing one is replaced only with overwrite."""
    refuse_to_replace(final, overwrite)
    move_into_place(temporary, final)


def write_run(out: str | Path, model_config: ModelConfig, tokenizer: dict, weights: dict[str, torch.Tensor], *,
              origin: str, overwrite: bool = False) -> Path:
    """Write a run directory holding these weights as its step-0 checkpoint, atomically; returns it."""
    out = Path(out)
    refuse_to_replace(out, overwrite)
    check_weights(model_config, weights, origin)
    if tokenizer["vocab_size"] > model_config.vocab_size:
        raise UserError(f"{origin}: the tokenizer has {tokenizer['vocab_size']} tokens, more than the model's "
                        f"vocabulary of {model_config.vocab_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".tmp-{out.name}")
    if temporary.exists():
        shutil.rmtree(temporary)
    checkpoint = checkpoint_dir(temporary, 0)
    checkpoint.mkdir(parents=True)
    (temporary / "config.toml").write_text(dumps_config(Config(model=model_config)))
    (temporary / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    save_file({name: tensor.detach().to(torch.float32).contiguous() for name, tensor in weights.items()},
              checkpoint / "model.safetensors")
    replace_path(temporary, out, overwrite)
    return out


def pad_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """An embedding or head matrix grown to `rows` rows with zeros (lmforge pads the vocabulary)."""
    if table.shape[0] > rows:
        raise UserError(f"a vocabulary table has {table.shape[0]} rows, more than the {rows} expected")
    padded = torch.zeros(rows, table.shape[1], dtype=torch.float32)
    padded[: table.shape[0]] = table.float()
    return padded
