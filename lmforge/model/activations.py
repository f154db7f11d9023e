"""The nonlinearities a model may use (`model.activation`), by name, for every architecture that has one.

tanh and sigmoid squash (saturate for large |x|, where their gradient vanishes); relu passes positives and
zeroes negatives (gradient 0 or 1); gelu is a smooth relu (GPT-2's tanh approximation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "sigmoid": torch.sigmoid,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function called `name`, one of the `model.activation` choices lmforge/config/ checked."""
    return ACTIVATIONS[name]
