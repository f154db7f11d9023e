"""`lmforge report`: report.md and plots from a real tiny run, resumed logs, and the errors a user meets."""

from __future__ import annotations

import json
import random
import re
import struct
from pathlib import Path

import pytest

import lmforge.report as report_module
from lmforge.cli import main
from lmforge.config.load import load_config
from lmforge.data.prepare import prepare
from lmforge.errors import UserError
from lmforge.report import last_per_step, read_log, write_report
from lmforge.run.log import TrainRecord
from lmforge.train.trainer import Trainer
from tests.conftest import assert_picture, records

PLOTS = ("loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png")
CHECKPOINT_PLOTS = ("weights.png", "gradients.png", "attention.png")  # drawn from the newest checkpoint
OVERRIDES = {"model.n_layer": "1", "model.n_head": "2", "model.n_embd": "16", "model.block_size": "16",
             "train.batch_size": "4", "train.max_steps": "20", "train.eval_every": "10",
             "train.log_every": "1", "train.warmup_steps": "2", "train.checkpoint_every": "10",
             "train.sample_every": "10", "train.sample_tokens": "20", "train.device": "cpu",
             "train.compile": "false"}
TOPICS = {
    "sea": "the tide rolls over grey stones while gulls cry above the harbour wall",
    "kitchen": "bread rises slowly in a warm oven; salt, flour and water make a loaf",
    "numbers": "one two three, 4 5 6; seven plus eight is fifteen and 9 x 9 = 81",
    "letters": "Dear Ann, the parcel came on Tuesday! Thank you. Yours, Tom.",
    "code": "def add(a, b):\n    return a + b  # `add` sums two numbers",
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real 20-step run with evaluations, samples and checkpoints at steps 10 and 20."""
    root = tmp_path_factory.mktemp("report")
    rng = random.Random(0)
    (root / "text").mkdir()
    for index in range(12):  # several documents of varied text, a few KB in all
        topic = rng.choice(sorted(TOPICS))
        lines = [" ".join(rng.sample(TOPICS[topic].split(" "), 8)) for _ in range(6)]
        (root / "text" / f"{index:02d}-{topic}.txt").write_text("\n".join(lines) + "\n")
    prepare([str(root / "text")], root / "data", "char", val_fraction=0.2, workers=1, quiet=True)
    Trainer(load_config(None, OVERRIDES), root / "data", root / "run", quiet=True).run()
    return root / "run"


@pytest.fixture(scope="module")
def report(trained_run) -> Path:
    return write_report(trained_run)


def test_every_plot_is_a_png_that_report_md_embeds_by_relative_path(trained_run, report):
    assert report == trained_run / "report" / "report.md"
    for name in PLOTS + CHECKPOINT_PLOTS:
        assert_picture(report.parent / name)  # decodes, drawn curves and labels, not an empty canvas
    widths = {name: struct.unpack(">I", (report.parent / name).read_bytes()[16:20])[0] for name in PLOTS}
    assert widths["loss.png"] > widths["lr.png"]  # two panels side by side
    embedded = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", report.read_text())
    # relative to report.md, so the report folder can move
    assert sorted(embedded) == sorted(PLOTS + CHECKPOINT_PLOTS)
    assert not [p.name for p in report.parent.iterdir() if p.name.startswith(".")]


def test_summary_and_model_match_the_log(trained_run, report):
    log = records(trained_run)
    start = next(r for r in log if r["kind"] == "start")
    end = [r for r in log if r["kind"] == "end"][-1]
    evals = [r for r in log if r["kind"] == "eval"]
    best = min(evals, key=lambda r: r["val_loss"])
    final = evals[-1]
    assert final["final"] and end["step"] == 20  # the run is what the test thinks it is
    text = report.read_text()
    assert text.startswith(f"# Training report: {trained_run.name}\n")
    assert f"**final step**: {end['step']}\n" in text
    assert f"**tokens seen**: {end['tokens']:,}\n" in text
    assert f"**stop reason**: {end['reason']}\n" in text
    assert f"**best val loss**: {best['val_loss']:.4f} at step {best['step']}\n" in text
    assert (f"**final val loss**: {final['val_loss']:.4f} at step {final['step']} (full validation split): "
            f"perplexity {final['val_ppl']:.2f}, {final['val_bpb']:.4f} bits per byte") in text
    params = f"{start['params']:,} ({start['params_non_embedding']:,} without embeddings)"
    assert f"**parameters**: {params}\n" in text
    assert f"**FLOPs per token**: {start['flops_per_token']:,}" in text
    assert "**device**: cpu\n" in text


def test_config_samples_and_a_fresh_sample_are_embedded(trained_run, report):
    text = report.read_text()
    config = (trained_run / "config.toml").read_text().rstrip("\n")
    assert f"```toml\n{config}\n```" in text
    samples = records(trained_run, "sample")
    assert [r["step"] for r in samples] == [10, 20]
    for sample in samples:
        assert f"Step {sample['step']}, empty prompt:\n\n```\n{sample['text']}\n```" in text
    newest = sorted(p.name for p in (trained_run / "checkpoints").iterdir())[-1]
    assert f"From checkpoint `{newest}`" in text
    fresh = text.split("## Fresh sample", 1)[1]
    assert re.search(r"tokens:\n\n```\n.+\n```\n$", fresh, re.DOTALL)


def test_writing_the_report_again_writes_the_same_report(trained_run, report):
    before = report.read_text()
    assert write_report(trained_run).read_text() == before  # the fresh sample is seeded


def test_the_report_reads_the_checkpoint_once_for_every_section_that_looks_inside(trained_run, monkeypatch):
    import lmforge.infer.load as load_module

    reads = []
    read_weights = load_module.read_weights
    monkeypatch.setattr(load_module, "read_weights", lambda checkpoint: reads.append(checkpoint) or
                        read_weights(checkpoint))
    text = write_report(trained_run).read_text()
    assert reads == [trained_run / "checkpoints" / "step_0000020"]
    assert "From checkpoint `step_0000020`" in text and "At checkpoint `step_0000020`" in text


def test_last_per_step_keeps_the_last_record_of_each_step_in_step_order():
    def record(step: int, loss: float) -> TrainRecord:
        return TrainRecord(step=step, loss=loss, lr=1e-3, grad_norm=1.0, tokens=64 * step, tokens_per_s=1.0,
                           elapsed=0.5 * step)

    logged = [record(1, 5.0), record(2, 4.0), record(3, 3.0), record(2, 4.5), record(3, 3.5), record(4, 3.2)]
    assert [(r.step, r.loss) for r in last_per_step(logged)] == [(1, 5.0), (2, 4.5), (3, 3.5), (4, 3.2)]
    assert [r.step for r in last_per_step(list(reversed(logged)))] == [1, 2, 3, 4]


# ----- hand-written logs -----
def start(resumed_from_step: int = 0) -> dict:
    return {"kind": "start", "time": 0.0, "params": 1000, "params_non_embedding": 800,
            "flops_per_token": 6000, "train_tokens": 10_000, "val_tokens": 1000, "tokens_per_step": 64,
            "iters_per_epoch": 156.25, "device": "cpu", "precision": "fp32", "world_size": 1,
            "resumed_from_step": resumed_from_step}


def train(step: int, loss: float) -> dict:
    return {"kind": "train", "step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens": 64 * step,
            "tokens_per_s": 1000.0, "epoch": 0.0, "mfu": 0.0, "elapsed": 0.5 * step}


def end(step: int, reason: str = "max_steps") -> dict:
    return {"kind": "end", "step": step, "tokens": 64 * step, "elapsed": 0.5 * step, "reason": reason}


def make_run(directory: Path, lines: list[dict | str | bytes]) -> Path:
    directory.mkdir()
    encoded = [line if isinstance(line, bytes) else
               (line if isinstance(line, str) else json.dumps(line)).encode() for line in lines]
    (directory / "log.jsonl").write_bytes(b"".join(line + b"\n" for line in encoded))
    return directory


def test_a_resumed_run_is_plotted_from_the_last_record_of_each_step(tmp_path, monkeypatch):
    # Interrupted after logging step 4 with the newest checkpoint at step 2, then resumed from step 2.
    final_eval = {"kind": "eval", "step": 5, "tokens": 320, "val_loss": 3.6, "val_ppl": 36.6, "val_bpb": 5.2,
                  "elapsed": 2.5, "final": True}
    run = make_run(tmp_path / "run", [start(), train(1, 5.0), train(2, 4.0), train(3, 3.9), train(4, 3.8),
                                      start(resumed_from_step=2), train(3, 3.5), train(4, 3.4), train(5, 3.3),
                                      final_eval, end(5)])
    plotted = {}
    original = report_module.write_plots

    def spy(train_records, eval_records, out):
        plotted["train"] = [(r.step, r.loss) for r in train_records]
        return original(train_records, eval_records, out)

    monkeypatch.setattr(report_module, "write_plots", spy)
    text = write_report(run).read_text()
    assert plotted["train"] == [(1, 5.0), (2, 4.0), (3, 3.5), (4, 3.4), (5, 3.3)]
    assert "**final step**: 5\n" in text
    assert "**launches**: 2 (resumed at step 2)" in text
    assert "**last train loss**: 3.3000 at step 5" in text
    assert "The run has no checkpoint, so no fresh sample." in text


def test_the_end_of_an_earlier_launch_does_not_describe_a_resumed_run(tmp_path):
    run = make_run(tmp_path / "run", [start(), train(1, 5.0), end(1, "interrupted"), start(1), train(2, 4.0)])
    assert read_log(run / "log.jsonl").end is None
    text = write_report(run).read_text()
    assert "**final step**: 2\n" in text
    assert "**stop reason**: none logged" in text


def test_a_run_without_evaluations_still_gets_a_report_that_says_so(tmp_path):
    run = make_run(tmp_path / "run", [start(), train(1, 5.0), train(2, 4.0), end(2)])
    path = write_report(run)
    text = path.read_text()
    assert "no evaluation was logged, so there is no validation curve" in text
    assert "best val loss" not in text and "final val loss" not in text
    for name in PLOTS:
        assert_picture(path.parent / name)


@pytest.mark.parametrize("lines, message", [
    ([start()], "no training steps"),
    ([start(), train(1, 5.0), '{"kind": "train", "step": 2, "lo'], "line 3 of the log is not valid JSON"),
    ([start(), b'{"kind": "train", "text": "\xff"}'], "line 2 of the log is not UTF-8"),
    ([start(), "[1, 2]"], "line 2 of the log is not a record"),
    ([start(), {k: v for k, v in train(1, 5.0).items() if k != "loss"}],
     "line 2 of the log: the train record lacks loss"),
])
def test_a_bad_log_raises_a_user_error_naming_the_problem(tmp_path, lines, message):
    run = make_run(tmp_path / "run", lines)
    with pytest.raises(UserError, match=re.escape(message)):
        write_report(run)


def test_an_unfinished_last_line_is_skipped_as_one_being_written(tmp_path):
    run = make_run(tmp_path / "run", [start(), train(1, 5.0), train(2, 4.0)])
    with open(run / "log.jsonl", "a") as log:
        log.write('{"kind": "train", "step": 3, "lo')  # no newline: the trainer is mid-write
    assert [r.step for r in read_log(run / "log.jsonl").train] == [1, 2]
    assert "**final step**: 2\n" in write_report(run).read_text()


def test_a_missing_run_or_log_raises_a_user_error(tmp_path):
    with pytest.raises(UserError, match="run directory not found"):
        write_report(tmp_path / "missing")
    (tmp_path / "untrained").mkdir()
    with pytest.raises(UserError, match="has no log.jsonl; train it first"):
        write_report(tmp_path / "untrained")


def test_the_cli_prints_one_line_and_exits_2_on_a_missing_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("lmforge report: error: run directory not found")


def test_the_cli_prints_where_the_report_is(tmp_path, capsys):
    run = make_run(tmp_path / "run", [start(), train(1, 5.0), end(1)])
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out == f"report written to {run / 'report' / 'report.md'}\n"
