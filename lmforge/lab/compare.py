"""`lmforge compare RUN... --out DIR`: several runs side by side, as a Markdown table and overlaid curves.

Every number comes from the runs' log.jsonl: the latest start record (architecture, parameters, training
tokens), the end record (tokens seen, wall time) and the evaluations (best val loss, and the final one on the
whole validation split for bits per byte). Epochs are tokens seen / training tokens.

Only next-token losses are ranked against each other. An encoder's masked-LM loss, an encoder-decoder's span loss
and a fine-tuning run's task loss answer other questions on other tokens (an encoder predicts 15% of the tokens,
each from both sides): their rows carry their loss in columns of their own, marked †, and come after the
next-token rows, unranked.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.ticker import EngFormatter

from lmforge.errors import UserError
from lmforge.files import check_output, write_atomic, writing
from lmforge.plots import new_figure, png_bytes
from lmforge.run.directory import read_config
from lmforge.run.log import last_per_step, read_log

NEXT_TOKEN = "next token"
# What a pretraining run of each architecture predicts, when it is not the next token, and its loss's unit.
OTHER_OBJECTIVES = {"encoder": ("masked tokens", "masked-LM loss, nats per masked token"),
                    "encoder-decoder": ("spans behind sentinels", "span loss, nats per target token")}
OWN_LOSS, OWN_BITS = "best val loss, own objective †", "val bits/predicted token †"
COLUMNS = ("run", "architecture", "trained to predict", "parameters", "tokens seen", "wall time (s)", "tokens/s",
           "best val loss", "val bits/byte", OWN_LOSS, OWN_BITS, "epochs")
FOOTNOTE = ("† Not a next-token loss, so ranked against nothing: an encoder's masked-LM loss is in nats per masked "
            "token (15% of each window hidden, each predicted from both sides), an encoder-decoder's span loss in nats "
            "per target token (the spans hidden behind sentinels, sentinels included), a fine-tuning run's loss is its "
            "task's. Each answers another question than the next token given the tokens before it, on other tokens. "
            "Bits per predicted token: the final evaluation's loss / ln 2.")


def objective(arch: str, task: str | None) -> tuple[str, str | None]:
    """(what a run is trained to predict, the unit of its loss when it is not a next-token loss, else None)."""
    if task is not None:
        return f"the {task} task", f"{task} task loss"
    return OTHER_OBJECTIVES.get(arch, (NEXT_TOKEN, None))


def summarize(run: Path) -> dict:
    """One row of the table, from the run's log."""
    log_path = run / "log.jsonl"
    if not log_path.is_file():
        raise UserError(f"{run} is not a run directory (no log.jsonl); compare takes run directories")
    log = read_log(log_path)
    evals = last_per_step(log.evals)
    if not log.starts or log.end is None or not evals:
        raise UserError(f"{run} has not finished training (its log has no end record or no evaluation); "
                        "compare finished runs")
    start, end = log.starts[-1], log.end
    final = evals[-1]
    predicts, other_loss = objective(start.arch, start.task)
    best = min(record.val_loss for record in log.evals)
    next_token = other_loss is None
    return {"run": run.name, "architecture": start.arch, "trained to predict": predicts, "other loss": other_loss,
            "parameters": start.params, "tokens seen": end.tokens, "wall time (s)": end.elapsed,
            "tokens/s": end.tokens / end.elapsed if end.elapsed > 0 else math.nan,
            "best val loss": best if next_token else None, "val bits/byte": final.val_bpb if next_token else None,
            OWN_LOSS: None if next_token else best, OWN_BITS: None if next_token else final.val_loss / math.log(2),
            "epochs": end.tokens / start.train_tokens, "evals": evals, "vocab_size": read_config(run).model.vocab_size}


def markdown_table(rows: list[dict]) -> str:
    formats = {"parameters": "{:,}", "tokens seen": "{:,}", "wall time (s)": "{:.1f}", "tokens/s": "{:,.0f}",
               "best val loss": "{:.4f}", "val bits/byte": "{:.4f}", OWN_LOSS: "{:.4f}", OWN_BITS: "{:.4f}",
               "epochs": "{:.2f}"}
    others = any(row["other loss"] for row in rows)
    columns = COLUMNS if others else tuple(key for key in COLUMNS if key not in (OWN_LOSS, OWN_BITS))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        # A loss column that is not this row's objective says so (-), apart from a measure the run lacks (n/a).
        foreign = {"best val loss", "val bits/byte"} if row["other loss"] else {OWN_LOSS, OWN_BITS}
        cells = [("-" if key in foreign else "n/a") if row[key] is None else formats.get(key, "{}").format(row[key])
                 for key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# What compare writes into its directory: all that --overwrite may replace there.
COMPARE_FILES = ("compare.md", "val_loss_vs_tokens.png", "val_loss_vs_time.png", ".*.tmp")


def compare(runs: list[str | Path], out: str | Path, overwrite: bool = False) -> Path:
    """Write OUT/compare.md (the table: next-token runs sorted by val bits per byte, else loss; then the runs of
    other objectives, in the order given) and the two curve PNGs."""
    if not runs:
        raise UserError("compare needs at least one run directory")
    rows = [summarize(Path(run)) for run in runs]
    names = [row["run"] for row in rows]
    if len(set(names)) != len(names):
        rows = [dict(row, run=str(Path(run))) for row, run in zip(rows, runs, strict=True)]
    ranked = sorted((row for row in rows if row["other loss"] is None),
                    key=lambda row: (row["val bits/byte"] is None, row["val bits/byte"] or row["best val loss"]))
    rows = ranked + [row for row in rows if row["other loss"] is not None]
    out = Path(out)
    check_output(out, overwrite, directory=True, owned=COMPARE_FILES, inputs=runs)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    # Tokens on a log axis: at equal time a bigram sees a hundred times the tokens a transformer does.
    for name, x_key, label, log in (("val_loss_vs_tokens.png", "tokens", "tokens seen", True),
                                    ("val_loss_vs_time.png", "elapsed", "wall time (s)", False)):
        write_atomic(out / name, _curves(rows, x_key, label, log))
    footnote = f"\n\n{FOOTNOTE}" if any(row["other loss"] for row in rows) else ""
    text = ("# Comparison\n\n" + markdown_table(rows) + "\n\nval bits/byte: the final evaluation, on the whole "
            "validation split; best val loss: the lowest of all evaluations." + footnote + "\n\n"
            "![val loss against tokens](val_loss_vs_tokens.png)\n\n"
            "![val loss against wall time](val_loss_vs_time.png)\n")
    write_atomic(out / "compare.md", text)
    return out / "compare.md"


def _curves(rows: list[dict], x_key: str, label: str, log: bool) -> bytes:
    figure = new_figure(8, 5)
    axes = figure.subplots()
    for row in rows:
        during = [r for r in row["evals"] if not r.final]  # on the first eval_tokens of the split
        # Another objective's loss is dashed and its legend names it: it is not a next-token loss.
        style, what = ("o--", f"{row['architecture']}: {row['other loss']} †") if row["other loss"] else \
            ("o-", row["architecture"])
        (line,) = axes.plot([getattr(r, x_key) for r in during], [r.val_loss for r in during], style, markersize=3,
                            label=f"{row['run']} ({what})")
        final = [r for r in row["evals"] if r.final]  # on the whole split: not the same measure
        axes.plot([getattr(r, x_key) for r in final], [r.val_loss for r in final], "*", markersize=10,
                  color=line.get_color())
    # A model that knows nothing guesses uniformly: ln V nats, where every run starts. A diverging run climbs
    # far above it and would squash the others into the bottom of the frame, so the frame stops a little above.
    uniform = max(math.log(row["vocab_size"]) for row in rows)
    axes.axhline(uniform, color="gray", linestyle="--", linewidth=1, label=f"uniform guess, ln V = {uniform:.2f}")
    highest = max((r.val_loss for row in rows for r in row["evals"] if math.isfinite(r.val_loss)), default=uniform)
    if highest > 1.15 * uniform:
        axes.set_ylim(top=1.15 * uniform)
        axes.set_title(f"Validation loss against {label} (frame cut at {1.15 * uniform:.1f}; the table has every "
                       "loss)", fontsize=10)
    else:
        axes.set_title(f"Validation loss against {label}")
    if log:
        axes.set_xscale("log")
    axes.set_xlabel(label + (" (log scale)" if log else ""))
    others = any(row["other loss"] for row in rows)
    axes.set_ylabel("val loss (nats per predicted token)" if others else "val loss (nats per token)")
    axes.xaxis.set_major_formatter(EngFormatter())
    axes.grid(alpha=0.3)
    axes.legend(title="★ final evaluation (whole validation split)" + ("\n† not a next-token loss: not comparable"
                                                                      if others else ""))
    return png_bytes(figure)
