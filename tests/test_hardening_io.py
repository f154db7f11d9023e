"""Hostile outputs and inputs of the commands that write files (issue 11, items 3, 9, 10, 12, 13): each ends in
one line on stderr and exit 2, leaves no temporary behind, and changes nothing written before. A full disk is
simulated with a file-size limit in a child process (a write past it fails with EFBIG, as one on a full disk
fails with ENOSPC), or with a patched writer."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.files import foreign_files, move_into_place, write_atomic
from tests.conftest import assert_one_line_error, checksums, child_cli, prepare_and_train, run_cli


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name or p.name.startswith(".old-")]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_corpus) -> SimpleNamespace:
    """A char data directory, a finished 10-step run, and its Hugging Face and llm.c exports."""
    base = prepare_and_train(tmp_path_factory.mktemp("hardening-io"), tiny_corpus, "--max-steps", "10")
    base.hf, base.llmc = base.root / "hf", base.root / "model.bin"
    assert main(["export", str(base.run), "--format", "hf", "--out", str(base.hf)]) == 0
    assert main(["export", str(base.run), "--format", "llmc", "--out", str(base.llmc)]) == 0
    return base


# ---- 3: --overwrite replaces only what lmforge wrote ----

OVERWRITES = {
    "export hf": lambda b, out: ["export", b.run, "--format", "hf", "--out", out, "--overwrite"],
    "import hf": lambda b, out: ["import", b.hf, "--out", out, "--overwrite"],
    "import llmc": lambda b, out: ["import", b.llmc, "--tokenizer", b.run, "--out", out, "--overwrite"],
}


@pytest.mark.parametrize("command", OVERWRITES)
def test_overwrite_refuses_a_directory_holding_files_lmforge_did_not_write(command, base, tmp_path, capsys):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "thesis.txt").write_text("years of work")
    (victim / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = checksums(victim)
    code, _, err = run_cli(capsys, *OVERWRITES[command](base, victim))
    assert_one_line_error(code, err, "thesis.txt", "sub")
    assert checksums(victim) == before
    assert not temporaries(tmp_path)


@pytest.mark.parametrize("command", OVERWRITES)
def test_overwrite_replaces_what_lmforge_wrote(command, base, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, *OVERWRITES[command](base, out))[0] == 0
    first = checksums(out)
    assert run_cli(capsys, *OVERWRITES[command](base, out))[0] == 0
    assert checksums(out) == first  # the same model written again, over its own files
    assert not temporaries(tmp_path)


def test_import_overwrite_replaces_a_trained_run_unless_it_holds_other_files(base, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base.run, run)
    (run / "report").mkdir()
    (run / "report" / "notes.txt").write_text("mine")
    before = checksums(run)
    code, _, err = run_cli(capsys, "import", base.hf, "--out", run, "--overwrite")
    assert_one_line_error(code, err, "report/notes.txt")
    assert checksums(run) == before
    (run / "report" / "notes.txt").unlink()
    (run / "report" / "report.md").write_text("# an earlier report")
    assert run_cli(capsys, "import", base.hf, "--out", run, "--overwrite")[0] == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000000"]


def test_llmc_overwrite_replaces_only_llmc_files(base, tmp_path, capsys):
    mine = tmp_path / "notes.bin"
    mine.write_text("not a model")
    code, _, err = run_cli(capsys, "export", base.run, "--format", "llmc", "--out", mine, "--overwrite")
    assert_one_line_error(code, err, "notes.bin", "llm.c")
    assert mine.read_text() == "not a model" and not (tmp_path / "notes_tokenizer.bin").exists()
    own = tmp_path / "own.bin"
    (tmp_path / "own_tokenizer.bin").write_text("mine too")
    code, _, err = run_cli(capsys, "export", base.run, "--format", "llmc", "--out", own, "--overwrite")
    assert_one_line_error(code, err, "own_tokenizer.bin")
    assert not own.exists()
    shutil.copy(base.llmc, own)
    shutil.copy(base.llmc.with_name("model_tokenizer.bin"), tmp_path / "own_tokenizer.bin")
    assert run_cli(capsys, "export", base.run, "--format", "llmc", "--out", own, "--overwrite")[0] == 0


def test_foreign_files_names_what_no_pattern_covers(tmp_path):
    for name in ("config.toml", "checkpoints/step_0000010/model.safetensors", "checkpoints/notes.txt",
                 "report/report.md", "report/mine/x.png", "empty/"):
        path = tmp_path / name
        path.mkdir(parents=True) if name.endswith("/") else (path.parent.mkdir(parents=True, exist_ok=True),
                                                            path.write_text("x"))
    owned = ("config.toml", "checkpoints/step_*/*", "report/*.md")
    assert foreign_files(tmp_path, owned) == ["checkpoints/notes.txt", "empty", "report/mine"]


# ---- 9: I/O errors: one line, the temporary deleted, earlier outputs unchanged ----

FULL_DISK = {
    "prepare char": lambda b, out: ["prepare", "--source", b.corpus, "--tokenizer", "char", "--workers", "1",
                                    "--out", out, "--quiet"],
    "prepare bpe": lambda b, out: ["prepare", "--source", b.corpus, "--tokenizer", "bpe", "--vocab-size", "300",
                                   "--workers", "1", "--out", out, "--quiet"],
    "plot": lambda b, out: ["plot", "activations", "--out", out / "a.png"],
    "compare": lambda b, out: ["compare", b.run, "--out", out],
    "export hf": lambda b, out: ["export", b.run, "--format", "hf", "--out", out],
    "export llmc": lambda b, out: ["export", b.run, "--format", "llmc", "--out", out / "m.bin"],
    "export gguf": lambda b, out: ["export", b.run, "--format", "gguf", "--out", out / "m.gguf", "--ollama"],
    "import": lambda b, out: ["import", b.hf, "--out", out],
}


@pytest.mark.parametrize("command", FULL_DISK)
def test_a_full_disk_is_one_line_and_leaves_no_temporary(command, base, tmp_path):
    out = tmp_path / "out"
    if command == "plot":
        out.mkdir()
    code, _, err = child_cli(*FULL_DISK[command](base, out), file_size_limit=2048)
    assert_one_line_error(code, err, "could not write", "File too large", "it needs")
    assert not temporaries(tmp_path)
    if command.startswith("prepare"):  # what the failed prepare wrote is gone: a rerun needs no --overwrite
        assert list(out.iterdir()) == []
        assert child_cli(*FULL_DISK[command](base, out))[0] == 0


@pytest.mark.parametrize("command", ["export hf", "import", "report"])
def test_a_full_disk_keeps_the_earlier_output_byte_for_byte(command, base, tmp_path):
    if command == "report":
        out = tmp_path / "run"
        shutil.copytree(base.run, out)
        argv = ["report", out]
    else:
        out = tmp_path / "out"
        argv = [*FULL_DISK[command](base, out), "--overwrite"]
    assert main([str(arg) for arg in argv]) == 0  # the earlier output, written in this process (faster)
    before = checksums(out)
    code, _, err = child_cli(*argv, file_size_limit=2048)
    assert_one_line_error(code, err, "could not write")
    assert checksums(out) == before
    assert not temporaries(tmp_path)


def test_a_failed_checkpoint_save_deletes_its_temporary_and_keeps_the_earlier(base, tmp_path, monkeypatch):
    from lmforge.run import checkpoints as checkpoints_module

    run = tmp_path / "run"
    shutil.copytree(base.run, run)
    before = checksums(run / "checkpoints")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints_module, "save_file", disk_full)
    with pytest.raises(UserError, match=r"could not write .*step_0000020: No space left on device; it needs"):
        checkpoints_module.save_checkpoint(run, 20, {}, [], {})
    assert checksums(run / "checkpoints") == before
    assert not temporaries(run)


def test_write_atomic_and_move_into_place_keep_the_old_file_when_the_new_one_fails(tmp_path, monkeypatch):
    path = tmp_path / "result.md"
    path.write_text("earlier")
    real_replace = os.replace

    def read_only(source, destination):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(UserError, match=r"could not write .*result.md: Read-only file system$") as failure:
        write_atomic(path, "new")
    assert path.read_text() == "earlier" and not temporaries(tmp_path)
    # still an OSError, for code that tolerates a failed write (the FLOP-rate cache on a read-only home)
    assert isinstance(failure.value, OSError) and failure.value.errno == errno.EROFS

    # The swap fails half-way: the old file is moved back, the new one deleted.
    calls = []

    def second_fails(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", second_fails)
    new = tmp_path / ".result.md.new"
    new.write_text("new")
    with pytest.raises(UserError, match="Permission denied"):
        move_into_place(new, path)
    assert path.read_text() == "earlier" and not new.exists() and not temporaries(tmp_path)


# ---- 10: output paths that are not what the command writes ----

OUTPUT_PATHS = {
    "llmc over a directory": lambda b, t: ["export", b.run, "--format", "llmc", "--out", t, "--overwrite"],
    "hf out .": lambda b, t: ["export", b.run, "--format", "hf", "--out", ".", "--overwrite"],
    "hf out ..": lambda b, t: ["export", b.run, "--format", "hf", "--out", "..", "--overwrite"],
    "hf over a file": lambda b, t: ["export", b.run, "--format", "hf", "--out", t / "keep.txt", "--overwrite"],
    "import out .": lambda b, t: ["import", b.hf, "--out", ".", "--overwrite"],
    "compare over a file": lambda b, t: ["compare", b.run, "--out", t / "keep.txt"],
    "compare under a file": lambda b, t: ["compare", b.run, "--out", t / "keep.txt" / "c"],
    "export under a file": lambda b, t: ["export", b.run, "--format", "hf", "--out", t / "keep.txt" / "c"],
    "prepare under a file": lambda b, t: ["prepare", "--source", b.corpus, "--tokenizer", "char", "--out",
                                          t / "keep.txt" / "d", "--quiet"],
    "plot onto a directory": lambda b, t: ["plot", "activations", "--out", t / "d.png"],
    "sweep under a file": lambda b, t: ["sweep", "--config", b.config, "--data", b.data, "--out",
                                        t / "keep.txt" / "s", "--param", "model.n_embd=16", "--quiet"],
}


@pytest.mark.parametrize("case", OUTPUT_PATHS)
def test_output_paths_that_cannot_be_written_are_refused(case, base, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("keep")
    (tmp_path / "d.png").mkdir()
    before = checksums(tmp_path)
    code, _, err = run_cli(capsys, *OUTPUT_PATHS[case](base, tmp_path))
    assert_one_line_error(code, err)
    assert checksums(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "keep.txt"]


# ---- 12: hostile files ----


def hostile(base, tmp_path: Path, case: str) -> tuple[list, str]:
    if case == "deep jsonl":
        source = tmp_path / "deep.jsonl"
        source.write_text('{"text": "fine"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
        return ["prepare", "--source", source, "--tokenizer", "char", "--out", tmp_path / "d", "--quiet"], "line 2"
    if case in ("hf config string", "hf config null", "hf config float"):
        source = tmp_path / "hf"
        shutil.copytree(base.hf, source)
        config = json.loads((source / "config.json").read_text())
        config["n_embd"] = {"hf config string": "abc", "hf config null": None, "hf config float": 16.5}[case]
        (source / "config.json").write_text(json.dumps(config))
        return ["import", source, "--out", tmp_path / "imported"], "n_embd"
    if case == "hf config alone":  # checked before the weights are looked for
        source = tmp_path / "hf"
        source.mkdir()
        (source / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": None, "n_layer": 1,
                                                        "n_head": 2, "n_positions": 16, "vocab_size": 40}))
        return ["import", source, "--out", tmp_path / "imported"], "'n_embd' must be a positive whole number"
    if case in ("hf weights garbage", "hf weights empty"):
        source = tmp_path / "hf"
        shutil.copytree(base.hf, source)
        (source / "model.safetensors").unlink()
        (source / "pytorch_model.bin").write_bytes(b"garbage" if case.endswith("garbage") else b"")
        return ["import", source, "--out", tmp_path / "imported"], "pytorch_model.bin"
    if case == "hf config not utf-8":
        source = tmp_path / "hf"
        shutil.copytree(base.hf, source)
        (source / "config.json").write_bytes(b'{"model_type": "gpt2", "name": "caf\xe9"}')
        return ["import", source, "--out", tmp_path / "imported"], "config.json"
    if case == "hf config a list":
        source = tmp_path / "hf"
        shutil.copytree(base.hf, source)
        (source / "config.json").write_text("[1, 2]")
        return ["import", source, "--out", tmp_path / "imported"], "config.json"
    tokenizer = tmp_path / "tokenizer.json"
    if case == "tokenizer not utf-8":
        tokenizer.write_bytes(b'{"kind": "char", "chars": "caf\xe9"}')
    else:  # deep tokenizer
        tokenizer.write_text("[" * 100_000 + "]" * 100_000)
    return ["import", base.llmc, "--tokenizer", tokenizer, "--out", tmp_path / "imported"], "tokenizer.json"


HOSTILE = ["deep jsonl", "hf config string", "hf config null", "hf config float", "hf config alone",
           "hf config not utf-8", "hf weights garbage", "hf weights empty",
           "hf config a list", "tokenizer not utf-8", "deep tokenizer"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_files_are_one_line(case, base, tmp_path, capsys):
    argv, fragment = hostile(base, tmp_path, case)
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "imported").exists() and not (tmp_path / "d").exists()


# ---- 13: sweep ----


def test_a_sweep_on_a_full_disk_is_one_line(base, tmp_path):
    code, _, err = child_cli("sweep", "--config", base.config, "--data", base.data, "--out", tmp_path / "s",
                             "--param", "model.n_embd=16", "--trials", "1", "--quiet", file_size_limit=2048)
    assert_one_line_error(code, err, "sweep.db")


def test_a_trials_user_error_is_one_line_without_optunas_traceback(base, tmp_path):
    code, out, err = child_cli("sweep", "--config", base.config, "--data", base.data, "--out", tmp_path / "s",
                               "--param", "model.n_embd=17", "--trials", "1")
    assert_one_line_error(code, err, "model.n_embd", "model.n_head")
    assert "sweep stopped" not in out


@pytest.mark.parametrize("spec, fragment", [("model.n_embd=lin:1.5:3.5", "lin:2:3"),
                                            ("model.n_embd=lin:1.2:1.8", "whole-number"),
                                            ("model.n_embd=lin:-4:8", "must be in (0, ")])
def test_an_integer_range_must_hold_allowed_whole_numbers(spec, fragment, base, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sweep", "--config", base.config, "--data", base.data, "--out", tmp_path / "s",
                           "--param", spec)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "s").exists()


def test_a_write_never_goes_through_another_process_s_temporary(tmp_path):
    """Two processes writing one output (two exports, two `tasks make`, two saves of a tokenizer) each write
    their own temporary: the other's half-written file is never renamed into place as ours, nor clobbered."""
    import subprocess
    import sys

    path = tmp_path / "tokenizer.json"
    theirs = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                             "from lmforge.files import temporary_beside; print(temporary_beside(Path(sys.argv[1])))",
                             str(path)], capture_output=True, text=True, check=True).stdout.strip()
    Path(theirs).write_text('{"half": ')  # the other process is in the middle of its write
    write_atomic(path, '{"whole": true}')
    assert json.loads(path.read_text()) == {"whole": True}
    assert Path(theirs).read_text() == '{"half": '
