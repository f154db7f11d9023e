"""`build_model(config)`: the model that `model.arch` names, for the trainer, checkpoints, bench and sampling."""

from __future__ import annotations

from torch import nn

from lmforge.config.sections import ModelConfig
from lmforge.model.bigram import Bigram
from lmforge.model.gpt import GPT
from lmforge.model.mlp import BengioMLP
from lmforge.model.recurrent import RECURRENT_ARCHS, RecurrentLM
from lmforge.model.seq2seq import EncoderDecoder

# One class per model.arch choice (lmforge/config/ declares them; a test keeps the two lists equal).
MODELS: dict[str, type[nn.Module]] = {"gpt": GPT, "encoder": GPT, "encoder-decoder": EncoderDecoder,
                                      "bigram": Bigram, "mlp": BengioMLP, **dict.fromkeys(RECURRENT_ARCHS, RecurrentLM)}
ARCHS = tuple(MODELS)


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialized model of the configured architecture (GPT's interface, whichever it is)."""
    return MODELS[config.arch](config)
