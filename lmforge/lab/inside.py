"""Pictures of a trained model's insides, for the report: weight and gradient histograms per layer, and a
transformer's attention maps (one small image per head of one layer) for a sample sentence.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator
from torch import nn

from lmforge.plots import new_figure, png_bytes


def layer_gradients(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of the mean loss on one batch, for every weight matrix (no dropout: the model in eval mode).
    The model's own .grad fields are left as they were."""
    was_training = model.training
    model.eval()
    matrices = {name: p for name, p in model.named_parameters() if p.dim() >= 2}
    _, loss = model(inputs, targets)
    grads = torch.autograd.grad(loss, list(matrices.values()))
    model.train(was_training)
    return dict(zip(matrices, grads, strict=True))


def histograms_png(tensors: dict[str, torch.Tensor], title: str) -> bytes:
    """One histogram per named tensor (log-scaled counts), in a grid; the title line gives each tensor's std.
    Counted by NumPy and drawn as one outline per tensor with a few ticks: a bar per bin and a log axis's minor
    ticks cost matplotlib seconds per picture."""
    columns = min(4, len(tensors))
    rows = math.ceil(len(tensors) / columns)
    figure = new_figure(3.2 * columns, 2.4 * rows + 0.6)
    figure.suptitle(title)
    for index, (name, tensor) in enumerate(tensors.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        values = tensor.detach().float().flatten().cpu().numpy()
        counts, edges = np.histogram(values, bins=60)
        axes.stairs(counts, edges, fill=True, baseline=0.5)  # a count of 1 stands above the baseline
        axes.set_yscale("log")
        axes.yaxis.set_major_locator(LogLocator(numticks=4))
        axes.yaxis.set_minor_locator(NullLocator())
        axes.xaxis.set_major_locator(MaxNLocator(4))
        axes.set_title(f"{name}\nstd {values.std():.2e}", fontsize=8)
        axes.tick_params(labelsize=7)
    return png_bytes(figure)


def attention_png(weights: torch.Tensor, labels: list[str], layer: int) -> bytes:
    """weights (n_head, T, T), row = query position, column = key position; labels: the tokens as text. Two
    heads per row, large enough to read the tokens, one colour scale for all."""
    heads = weights.size(0)
    columns = min(2, heads)
    rows = math.ceil(heads / columns)
    size = max(3.5, 0.17 * len(labels))
    figure = new_figure(size * columns + 1.2, size * rows + 0.8)
    figure.suptitle(f"Attention weights of layer {layer} (layers counted from 0), every head\n"
                    "row: the query token, column: the key token it reads; above the diagonal is the future")
    shown = None
    for head in range(heads):
        axes = figure.add_subplot(rows, columns, head + 1)
        shown = axes.imshow(weights[head].cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
        axes.set_title(f"head {head}", fontsize=10)
        axes.set_xticks(range(len(labels)), [visible(label) for label in labels], fontsize=8, rotation=90)
        axes.set_yticks(range(len(labels)), [visible(label) for label in labels], fontsize=8)
    figure.colorbar(shown, ax=figure.axes, label="attention weight (each row sums to 1)", shrink=0.8)
    return png_bytes(figure)


def visible(token: str) -> str:
    """A token as a tick label: a space as ␣, a newline as \\n."""
    return repr(token)[1:-1].replace(" ", "␣")
