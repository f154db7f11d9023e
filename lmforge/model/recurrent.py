"""The language models before the transformer, to train side by side with it: bigram, Bengio's MLP, Elman's
RNN, LSTM and GRU.

Every one has GPT's interface: `forward(idx, targets=None, cache=None) -> (logits, loss)` with logits
(B, T, vocab_size) where position t sees only tokens 0..t, `num_params`, `flops_per_token`, `head_weight`
and `new_cache`. The recurrent ones (rnn, lstm, gru) carry a hidden state:

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

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.model.activations import ACTIVATIONS, activation
from lmforge.model.init import init_weights

RECURRENT_ARCHS = ("rnn", "lstm", "gru")
# What model.activation may be per architecture: "" is the architecture's own choice.
ACTIVATION_CHOICES = {"bigram": ("",), "lstm": ("",), "gru": ("",), "mlp": ("", *ACTIVATIONS),
                      "rnn": ("", *ACTIVATIONS)}
WHY_NO_ACTIVATION = {"bigram": "a lookup table has no hidden layer",
                     "lstm": "its gates are fixed sigmoids and tanh (torch's built-in cell)",
                     "gru": "its gates are fixed sigmoids and tanh (torch's built-in cell)"}

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # (layers, B, width); the LSTM adds its cell state


@dataclass
class RecurrentState:
    """The hidden state after the tokens seen so far (None: zeros); forward replaces it with the new one."""

    hidden: Hidden | None = None
    length: int = 0


def check_recurrent_config(config: ModelConfig) -> None:
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
        check_recurrent_config(config)
        self.config = config
        self.vocab_size = config.vocab_size

    def head_weight(self) -> torch.Tensor:
        """The output matrix (vocab rows): each architecture names its own."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
        if targets is None:
            return None
        return F.cross_entropy(logits.float().reshape(-1, self.vocab_size), targets.reshape(-1))

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> RecurrentState | None:
        """None: no state to carry, so generation recomputes the window for each new token."""
        return None

    def num_params(self, include_embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total if include_embeddings else total - self.wte.weight.numel()

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per weight of every matrix multiplied with each token (embedding lookups
        cost nothing; a head tied to the embedding is a matmul and counts)."""
        weights = sum(p.numel() for name, p in self.named_parameters() if p.dim() == 2 and not name.startswith("wte"))
        if self.head_weight() is self.wte.weight and not isinstance(self, Bigram):
            weights += self.wte.weight.numel()
        return 6 * weights


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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.wte(idx)
        return logits, self.loss(logits, targets)


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
