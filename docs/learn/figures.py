"""Regenerate every figure of the learner's course (docs/learn/img/) from lmforge commands: `make learn-figures`.

Each figure is the output of an `lmforge` command, run here in one process through the command line's own entry
point (lmforge.cli.main), so the pictures are exactly what a reader's commands draw:

  prepare the built-in corpus (if missing) · train configs/gpt.toml for --steps steps · plot activations,
  derivative, landscape (of that run, and of the same model after one step) and next-token · configs/mlp.toml
  at three learning rates and `compare` · an eight-trial `sweep` of its learning rate · `report` (its attention
  maps).

Two figures are drawn by Python: the gradient picture, as chapter 6 draws it (lmforge.lab.learn.plot_gradient_field),
and the three transformer families' masks of chapter 11, measured on seeded one-layer models
(lmforge.lab.families.plot_family_masks; no training).

About six minutes on a 2-core CPU with the defaults (on a busy machine, OMP_NUM_THREADS=1 is much faster).
tests/test_learn.py runs it with tiny settings, so the commands cannot rot.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's lmforge, whatever is installed

from lmforge.cli import main  # noqa: E402  (after the path is set)
from lmforge.lab.families import plot_family_masks  # noqa: E402
from lmforge.lab.learn import plot_gradient_field  # noqa: E402

# AdamW on configs/mlp.toml, constant rate; each run is named for its rate, which the curves' legend then shows.
LEARNING_RATES = {"lr-1e-4": "1e-4", "lr-1e-2": "1e-2", "lr-1": "1"}
PROMPT = "O Romeo, Romeo! wherefore art thou "
FAMILY_LINE = PROMPT + "Romeo?"  # chapter 11's line


def lmforge(*argv: str) -> None:
    """One lmforge command, as typed in a shell; a non-zero exit stops the script."""
    print("$ lmforge " + " ".join(argv), flush=True)
    code = main(list(argv))
    if code:
        raise SystemExit(f"lmforge {argv[0]} exited with {code}")


def make_figures(out: Path, data: Path, runs: Path, *, steps: int, trio_steps: int, trials: int = 8,
                 landscape_points: int = 21, prompt: str = PROMPT) -> list[Path]:
    """Write every course figure into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    config, mlp = str(ROOT / "configs" / "gpt.toml"), str(ROOT / "configs" / "mlp.toml")
    if not (data / "meta.json").is_file():
        lmforge("prepare", "--source", "shakespeare", "--tokenizer", "char", "--val-fraction", "0.1", "--out",
                str(data), "--quiet")
    run = runs / "gpt"
    lmforge("train", "--config", config, "--data", str(data), "--out", str(run), "--max-steps", str(steps),
            "--overwrite", "--quiet")
    # The figures replace the committed ones: --overwrite.
    lmforge("plot", "activations", "--out", str(out / "activations.png"), "--overwrite")
    lmforge("plot", "derivative", "--out", str(out / "derivative.png"), "--overwrite")
    plot_gradient_field(out / "gradient.png", overwrite=True)  # chapter 6 calls it from Python, as here
    plot_family_masks(out / "masks.png", FAMILY_LINE, overwrite=True)
    lmforge("plot", "landscape", str(run), "--points", str(landscape_points), "--out", str(out / "landscape.png"),
            "--overwrite")
    # The same picture for the same model after one step (a 1/50 warmup rate): where training starts.
    untrained = runs / "gpt-untrained"
    lmforge("train", "--config", config, "--data", str(data), "--out", str(untrained), "--max-steps", "1",
            "--overwrite", "--quiet")
    lmforge("plot", "landscape", str(untrained), "--points", str(landscape_points), "--out",
            str(out / "landscape-untrained.png"), "--overwrite")
    lmforge("plot", "next-token", str(run), "--prompt", prompt, "--out", str(out / "next-token.png"), "--overwrite")

    for name, rate in LEARNING_RATES.items():
        lmforge("train", "--config", mlp, "--data", str(data), "--out", str(runs / "lr" / name), "--max-steps",
                str(trio_steps), "--optim.lr", rate, "--train.schedule", "constant", "--train.eval_every",
                str(max(1, trio_steps // 10)), "--train.eval_tokens", "4096", "--overwrite", "--quiet")
    lmforge("compare", *(str(runs / "lr" / name) for name in LEARNING_RATES), "--out", str(runs / "lr" / "compare"),
            "--overwrite")
    shutil.copyfile(runs / "lr" / "compare" / "val_loss_vs_tokens.png", out / "learning-rates.png")

    sweep = runs / "sweep-lr"
    shutil.rmtree(sweep, ignore_errors=True)  # a sweep continues an old study in the same place: start afresh
    lmforge("sweep", "--config", mlp, "--data", str(data), "--out", str(sweep), "--param",
            "optim.lr=log:1e-4:1", "--method", "random", "--trials", str(trials), "--train.schedule", "constant",
            "--train.max_steps", str(trio_steps), "--train.eval_every", str(max(1, trio_steps // 4)), "--quiet")
    shutil.copyfile(sweep / "param_optim.lr.png", out / "sweep-lr.png")

    lmforge("report", str(run))
    attention = sorted((run / "report").glob("attention*.png"))
    shutil.copyfile(attention[-1], out / "attention.png")
    return sorted(out.glob("*.png"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "learn" / "img"))
    parser.add_argument("--data", default="data/shakespeare-char")
    parser.add_argument("--runs", default="runs/learn")
    parser.add_argument("--steps", type=int, default=600, help="training steps of the run the plots read")
    parser.add_argument("--trio-steps", type=int, default=200, help="steps of each learning-rate run")
    args = parser.parse_args()
    for path in make_figures(Path(args.out), Path(args.data), Path(args.runs), steps=args.steps,
                             trio_steps=args.trio_steps):
        print(f"wrote {path}")
