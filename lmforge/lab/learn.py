"""Small helpers the learner's course (docs/learn/) calls: loading a run's model for a chapter, the tiny seeded
model of the derivative chapter, its finite-difference table and the error-against-h picture, and the PNG check
the course's plots share.

Everything here is deterministic on a CPU (a seeded model, fixed inputs, float64 where the text quotes numbers),
so the numbers a chapter prints are the numbers its test asserts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from lmforge.config.sections import Config, ModelConfig
from lmforge.data.tokenizer import CharTokenizer, Tokenizer
from lmforge.errors import UserError
from lmforge.files import check_output, write_atomic
from lmforge.infer import load as run_loader
from lmforge.model.gpt import GPT
from lmforge.plots import new_figure, png_bytes
from lmforge.run.checkpoints import resolve_checkpoint
from lmforge.run.directory import CHECKPOINT_PREFIX, LOG_FILE
from lmforge.run.log import read_log

TINY_TEXT = "to be, or not to be, that is the question"
# The chapters' illustrations come from runs of 600 steps and more (make demo trains about 780): a run with fewer
# shows little of what the text describes (near-uniform attention, a loss far above the quoted one).
COURSE_STEPS = 600
STEPS = tuple(10.0**-exponent for exponent in range(1, 15))  # h = 1e-1 ... 1e-14


def load_run(run: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, Tokenizer]:
    """A trained run's language model (eval mode), config and tokenizer, as the course's chapters unpack them
    (the commands take the whole `lmforge.infer.load.LoadedRun`); a classify run, which predicts labels rather
    than next tokens, is refused by name."""
    loaded = run_loader.load_run(run, device=device)
    return loaded.model, loaded.config, loaded.tokenizer


def trained_steps(run: str | Path) -> int:
    """The step of the checkpoint the course loads (a run's newest): the log's last training line can be a few
    steps earlier, since the trainer logs every train.log_every steps."""
    return int(resolve_checkpoint(run)[1].name.removeprefix(CHECKPOINT_PREFIX))


def course_run_check(run: str | Path, assumed_steps: int = COURSE_STEPS) -> str:
    """One line on whether `run` is trained as long as the course assumes, and if not, the command that is."""
    steps = trained_steps(run)
    if steps >= assumed_steps:
        return f"{run}: {steps} steps, trained as long as the course assumes (at least {assumed_steps})"
    return (f"{run} is barely trained ({steps} steps; the course assumes at least {assumed_steps}): train longer "
            f"with make demo, or lmforge train --config configs/shakespeare-char.toml --data DATA --out {run} "
            f"--max-steps 780 --overwrite")


def recorded_data_dir(run: str | Path) -> Path | None:
    """The data directory a run was trained on, from the start record of its log (None if not recorded)."""
    log = resolve_checkpoint(run)[0] / LOG_FILE
    starts = read_log(log).starts if log.is_file() else []
    return Path(starts[0].data) if starts and starts[0].data else None


def load_transformer(run: str | Path) -> tuple[GPT, Config, Tokenizer]:
    """load_run for the chapters about attention, which only a transformer has."""
    model, config, tokenizer = load_run(run)
    if config.model.arch != "gpt":
        raise UserError(f"{run} is a model.arch = '{config.model.arch}' run, which has no attention heads; "
                        "pass a transformer run (model.arch = 'gpt', e.g. runs/shakespeare-char from make demo)")
    return model, config, tokenizer


def check_png_out(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                  make_directory: bool = False) -> Path:
    """--out as a Path, refused (UserError) unless it names a .png file in an existing directory (or one to
    make, with `make_directory`) that `files.check_output` allows: an existing file only with `overwrite`, and
    never one of the command's `inputs` (None: no such input) or a file inside a run."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {out}")
    check_output(out, overwrite, directory=False, inputs=[path for path in inputs if path is not None])
    if not make_directory and not out.parent.is_dir():
        raise UserError(f"the directory of --out does not exist: {out.parent}")
    return out


def write_png(figure: Figure, out: Path) -> Path:
    write_atomic(out, png_bytes(figure))
    return out


# ----- the derivative chapter: one weight of a tiny real model -----


def tiny_model(dtype: torch.dtype = torch.float64) -> GPT:
    """lmforge's transformer at toy size (2 layers, width 16, 2 heads), initialized with seed 0, untrained."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=CharTokenizer.train([TINY_TEXT]).vocab_size, block_size=64, n_layer=2,
                         n_head=2, n_embd=16)
    return GPT(config).to(dtype).eval()


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """TINY_TEXT as one (inputs, next-token targets) pair, through a char tokenizer trained on it."""
    ids = torch.tensor([CharTokenizer.train([TINY_TEXT]).encode(TINY_TEXT)])
    return ids[:, :-1], ids[:, 1:]


@dataclass
class DifferenceRow:
    """At one step h: the forward quotient (f(w+h) - f(w)) / h and the central one (f(w+h) - f(w-h)) / 2h,
    each as its error against autograd's exact derivative."""

    step: float
    forward: float
    forward_error: float
    central_error: float


def tiny_loss(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy in the model's own dtype (the model's forward rounds its loss to
    float32, which would hide float64's precision)."""
    logits, _ = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def difference_table(dtype: torch.dtype = torch.float64, steps: tuple[float, ...] = STEPS
                     ) -> tuple[float, list[DifferenceRow]]:
    """The loss's derivative with respect to wte.weight[0, 0] of tiny_model() (the first number of the space
    character's embedding): autograd's value (in float64 whatever `dtype`), and the finite-difference quotients
    computed in `dtype` at every step h."""
    exact_model, (inputs, targets) = tiny_model(torch.float64), tiny_batch()
    exact = torch.autograd.grad(tiny_loss(exact_model, inputs, targets), exact_model.wte.weight)[0][0, 0].item()

    model = tiny_model(dtype)
    weight = model.wte.weight

    @torch.no_grad()
    def loss_at(value: float) -> float:
        saved = weight[0, 0].item()
        weight[0, 0] = value
        loss = tiny_loss(model, inputs, targets).item()
        weight[0, 0] = saved
        return loss

    w = weight[0, 0].item()
    here = loss_at(w)
    rows = []
    for h in steps:
        forward = (loss_at(w + h) - here) / h
        central = (loss_at(w + h) - loss_at(w - h)) / (2 * h)
        rows.append(DifferenceRow(h, forward, abs(forward - exact), abs(central - exact)))
    return exact, rows


def plot_difference_errors(out: str | Path, overwrite: bool = False) -> Path:
    """Error of the difference quotients against h, log-log: float64 forward and central, float32 forward."""
    out = check_png_out(out, overwrite)
    figure = new_figure(7, 4.5)
    axes = figure.subplots()
    tiny = 1e-18  # an error of exactly 0 has no place on a log axis
    _, rows64 = difference_table(torch.float64)
    _, rows32 = difference_table(torch.float32)
    steps = [row.step for row in rows64]
    axes.loglog(steps, [max(row.forward_error, tiny) for row in rows64], "o-", label="forward, float64")
    axes.loglog(steps, [max(row.central_error, tiny) for row in rows64], "s-", label="central, float64")
    axes.loglog(steps, [max(row.forward_error, tiny) for row in rows32], "^-", label="forward, float32")
    for machine_epsilon, name in ((torch.finfo(torch.float64).eps, "float64"), (torch.finfo(torch.float32).eps,
                                                                                   "float32")):
        axes.axvline(math.sqrt(machine_epsilon), color="gray", linestyle=":", linewidth=1)
        axes.text(math.sqrt(machine_epsilon), axes.get_ylim()[1], f" √ε {name}", fontsize=8, va="top")
    axes.set_xlabel("step h")
    axes.set_ylabel("|difference quotient − autograd|")
    axes.set_title("d loss / d wte.weight[0, 0] of a tiny GPT: error against h")
    axes.invert_xaxis()  # h shrinks to the right, as in the limit
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    return write_png(figure, out)


# ----- the gradient descent chapter: a surface of two weights with a local and a global minimum -----


def two_weight_loss(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """L(w1, w2) = (w1² − 1)² + 0.3·w1 + w2²: two valleys along w1, the deeper (global) one near w1 = −1, the
    shallower (local) one near w1 = +1."""
    return (w1**2 - 1) ** 2 + 0.3 * w1 + w2**2


def two_weight_gradient(w1: float, w2: float) -> tuple[float, float]:
    """The vector of partial derivatives (∂L/∂w1, ∂L/∂w2), by hand."""
    return 4 * w1 * (w1**2 - 1) + 0.3, 2 * w2


def descend(start: tuple[float, float], lr: float = 0.05, steps: int = 60) -> list[tuple[float, float]]:
    """The points gradient descent visits on two_weight_loss from `start`."""
    path = [start]
    for _ in range(steps):
        w1, w2 = path[-1]
        g1, g2 = two_weight_gradient(w1, w2)
        path.append((w1 - lr * g1, w2 - lr * g2))
    return path


def plot_gradient_field(out: str | Path, starts: tuple[tuple[float, float], ...] = ((1.6, 1.2), (-0.2, 1.4)),
                        overwrite: bool = False) -> Path:
    """Contours of two_weight_loss, its negative gradient as arrows, and gradient descent from each start."""
    out = check_png_out(out, overwrite)
    figure = new_figure(7.5, 5.5)
    axes = figure.subplots()
    grid = torch.linspace(-1.8, 1.8, 121)
    w1, w2 = torch.meshgrid(grid, grid, indexing="xy")
    filled = axes.contourf(w1, w2, two_weight_loss(w1, w2), levels=30, cmap="viridis")
    figure.colorbar(filled, ax=axes, label="L(w₁, w₂)")
    arrows = torch.linspace(-1.6, 1.6, 11)
    a1, a2 = torch.meshgrid(arrows, arrows, indexing="xy")
    g1, g2 = two_weight_gradient(a1, a2)
    axes.quiver(a1, a2, -g1, -g2, color="white", alpha=0.7, angles="xy")
    for start in starts:
        path = descend(start)
        axes.plot([p[0] for p in path], [p[1] for p in path], "o-", color="orange", markersize=2.5)
        axes.plot(*start, "ko", markersize=5)
    axes.plot(-1.036, 0, "r*", markersize=14, label="global minimum")
    axes.plot(0.960, 0, "w*", markersize=14, markeredgecolor="k", label="local minimum")
    axes.set_xlabel("w₁")
    axes.set_ylabel("w₂")
    axes.set_title("−gradient (arrows) and gradient descent (orange) from two starts")
    axes.set_aspect("equal")
    axes.legend(loc="upper left")
    return write_png(figure, out)
