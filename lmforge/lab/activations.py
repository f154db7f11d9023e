"""`lmforge plot activations`: the activation functions a model may use, and their derivatives, on one figure.

The derivatives come from autograd on the very functions the models call (lmforge.model.activations), so
the picture shows what training sees: where a function saturates its gradient vanishes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.files import write_atomic
from lmforge.lab.learn import check_png_out
from lmforge.model.activations import ACTIVATIONS
from lmforge.plots import new_figure, png_bytes


def plot_activations(out: str | Path, overwrite: bool = False) -> Path:
    """Write the PNG (functions left, derivatives right) to `out`, atomically (making its directory); return
    its path."""
    out = check_png_out(out, overwrite, make_directory=True)  # a missing directory is made, as for other outputs
    figure = new_figure(11, 4.5)
    values_axes, slopes_axes = figure.subplots(1, 2)
    for name, function in ACTIVATIONS.items():
        x = torch.linspace(-4, 4, 401, requires_grad=True)
        y = function(x)
        (slope,) = torch.autograd.grad(y.sum(), x)
        values_axes.plot(x.detach(), y.detach(), label=name)
        slopes_axes.plot(x.detach(), slope, label=name)
    for axes, title in ((values_axes, "Activation f(x)"), (slopes_axes, "Derivative f'(x)")):
        axes.set_title(title)
        axes.set_xlabel("x")
        axes.axhline(0, color="gray", linewidth=0.5)
        axes.axvline(0, color="gray", linewidth=0.5)
        axes.grid(alpha=0.3)
        axes.legend()
    write_atomic(out, png_bytes(figure))
    return out
