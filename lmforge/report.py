"""`lmforge report RUN`: turn a run directory into RUN/report/report.md with PNG plots beside it.

Everything comes from what the trainer wrote (log.jsonl, config.toml, the newest checkpoint); nothing is
recomputed except one fresh sample from the checkpoint and, for a fine-tuning run, its task section: the
task's validation metrics as logged and, for classify, the confusion matrix of its best checkpoint on the
task data's test split (the val split if there is none), drawn as confusion.png. Files are written under a
temporary name and renamed, so a reader never sees half a report.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

from lmforge.errors import UserError
from lmforge.files import write_atomic, writing
from lmforge.plots import new_figure, png_bytes
from lmforge.run.log import EvalRecord, RunLog, TrainRecord, last_per_step, read_log

if TYPE_CHECKING:
    from lmforge.infer.load import LoadedRun

SAMPLES_SHOWN = 3  # the last few samples logged during training
# The fresh sample: seeded, so that writing the report twice writes the same report.
FRESH_TOKENS = 200
FRESH_TEMPERATURE = 0.8
FRESH_TOP_K = 200
FRESH_SEED = 1337
GRADIENT_WINDOWS = 8  # the validation windows whose loss gives the gradient histograms
ATTENTION_SENTENCE = "ROMEO: But soft, what light through yonder window breaks?"

def write_report(run: str | Path, attention_layer: int = -1) -> Path:
    """Write RUN/report/report.md and its plots from the run's files; return the path of report.md.
    `attention_layer`: the transformer layer whose attention maps are drawn (negative: from the last)."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    log_path = run / "log.jsonl"
    if not log_path.is_file():
        raise UserError(f"{run} has no log.jsonl; train it first (lmforge train --out {run})")
    log = read_log(log_path)
    if not log.train:
        raise UserError(f"{log_path} holds no training steps yet; train the run until it logs a step")

    out = run / "report"
    if out.is_symlink() or (out.exists() and not out.is_dir()):  # never written through or replaced
        raise UserError(f"{out} is a {'symbolic link' if out.is_symlink() else 'file'}, not the report directory "
                        "lmforge writes; move it away and run the report again")
    with writing(out):
        out.mkdir(exist_ok=True)
    train, evals = last_per_step(log.train), last_per_step(log.evals)
    plots = write_plots(train, evals, out)
    loaded = _load_once(run)
    sections = [
        f"# Training report: {run.resolve().name}",
        _summary_section(log, train, evals),
        _model_section(log),
        _task_section(run, out, log, loaded),
        _config_section(run),
        _plots_section(plots, evals),
        _samples_section(log),
        _inside_section(run, out, log, attention_layer, loaded),
        _fresh_sample_section(run, loaded),
    ]
    path = out / "report.md"
    write_atomic(path, "\n\n".join(section for section in sections if section) + "\n")
    return path


def _load_once(run: Path) -> LoadedRun | UserError:
    """The run's model, loaded once for every section that looks at it, or the UserError saying why it cannot
    be (those sections say so; the rest of the report still stands)."""
    from lmforge.infer.load import load_run

    try:
        return load_run(run, language_model=False, chat_template=True)  # a classify run's head: its confusion
    except UserError as err:
        return err


# ----- plots -----
def write_plots(train: list[TrainRecord], evals: list[EvalRecord], out: Path) -> dict[str, str]:
    """Write the PNG plots into `out` from per-step records; return {file name: caption}."""
    steps = [record.step for record in train]
    figures = {
        "loss.png": (_loss_figure(train, evals), "Train and validation loss against step and against tokens"),
        "lr.png": (_step_figure(steps, [r.lr for r in train], "learning rate", "Learning rate"),
                   "Learning rate against step"),
        "grad_norm.png": (_step_figure(steps, [r.grad_norm for r in train], "norm before clipping",
                                       "Gradient norm"), "Gradient norm against step"),
        "tokens_per_s.png": (_step_figure(steps, [r.tokens_per_s for r in train], "tokens/s", "Throughput",
                                          EngFormatter()), "Training tokens per second against step"),
    }
    for name, (figure, _) in figures.items():
        write_atomic(out / name, png_bytes(figure))
    return {name: caption for name, (_, caption) in figures.items()}


def _loss_figure(train: list[TrainRecord], evals: list[EvalRecord]) -> Figure:
    figure = new_figure(11, 4)
    by_step, by_tokens = figure.subplots(1, 2)
    for axes, x_key, x_label in ((by_step, "step", "step"), (by_tokens, "tokens", "tokens seen")):
        axes.plot([getattr(r, x_key) for r in train], [r.loss for r in train], linewidth=1, label="train")
        if evals:
            axes.plot([getattr(r, x_key) for r in evals], [r.val_loss for r in evals], "o-", label="validation")
        _style(axes, x_label, "loss (nats per token)",
               f"Loss against {x_key}" + ("" if evals else " (no evaluation logged)"))
        axes.legend()
    by_tokens.xaxis.set_major_formatter(EngFormatter())  # 1.2 M rather than 1200000
    return figure


def _step_figure(steps: list[int], values: list[float], y_label: str, title: str,
                 y_formatter: EngFormatter | None = None) -> Figure:
    figure = new_figure(7, 4)
    axes = figure.subplots()
    axes.plot(steps, values, linewidth=1)
    _style(axes, "step", y_label, f"{title} against step")
    if y_formatter is not None:
        axes.yaxis.set_major_formatter(y_formatter)
    return figure


def _style(axes: Axes, x_label: str, y_label: str, title: str) -> None:
    if x_label == "step":
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5 on short runs
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title)
    axes.grid(alpha=0.3)


# ----- report.md sections -----
def _summary_section(log: RunLog, train: list[TrainRecord], evals: list[EvalRecord]) -> str:
    last_train = train[-1]
    # The end record counts steps after the last logged one (log_every > 1); without it, the newest record.
    newest = log.end or max(train[-1:] + evals[-1:], key=lambda record: record.step)
    reason = log.end.reason if log.end else "none logged (still running, or stopped by a kill or a crash)"
    lines = [
        "## Summary",
        "",
        f"- **final step**: {newest.step:,}",
        f"- **tokens seen**: {newest.tokens:,}",
        f"- **elapsed**: {_duration(newest.elapsed)}",
        f"- **stop reason**: {reason}",
        f"- **last train loss**: {last_train.loss:.4f} at step {last_train.step:,}",
    ]
    if not evals:
        lines.append("- **validation**: no evaluation was logged, so there is no validation curve "
                     "(evaluations run every train.eval_every steps and once when training ends)")
        return "\n".join(lines)
    finite = [record for record in evals if math.isfinite(record.val_loss)]
    if finite:  # a diverged run logs nan
        best = min(finite, key=lambda record: record.val_loss)
        lines.append(f"- **best val loss**: {best.val_loss:.4f} at step {best.step:,}")
    final = evals[-1]
    split = "full validation split" if final.final else "validation subset used during training"
    lines.append(f"- **final val loss**: {final.val_loss:.4f} at step {final.step:,} ({split}): "
                 f"perplexity {final.val_ppl:.2f}, " + (f"{final.val_bpb:.4f} bits per byte"
                 if final.val_bpb is not None else "bits per byte unknown (no byte counts in the data)"))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _model_section(log: RunLog) -> str:
    if not log.starts:
        return "## Model\n\nlog.jsonl holds no start record, so the model's size and device are unknown."
    start = log.starts[-1]  # the latest launch: device and precision can change on resume
    lines = [
        "## Model",
        "",
        f"- **parameters**: {start.params:,} ({start.params_non_embedding:,} without embeddings)",
        f"- **FLOPs per token**: {start.flops_per_token:,} (forward and backward)",
        f"- **device**: {start.device}",
        f"- **precision**: {start.precision}",
    ]
    if len(log.starts) > 1:
        steps = [f"{record.resumed_from_step:,}" for record in log.starts[1:]]
        lines.append(f"- **launches**: {len(log.starts)} (resumed at step{'s' * (len(steps) > 1)} "
                     f"{', '.join(steps)})")
    return "\n".join(lines)


def _config_section(run: Path) -> str:
    path = run / "config.toml"
    if not path.is_file():
        return "## Config\n\nThe run has no config.toml."
    return "## Config\n\n" + _fenced(path.read_text(encoding="utf-8").rstrip("\n"), "toml")


def _plots_section(plots: dict[str, str], evals: list[EvalRecord]) -> str:
    lines = ["## Plots"]
    if not evals:
        lines += ["", "No evaluation was logged, so the loss plots show the training loss only."]
    for name, caption in plots.items():
        lines += ["", f"![{caption}]({name})"]
    return "\n".join(lines)


def _samples_section(log: RunLog) -> str:
    samples = last_per_step(log.samples)[-SAMPLES_SHOWN:]
    if not samples:
        return "## Samples during training\n\nNo samples were logged (set train.sample_every to log some)."
    lines = ["## Samples during training"]
    for sample in samples:
        prompt = sample.prompt
        origin = f"prompt {prompt!r}" if prompt else "empty prompt"
        text = sample.text or "(empty: the model ended the text at once)"
        lines += ["", f"Step {sample.step:,}, {origin}:", "", _fenced(text)]
    return "\n".join(lines)


def _fresh_sample_section(run: Path, loaded: LoadedRun | UserError) -> str:
    # Imported here: torch is needed only for this section, and only when a checkpoint exists.
    import torch

    from lmforge.infer.generate import generate
    from lmforge.run.checkpoints import list_checkpoints
    from lmforge.run.directory import read_config
    from lmforge.tasks.kinds import task_kind

    title = "## Fresh sample"
    if not list_checkpoints(run):
        return f"{title}\n\nThe run has no checkpoint, so no fresh sample."
    try:
        finetune = read_config(run).finetune
    except UserError as err:
        return f"{title}\n\nThe run's config could not be read: {err}"
    if finetune is not None and task_kind(finetune.task).labelled:
        return f"{title}\n\nA classify run predicts labels, not text, so no fresh sample (lmforge predict {run})."
    if read_config(run).model.arch == "encoder":
        return (f"{title}\n\nAn encoder fills in masked tokens from both sides and does not generate, so no fresh "
                f"sample (lmforge eval {run} --data DATA reports its masked-LM loss and pseudo-perplexity).")
    if isinstance(loaded, UserError):  # the rest of the report still stands without the sample
        return f"{title}\n\nThe newest checkpoint could not be loaded: {loaded}"
    model, tokenizer, checkpoint = loaded.model, loaded.tokenizer, loaded.checkpoint
    # An encoder-decoder's decoder writes at most its context; a decoder's window slides on.
    from_source = model.config.arch == "encoder-decoder"
    count = min(FRESH_TOKENS, model.config.block_size) if from_source else FRESH_TOKENS
    ids = list(generate(model, [tokenizer.eot_id], count, temperature=FRESH_TEMPERATURE,
                        top_k=FRESH_TOP_K, generator=torch.Generator().manual_seed(FRESH_SEED),
                        stop_token=tokenizer.eot_id))
    text = tokenizer.decode(ids) or "(empty: the model ended the text at once)"
    settings = f"temperature {FRESH_TEMPERATURE}, top-k {FRESH_TOP_K}, seed {FRESH_SEED}"
    prompt = "an empty source (end-of-text alone)" if from_source else "an empty prompt"
    return (f"{title}\n\nFrom checkpoint `{checkpoint.name}`, {prompt}, {settings}, "
            f"up to {count} tokens:\n\n{_fenced(text)}")


def _inside_section(run: Path, out: Path, log: RunLog, attention_layer: int, loaded: LoadedRun | UserError
                    ) -> str:
    """Weight and gradient histograms per layer at the newest checkpoint, and a transformer's attention maps."""
    import numpy as np
    import torch

    from lmforge.data.loader import TokenWindows, to_batch
    from lmforge.infer.evaluate import mask_windows, span_windows
    from lmforge.lab.inside import attention_png, histograms_png, layer_gradients
    from lmforge.model.masking import mask_token_id
    from lmforge.run.checkpoints import list_checkpoints

    title = "## Inside the model"
    if not list_checkpoints(run):
        return f"{title}\n\nThe run has no checkpoint, so there is nothing to look inside."
    if isinstance(loaded, UserError):
        return f"{title}\n\nThe newest checkpoint could not be loaded: {loaded}"
    model, config, tokenizer, checkpoint = loaded.model, loaded.config, loaded.tokenizer, loaded.checkpoint
    matrices = {name: p for name, p in model.named_parameters() if p.dim() >= 2}
    write_atomic(out / "weights.png", histograms_png(matrices, f"Weights per layer at {checkpoint.name}"))
    lines = [title, "", f"At checkpoint `{checkpoint.name}`: every weight matrix, its values and the gradient of "
             f"the loss on the first {GRADIENT_WINDOWS} validation windows.", "",
             "![Weight histograms per layer](weights.png)"]
    data = log.starts[-1].data if log.starts else None
    try:
        windows = TokenWindows(data, "val", config.model.block_size) if data else None
    except (UserError, OSError):
        windows = None
    if windows is None:
        lines += ["", f"No gradient histograms: the run's data directory ({data or 'not logged'}) cannot be read."]
    else:
        ids = np.arange(min(GRADIENT_WINDOWS, windows.num_windows))
        inputs, targets = to_batch(windows.gather(ids), torch.device("cpu"))
        if config.model.arch == "encoder":  # the loss it trains on: masked LM, with evaluation's fixed masks
            inputs, targets = mask_windows(inputs, ids, mask_token_id(config.model))
        elif config.model.arch == "encoder-decoder":  # span corruption, with evaluation's fixed spans
            inputs, targets = span_windows(inputs, ids, config.model)
        grads = layer_gradients(model, inputs, targets)
        write_atomic(out / "gradients.png", histograms_png(grads, f"Gradients per layer at {checkpoint.name}"))
        lines += ["", "![Gradient histograms per layer](gradients.png)"]
    if config.model.arch in ("gpt", "encoder"):  # the encoder's maps have no causal mask: every cell is filled
        n_layer = config.model.n_layer
        if not -n_layer <= attention_layer < n_layer:
            raise UserError(f"--attention-layer {attention_layer}: the model has {n_layer} layers (0 to {n_layer - 1})")
        layer = attention_layer % n_layer
        ids = tokenizer.encode(ATTENTION_SENTENCE)[: config.model.block_size]
        transformer = getattr(model, "body", model)  # a classify run's transformer is under its head
        weights = transformer.attention_maps(torch.tensor([ids]), layer)[0]
        write_atomic(out / "attention.png", attention_png(weights, [tokenizer.decode([i]) for i in ids], layer))
        lines += ["", f"Attention maps of layer {layer} for {ATTENTION_SENTENCE!r}, one image per head:", "",
                  f"![Attention maps of layer {layer}](attention.png)"]
    return "\n".join(lines)


def _task_section(run: Path, out: Path, log: RunLog, loaded: LoadedRun | UserError) -> str:
    """A fine-tuning run's task, what trained, its validation metric and, for classify, its confusion matrix
    on the held-out split; empty for a run that was not fine-tuned."""
    from lmforge.run.directory import read_config
    from lmforge.tasks.evaluate import evaluate_task
    from lmforge.tasks.kinds import task_kind
    from lmforge.tasks.records import data_file, split_files

    try:
        finetune = read_config(run).finetune
    except UserError:
        return ""
    if finetune is None:
        return ""
    kind = task_kind(finetune.task)
    lines = ["## Fine-tuning", "", f"- **task**: {finetune.task}, method {finetune.method}",
             f"- **base run**: {finetune.base_checkpoint}"]
    start = log.starts[-1] if log.starts else None
    if start is not None and start.trainable_params is not None:
        lines.append(f"- **trainable parameters**: {start.trainable_params:,} of {start.params:,} "
                     f"({start.trainable_params / start.params:.2%})")
    if log.end is not None and log.end.best_step is not None:
        lines.append(f"- **best checkpoint**: step {log.end.best_step:,} (by validation "
                     f"{kind.metric_words})")
    evals = last_per_step(log.evals)
    if evals and evals[-1].val_accuracy is not None:
        best = max(evals, key=lambda record: record.val_accuracy)
        lines.append(f"- **best val accuracy**: {best.val_accuracy:.4f} (macro F1 {best.val_macro_f1:.4f}) at "
                     f"step {best.step:,}")
    if not kind.labelled:
        return "\n".join(lines)
    data = Path(start.data) if start is not None and start.data else None
    if data is None or not data.is_dir():
        lines += ["", f"No confusion matrix: the task data ({data or 'not logged'}) cannot be read."]
        return "\n".join(lines)
    split = "test" if "test" in split_files(data) else "val"
    try:
        if isinstance(loaded, UserError):
            raise loaded
        scores = evaluate_task(loaded, kind.name, data, split=split)
    except UserError as err:
        lines += ["", f"No confusion matrix: {err}"]
        return "\n".join(lines)
    write_atomic(out / "confusion.png", _confusion_png(scores["confusion"]["labels"], scores["confusion"]["matrix"],
                                                        f"Confusion matrix on the {split} split"))
    lines += ["", f"On the {split} split ({data_file(data, split)}): accuracy {scores['accuracy']:.4f}, macro F1 "
              f"{scores['macro_f1']:.4f}; rows are the true labels, columns the predictions.", "",
              f"![Confusion matrix on the {split} split](confusion.png)"]
    return "\n".join(lines)


def _confusion_png(labels: list[str], matrix: list[list[int]], title: str) -> bytes:
    size = 2.5 + 0.6 * len(labels)
    figure = new_figure(size + 1, size)
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, label="records")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    peak = max((value for row in matrix for value in row), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axes.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    return png_bytes(figure)


def _fenced(text: str, language: str = "") -> str:
    """A code block the text cannot close early: its fence is longer than any run of backticks inside."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"
