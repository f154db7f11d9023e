"""What the language models before the transformer (bigram, Bengio's MLP, rnn, lstm, gru) share: a base
class with GPT's interface (their config was checked when it was made: lmforge/config/).

Every one has `forward(idx, targets=None, cache=None) -> (logits, loss)` with logits (B, T, vocab_size) where
position t sees only tokens 0..t, `num_params`, `flops_per_token`, `head_weight` and `new_cache`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config.sections import ModelConfig


class LanguageModel(nn.Module):
    """What the architectures here share: the loss, parameter and FLOP counts, and (no) generation cache."""

    wte: nn.Embedding

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config  # checked when it was made: lmforge/config/
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
