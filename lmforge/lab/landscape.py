"""`lmforge plot landscape RUN`: the validation loss around the trained weights, along a line and on a plane.

The trained weights θ are one point in a space of as many dimensions as the model has parameters. We pick two
random directions d1, d2 in that space and draw loss(θ + a·d1) against a (the line) and loss(θ + a·d1 + b·d2)
over a grid of (a, b) (the contours). Raw random directions would be meaningless across layers of different
scale, so each direction is filter-normalised (Li et al., 2018, "Visualizing the Loss Landscape of Neural
Nets"): every row of every weight matrix (a neuron's incoming weights, or a token's embedding) is rescaled to
the norm of the same row of the trained weights, and vectors (biases, norm gains) get no component. So a = 1
moves each row by its own length, whatever the layer.

The loss is measured on a fixed set of validation windows spread evenly over the split, the same at every point.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lmforge.data.loader import TokenWindows, to_batch
from lmforge.errors import UserError
from lmforge.infer.load import load_run
from lmforge.lab.learn import check_png_out, recorded_data_dir, write_png
from lmforge.plots import new_figure

MIN_POINTS = 3
# 101 per axis is 10,302 forward passes: minutes for a small model on a CPU; past it the plot grows no clearer.
MAX_POINTS = 101
MAX_WINDOWS = 1024  # validation windows, evaluated as one batch at every point


@dataclass
class Landscape:
    """The loss along the line (offsets × loss) and on the plane (grid[i, j] at a = offsets[j], b = offsets[i])."""

    offsets: np.ndarray
    line: np.ndarray
    grid: np.ndarray


def filter_normalised_direction(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random direction, one tensor per parameter: Gaussian, each row of a matrix scaled to the norm of that
    row of the weights; zero for vectors (biases and norm gains)."""
    direction = {}
    for name, weight in model.named_parameters():
        if weight.dim() < 2:
            direction[name] = torch.zeros_like(weight)
            continue
        rows = weight.detach().reshape(weight.size(0), -1)
        random = torch.randn(rows.shape, generator=generator, dtype=rows.dtype).to(rows.device)
        random *= rows.norm(dim=1, keepdim=True) / random.norm(dim=1, keepdim=True).clamp_min(1e-12)
        direction[name] = random.reshape(weight.shape)
    return direction


def validation_batch(data_dir: str | Path, block_size: int, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`windows` validation windows spread evenly over the split (fewer if the split has fewer)."""
    split = TokenWindows(data_dir, "val", block_size)
    ids = np.unique(np.linspace(0, split.num_windows - 1, min(windows, split.num_windows)).round().astype(np.int64))
    return to_batch(split.gather(ids), torch.device("cpu"))


@torch.no_grad()
def loss_landscape(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, points: int, span: float,
                   seed: int) -> Landscape:
    """The loss at θ + a·d1 (+ b·d2) for a, b in `points` evenly spaced offsets from -span to span; the model's
    weights are θ again afterwards."""
    generator = torch.Generator().manual_seed(seed)
    first = filter_normalised_direction(model, generator)
    second = filter_normalised_direction(model, generator)
    parameters = dict(model.named_parameters())
    trained = {name: p.detach().clone() for name, p in parameters.items()}
    offsets = np.linspace(-span, span, points)

    def loss_at(a: float, b: float) -> float:
        for name, p in parameters.items():
            p.copy_(trained[name] + a * first[name] + b * second[name])
        return model(inputs, targets)[1].item()

    # points + points² forward passes: at the largest --points that is about ten thousand, so show how far it is.
    bar = tqdm(total=points + points * points, desc="loss landscape", unit="point", disable=None, leave=False)
    try:
        line = np.array([loss_at(a, 0.0) for a in bar_over(offsets, bar)])
        grid = np.array([[loss_at(a, b) for a in bar_over(offsets, bar)] for b in offsets])
    finally:
        bar.close()
        for name, p in parameters.items():
            p.copy_(trained[name])
    return Landscape(offsets, line, grid)


def bar_over(values: np.ndarray, bar: tqdm) -> Iterator[float]:
    """The values, one tick of `bar` after each."""
    for value in values:
        yield float(value)
        bar.update()


def plot_landscape(run: str | Path, out: str | Path, *, data: str | Path | None = None, points: int = 21,
                   span: float = 1.0, seed: int = 0, windows: int = 8, overwrite: bool = False) -> Path:
    """Write the two-panel PNG (the line, the contours of the plane) for a run to `out`; return its path."""
    out = check_png_out(out, overwrite, inputs=(run, data))
    if not MIN_POINTS <= points <= MAX_POINTS:
        raise UserError(f"--points must be from {MIN_POINTS} to {MAX_POINTS} (points² losses are computed), "
                        f"got {points}")
    if not (math.isfinite(span) and span > 0):
        raise UserError(f"--span must be a finite positive number, got {span}")
    if not 1 <= windows <= MAX_WINDOWS:
        raise UserError(f"--windows must be from 1 to {MAX_WINDOWS} (one batch at every point), got {windows}")
    loaded = load_run(run)
    model, config = loaded.model, loaded.config
    if data is None and config.finetune is not None:
        # A fine-tuning run's log records its task records, which have no token windows to measure.
        try:
            base_data = recorded_data_dir(config.finetune.base_run)
        except UserError:  # the base run is gone or holds no checkpoint: no directory to suggest
            base_data = None
        raise UserError(f"{run} is a fine-tuning run: its log records task data, not prepared token shards; pass "
                        f"--data with a directory prepared with its tokenizer"
                        + (f" (its base run's: --data {base_data})" if base_data else ""))
    data_dir = Path(data) if data is not None else recorded_data_dir(run)
    if data_dir is None:
        raise UserError(f"{run}'s log does not record its data directory; pass --data DIR")
    inputs, targets = validation_batch(data_dir, config.model.block_size, windows)
    if int(inputs.max()) >= config.model.vocab_size:
        raise UserError(f"{data_dir} has token ids beyond the run's vocabulary ({config.model.vocab_size}): "
                        "it was prepared with another tokenizer")
    started = time.perf_counter()
    with torch.no_grad():
        model(inputs, targets)
    evaluations = points + points * points
    # The one line a reader sees before minutes of work (the progress bar shows only on a terminal).
    print(f"loss landscape: {evaluations} evaluations of the loss on {len(inputs)} windows, about "
          f"{math.ceil(evaluations * (time.perf_counter() - started))} s", flush=True)
    landscape = loss_landscape(model, inputs, targets, points=points, span=span, seed=seed)

    figure = new_figure(12, 5)
    line_axes, plane_axes = figure.subplots(1, 2)
    figure.suptitle(f"Validation loss around the trained weights of {Path(run).name} "
                    f"({len(inputs)} windows of {inputs.size(1)} tokens, filter-normalised directions, seed {seed})")
    line_axes.plot(landscape.offsets, landscape.line, "o-", markersize=3)
    line_axes.plot([0], [landscape.line[points // 2]], "r*", markersize=12, label="trained weights")
    line_axes.set_xlabel("a  (weights θ + a·d₁)")
    line_axes.set_ylabel("validation loss (nats per token)")
    line_axes.set_title("Along one direction")
    line_axes.grid(alpha=0.3)
    line_axes.legend()
    # Far from the minimum the loss climbs steeply; levels up to its 90th percentile keep the valley readable.
    low, high = float(landscape.grid.min()), float(np.quantile(landscape.grid, 0.9))
    levels = np.linspace(low, max(high, low + 1e-6), 16)
    filled = plane_axes.contourf(landscape.offsets, landscape.offsets, landscape.grid, levels=levels,
                                 cmap="viridis", extend="max")
    plane_axes.contour(landscape.offsets, landscape.offsets, landscape.grid, levels=levels, colors="white",
                       linewidths=0.4)
    plane_axes.plot([0], [0], "r*", markersize=12)
    plane_axes.set_xlabel("a  (along d₁)")
    plane_axes.set_ylabel("b  (along d₂)")
    plane_axes.set_title("On the plane θ + a·d₁ + b·d₂")
    plane_axes.set_aspect("equal")
    figure.colorbar(filled, ax=plane_axes, label="validation loss")
    return write_png(figure, out)
