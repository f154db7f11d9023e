"""Run configuration: four dataclass sections, loaded from TOML, overridden by dotted CLI flags, saved back.

A preset in configs/*.toml names only what differs from the defaults below; `--section.key value` on the
command line wins over the file. Unknown keys are an error that names the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from lmforge.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    arch: str = "gpt"  # gpt | bigram | mlp (Bengio) | rnn (Elman) | lstm | gru: lmforge/model/factory.py
    vocab_size: int = 0  # 0: taken from the prepared data's tokenizer
    block_size: int = 256  # context length in tokens
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 0  # grouped-query attention: 0 means n_head (plain multi-head)
    n_embd: int = 384
    mlp: str = "gelu"  # gelu | swiglu | relu2
    mlp_hidden: int = 0  # 0: 4 * n_embd (gelu, relu2) or the parameter-matched 8/3 * n_embd (swiglu)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 0.0  # 0: the usual epsilon of the norm (1e-5 for layernorm, 1e-6 for rmsnorm)
    position: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    qk_norm: bool = False
    tie_embeddings: bool = True
    bias: bool = True
    logit_softcap: float = 0.0  # 0: off; else logits = c * tanh(logits / c)
    dropout: float = 0.0
    init: str = "normal"  # normal | xavier | kaiming
    init_std: float = 0.02
    activation: str = ""  # tanh | relu | gelu | sigmoid; "": the arch's own (gpt: model.mlp; mlp, rnn: tanh)
    context: int = 3  # arch = mlp: how many previous tokens the Bengio MLP sees


@dataclass
class DataConfig:
    shuffle: bool = True  # epochs without replacement over shuffled windows; false: windows in corpus order
    # true: batch row i reads its own contiguous stretch of the corpus and each batch continues every row
    # where the previous one stopped, so recurrent models carry their hidden state (truncated BPTT)
    sequential: bool = False


ENGINES = ("torch", "scratch")  # train.engine: autograd, or the NumPy backward written by hand


@dataclass
class TrainConfig:
    batch_size: int = 32  # sequences per micro-step
    tokens_per_step: int = 0  # global batch in tokens; 0: batch_size * block_size (no accumulation)
    max_steps: int = 5000
    max_time: float = 0.0  # seconds of training; 0: no limit
    max_epochs: float = 0.0  # 0: no limit
    schedule: str = "cosine"  # cosine | linear | constant | wsd
    warmup_steps: int = 100
    cooldown_fraction: float = 0.2  # wsd: the final fraction of training spent decaying
    min_lr_ratio: float = 0.1  # the lr at the end of decay, as a fraction of the peak
    grad_clip: float = 1.0  # 0: off
    eval_every: int = 250
    eval_tokens: int = 65536  # size of the fixed validation subset used during training
    sample_every: int = 0  # 0: no samples during training
    sample_tokens: int = 200
    checkpoint_every: int = 1000
    keep_last: int = 2  # checkpoints kept besides the best by validation loss
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: str = "auto"  # auto (on for CUDA) | true | false
    tensorboard: bool = False
    engine: str = "torch"  # torch (autograd) | scratch (NumPy, every backward by hand: lmforge/scratch)
    parallel: str = "ddp"  # under torchrun: ddp (a replica per rank) | fsdp (parameters and state sharded)
    dist_timeout: float = 600.0  # seconds a rank waits in a collective for the others before giving up


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon
    lr: float = 1e-3  # peak learning rate of AdamW (for muon: of the embeddings, head and scalars)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    muon_lr: float = 0.02  # muon: peak learning rate of the hidden matrices
    muon_momentum: float = 0.95


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(getattr(Config(), section))}


def _all_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _section_fields(s)]


def _unknown(key: str) -> UserError:
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid sections: {', '.join(SECTIONS)}"
    return UserError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Convert a TOML or command-line value to the type of the field's default."""
    kind = type(current)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"config key '{key}' expects {kind.__name__}, got {value!r}") from None


def set_value(config: Config, dotted: str, value: Any) -> None:
    """Set `section.key` on a config, with type checking and a helpful error for unknown keys."""
    if dotted.count(".") != 1:
        raise _unknown(dotted)
    section, key = dotted.split(".")
    if section not in SECTIONS or key not in _section_fields(section):
        raise _unknown(dotted)
    part = getattr(config, section)
    setattr(part, key, _coerce(dotted, value, getattr(part, key)))


def from_dict(data: dict[str, Any]) -> Config:
    config = Config()
    for section, values in data.items():
        if not isinstance(values, dict):
            raise _unknown(section)
        for key, value in values.items():
            set_value(config, f"{section}.{key}", value)
    return config


def load_config(path: str | Path | None, overrides: dict[str, str] | None = None) -> Config:
    """Defaults, then the TOML file (if any), then `section.key` overrides."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"config file {path} is not valid TOML: {err}") from None
        config = from_dict(data)
    for dotted, value in (overrides or {}).items():
        set_value(config, dotted, value)
    return config


def dumps_config(config: Config) -> str:
    return tomli_w.dumps(config.to_dict())


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Turn ['--optim.lr', '3e-3', '--model.n_layer=4'] into {'optim.lr': '3e-3', 'model.n_layer': '4'}."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument '{arg}' (config overrides look like --section.key value)")
        name = arg[2:]
        if "=" in name:
            name, value = name.split("=", 1)
        elif i + 1 < len(args):
            i += 1
            value = args[i]
        else:
            raise UserError(f"option '{arg}' needs a value")
        if "." not in name:
            raise UserError(f"unknown option '{arg}'")
        overrides[name] = value
        i += 1
    return overrides
