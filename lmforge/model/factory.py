"""`build_model(config)`: the model that `model.arch` names, for the trainer, checkpoints, bench and sampling."""

from __future__ import annotations

from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.model.bigram import Bigram
from lmforge.model.gpt import GPT
from lmforge.model.mlp import BengioMLP
from lmforge.model.recurrent import RECURRENT_ARCHS, RecurrentLM

ARCHS = ("gpt", "bigram", "mlp", *RECURRENT_ARCHS)


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialized model of the configured architecture (GPT's interface, whichever it is)."""
    if config.arch == "gpt":
        return GPT(config)
    if config.arch == "bigram":
        return Bigram(config)
    if config.arch == "mlp":
        return BengioMLP(config)
    if config.arch in RECURRENT_ARCHS:
        return RecurrentLM(config)
    raise UserError(f"unknown model.arch '{config.arch}'; choose one of {', '.join(ARCHS)}")
