"""An exponential moving average of the weights (`train.ema_decay`): what evaluations, samples and the
checkpoints' model.safetensors hold, while the optimizer keeps stepping the weights as trained.

After optimizer step t: average = d_t * average + (1 - d_t) * weights, with d_t = min(ema_decay, (1 + t) / (10 + t)).
The ramp keeps a short run's average from remembering its random initialisation (with d = 0.999 alone, 45% of
the average would still be the initial weights after 800 steps). Averaging late-training iterates removes
some of the noise of the last updates, the gain a decay-to-zero schedule also gets.

The average covers the trainable parameters; the swap into the model is an in-place copy, so every engine's
forward sees it (the scratch engine's NumPy arrays are views of the same memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def decay_at(step: int, ema_decay: float) -> float:
    """The decay of the update after optimizer step `step` (1-based)."""
    return min(ema_decay, (1 + step) / (10 + step))


class WeightAverage:
    """The average of one model's trainable parameters (see the module docstring)."""

    def __init__(self, model: nn.Module, ema_decay: float):
        self.ema_decay = ema_decay
        self.params = [param for param in model.parameters() if param.requires_grad]
        self.average = [param.detach().clone() for param in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average toward the weights after optimizer step `step`."""
        weight = 1.0 - decay_at(step, self.ema_decay)
        torch._foreach_lerp_(self.average, [param.detach() for param in self.params], weight)

    @torch.no_grad()
    def restart_from_model(self) -> None:
        """The average becomes the model's current weights (after loading a checkpoint's averaged weights)."""
        for average, param in zip(self.average, self.params, strict=True):
            average.copy_(param)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block and exactly its trained weights again after it."""
        trained = [param.detach().clone() for param in self.params]
        with torch.no_grad():
            for param, average in zip(self.params, self.average, strict=True):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, weights in zip(self.params, trained, strict=True):
                    param.copy_(weights)

    def averaged_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of the model's `state_dict()` with the average in place of each trainable parameter (a tied
        embedding and head, one tensor under two names, both)."""
        by_storage = {param.data_ptr(): average for param, average in zip(self.params, self.average, strict=True)}
        return {name: by_storage.get(value.data_ptr(), value) for name, value in state.items()}
