"""Run configuration: typed dataclass sections, loaded from TOML, overridden by dotted CLI flags, saved back.

A preset in configs/*.toml names only what differs from the defaults below; `--section.key value` on the
command line wins over the file. Every key declares what it accepts next to its default: a `Literal` of
choices, `bool`, or a number with its range (`number(...)`). Values are checked here, once, wherever a config
is made: loading a file, a command-line override, `from_dict`, or constructing a section directly. A bad value
is a one-line UserError naming the key, the value and what is allowed; an unknown key names the closest valid
key in any section. `[finetune]` is the one optional section: only a fine-tuning run has it (a plain run's
config.toml has no such table), and `--lora.KEY` is the short spelling of `--finetune.lora_KEY`. The rules
between keys (a section's `check_combination`: which arch takes `model.activation`, the transformer's head
shapes) live here too, so the modules that build from a config trust it. Rules that need more than the config
stay beside what they need: what the scratch engine implements, a LoRA rank against a layer's width, devices
and process counts only known at run time.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import sys
import types
import typing
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import tomli_w

from lmforge.errors import UserError
from lmforge.inputs import refuse_special_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

AUTO = "auto"  # how a key whose value is None ("decide for me") is spelled in TOML and on the command line
INT64_MAX = 2**63 - 1  # every int key ends up in a torch or NumPy int64 (the seed alone is a uint64)
# Upper bounds on sizes, far above any model this project trains (GPT-2 XL: 50,257 tokens, 1,024 context, 48
# layers, 25 heads, width 1,600; the largest open models stay within them too), low enough that a typo such
# as block_size 1000000000 is refused by name instead of ending in an allocator's traceback.
MAX_VOCAB = 2**20
MAX_BLOCK = 2**17
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_WIDTH = 2**16
MAX_BATCH = 2**16  # sequences per micro-batch
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Range:
    """The values a numeric key allows: `at_least`/`at_most` are inclusive bounds, `above`/`below` exclusive."""

    at_least: float | None = None
    at_most: float | None = None
    above: float | None = None
    below: float | None = None

    def allows(self, value: float) -> bool:
        return ((self.at_least is None or value >= self.at_least) and (self.at_most is None or value <= self.at_most)
                and (self.above is None or value > self.above) and (self.below is None or value < self.below))

    def describe(self) -> str:
        low = f"[{self.at_least}" if self.at_least is not None else f"({self.above}" if self.above is not None else ""
        high = f"{self.at_most}]" if self.at_most is not None else f"{self.below})" if self.below is not None else ""
        if low and high:
            return f"in {low}, {high}"
        if self.above == 0 and not high:
            return "positive"
        if self.at_least is not None:
            return f"{self.at_least} or more"
        if self.above is not None:
            return f"above {self.above}"
        return f"at most {self.at_most}" if self.at_most is not None else f"below {self.below}"


def number(default: float, *, at_least: float | None = None, at_most: float | None = None,
           above: float | None = None, below: float | None = None) -> Any:
    """A numeric key's default and its declared range (a dataclass field)."""
    return field(default=default, metadata={"range": Range(at_least, at_most, above, below)})


class Section:
    """What every config section shares: its values are parsed and checked as it is made."""

    def __post_init__(self) -> None:
        check_section(self)

    def check_combination(self) -> None:
        """Rules between keys of this section; none unless a section says otherwise."""


Arch = Literal["gpt", "bigram", "mlp", "rnn", "lstm", "gru"]
Activation = Literal["", "tanh", "relu", "gelu", "sigmoid"]
# The archs whose nonlinearity model.activation chooses; every other arch has its own, fixed or set elsewhere.
ACTIVATION_ARCHS = ("mlp", "rnn")
FIXED_NONLINEARITY = {
    "gpt": "its MLP's nonlinearity is chosen by model.mlp (gelu, swiglu or relu2)",
    "bigram": "a lookup table has no hidden layer",
    "lstm": "its gates are fixed sigmoids and tanh (torch's built-in cell)",
    "gru": "its gates are fixed sigmoids and tanh (torch's built-in cell)",
}


@dataclass
class ModelConfig(Section):
    arch: Arch = "gpt"  # gpt | bigram | mlp (Bengio) | rnn (Elman) | lstm | gru: lmforge/model/factory.py
    vocab_size: int = number(0, at_least=0, at_most=MAX_VOCAB)  # 0: taken from the prepared data's tokenizer
    block_size: int = number(256, above=0, at_most=MAX_BLOCK)  # context length in tokens
    n_layer: int = number(6, above=0, at_most=MAX_LAYERS)
    n_head: int = number(6, above=0, at_most=MAX_HEADS)
    # grouped-query attention: 0 means n_head (plain multi-head)
    n_kv_head: int = number(0, at_least=0, at_most=MAX_HEADS)
    n_embd: int = number(384, above=0, at_most=MAX_WIDTH)
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    # 0: 4 * n_embd (gelu, relu2) or the parameter-matched 8/3 * n_embd (swiglu)
    mlp_hidden: int = number(0, at_least=0, at_most=4 * MAX_WIDTH)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    # 0: the usual epsilon of the norm (1e-5 for layernorm, 1e-6 for rmsnorm)
    norm_eps: float = number(0.0, at_least=0)
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = number(10000.0, above=0)
    qk_norm: bool = False
    tie_embeddings: bool = True
    bias: bool = True
    logit_softcap: float = number(0.0, at_least=0)  # 0: off; else logits = c * tanh(logits / c)
    dropout: float = number(0.0, at_least=0, below=1)
    init: Literal["normal", "xavier", "kaiming"] = "normal"
    init_std: float = number(0.02, above=0)
    # mlp, rnn only ("": tanh); gpt's MLP nonlinearity is model.mlp, and bigram, lstm, gru have none to choose
    activation: Activation = ""
    context: int = number(3, above=0, at_most=MAX_BLOCK)  # arch = mlp: how many previous tokens the Bengio MLP sees

    def check_combination(self) -> None:
        # One key decides each nonlinearity: gpt's is model.mlp, so model.activation may not quietly replace it.
        if self.activation and self.arch not in ACTIVATION_ARCHS:
            raise UserError(f"model.activation = '{self.activation}' does not apply to arch '{self.arch}': "
                            f"{FIXED_NONLINEARITY[self.arch]}; leave model.activation empty")
        if self.arch == "gpt":
            self.check_attention_shape()

    def check_attention_shape(self) -> None:
        """The transformer splits its width into equal heads, its heads into equal key/value groups, and a
        rotary head into channel pairs."""
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head})")
        n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % n_kv_head:
            raise UserError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({n_kv_head})")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise UserError("rotary positions need an even head size (model.n_embd / model.n_head)")


@dataclass
class DataConfig(Section):
    shuffle: bool = True  # epochs without replacement over shuffled windows; false: windows in corpus order
    # true: batch row i reads its own contiguous stretch of the corpus and each batch continues every row
    # where the previous one stopped, so recurrent models carry their hidden state (truncated BPTT)
    sequential: bool = False


Engine = Literal["torch", "scratch"]  # train.engine: autograd, or the NumPy backward written by hand
ENGINES: tuple[str, ...] = typing.get_args(Engine)


@dataclass
class TrainConfig(Section):
    batch_size: int = number(32, above=0, at_most=MAX_BATCH)  # sequences per micro-step
    # global batch in tokens; 0: batch_size * block_size (no accumulation)
    tokens_per_step: int = number(0, at_least=0)
    max_steps: int = number(5000, above=0)
    max_time: float = number(0.0, at_least=0)  # seconds of training; 0: no limit
    max_epochs: float = number(0.0, at_least=0)  # 0: no limit
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = number(100, at_least=0)
    # wsd: the final fraction of training spent decaying
    cooldown_fraction: float = number(0.2, at_least=0, at_most=1)
    min_lr_ratio: float = number(0.1, at_least=0, at_most=1)  # the lr at the end of decay, as a fraction of the peak
    grad_clip: float = number(1.0, at_least=0)  # 0: off
    eval_every: int = number(250, at_least=0)  # 0: only the final evaluation
    eval_tokens: int = number(65536, above=0)  # size of the fixed validation subset used during training
    sample_every: int = number(0, at_least=0)  # 0: no samples during training
    sample_tokens: int = number(200, above=0, at_most=MAX_BLOCK)
    checkpoint_every: int = number(1000, at_least=0)  # 0: only the final checkpoint
    keep_last: int = number(2, above=0)  # checkpoints kept besides the best by validation loss
    log_every: int = number(10, above=0)
    seed: int = number(1337, at_least=0, at_most=2**64 - 1)  # torch's generators take an unsigned 64-bit seed
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool | None = None  # None ("auto" in TOML and on the command line): on for CUDA
    tensorboard: bool = False
    engine: Engine = "torch"  # torch (autograd) | scratch (NumPy, every backward by hand: lmforge/scratch)
    # under torchrun: ddp (a replica per rank) | fsdp (parameters and state sharded)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # seconds a rank waits in a collective for the others before giving up
    dist_timeout: float = number(600.0, above=0)


@dataclass
class OptimConfig(Section):
    name: Literal["adamw", "muon"] = "adamw"
    # peak learning rate of AdamW (for muon: of the embeddings, head and scalars); 0 leaves the weights as they are
    lr: float = number(1e-3, at_least=0)
    weight_decay: float = number(0.1, at_least=0)
    beta1: float = number(0.9, at_least=0, below=1)
    beta2: float = number(0.95, at_least=0, below=1)
    eps: float = number(1e-8, above=0)
    muon_lr: float = number(0.02, at_least=0)  # muon: peak learning rate of the hidden matrices
    muon_momentum: float = number(0.95, at_least=0, below=1)


Task = Literal["classify", "sft", "translate", "qa"]  # what `lmforge finetune` trains: the registry's trainable kinds
# (lmforge/tasks/kinds.py; tests/test_tasks_data.py checks that the two agree)
FINETUNE_TASKS: tuple[str, ...] = typing.get_args(Task)


@dataclass
class FinetuneConfig(Section):
    """A fine-tuning run's own settings (lmforge finetune writes them; a plain run has none)."""

    task: Task = "classify"
    method: Literal["full", "lora"] = "full"  # full: every weight (or the last train_blocks) trains; lora: adapters
    base_run: str = ""  # the run fine-tuned from (absolute path), and the checkpoint of it used
    base_checkpoint: str = ""
    base_fingerprint: str = ""  # SHA-256 of the base checkpoint's weights file: a LoRA run refuses other weights
    labels: list[str] = field(default_factory=list)  # classify: label names, in the head's output order
    # chat: chat_template.json (sft, qa); translate: source, separator, target; "": classify
    template: Literal["", "chat", "translate"] = ""
    train_blocks: int = number(0, at_least=0)  # full fine-tuning: train only the last N blocks (and heads); 0: all
    patience: int = number(5, at_least=0)  # evaluations without improvement before stopping early; 0: never
    lora_rank: int = number(8, above=0, at_most=MAX_WIDTH)  # and at most the adapted layers' width (model/lora.py)
    lora_alpha: float = number(16.0, above=0)
    lora_dropout: float = number(0.0, at_least=0, below=1)
    lora_targets: list[str] = field(default_factory=list)  # linear layer names (lmforge/model/lora.py); []: all

    def check_combination(self) -> None:
        if self.train_blocks and self.method == "lora":
            raise UserError("finetune.train_blocks (--train-blocks) chooses what full fine-tuning trains; with "
                            "--method lora the adapters train (choose layers with --lora.targets)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig | None = None  # only a fine-tuning run has this section

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The sections as nested dicts; an absent optional section is left out."""
        return {name: values for name, values in dataclasses.asdict(self).items() if values is not None}


@dataclass(frozen=True)
class Key:
    """One config key as declared: its dotted name, its type, and the choices or range it allows."""

    name: str
    kind: type  # bool, int, float, str (free text when it has no choices) or list (of names)
    choices: tuple[str, ...] = ()  # a str key's allowed values
    optional: bool = False  # None allowed, spelled AUTO
    range: Range | None = None

    def allowed(self) -> str:
        if self.choices:
            named = [choice for choice in self.choices if choice]
            listed = ", ".join(named[:-1]) + " or " + named[-1] if len(named) > 1 else named[0]
            return listed + (' (or "" for the default)' if "" in self.choices else "")
        if self.kind is bool:
            return f"{AUTO}, true or false" if self.optional else "true or false"
        if self.kind is list:
            return "a list of names, or one text of names separated by commas"
        if self.kind is str:
            return "any text"
        return self.range.describe() if self.range else "any value"


def _declared_keys(name: str, section: type) -> dict[str, Key]:
    hints = typing.get_type_hints(section)
    keys = {}
    for item in dataclasses.fields(section):
        hint, optional = hints[item.name], False
        if isinstance(hint, types.UnionType):  # `X | None`
            (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            optional = True
        choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        hint = list if typing.get_origin(hint) is list else hint
        dotted = f"{name}.{item.name}"
        keys[dotted] = Key(dotted, str if choices else hint, choices, optional, item.metadata.get("range"))
    return keys


def _section_type(hint: Any) -> type:
    """A section's class, also for an optional one (`X | None`)."""
    if isinstance(hint, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


SECTIONS: dict[str, type] = {name: _section_type(hint) for name, hint in typing.get_type_hints(Config).items()}
OPTIONAL_SECTIONS = ("finetune",)
ALIASES = {"lora": "finetune.lora_"}  # --lora.rank is --finetune.lora_rank
SECTION_NAMES = {section: name for name, section in SECTIONS.items()}
KEYS: dict[str, Key] = {dotted: key for name, section in SECTIONS.items()
                        for dotted, key in _declared_keys(name, section).items()}


def _wrong_type(key: Key, value: Any, what: str) -> UserError:
    return UserError(f"{key.name} expects {what} ({key.allowed()}), got {value!r}")


def _parse_int(key: Key, value: Any) -> int:
    """A whole number in any spelling (4, 4.0, "4", "4e0", "1_000"); a fraction is refused, never truncated."""
    if isinstance(value, numbers.Integral):  # Python's or NumPy's
        return int(value)
    if isinstance(value, numbers.Real):
        if math.isfinite(value) and float(value).is_integer():
            return int(value)
        raise _wrong_type(key, value, "int")
    try:
        return int(value)
    except ValueError:
        pass
    try:
        exact = Decimal(value.strip().replace("_", ""))
    except InvalidOperation:
        raise _wrong_type(key, value, "int") from None
    # adjusted() < 40: int() of 1e999999999 would build a billion-digit number before the range check
    if exact.is_finite() and exact.adjusted() < 40 and exact == exact.to_integral_value():
        return int(exact)
    raise _wrong_type(key, value, "int")


def _parse_float(key: Key, value: Any) -> float:
    try:
        parsed = float(value)  # int, float, or text such as "3e-4"
    except (ValueError, OverflowError):
        raise _wrong_type(key, value, "a finite float") from None
    if not math.isfinite(parsed):
        raise _wrong_type(key, value, "a finite float")
    return parsed


def _parse_bool(key: Key, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise UserError(f"{key.name} expects {key.allowed()}, got {value!r}")


def parse_value(key: Key, value: Any) -> Any:
    """A TOML, command-line (text) or Python value as the key's type, checked against its choices or range."""
    if key.optional and (value is None or (isinstance(value, str) and value.strip().lower() == AUTO)):
        return None
    if key.choices:
        if isinstance(value, str) and value in key.choices:
            return value
        raise UserError(f"unknown {key.name} {value!r}; choose {key.allowed()}")
    if key.kind is bool:
        return _parse_bool(key, value)
    if key.kind is list:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple) and all(isinstance(part, str) for part in value):
            return list(value)
        raise _wrong_type(key, value, "a list of names")
    if key.kind is str:
        if isinstance(value, str):
            return value
        raise _wrong_type(key, value, "text")
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):  # True is an int to Python, not here
        raise _wrong_type(key, value, key.kind.__name__)
    parsed = _parse_int(key, value) if key.kind is int else _parse_float(key, value)
    if key.range and not key.range.allows(parsed):
        raise UserError(f"{key.name} must be {key.range.describe()}, got {parsed}")
    if key.kind is int and key.range and key.range.at_most is None and parsed > INT64_MAX:
        raise UserError(f"{key.name} must be at most 2**63 - 1 (a 64-bit integer), got {parsed}")
    return parsed


def check_section(part: Section) -> None:
    """Parse and check every key of one section in place, then the rules between its keys."""
    name = SECTION_NAMES[type(part)]
    for item in dataclasses.fields(part):
        setattr(part, item.name, parse_value(KEYS[f"{name}.{item.name}"], getattr(part, item.name)))
    part.check_combination()


def check_config(config: Config) -> None:
    """Check every key and every rule between keys: after a series of `set_value` calls (each checks one key
    alone, so that the order of overrides does not matter)."""
    for name in SECTIONS:
        if getattr(config, name) is not None:
            check_section(getattr(config, name))


def _unknown(dotted: str) -> UserError:
    """Name the closest key in any section: `train.n_layer` is most likely `model.n_layer`."""
    section, _, name = dotted.rpartition(".")

    def likeness(candidate: str) -> float:
        their_section, their_name = candidate.split(".")
        return (difflib.SequenceMatcher(None, name, their_name).ratio()
                + 0.5 * difflib.SequenceMatcher(None, section, their_section).ratio())

    best = max(KEYS, key=likeness)
    if difflib.SequenceMatcher(None, name, best.split(".")[1]).ratio() >= 0.6:
        hint = f"; did you mean '{best}'?"
    else:
        hint = f"; valid sections: {', '.join(SECTIONS)}"
    return UserError(f"unknown config key '{dotted}'{hint}")


def canonical_key(dotted: str) -> str:
    """The declared name of a key given in any spelling (`lora.rank` is `finetune.lora_rank`)."""
    section, _, name = dotted.partition(".")
    return ALIASES[section] + name if section in ALIASES and name else dotted


def set_value(config: Config, dotted: str, value: Any) -> None:
    """Set `section.key` on a config, checking the value's type and range; an unknown key names the closest.
    Setting a key of an absent optional section ([finetune]) adds that section with its defaults."""
    dotted = canonical_key(dotted)
    if dotted not in KEYS:
        raise _unknown(dotted)
    section, name = dotted.split(".")
    parsed = parse_value(KEYS[dotted], value)
    if getattr(config, section) is None:
        setattr(config, section, SECTIONS[section]())
    setattr(getattr(config, section), name, parsed)


def _set_all(config: Config, data: dict[str, Any]) -> None:
    for section, values in data.items():
        if not isinstance(values, dict):
            if section in SECTIONS:
                raise UserError(f"config section '{section}' must be a table ([{section}]), got {values!r}")
            raise _unknown(section)
        for key, value in values.items():
            set_value(config, f"{section}.{key}", value)


def from_dict(data: dict[str, Any]) -> Config:
    """A config from parsed TOML: {section: {key: value}} over the defaults, every value and rule checked."""
    config = Config()
    _set_all(config, data)
    check_config(config)
    return config


def _read_text(path: Path) -> str:
    refuse_special_file(path, "config file")
    if path.is_dir():
        raise UserError(f"config path {path} is a directory; pass a TOML file such as configs/gpt.toml")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                        f"{err.start}); save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None


def load_config(path: str | Path | None, overrides: dict[str, str] | None = None) -> Config:
    """Defaults, then the TOML file (if any), then `section.key` overrides; every value and rule checked."""
    config = Config()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(_read_text(path))
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"config file {path} is not valid TOML: {err}") from None
        _set_all(config, data)  # the rules between keys are checked once the overrides are in too
    for dotted, value in (overrides or {}).items():
        set_value(config, dotted, value)
    check_config(config)
    return config


def dumps_config(config: Config) -> str:
    """The config as TOML; `load_config` reads it back equal. TOML has no null: None is written as AUTO."""
    data = config.to_dict()
    for dotted, key in KEYS.items():
        section, name = dotted.split(".")
        if section in data and key.optional and data[section][name] is None:
            data[section][name] = AUTO
    return tomli_w.dumps(data)


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
