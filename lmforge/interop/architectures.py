"""Which upstream architecture computes exactly a given lmforge transformer, per export format.

The one mapping table behind `export --format hf`, `export --format gguf` and `export --check`: an lmforge
transformer's (positions, norm, MLP, QK-norm) combination names one architecture that both transformers and
llama.cpp implement, and a few more options (biases, grouped-query attention, a logit soft-cap) must match what
that architecture can express. A model no architecture computes exactly is refused before anything is written,
by one line naming the option(s) in the way and the nearest exportable choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.config.load import load_config
from lmforge.config.sections import ModelConfig
from lmforge.errors import UserError
from lmforge.run.checkpoints import resolve_checkpoint
from lmforge.run.directory import CONFIG_FILE, read_config

FORMATS = ("hf", "gguf")


@dataclass(frozen=True)
class Architecture:
    name: str  # the upstream family: gpt2, llama, arcee, qwen3 (also llama.cpp's general.architecture)
    hf_class: str  # the transformers model class AutoModelForCausalLM builds
    position: str  # the lmforge options that select it
    norm: str
    mlp: str
    qk_norm: bool
    biases: str  # "required": every linear layer and norm has one; "optional": model.bias either way; "none"
    grouped_query: bool  # whether model.n_kv_head < model.n_head is expressible

    def combination(self) -> str:
        return (f"position = {self.position}, norm = {self.norm}, mlp = {self.mlp}, "
                f"qk_norm = {str(self.qk_norm).lower()}")


ARCHITECTURES = (
    Architecture("gpt2", "GPT2LMHeadModel", "learned", "layernorm", "gelu", False, "required", False),
    Architecture("llama", "LlamaForCausalLM", "rope", "rmsnorm", "swiglu", False, "optional", True),
    Architecture("arcee", "ArceeForCausalLM", "rope", "rmsnorm", "relu2", False, "optional", True),
    # Qwen3's MLP has no biases (its attention may, but lmforge's model.bias covers both together).
    Architecture("qwen3", "Qwen3ForCausalLM", "rope", "rmsnorm", "swiglu", True, "none", True),
)


def choice_distance(config: ModelConfig, architecture: Architecture) -> int:
    return sum(mine != theirs for mine, theirs in (
        (config.position, architecture.position), (config.norm, architecture.norm),
        (config.mlp, architecture.mlp), (config.qk_norm, architecture.qk_norm)))


def differences(config: ModelConfig, architecture: Architecture) -> list[str]:
    """The model.* settings that keep `config` from being `architecture`, as `key = value` texts."""
    wanted = {"position": architecture.position, "norm": architecture.norm, "mlp": architecture.mlp,
              "qk_norm": architecture.qk_norm}
    return [f"model.{key} = {str(value).lower()}" for key, value in wanted.items() if getattr(config, key) != value]


def architecture_for(config: ModelConfig, fmt: str = "hf") -> Architecture:
    """The architecture that computes exactly this model in format `fmt` (hf or gguf); a UserError naming the
    option(s) in the way and the nearest exportable choice when there is none."""
    if config.arch == "encoder":  # upstream causal-LM classes would read it with a causal mask: other numbers
        raise UserError(f"model.arch = encoder: a bidirectional encoder has no {fmt} export (the exported "
                        "architectures are causal decoders, which would compute other numbers, and a BERT-style "
                        "export is not implemented); export a decoder (model.arch = gpt)")
    if config.arch == "encoder-decoder":
        raise UserError(f"model.arch = encoder-decoder: a T5-style {fmt} export is not implemented (the exported "
                        "architectures are causal decoders); lmforge sample and predict run it, or export a "
                        "decoder (model.arch = gpt)")
    if config.arch != "gpt":
        raise UserError(f"model.arch = {config.arch}: export covers the transformer (model.arch = gpt) only; "
                        "transformers and llama.cpp have no bigram, MLP or RNN language model to load it into")
    if config.logit_softcap > 0:
        raise UserError(f"model.logit_softcap = {config.logit_softcap} has no {fmt} equivalent (transformers' and "
                        "llama.cpp's GPT-2, Llama, Arcee and Qwen3 have no soft-cap); nearest exportable: "
                        "model.logit_softcap = 0")
    if config.value_embeddings:
        raise UserError(f"model.value_embeddings = true has no {fmt} equivalent (no upstream architecture adds a "
                        "per-layer token embedding to the attention values); nearest exportable: "
                        "model.value_embeddings = false")
    nearest = min(ARCHITECTURES, key=lambda architecture: choice_distance(config, architecture))
    if choice_distance(config, nearest) > 0:
        options = (f"model.position = {config.position}, model.norm = {config.norm}, model.mlp = {config.mlp}, "
                   f"model.qk_norm = {str(config.qk_norm).lower()}")
        raise UserError(f"{options}: no upstream architecture computes this combination; nearest exportable: "
                        f"{' and '.join(differences(config, nearest))} ({nearest.name}: {nearest.hf_class})")
    architecture = nearest
    grouped = (config.n_kv_head or config.n_head) != config.n_head
    if grouped and not architecture.grouped_query:
        raise UserError(f"model.n_kv_head = {config.n_kv_head} (grouped-query attention) has no {architecture.name} "
                        f"equivalent; nearest exportable: model.n_kv_head = 0 (or model.position = rope, "
                        "model.norm = rmsnorm, model.mlp = swiglu: llama)")
    if architecture.biases == "required" and not config.bias:
        raise UserError(f"model.bias = false has no {architecture.name} equivalent ({architecture.name} has biases "
                        "everywhere); nearest exportable: model.bias = true")
    if architecture.biases == "none" and config.bias:
        raise UserError(f"model.bias = true has no {architecture.name} equivalent ({architecture.name}'s MLP has "
                        "no biases); nearest exportable: model.bias = false")
    if fmt == "gguf" and architecture.name == "arcee" and config.bias:
        raise UserError("model.bias = true has no gguf equivalent (llama.cpp's arcee loads no biases for the "
                        "attention output or the MLP); nearest exportable: model.bias = false")
    return architecture


def export_report(config: ModelConfig) -> dict[str, str]:
    """Per format, the architecture the model exports to, or the line saying why it cannot: what
    `export --check` prints."""
    report = {}
    for fmt in FORMATS:
        try:
            architecture = architecture_for(config, fmt)
        except UserError as err:
            report[fmt] = f"refused: {err}"
            continue
        report[fmt] = architecture.hf_class if fmt == "hf" else f"llama.cpp '{architecture.name}'"
    return report


def check_export(path: str | Path) -> dict[str, str]:
    """`export --check`: `export_report` for the model of a config TOML, or of a run (or a checkpoint inside
    one), before training it or before exporting it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: export --check takes a config TOML, a run or a checkpoint in one")
    if (path / CONFIG_FILE).is_file():  # a run, checkpoints or not yet
        config = read_config(path)
    elif path.is_dir():
        config = read_config(resolve_checkpoint(path)[0])
    else:
        config = load_config(path)
    if config.finetune is not None and config.finetune.labels:  # the fine-tuned model builder's own rule
        return {fmt: "refused: a classify run predicts labels (its head is a classifier over finetune.labels), "
                     "not next tokens; no language-model architecture holds it" for fmt in FORMATS}
    return export_report(config.model)
