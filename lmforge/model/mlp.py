"""Bengio's neural language model (2003): a fixed window of previous tokens through an MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config.sections import ModelConfig
from lmforge.model.activations import activation
from lmforge.model.classic import LanguageModel
from lmforge.model.init import init_weights


class BengioMLP(LanguageModel):
    """Bengio et al. (2003): the embeddings of the previous `context` tokens, concatenated, through `n_layer`
    hidden layers (tanh by default), then a linear head. Positions before the window's first token read as
    zero vectors."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.context = config.context
        hidden = config.mlp_hidden or 4 * config.n_embd
        self.act = activation(config.activation or "tanh")
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        sizes = [config.context * config.n_embd] + [hidden] * config.n_layer
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(hidden, config.vocab_size)
        init_weights(self, config)

    def head_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length = idx.shape
        x = F.pad(self.wte(idx), (0, 0, self.context - 1, 0))  # (B, context - 1 + T, E): zeros before the start
        # Row t: the embeddings of tokens t - context + 1 .. t, oldest first, side by side.
        x = x.unfold(1, self.context, 1).transpose(2, 3).reshape(batch, length, -1)  # (B, T, context * E)
        for layer in self.hidden:
            x = self.dropout(self.act(layer(x)))
        logits = self.lm_head(x)
        return logits, self.loss(logits, targets)
