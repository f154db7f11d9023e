"""The typed config sections: every key with its default and what it accepts, and the rules between keys.

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

How a key is parsed is in lmforge/config/keys.py; loading, overriding and saving a config in
lmforge/config/load.py.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.config.keys import Key, declared_keys, number, parse_value
from lmforge.errors import UserError

# Upper bounds on sizes, far above any model this project trains (GPT-2 XL: 50,257 tokens, 1,024 context, 48
# layers, 25 heads, width 1,600; the largest open models stay within them too), low enough that a typo such
# as block_size 1000000000 is refused by name instead of ending in an allocator's traceback.
MAX_VOCAB = 2**20
MAX_BLOCK = 2**17
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_WIDTH = 2**16
MAX_BATCH = 2**16  # sequences per micro-batch


class Section:
    """What every config section shares: its values are parsed and checked as it is made."""

    def __post_init__(self) -> None:
        check_section(self)

    def check_combination(self) -> None:
        """Rules between keys of this section; none unless a section says otherwise."""


Arch = Literal["gpt", "bigram", "mlp", "rnn", "lstm", "gru", "encoder", "encoder-decoder"]
Activation = Literal["", "tanh", "relu", "gelu", "sigmoid"]
# The archs whose nonlinearity model.activation chooses; every other arch has its own, fixed or set elsewhere.
ACTIVATION_ARCHS = ("mlp", "rnn")
FIXED_NONLINEARITY = {
    "gpt": "its MLP's nonlinearity is chosen by model.mlp (gelu, swiglu or relu2)",
    "encoder": "its MLP's nonlinearity is chosen by model.mlp (gelu, swiglu or relu2)",
    "encoder-decoder": "its MLP's nonlinearity is chosen by model.mlp (gelu, swiglu or relu2)",
    "bigram": "a lookup table has no hidden layer",
    "lstm": "its gates are fixed sigmoids and tanh (torch's built-in cell)",
    "gru": "its gates are fixed sigmoids and tanh (torch's built-in cell)",
}


@dataclass
class ModelConfig(Section):
    # gpt | bigram | mlp (Bengio) | rnn (Elman) | lstm | gru | encoder (BERT-style, masked LM) |
    # encoder-decoder (T5-style, span corruption): lmforge/model/factory.py
    arch: Arch = "gpt"
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
    # gpt: the projections that write into the residual stream (attn.proj, mlp.proj) start at zero, so every block
    # starts as the identity (modded-nanogpt's choice); false: they follow model.init
    zero_init_proj: bool = False
    # gpt: every layer adds a token embedding of its own to its attention values (the speedrun's "value
    # embeddings"), each starting at zero; no runtime has them, so export refuses them
    value_embeddings: bool = False
    # gpt: multi-token prediction: while training, K extra heads each learn the token k + 1 places ahead
    # (k = 1..K) from the final states, their mean loss weighted by multi_token_weight added to the gradient;
    # evaluation, generation and export use the next-token head alone; 0: off
    multi_token: int = number(0, at_least=0, at_most=16)
    multi_token_weight: float = number(0.5, above=0)
    # mlp, rnn only ("": tanh); gpt's MLP nonlinearity is model.mlp, and bigram, lstm, gru have none to choose
    activation: Activation = ""
    context: int = number(3, above=0, at_most=MAX_BLOCK)  # arch = mlp: how many previous tokens the Bengio MLP sees

    def check_combination(self) -> None:
        # One key decides each nonlinearity: gpt's is model.mlp, so model.activation may not quietly replace it.
        if self.activation and self.arch not in ACTIVATION_ARCHS:
            raise UserError(f"model.activation = '{self.activation}' does not apply to arch '{self.arch}': "
                            f"{FIXED_NONLINEARITY[self.arch]}; leave model.activation empty")
        for option, value, off in (("zero_init_proj", self.zero_init_proj, False),
                                   ("value_embeddings", self.value_embeddings, False),
                                   ("multi_token", self.multi_token, 0)):
            if value != off and self.arch != "gpt":
                raise UserError(f"model.{option} is implemented for the decoder transformer (arch gpt) only, not "
                                f"arch '{self.arch}': leave it {str(off).lower()}")
        if self.multi_token >= self.block_size:
            raise UserError(f"model.multi_token = {self.multi_token}: its last head learns the token "
                            f"{self.multi_token + 1} places ahead, which a context of model.block_size = "
                            f"{self.block_size} never holds; use a smaller model.multi_token")
        if self.arch in ("gpt", "encoder", "encoder-decoder"):
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
    # Data warmups over the first fraction of the run (measured as the lr schedule measures it): a quarter over
    # its first third, a half over the rest, then all (lmforge/train/schedule.py); pretraining a decoder only; 0: off.
    # batch_warmup: a quarter of batch_size per micro-step, then half, then all (fewer tokens per early step).
    # context_warmup: every window cut into four sequences, then two, then whole (the same tokens per step).
    batch_warmup: float = number(0.0, at_least=0, at_most=1)
    context_warmup: float = number(0.0, at_least=0, at_most=1)
    # an exponential moving average of the weights, for evaluations, samples and the checkpoints' weights
    # (lmforge/train/ema.py); 0: off
    ema_decay: float = number(0.0, at_least=0, below=1)
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
    # intra-op threads of torch's CPU kernels; 0: torch's default (one per core). Small matrix products can be
    # faster on fewer threads than cores (benchmarks/speedrun.py --ablation threads1 measures it)
    threads: int = number(0, at_least=0, at_most=1024)
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
                        for dotted, key in declared_keys(name, section).items()}


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
