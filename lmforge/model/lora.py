"""LoRA on lmforge's own modules, through PEFT: which linear layers it adapts, wrapping, saving and merging.

LoRA (Hu et al., 2021) freezes a weight W and learns a low-rank change B·A beside it (rank r, scaled by
alpha / r): W' = W + (alpha / r)·B·A, with B starting at zero so the adapted model starts as the base. PEFT
injects these adapters into any nn.Module whose nn.Linear submodules it is told by name; lmforge's models
are plain modules, so we name them ourselves.

Layers are named by their name inside a block or layer: `attn.qkv`, `attn.proj`, `mlp.fc`, `mlp.proj` for a
transformer (one name covers that layer in every block); `input`, `recurrent` for an Elman RNN; `hidden`,
`lm_head` for Bengio's MLP. torch's fused nn.LSTM and nn.GRU hold no nn.Linear, so LoRA cannot adapt them.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lmforge.errors import UserError

# A module path's leading part up to its last numeric component (a block or layer index) is not part of
# the layer's name: blocks.3.attn.qkv -> attn.qkv; hidden.0 -> hidden.
_INDEXED = re.compile(r"^(?:.*\.)?\d+\.")
_TRAILING_INDEX = re.compile(r"\.\d+$")
# Output heads map to the vocabulary (or the labels): adapted only when named.
HEAD_NAMES = ("lm_head", "score")


def layer_name(module_path: str) -> str:
    return _INDEXED.sub("", _TRAILING_INDEX.sub("", module_path))


def linear_layer_names(model: nn.Module) -> dict[str, list[str]]:
    """{layer name: the full module paths of every nn.Linear with that name}, in model order."""
    names: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            names.setdefault(layer_name(path), []).append(path)
    return names


def default_targets(model: nn.Module) -> list[str]:
    """Every linear layer except the output heads: for a transformer, all attention and MLP projections."""
    return [name for name in linear_layer_names(model) if name not in HEAD_NAMES]


def resolve_targets(model: nn.Module, targets: list[str], arch: str) -> list[str]:
    """The full module paths LoRA adapts for these layer names (empty: the defaults); an unknown name is a
    UserError listing the valid ones."""
    available = linear_layer_names(model)
    if not available or not (targets or default_targets(model)):
        raise UserError(f"--method lora: model.arch '{arch}' has no linear layers to adapt (torch's LSTM and GRU "
                        "are fused kernels); use --method full")
    unknown = [name for name in targets if name not in available]
    if unknown:
        raise UserError(f"--lora.targets: {', '.join(unknown)} match no linear layer of this {arch} model; "
                        f"valid names: {', '.join(available)}")
    return [path for name in (targets or default_targets(model)) for path in available[name]]


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, targets: list[str],
               arch: str) -> nn.Module:
    """The model with LoRA adapters on the named layers; only the adapters train (callers may unfreeze more,
    such as a new classification head). PEFT changes `model` in place and returns its wrapper."""
    if rank <= 0:
        raise UserError(f"--lora.rank must be positive, got {rank}")
    if not 0 <= dropout < 1:
        raise UserError(f"--lora.dropout must be in [0, 1), got {dropout}")
    paths = resolve_targets(model, targets, arch)
    # B·A has rank at most min(in, out) of its layer: a larger rank adds parameters (and gigabytes) but nothing
    # the adapter could learn.
    narrowest = min(min(layer.in_features, layer.out_features) for layer in map(model.get_submodule, paths))
    if rank > narrowest:
        raise UserError(f"--lora.rank {rank} is above {narrowest}, the smallest min(in, out) width of the adapted "
                        f"layers, where an adapter already spans the whole layer; use a rank of at most {narrowest}")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=paths, bias="none")
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with every adapter folded into its weight (W + scale·B·A): the same function, no
    PEFT layers left, so sampling, evaluation and export see an ordinary model."""
    return model.merge_and_unload()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name: what a LoRA checkpoint holds (adapters and any new head)."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Copy a LoRA checkpoint's tensors into a freshly wrapped model; every one must have its place."""
    own = dict(model.named_parameters())
    misfits = [name for name, tensor in state.items() if name not in own or own[name].shape != tensor.shape]
    if misfits:
        raise UserError(f"{origin} does not fit this LoRA model (e.g. {misfits[0]}): the run's [finetune] "
                        "settings or its base run changed since it was written")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
