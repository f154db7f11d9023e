"""Hostile input and faults in training, resume, sampling and evaluation: each ends in one line on stderr and
exit 2 (or, for a signal, a checkpoint and exit 130/143), and nothing already saved changes. One test (often
parametrized) per class of fault; failed writes, output paths, hostile source files and the sweep's errors
are in test_hardening_io.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lmforge.cli import main
from tests.conftest import (
    PATIENCE,
    assert_one_line_error,
    checksums,
    child_cli,
    prepare_and_train,
    records,
    run_cli,
    start_child_cli,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_corpus) -> SimpleNamespace:
    """A prepared data directory, a config file and a finished 20-step run with checkpoints at 10 and 20."""
    return prepare_and_train(tmp_path_factory.mktemp("hardening"), tiny_corpus)


def copy_run(base, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base.run, run)
    return run


def train_argv(base, out: Path, *extra) -> list:
    return ["train", "--config", base.config, "--data", base.data, "--out", out, "--quiet", *extra]


# ---- 1 and 5: a signal at any moment ends with a checkpoint and the signal's exit code ----


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_training_saves_a_checkpoint_and_exits_with_the_signals_code(base, tmp_path, signum, code):
    out = tmp_path / "run"
    process = start_child_cli(*train_argv(base, out, "--max-steps", "1000000", "--train.checkpoint_every", "0"))
    deadline = time.monotonic() + PATIENCE
    while not (out / "log.jsonl").is_file() or '"kind": "train"' not in (out / "log.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=PATIENCE)
    returncode = process.returncode
    assert returncode == code, err
    assert list((out / "checkpoints").iterdir()), "no checkpoint after a clean stop"
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["reason"] == "interrupted"


def test_a_signal_during_the_final_evaluation_still_saves_a_checkpoint(base, tmp_path, capsys, monkeypatch):
    """Fault injection: SIGTERM arrives while the final whole-split evaluation runs, after the loop ended."""
    import lmforge.train.language as language_module

    evaluate = language_module.evaluate

    def evaluate_then_signal(*args, **kwargs):
        if kwargs.get("max_windows") is None:  # the final evaluation reads the whole split
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    def unhandled(signum, frame):  # reached only if the trainer let go of the signal: fail, don't kill pytest
        raise AssertionError("SIGTERM reached the default handler: the trainer was not listening")

    monkeypatch.setattr(language_module, "evaluate", evaluate_then_signal)
    out = tmp_path / "run"
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        code, _, err = run_cli(capsys, *train_argv(base, out, "--train.checkpoint_every", "0"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143, err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000020"]


# ---- 2: resume refuses another tokenizer or architecture, and never rewrites the run's model config ----


def other_tokenizer_data(base) -> Path:
    """The same documents in capitals: another character vocabulary, hence other ids for the same letters."""
    out = base.root / "upper-data"
    if not out.exists():
        corpus = base.root / "upper"
        corpus.mkdir()
        for document in base.corpus.iterdir():
            (corpus / document.name).write_text(document.read_text().upper())
        assert main(["prepare", "--source", str(corpus), "--tokenizer", "char", "--val-fraction", "0.2",
                     "--workers", "1", "--out", str(out), "--quiet"]) == 0
    return out


RESUME_MISMATCHES = {
    "other tokenizer": (lambda b: ["--data", other_tokenizer_data(b)], "tokenizer"),
    "other mlp": (lambda b: ["--data", b.data, "--model.mlp", "relu2"], "model.mlp"),
    "other width": (lambda b: ["--data", b.data, "--model.n_embd", "32"], "model.n_embd"),
    "other arch": (lambda b: ["--data", b.data, "--model.arch", "lstm"], "model.arch"),
}


@pytest.mark.parametrize("case", RESUME_MISMATCHES)
def test_resume_refuses_another_tokenizer_or_model(case, base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    before = checksums(run)
    extra, fragment = RESUME_MISMATCHES[case]
    code, _, err = run_cli(capsys, "train", "--resume", "--out", run, "--max-steps", "30", "--quiet", *extra(base))
    assert_one_line_error(code, err, fragment)
    assert checksums(run) == before


# ---- 3: --overwrite removes only what lmforge wrote ----


@pytest.mark.parametrize("place", ["report", "checkpoints", "checkpoints/step_0000010"])
def test_train_overwrite_refuses_a_run_holding_files_lmforge_did_not_write(base, tmp_path, capsys, place):
    run = copy_run(base, tmp_path)
    (run / place).mkdir(exist_ok=True)
    (run / place / "notes.txt").write_text("mine")
    before = checksums(run)
    code, _, err = run_cli(capsys, *train_argv(base, run, "--overwrite"))
    assert_one_line_error(code, err, "notes.txt")
    assert checksums(run) == before


def test_train_overwrite_replaces_the_run_and_leaves_files_beside_it(base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    (run / "notes.txt").write_text("mine")
    assert run_cli(capsys, *train_argv(base, run, "--overwrite", "--max-steps", "5"))[0] == 0
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000005"]
    assert (run / "notes.txt").read_text() == "mine"


# ---- 4: one writer per run ----


def test_a_second_writer_on_a_run_is_refused_naming_the_holder(base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    first = start_child_cli("train", "--resume", "--out", run, "--data", base.data, "--quiet", "--max-steps",
                           "1000000", "--train.checkpoint_every", "0")
    deadline = time.monotonic() + PATIENCE
    while len((run / "log.jsonl").read_text().splitlines()) <= len((base.run / "log.jsonl").read_text().splitlines()):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    try:
        log_before = (run / "log.jsonl").read_text()
        code, _, err = run_cli(capsys, "train", "--resume", "--out", run, "--data", base.data, "--quiet")
        assert_one_line_error(code, err, str(first.pid))
        assert (run / "log.jsonl").read_text().startswith(log_before)  # the holder's log is untouched
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=PATIENCE)
    assert first.returncode == 143


# ---- 6: every config value is checked, type and range, when the config is loaded ----

BAD_VALUES = [
    ("--optim.lr", "-1"), ("--optim.lr", "nan"), ("--optim.lr", "inf"), ("--optim.beta1", "1.5"),
    ("--optim.weight_decay", "-1"), ("--model.mlp_hidden", "-1"), ("--train.seed", str(2**64)),
    ("--train.warmup_steps", "-5"), ("--max-time", "-5"), ("--train.batch_size", "0"), ("--model.dropout", "1"),
    ("--model.n_layer", "2.5"), ("--train.max_epochs", "-1"), ("--train.grad_clip", "-1"),
]


@pytest.mark.parametrize("flag, value", BAD_VALUES)
def test_out_of_range_values_are_refused_before_anything_is_written(flag, value, base, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_argv(base, out, flag, value))
    assert_one_line_error(code, err, flag.lstrip("-").replace("max-time", "max_time"))
    assert not out.exists()


def test_a_toml_boolean_is_not_an_integer(base, tmp_path, capsys):
    config = tmp_path / "bool.toml"
    config.write_text("[model]\nn_layer = true\n")
    code, _, err = run_cli(capsys, "train", "--config", config, "--data", base.data, "--out", tmp_path / "r")
    assert_one_line_error(code, err, "model.n_layer")


def test_bench_refuses_a_zero_batch(capsys):
    code, _, err = run_cli(capsys, "bench", "--train.batch_size", "0", "--steps", "1")
    assert_one_line_error(code, err, "train.batch_size")


# ---- 7: sampling and evaluation arguments ----

BAD_SAMPLING = [
    ("--top-k", "0"), ("--top-p", "0"), ("--top-p", "1.5"), ("--temperature", "nan"),
    ("--max-new-tokens", "-5"), ("--num-samples", "0"),
]


@pytest.mark.parametrize("flag, value", BAD_SAMPLING)
def test_bad_sampling_arguments(flag, value, base, capsys):
    code, _, err = run_cli(capsys, "sample", base.run, "--prompt", "the", "--device", "cpu", flag, value)
    assert_one_line_error(code, err, flag)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_bad_eval_batch_size(value, base, capsys):
    code, _, err = run_cli(capsys, "eval", base.run, "--data", base.data, "--device", "cpu", "--batch-size", value)
    assert_one_line_error(code, err, "--batch-size")


def test_a_prompt_character_outside_the_vocabulary_is_named(base, capsys):
    code, _, err = run_cli(capsys, "sample", base.run, "--prompt", "the Ωmega", "--device", "cpu")
    assert_one_line_error(code, err, "'Ω'")
    code, out, err = run_cli(capsys, "sample", base.run, "--prompt", "the Ωmega", "--device", "cpu",
                             "--allow-unknown", "--max-new-tokens", "5")
    assert code == 0 and "Ω" in err


# ---- 8: token ids beyond the model's vocabulary ----


def test_a_shard_with_ids_beyond_the_vocabulary_is_refused_with_the_numbers(base, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(base.data, data)
    shard = data / "val_000000.bin"
    tokens = np.memmap(shard, dtype="<u2", mode="r+", offset=1024)
    tokens[3] = 999
    tokens.flush()
    del tokens
    code, _, err = run_cli(capsys, "eval", base.run, "--data", data, "--device", "cpu")
    assert_one_line_error(code, err, "999")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--init-from", base.run, "--data", data, "--out", out, "--quiet")
    assert_one_line_error(code, err, "999")
    assert not out.exists()


# ---- 9: I/O errors (a file-size limit fails writes as a full disk does) ----


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_ones_and_leaves_no_temporary(base, tmp_path):
    run = copy_run(base, tmp_path)
    before = checksums(run / "checkpoints")
    code, _, err = child_cli("train", "--resume", "--out", run, "--data", base.data, "--quiet", "--max-steps", "30",
                             file_size_limit=4096)
    assert_one_line_error(code, err, "could not write")
    assert checksums(run / "checkpoints") == before
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]


# ---- 11: leftovers of an interrupted swap are cleaned at start ----


def test_resume_repairs_what_an_interrupted_checkpoint_swap_left(base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    checkpoints = run / "checkpoints"
    os.replace(checkpoints / "step_0000020", checkpoints / ".old-step_0000020")  # killed between the two renames
    shutil.copytree(checkpoints / "step_0000010", checkpoints / ".tmp-step_0000020")
    shutil.copytree(checkpoints / "step_0000010", checkpoints / ".old-step_0000010")  # killed before the delete
    code, out, err = run_cli(capsys, "train", "--resume", "--out", run, "--data", base.data, "--max-steps", "25")
    assert code == 0, err
    assert "restored" in out and ".old-step_0000010" in out
    assert records(run, "start")[-1]["resumed_from_step"] == 20  # the swapped-out checkpoint was put back
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]


# ---- 12: hostile files ----


def hostile(base, tmp_path: Path, case: str) -> list:
    if case == "non-utf8 config":
        config = tmp_path / "latin1.toml"
        config.write_bytes("[model]\n# caf\xe9\nn_layer = 1\n".encode("latin-1"))
        return ["train", "--config", config, "--data", base.data, "--out", tmp_path / "r"]
    if case == "empty state.json":
        run = copy_run(base, tmp_path)
        for checkpoint in (run / "checkpoints").iterdir():
            (checkpoint / "state.json").write_text("{}")
        return ["train", "--resume", "--out", run, "--data", base.data]
    if case in ("empty meta.json eval", "empty meta.json train"):
        data = tmp_path / "data"
        shutil.copytree(base.data, data)
        (data / "meta.json").write_text("{}")
        if case.endswith("eval"):
            return ["eval", base.run, "--data", data, "--device", "cpu"]
        return train_argv(base, tmp_path / "r", "--data", data)
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["non-utf8 config", "empty state.json", "empty meta.json eval",
                                  "empty meta.json train"])
def test_hostile_files_are_refused_in_one_line(case, base, tmp_path, capsys):
    code, _, err = run_cli(capsys, *hostile(base, tmp_path, case))
    assert_one_line_error(code, err)


# ---- 14: messages that say what is true ----


def test_an_unknown_key_suggests_the_key_in_any_section(base, tmp_path, capsys):
    code, _, err = run_cli(capsys, *train_argv(base, tmp_path / "r", "--train.n_layer", "2"))
    assert_one_line_error(code, err, "'model.n_layer'")


def test_resume_with_no_run_says_so(base, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", "--out", tmp_path / "nothing", "--data", base.data)
    assert_one_line_error(code, err, "no run to resume")


def test_resume_falls_back_from_a_corrupt_newest_checkpoint_saying_so(base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    (run / "checkpoints" / "step_0000020" / "model.safetensors").write_bytes(b"garbage")
    code, out, err = run_cli(capsys, "train", "--resume", "--out", run, "--data", base.data, "--max-steps", "25")
    assert code == 0, err
    assert "step_0000020" in out + err and "step_0000010" in out + err


def test_the_scratch_engine_names_the_architecture(base, tmp_path, capsys):
    run = tmp_path / "lstm"
    assert run_cli(capsys, *train_argv(base, run, "--model.arch", "lstm", "--max-steps", "2"))[0] == 0
    code, _, err = run_cli(capsys, "sample", run, "--engine", "scratch", "--max-new-tokens", "2")
    assert_one_line_error(code, err, "lstm")


def test_a_failed_start_leaves_nothing_that_needs_overwrite(base, tmp_path, capsys, monkeypatch):
    """A crash after the run directory was created (here: the first step raises) removes what the start wrote,
    so the corrected command runs without --overwrite."""
    import lmforge.train.engine as engine_module
    from lmforge.errors import UserError

    def fail(*args, **kwargs):
        raise UserError("injected failure at the first step")

    monkeypatch.setattr(engine_module.TorchEngine, "step", fail)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_argv(base, out))
    assert_one_line_error(code, err, "injected")
    monkeypatch.undo()
    assert run_cli(capsys, *train_argv(base, out, "--max-steps", "2"))[0] == 0


def test_finetuning_stops_on_a_signal_with_a_checkpoint_and_holds_its_run_against_a_second_writer(base, tmp_path,
                                                                                                   capsys):
    data = tmp_path / "genre"
    data.mkdir()
    for split in ("train", "val"):
        lines = [json.dumps({"text": f"the cat sat {i}", "label": "a" if i % 2 else "b"}) for i in range(12)]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "classify"
    child = start_child_cli("finetune", base.run, "--task", "classify", "--data", data, "--out", out, "--quiet",
                            "--max-steps", "1000000", "--train.eval_every", "1000000")
    deadline = time.monotonic() + PATIENCE
    while not (out / "log.jsonl").is_file() or '"kind": "train"' not in (out / "log.jsonl").read_text():
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.05)
    code, _, err = run_cli(capsys, "finetune", base.run, "--task", "classify", "--data", data, "--out", out,
                           "--overwrite")
    assert_one_line_error(code, err, str(child.pid))
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=PATIENCE)
    assert child.returncode == 143, err
    assert list((out / "checkpoints").iterdir()), "no checkpoint after a clean stop"
