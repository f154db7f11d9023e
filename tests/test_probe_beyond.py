"""Hostile input to the commands beyond the probe's list (issue 17): fifos and devices named as input, weights
that are not a model's, sizes that abort the process, SIGTERM in the middle of writing. Each must end in one
line on stderr and exit 2 (143 for SIGTERM), never hang, never leave half-written output."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    PATIENCE,
    WORDS,
    assert_one_line_error,
    checksums,
    child_cli,
    prepare_and_train,
    run_cli,
    start_child_cli,
    write_corpus,
)
from safetensors.torch import load_file, save_file

from lmforge.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A prepared char dataset and a tiny trained run (with its llm.c and Hugging Face exports)."""
    root = tmp_path_factory.mktemp("beyond")
    made = prepare_and_train(root, write_corpus(root / "docs"))
    assert main(["export", str(made.run), "--format", "llmc", "--out", str(root / "model.bin")]) == 0
    assert main(["export", str(made.run), "--format", "hf", "--out", str(root / "hf")]) == 0
    return made


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


# ----- a fifo or a device named as input: refused before it is opened (a fifo blocked the command until some
# other process wrote to it; /dev/zero and /dev/urandom were read until memory ran out) -----

def special_inputs(root: Path, tiny) -> list[tuple[list, str]]:
    """(command line, what the error must name) for each way a named file is read: prepare's sources (text,
    jsonl, --val-source), the two import formats and import's --tokenizer, a config file (train; bench, sweep
    and every run's config.toml read it through the same function) and sample's --prompt-file."""
    fifo_txt = make_fifo(root / "fifo.txt")
    zero_txt = root / "zero.txt"
    zero_txt.symlink_to("/dev/zero")
    urandom_jsonl = root / "urandom.jsonl"
    urandom_jsonl.symlink_to("/dev/urandom")
    loop = root / "loop.txt"
    loop.symlink_to(root / "loop.txt")
    hf_dir = root / "hf_fifo_config"
    hf_dir.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (hf_dir / name).write_bytes((tiny.root / "hf" / name).read_bytes())
    make_fifo(hf_dir / "config.json")
    docs, out = tiny.corpus, root / "out"
    return [
        (["prepare", "--source", fifo_txt, "--tokenizer", "char", "--out", out], "is a fifo (named pipe)"),
        (["prepare", "--source", zero_txt, "--tokenizer", "char", "--out", out], "is a character device"),
        (["prepare", "--source", urandom_jsonl, "--tokenizer", "char", "--out", out], "is a character device"),
        (["prepare", "--source", docs, "--val-source", fifo_txt, "--tokenizer", "char", "--out", out], "fifo"),
        (["prepare", "--source", loop, "--tokenizer", "char", "--out", out], "symbolic links"),
        (["import", make_fifo(root / "fifo.bin"), "--out", out], "llm.c model file"),
        (["import", hf_dir, "--out", out], "model config"),
        (["import", tiny.root / "model.bin", "--tokenizer", fifo_txt, "--out", out], "tokenizer"),
        (["train", "--config", fifo_txt, "--data", tiny.data, "--out", out], "config file"),
        (["sample", tiny.run, "--prompt-file", fifo_txt, "--device", "cpu"], "--prompt-file"),
    ]


def test_fifos_and_devices_named_as_input_are_refused(tmp_path, tiny):
    cases = special_inputs(tmp_path, tiny)
    children = [start_child_cli(*argv) for argv, _ in cases]  # at once: each takes a second or two to start
    for (argv, fragment), child in zip(cases, children, strict=True):
        _, err = child.communicate(timeout=300)  # before the fix the fifo cases never returned
        assert_one_line_error(child.returncode, err, fragment)
        assert "not a regular file" in err or "symbolic links" in err, argv
        assert not (tmp_path / "out").exists(), argv


# ----- imported weights that are not a model's: NaN or infinite (sampling failed with a torch traceback and
# eval printed NaN), or integers (a quantized checkpoint, imported as noise) -----

def llmc_with_weights(tiny, path: Path, value: float) -> Path:
    data = bytearray((tiny.root / "model.bin").read_bytes())
    assert np.frombuffer(data[:1024], dtype="<i4")[1] == 3  # fp32: parameter i is at offset 1024 + 4 * i
    struct.pack_into("<f", data, 1024 + 4 * 7, value)  # one parameter of the embedding table
    path.write_bytes(bytes(data))
    return path


def hf_with_weights(tiny, folder: Path, change) -> Path:
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((tiny.root / "hf" / name).read_bytes())
    tensors = load_file(tiny.root / "hf" / "model.safetensors")
    save_file({name: change(name, tensor) for name, tensor in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


def with_nan(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if name.endswith("ln_f.weight"):
        tensor = tensor.clone()
        tensor[0] = float("nan")
    return tensor


@pytest.mark.parametrize("make, fragment", [
    (lambda tiny, root: llmc_with_weights(tiny, root / "nan.bin", float("nan")), "NaN or infinite"),
    (lambda tiny, root: llmc_with_weights(tiny, root / "inf.bin", float("-inf")), "NaN or infinite"),
    (lambda tiny, root: hf_with_weights(tiny, root / "hf_nan", with_nan), "NaN or infinite"),
    (lambda tiny, root: hf_with_weights(tiny, root / "hf_int8", lambda _, t: t.to(torch.int8)), "int8"),
], ids=["llmc-nan", "llmc-inf", "hf-nan", "hf-int8"])
def test_import_refuses_weights_that_are_not_finite_floats(capsys, tmp_path, tiny, make, fragment):
    source = make(tiny, tmp_path)
    extra = ["--tokenizer", tiny.run] if source.suffix == ".bin" else []
    code, _, err = run_cli(capsys, "import", source, "--out", tmp_path / "imported", *extra)
    assert_one_line_error(code, err, fragment, "cannot import" if "NaN" in fragment else "floating-point")
    assert not (tmp_path / "imported").exists()


def test_import_still_takes_finite_weights(capsys, tmp_path, tiny):
    """The checks refuse only what they should: the run's own exports import."""
    assert run_cli(capsys, "import", tiny.root / "hf", "--out", tmp_path / "from_hf")[0] == 0
    assert run_cli(capsys, "import", tiny.root / "model.bin", "--tokenizer", tiny.run,
                   "--out", tmp_path / "from_llmc")[0] == 0


# ----- prepare's sizes -----

@pytest.mark.parametrize("vocab_size", [100_000_000_000, 2**20 + 1])
def test_bpe_vocab_size_beyond_the_bound_is_one_line(tmp_path, tiny, vocab_size):
    """A vocabulary in the billions aborted the process in the Rust trainer (out of memory, a Rust backtrace,
    exit 134); in a child process, because that abort would take pytest with it."""
    code, _, err = child_cli("prepare", "--source", tiny.corpus, "--tokenizer", "bpe", "--vocab-size", vocab_size,
                             "--out", tmp_path / "data", "--workers", "1")
    assert_one_line_error(code, err, "--vocab-size must be between 257", "1,048,576", str(vocab_size))
    assert not (tmp_path / "data").exists()


def test_workers_beyond_the_cores_start_no_more_processes(capsys, tmp_path, monkeypatch):
    """The process pool starts a process for each unit of work in flight, and 2 * --workers units are: the
    large --workers started one process per unit of the corpus and read it all ahead."""
    import lmforge.data.prepare as prepare_module

    pools: list[int] = []

    class RecordingPool(ThreadPoolExecutor):  # the same work, in one thread: only the size asked is recorded
        def __init__(self, max_workers, mp_context=None, initializer=None, initargs=()):
            pools.append(max_workers)
            super().__init__(1, initializer=initializer, initargs=initargs)

    monkeypatch.setattr(prepare_module, "ProcessPoolExecutor", RecordingPool)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(3):  # more than one unit of work (CHUNK_CHARS), so that the pool is used
        (corpus / f"doc{index}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(300_000)))
    code, _, err = run_cli(capsys, "prepare", "--source", corpus, "--tokenizer", "char", "--workers", 1024,
                           "--out", tmp_path / "data", "--quiet")
    assert code == 0, err
    assert pools == [2]
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["splits"]["train"]["tokens"] > 0


# ----- SIGTERM -----

def test_sigterm_during_prepare_removes_what_it_wrote(tmp_path, tiny):
    """SIGTERM killed prepare on the spot, leaving tokenizer.json and a half-written shard that a rerun then
    refused without --overwrite. Now it ends like Ctrl-C: its files removed, one line, exit 143; and a
    dataset elsewhere is untouched."""
    rng = random.Random(1)
    source = tmp_path / "big.txt"
    lines = (" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(600_000))
    source.write_text("\n".join(lines))  # about 40 MB: seconds of encoding, in which the signal lands
    before = checksums(tiny.data)
    out = tmp_path / "data"
    child = start_child_cli("prepare", "--source", source, "--tokenizer", "char", "--workers", "1", "--out", out)
    deadline = time.monotonic() + PATIENCE
    while not (out.is_dir() and any(path.name.endswith(".tmp") for path in out.iterdir())):
        assert child.poll() is None, "prepare ended before it started writing a shard"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=PATIENCE)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == ["lmforge prepare: terminated"]
    assert list(out.iterdir()) == []
    assert checksums(tiny.data) == before


# ----- a bad log line, read by a command other than report -----

def test_compare_names_the_bad_log_line_without_naming_report(capsys, tmp_path, tiny):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.toml", "tokenizer.json"):
        (run / name).write_bytes((tiny.run / name).read_bytes())
    (run / "log.jsonl").write_bytes((tiny.run / "log.jsonl").read_bytes() + b"\xff\xfe{\n")
    code, _, err = run_cli(capsys, "compare", tiny.run, run, "--out", tmp_path / "cmp")
    assert_one_line_error(code, err, "log.jsonl, line 10", "run the command again")
    assert "run the report" not in err



# ----- two writers at once -----

def test_a_second_prepare_into_the_same_out_is_refused_and_the_first_dataset_stays(tmp_path, tiny):
    """Two prepares into one --out at once lost the dataset (one said done, the directory ended empty): the
    writer holds the directory's lock, and another prepare is one line naming its PID. Here the test holds the
    lock as a first prepare would, over a dataset already written."""
    from lmforge.files import take_directory_lock

    out = tmp_path / "data"
    argv = ["prepare", "--source", tiny.corpus, "--tokenizer", "char", "--out", out, "--workers", "1", "--quiet"]
    code, _, err = child_cli(*argv)
    assert code == 0, err
    assert not (out / ".lock").exists()  # a finished prepare leaves no lock file behind
    before = checksums(out)
    lock = take_directory_lock(out, out / ".lock")
    try:
        code, _, err = child_cli(*argv, "--overwrite", "--lowercase")
    finally:
        lock.close()
    assert_one_line_error(code, err, "being written by another lmforge process", f"PID {os.getpid()}")
    (out / ".lock").unlink()
    assert checksums(out) == before
