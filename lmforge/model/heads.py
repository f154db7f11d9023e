"""The classification head: a language model's last hidden state at a text's last token (an encoder's: the mean
over the text), mapped to labels.

As in Raschka's LLMs-from-scratch (chapter 6), the model reads a text and the hidden state at its last real
token, which in a causal model has seen the whole text, goes through a new linear layer with one output per
label; the language-model head is not computed. Texts in a batch are padded on the right: a causal model's
state at a position never depends on later positions, so padding cannot change a text's logits. A text
longer than the context keeps its last `block_size` tokens (the end of a passage is what the last position
summarises best).

An encoder (`model.arch = "encoder"`) has no position that has read the whole text more than another: every
position sees every other. Its passage is pooled instead: the mean of the states at the real tokens, the padding
hidden from attention (GPT.hidden_states' `lengths`) and left out of the mean, so a text's logits do not depend on
what it is batched with either. Mean pooling needs no extra reserved token (a leading summary token would); on
a tiny case it tied with reading the first position's state (docs/families.md), so the simpler readout stays.

`train_only_last_blocks` freezes all but the last N blocks (plus the final norm and the heads): the cheaper
fine-tuning that chapter compares with training everything.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.model.mlp import BengioMLP
from lmforge.model.recurrent import RecurrentLM

CLASSIFY_ARCHS = ("gpt", "encoder", "rnn", "lstm", "gru", "mlp")  # bigram: its "state" is one token's table row


def check_classify_arch(arch: str) -> None:
    if arch not in CLASSIFY_ARCHS:
        raise UserError(f"--task classify needs a model with a hidden state; model.arch '{arch}' has none (a "
                        f"bigram's output is a lookup of the last token alone); use one of {', '.join(CLASSIFY_ARCHS)}")


def hidden_width(body: nn.Module) -> int:
    return body.lm_head.in_features if isinstance(body, BengioMLP) else body.config.n_embd


def hidden_states(body: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """The states (B, T, width) that the language-model head would read, without computing that head. The
    transformer has its own (GPT.hidden_states, what its forward runs); the others mirror their forward up to
    their head."""
    if isinstance(body, GPT):
        return body.hidden_states(idx)
    if isinstance(body, RecurrentLM):
        x, _ = body.core(body.dropout(body.wte(idx)), None)
        return body.dropout(x)
    if isinstance(body, BengioMLP):
        batch, length = idx.shape
        x = F.pad(body.wte(idx), (0, 0, body.context - 1, 0))
        x = x.unfold(1, body.context, 1).transpose(2, 3).reshape(batch, length, -1)
        for layer in body.hidden:
            x = body.dropout(body.act(layer(x)))
        return x
    raise UserError(f"--task classify: no hidden state for model.arch '{body.config.arch}'")


class Classifier(nn.Module):
    """A language model's body with a new head `score` (width -> labels) on the last real token."""

    def __init__(self, body: nn.Module, labels: Sequence[str]):
        super().__init__()
        check_classify_arch(body.config.arch)
        self.body = body
        self.labels = list(labels)
        self.score = nn.Linear(hidden_width(body), len(self.labels))
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Label logits (B, labels) for right-padded token ids idx (B, T) whose real lengths are `lengths`."""
        if isinstance(self.body, GPT) and not self.body.causal:  # an encoder: the mean over its real tokens
            states = self.body.hidden_states(idx, lengths=lengths)
            real = torch.arange(idx.size(1), device=idx.device) < lengths[:, None]
            return self.score((states * real[..., None]).sum(1) / lengths[:, None])
        states = hidden_states(self.body, idx)
        last = states[torch.arange(idx.size(0), device=idx.device), lengths - 1]
        return self.score(last)


def block_modules(body: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters of each block (transformer block, recurrent layer, MLP hidden layer), first to last."""
    if isinstance(body, GPT):
        return [list(block.parameters()) for block in body.blocks]
    if isinstance(body, BengioMLP):
        return [list(layer.parameters()) for layer in body.hidden]
    if isinstance(body, RecurrentLM) and body.config.arch == "rnn":
        return [list(layer.parameters()) for layer in body.core.layers]
    if isinstance(body, RecurrentLM):  # torch's LSTM/GRU name each layer's tensors *_l{k}
        return [[p for name, p in body.core.named_parameters() if name.endswith(f"_l{k}")]
                for k in range(body.config.n_layer)]
    raise UserError(f"--train-blocks: model.arch '{body.config.arch}' has no blocks")


def train_only_last_blocks(model: nn.Module, body: nn.Module, blocks: int) -> None:
    """Freeze everything, then let the last `blocks` blocks, the final norm and the heads (a classifier's
    `score`; the language-model head, which is the embedding when tied) train again."""
    groups = block_modules(body)
    if not 0 < blocks <= len(groups):
        raise UserError(f"--train-blocks must be between 1 and the model's {len(groups)} blocks, got {blocks}")
    for param in model.parameters():
        param.requires_grad_(False)
    trained = [p for group in groups[-blocks:] for p in group]
    if getattr(body, "norm_f", None) is not None:
        trained += list(body.norm_f.parameters())
    if isinstance(model, Classifier):
        trained += list(model.score.parameters())
    else:
        trained.append(body.head_weight())
    for param in trained:
        param.requires_grad_(True)


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, longest), lengths (B,)): each sequence followed by pad_id up to the longest."""
    longest = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.long)
    return ids.to(device), lengths.to(device)


@torch.no_grad()
def classify_ids(model: Classifier, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int,
                 device: torch.device | str) -> torch.Tensor:
    """Label logits (N, labels) of token sequences, in order, `batch_size` at a time (float32, on the CPU)."""
    was_training = model.training
    model.eval()
    try:
        logits = [model(*pad_right(sequences[start : start + batch_size], pad_id, device)).float().cpu()
                  for start in range(0, len(sequences), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(logits)
