"""Loading a run (lmforge/infer/load.py): each command resolves and reads the run once, and the best-checkpoint
rule (lmforge/run/checkpoints.py) picks the checkpoint a fine-tuning run's newest state names."""

from __future__ import annotations

import io
import json
import types
from pathlib import Path

import pytest
import torch

import lmforge.infer.load as load_module
from lmforge.cli import main
from lmforge.data.template import ChatTemplate
from lmforge.errors import UserError
from lmforge.infer.load import LoadedRun, load_run
from lmforge.run import checkpoints as run_checkpoints
from lmforge.run import directory as rundir
from lmforge.run.checkpoints import best_checkpoint, save_checkpoint
from lmforge.run.directory import checkpoint_dir
from tests.conftest import assert_one_line_error, run_cli
from tests.serve_fixtures import make_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("load") / "run")
    # A template of its own (as an sft run writes one): a command that used the default instead would show it.
    ChatTemplate(markers={"system": "S: ", "user": "Q: ", "assistant": "A: "}, turn_end="\n").save(run)
    return run


def count_loads(monkeypatch) -> types.SimpleNamespace:
    """Counters of checkpoint weight reads (the loader's one read per model) and of checkpoint listings (one
    each time a run directory is resolved to its checkpoint)."""
    counts = types.SimpleNamespace(weights=0, listings=0)
    read_weights, list_checkpoints = load_module.read_weights, run_checkpoints.list_checkpoints

    def counted_read(checkpoint: Path):
        counts.weights += 1
        return read_weights(checkpoint)

    def counted_list(run_dir: Path):
        counts.listings += 1
        return list_checkpoints(run_dir)

    monkeypatch.setattr(load_module, "read_weights", counted_read)
    monkeypatch.setattr(run_checkpoints, "list_checkpoints", counted_list)
    return counts


def test_load_run_gives_every_part_of_the_run_in_one_object(tiny_run):
    loaded = load_run(tiny_run, chat_template=True)
    assert isinstance(loaded, LoadedRun)
    assert loaded.run_dir == tiny_run and loaded.checkpoint == checkpoint_dir(tiny_run, 0)
    assert loaded.device == torch.device("cpu") and not loaded.model.training
    assert loaded.chat_template.markers["user"] == "Q: "
    assert load_run(tiny_run).chat_template is None  # read only when asked: sample and eval never need it


def test_serve_resolves_the_run_once_with_its_template_and_leaves_the_weights_to_its_engine(tiny_run, monkeypatch):
    """The server process reads the run's config, tokenizer and template; the model loads in the engine process
    only (which reads its weights once: load_run, as every command)."""
    from lmforge.serve.cli import build_app

    counts = count_loads(monkeypatch)
    app = build_app(tiny_run, device="cpu")
    assert (counts.weights, counts.listings) == (0, 1)
    assert app.state.server.template.markers["user"] == "Q: "


def test_chat_resolves_and_loads_the_run_once_with_its_template(tiny_run, monkeypatch):
    from lmforge.infer.chat import chat

    counts = count_loads(monkeypatch)
    seen: list[str] = []

    def read_line(prompt: str) -> str:
        if seen:
            raise EOFError
        seen.append(prompt)
        return "hi"

    out = io.StringIO()
    chat(tiny_run, max_new_tokens=2, device="cpu", read_line=read_line, out=out)
    assert (counts.weights, counts.listings) == (1, 1)
    assert str(checkpoint_dir(tiny_run, 0)) in out.getvalue()


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory, tiny_run) -> Path:
    """A classify run fine-tuned (one step) from the tiny run, through the command line."""
    root = tmp_path_factory.mktemp("classify")
    (root / "data").mkdir()
    for split in ("train", "val"):
        (root / "data" / f"{split}.jsonl").write_text("".join(
            json.dumps({"text": f"the {word} sat", "label": word}) + "\n" for word in ["cat", "dog"] * 3))
    assert main(["finetune", str(tiny_run), "--task", "classify", "--data", str(root / "data"), "--out",
                 str(root / "run"), "--max-steps", "1", "--train.eval_every", "1", "--train.device", "cpu",
                 "--quiet"]) == 0
    return root / "run"


def test_a_classify_run_is_refused_where_text_is_needed_by_the_same_line(classify_run, capsys):
    code, _, err = run_cli(capsys, "sample", classify_run, "--device", "cpu")
    assert_one_line_error(code, err, f"{classify_run} was fine-tuned for classify: it predicts labels (lmforge "
                          f"predict {classify_run} --text ...), not next tokens")
    assert load_run(classify_run, language_model=False).model.labels == ["cat", "dog"]


def test_the_report_of_a_classify_run_loads_it_once_for_every_section(classify_run, monkeypatch):
    from lmforge.report import write_report

    counts = count_loads(monkeypatch)
    text = write_report(classify_run).read_text()
    assert counts.weights == 1
    assert "![Confusion matrix on the val split](confusion.png)" in text  # the task section's model
    assert "![Weight histograms per layer](weights.png)" in text  # the inside section's


# ----- the best-checkpoint rule (lmforge/run/checkpoints.py) -----
def fine_tuning_checkpoints(run: Path, steps: list[int], best_step: int | None) -> Path:
    """Checkpoints at `steps`, the newest recording `best_step` as a fine-tuning run's progress does."""
    weights = {"w": torch.zeros(1)}
    for step in steps:
        progress = {"step": step} if best_step is None else {"step": step, "best_step": best_step}
        save_checkpoint(run, step, weights, [], {"progress": progress})
    return run


def test_best_checkpoint_is_the_one_the_newest_state_names(tmp_path):
    run = fine_tuning_checkpoints(tmp_path / "run", [2, 4, 6], best_step=4)
    assert best_checkpoint(run) == checkpoint_dir(run, 4)


def test_best_checkpoint_is_the_newest_when_none_is_named_or_the_named_one_is_gone(tmp_path):
    assert best_checkpoint(fine_tuning_checkpoints(tmp_path / "none", [2, 4], None)) == checkpoint_dir(
        tmp_path / "none", 4)
    pruned = fine_tuning_checkpoints(tmp_path / "pruned", [6], best_step=2)  # step 2 was pruned
    assert best_checkpoint(pruned) == checkpoint_dir(pruned, 6)


def test_best_checkpoint_of_no_or_an_unreadable_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        best_checkpoint(tmp_path / "empty")
    run = fine_tuning_checkpoints(tmp_path / "run", [2], best_step=2)
    (checkpoint_dir(run, 2) / rundir.STATE_FILE).write_text("{half")
    with pytest.raises(UserError, match="step_0000002 is unreadable"):
        best_checkpoint(run)
