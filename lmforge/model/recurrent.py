"""The recurrent language models: Elman's RNN (written out), LSTM and GRU (torch's cells).

They have GPT's interface (see model/classic.py) and carry a hidden state:

- `cache` (a RecurrentState): forward starts from its hidden state and writes the new one back; generation
  feeds the prompt once and then one token at a time, so a token costs one step of the recurrence.
- training with `carry_state(True)` (the trainer does this when the loader reads sequentially): each
  training forward starts where the previous batch ended, detached, so gradients flow back through one
  window only (truncated backpropagation through time). Otherwise every window starts from zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config.sections import ModelConfig
from lmforge.model.activations import activation
from lmforge.model.classic import LanguageModel
from lmforge.model.init import init_weights

RECURRENT_ARCHS = ("rnn", "lstm", "gru")

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # (layers, B, width); the LSTM adds its cell state


@dataclass
class RecurrentState:
    """The hidden state after the tokens seen so far (None: zeros); forward replaces it with the new one."""

    hidden: Hidden | None = None
    length: int = 0


class ElmanLayer(nn.Module):
    """h_t = act(W_xh x_t + b + W_hh h_{t-1}): the recurrence, one time step at a time."""

    def __init__(self, width: int, act):
        super().__init__()
        self.input = nn.Linear(width, width)  # W_xh and b
        self.recurrent = nn.Linear(width, width, bias=False)  # W_hh: what carries the past forward
        self.act = act

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, W), h (B, W) -> every step's h (B, T, W) and the last h."""
        from_input = self.input(x)  # the input's share of every step, in one matmul
        outputs = []
        for t in range(x.size(1)):
            h = self.act(from_input[:, t] + self.recurrent(h))
            outputs.append(h)
        return torch.stack(outputs, dim=1), h


class Elman(nn.Module):
    """Stacked Elman layers with dropout between them; the state is (layers, B, W), as torch's nn.RNN's."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        act = activation(config.activation or "tanh")
        self.layers = nn.ModuleList(ElmanLayer(config.n_embd, act) for _ in range(config.n_layer))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden is None:
            hidden = x.new_zeros(len(self.layers), x.size(0), x.size(2))
        last = []
        for index, layer in enumerate(self.layers):
            if index:
                x = self.dropout(x)
            x, h = layer(x, hidden[index])
            last.append(h)
        return x, torch.stack(last)


class RecurrentLM(LanguageModel):
    """Embedding, a stack of recurrent layers (rnn: Elman, written out; lstm, gru: torch's), dropout, a head
    (tied to the embedding unless model.tie_embeddings = false)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        width = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, width)
        if config.arch == "rnn":
            self.core: nn.Module = Elman(config)
        else:
            kind = nn.LSTM if config.arch == "lstm" else nn.GRU
            self.core = kind(width, width, num_layers=config.n_layer, batch_first=True,
                             dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = None if config.tie_embeddings else nn.Linear(width, config.vocab_size, bias=False)
        self.carry = False
        self.carried: Hidden | None = None
        init_weights(self, config)
        if config.arch == "lstm":
            with torch.no_grad():  # forget gate open at the start, so the cell state remembers from step one
                for name, bias in self.core.named_parameters():
                    if name.startswith("bias_ih"):
                        bias[width : 2 * width] = 1.0

    def head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> RecurrentState:
        return RecurrentState()

    def carry_state(self, carry: bool) -> None:
        """Carry the hidden state from one training batch to the next (truncated BPTT), or start each at zero."""
        self.carry = carry
        self.carried = None

    def carried_state(self) -> dict[str, torch.Tensor]:
        """The hidden state carried to the next training batch, by name (h; the LSTM adds its cell state c),
        each (layers, B, W); empty before the first carrying batch. Checkpoints keep it, so that a resumed run
        continues its streams from where they stood instead of from zeros."""
        if self.carried is None:
            return {}
        parts = self.carried if isinstance(self.carried, tuple) else (self.carried,)
        return dict(zip(("h", "c"), parts, strict=False))

    def restore_carried_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back what `carried_state` gave (on this model's device)."""
        parts = tuple(state[name] for name in ("h", "c") if name in state)
        self.carried = None if not parts else parts if len(parts) == 2 else parts[0]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: RecurrentState | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        carrying = cache is None and self.carry and self.training
        hidden = cache.hidden if cache is not None else self.carried if carrying else None
        if hidden is not None and _batch_of(hidden) != idx.size(0):
            hidden = None  # another batch size: these rows are not the streams the state belongs to
        x = self.dropout(self.wte(idx))
        x, hidden = self.core(x, hidden)
        if cache is not None:
            cache.hidden, cache.length = hidden, cache.length + idx.size(1)
        elif carrying:  # the next batch continues these rows; the gradient stops at the boundary
            self.carried = tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()
        logits = F.linear(self.dropout(x), self.head_weight())
        return logits, self.loss(logits, targets)


def _batch_of(hidden: Hidden) -> int:
    return (hidden[0] if isinstance(hidden, tuple) else hidden).size(1)
