"""What the language models before the transformer (bigram, Bengio's MLP, rnn, lstm, gru) share: their config
checks and a base class with GPT's interface.

Every one has `forward(idx, targets=None, cache=None) -> (logits, loss)` with logits (B, T, vocab_size) where
position t sees only tokens 0..t, `num_params`, `flops_per_token`, `head_weight` and `new_cache`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.model.activations import ACTIVATIONS, activation

# What model.activation may be per architecture: "" is the architecture's own choice.
ACTIVATION_CHOICES = {"bigram": ("",), "lstm": ("",), "gru": ("",), "mlp": ("", *ACTIVATIONS),
                      "rnn": ("", *ACTIVATIONS)}
WHY_NO_ACTIVATION = {"bigram": "a lookup table has no hidden layer",
                     "lstm": "its gates are fixed sigmoids and tanh (torch's built-in cell)",
                     "gru": "its gates are fixed sigmoids and tanh (torch's built-in cell)"}


def check_config(config: ModelConfig) -> None:
    """Clear errors for settings that cannot build one of these models."""
    allowed = ACTIVATION_CHOICES[config.arch]
    if config.activation not in allowed:
        if allowed == ("",):
            raise UserError(f"model.activation does not apply to arch '{config.arch}' "
                            f"({WHY_NO_ACTIVATION[config.arch]}); leave it empty")
        activation(config.activation)  # raises, naming the choices
    keys = ("vocab_size", "block_size") if config.arch == "bigram" else ("vocab_size", "block_size", "n_layer",
                                                                        "n_embd")
    for key in keys + (("context",) if config.arch == "mlp" else ()):
        if getattr(config, key) <= 0:
            raise UserError(f"model.{key} must be positive, got {getattr(config, key)}")
    if not 0 <= config.dropout < 1:
        raise UserError(f"model.dropout must be in [0, 1), got {config.dropout}")
    if config.init not in ("normal", "xavier", "kaiming"):
        raise UserError(f"unknown model.init '{config.init}'; choose one of normal, xavier, kaiming")


class LanguageModel(nn.Module):
    """What the architectures here share: the loss, parameter and FLOP counts, and (no) generation cache."""

    wte: nn.Embedding

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_config(config)
        self.config = config
        self.vocab_size = config.vocab_size

    def head_weight(self) -> torch.Tensor:
        """The output matrix (vocab rows): each architecture names its own."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
        if targets is None:
            return None
        return F.cross_entropy(logits.float().reshape(-1, self.vocab_size), targets.reshape(-1))

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        """None: no state to carry, so generation recomputes the window for each new token."""
        return None

    def num_params(self, include_embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total if include_embeddings else total - self.wte.weight.numel()

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per weight of every matrix multiplied with each token (embedding lookups
        cost nothing; a head tied to the embedding is a matmul and counts)."""
        weights = sum(p.numel() for name, p in self.named_parameters() if p.dim() == 2 and not name.startswith("wte"))
        if self.head_weight() is self.wte.weight:
            weights += self.wte.weight.numel()
        return 6 * weights
