"""The bigram model: the next token's logits are one row of a table, looked up by the current token."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config.sections import ModelConfig
from lmforge.model.classic import LanguageModel
from lmforge.model.init import init_weights


class Bigram(LanguageModel):
    """The next token's logits are a row of one table, looked up by the current token: no context at all."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.vocab_size)
        init_weights(self, config)
        with torch.no_grad():  # the table is the model's one matrix (one-hot in, logits out): the scheme applies
            if config.init == "xavier":
                nn.init.xavier_uniform_(self.wte.weight)
            elif config.init == "kaiming":
                nn.init.kaiming_normal_(self.wte.weight, nonlinearity="relu")

    def head_weight(self) -> torch.Tensor:
        return self.wte.weight

    def flops_per_token(self) -> int:
        """None worth counting: the table is its own head, but a lookup, not a matmul."""
        return 0

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.wte(idx)
        return logits, self.loss(logits, targets)
