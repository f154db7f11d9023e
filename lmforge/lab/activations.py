"""`lmforge plot activations`: the activation functions a model may use, and their derivatives, on one figure.

The derivatives come from autograd on the very functions the models call (lmforge.model.activations), so
the picture shows what training sees: where a function saturates its gradient vanishes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.files import write_atomic
from lmforge.lab.learn import check_png_out
from lmforge.model.activations import ACTIVATIONS
from lmforge.plots import new_figure, png_bytes

# The transformer's MLP nonlinearity (model.mlp = "relu2", the demo's), written as gpt.py's MLP computes it.
PLOTTED = {**ACTIVATIONS, "relu² (model.mlp)": lambda z: F.relu(z).square()}


def plot_activations(out: str | Path, overwrite: bool = False) -> Path:
    """Write the PNG (functions left, derivatives right) to `out`, atomically (making its directory); return
    its path."""
    out = check_png_out(out, overwrite, make_directory=True)  # a missing directory is made, as for other outputs
    figure = new_figure(11, 4.5)
    values_axes, slopes_axes = figure.subplots(1, 2)
    for name, function in PLOTTED.items():
        z = torch.linspace(-4, 4, 401, requires_grad=True)
        y = function(z)
        (slope,) = torch.autograd.grad(y.sum(), z)
        values_axes.plot(z.detach(), y.detach(), label=name)
        slopes_axes.plot(z.detach(), slope, label=name)
    # ReLU² reaches 16 and its slope 8 at z = 4: frames that keep the saturating functions readable.
    values_axes.set_ylim(-1.5, 4)
    slopes_axes.set_ylim(-0.5, 2.5)
    for axes, title in ((values_axes, "Activation f(z)"), (slopes_axes, "Derivative f′(z)")):
        axes.set_title(title)
        axes.set_xlabel("z  (the neuron's weighted sum w·x + b)")
        axes.axhline(0, color="gray", linewidth=0.5)
        axes.axvline(0, color="gray", linewidth=0.5)
        axes.grid(alpha=0.3)
        axes.legend()
    write_atomic(out, png_bytes(figure))
    return out
