"""The scratch engine behind torch's module interface: NumPy views of a torch GPT's parameters, and its
NumPy forward with the torch model's call signature, so evaluation and generation take either engine."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lmforge.model.gpt import GPT
from lmforge.scratch.gpt import check_scratch_config, gpt_forward


def numpy_parameters(model: GPT) -> dict[str, np.ndarray]:
    """Views (not copies) of the model's parameters: writing one writes the other."""
    return {name: param.detach().numpy() for name, param in model.named_parameters()}


class ScratchForward(nn.Module):
    """The scratch engine's forward behind the torch model's call signature, for evaluate() and generate():
    (idx, targets=None) -> (logits, loss). It holds no parameters of its own; `wte` and `config` are the
    model's, because generate() reads the device and the context length from them."""

    def __init__(self, model: GPT):
        super().__init__()
        check_scratch_config(model.config)
        self.config = model.config
        self.wte = model.wte
        self.params = numpy_parameters(model)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, loss, _ = gpt_forward(self.params, idx.numpy(), self.config,
                                      None if targets is None else targets.numpy())
        return torch.from_numpy(logits), None if loss is None else torch.tensor(loss)
