"""Output paths of every command (issue 17, D1 D2 D7 D8): an output that would replace an input, a run's file,
a device, a user's file without --overwrite, the current directory or one above it, or that lies below a file
or inside a run, ends in one line and exit 2, and nothing that was there changes. --overwrite replaces only
what lmforge wrote; a full disk while a run or a task is being made leaves nothing of it behind. The file-size
limit of a child process stands in for a full disk (a write past it fails with EFBIG); the tests run as root,
which ignores permissions, so a read-only place is simulated by a path below a file (ENOTDIR)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.cli import main
from tests.conftest import assert_one_line_error, checksums, child_cli, prepare_and_train, run_cli

QA = [{"context": "the cat sat on a mat", "question": "who sat", "answers": ["cat"]},
      {"context": "a dog ran to the park", "question": "who ran", "answers": ["dog"]}]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_corpus) -> SimpleNamespace:
    """In one directory: a char data directory, a finished 10-step run, its Hugging Face export, a qa task
    directory (train/val/test .jsonl) and two files of the user's."""
    corpus = tmp_path_factory.mktemp("probe-corpus")
    for document in tiny_corpus.iterdir():
        shutil.copy(document, corpus)
    # qa wraps each record in the chat template and its prompt: the tokenizer must know their characters
    (corpus / "roles.txt").write_text("SYSTEM:\nUSER:\nASSISTANT:\nContext: \nQuestion: \n")
    base = prepare_and_train(tmp_path_factory.mktemp("probe-outputs"), corpus, "--max-steps", "10")
    base.hf, base.task = base.root / "hf", base.root / "task"
    assert main(["export", str(base.run), "--format", "hf", "--out", str(base.hf)]) == 0
    base.task.mkdir()
    for split in ("train", "val", "test"):
        (base.task / f"{split}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in QA * 2))
    base.notes, base.picture = base.root / "notes.txt", base.root / "picture.png"
    base.notes.write_text("years of work")
    base.picture.write_bytes(b"\x89PNG a picture of the user's")
    (base.root / "folder.png").mkdir()
    return base


def temporaries(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if ".tmp" in path.name or path.name.startswith(".old-")]


def assert_refused_and_unchanged(base: SimpleNamespace, cwd: Path, argv: list, *fragments: str, capsys) -> None:
    """The command ends in one line and exit 2; the base's files, /dev/null and the (empty) current directory
    are as they were."""
    before = checksums(base.root)
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *fragments)
    assert checksums(base.root) == before
    assert stat.S_ISCHR(Path("/dev/null").stat().st_mode)  # still the device, not a file written over it
    assert list(cwd.iterdir()) == []
    assert not temporaries(base.root)


# ---- D1: commands that write one file ----

FILE_COMMANDS = {
    "eval --predictions": lambda b, out: ["eval", b.run, "--task", "qa", "--data", b.task, "--device", "cpu",
                                          "--predictions", out],
    "plot activations": lambda b, out: ["plot", "activations", "--out", out],
    "plot derivative": lambda b, out: ["plot", "derivative", "--out", out],
    "plot landscape": lambda b, out: ["plot", "landscape", b.run, "--data", b.data, "--points", "3",
                                      "--windows", "1", "--out", out],
    "plot next-token": lambda b, out: ["plot", "next-token", b.run, "--out", out],
    "export llmc": lambda b, out: ["export", b.run, "--format", "llmc", "--out", out],
    "export gguf": lambda b, out: ["export", b.run, "--format", "gguf", "--out", out],
}
PLOTS = [name for name in FILE_COMMANDS if name.startswith("plot")]

# Each place a file output must not go, with --overwrite given (it allows none of them), and what the line
# says; `png`: the name a plot is given (plots write only .png files), None where the case is not a plot's.
FILE_PLACES = {
    "a run's config": (lambda b: b.run / "config.toml", lambda b: b.run / "config.png", "inside the run directory"),
    "a checkpoint's weights": (lambda b: next((b.run / "checkpoints").iterdir()) / "model.safetensors",
                               lambda b: next((b.run / "checkpoints").iterdir()) / "loss.png",
                               "inside the run directory"),
    "a device": (lambda b: Path("/dev/null"), None, "not a regular file"),
    "a full device": (lambda b: Path("/dev/full"), None, "not a regular file"),
    "below a file": (lambda b: b.notes / "out", lambda b: b.notes / "out.png", "is a file, not a directory"),
    "below a device": (lambda b: Path("/dev/null/out"), lambda b: Path("/dev/null/out.png"),
                       "is a file, not a directory"),
    "the current directory": (lambda b: Path("."), None, "current directory"),
    "a directory": (lambda b: b.data, lambda b: b.root / "folder.png", "is a directory"),
}


def file_cases() -> list:
    cases = []
    for command in FILE_COMMANDS:
        for place, (_, png, _) in FILE_PLACES.items():
            if command in PLOTS and png is None:
                continue
            cases.append(pytest.param(command, place, id=f"{command}-{place}"))
    return cases


@pytest.mark.parametrize(("command", "place"), file_cases())
def test_a_file_output_is_refused_where_it_would_destroy_something(command, place, base, tmp_path, capsys,
                                                                   monkeypatch):
    path, png, fragment = FILE_PLACES[place]
    out = (png if command in PLOTS else path)(base)
    monkeypatch.chdir(tmp_path)
    assert_refused_and_unchanged(base, tmp_path, [*FILE_COMMANDS[command](base, out), "--overwrite"], fragment,
                                 capsys=capsys)


@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_a_users_file_is_replaced_only_with_overwrite(command, base, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = base.picture if command in PLOTS else base.notes
    assert_refused_and_unchanged(base, tmp_path, FILE_COMMANDS[command](base, out), "already exists",
                                 "--overwrite", capsys=capsys)


def test_eval_never_writes_its_predictions_over_its_own_task_file(base, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out, fragment in ((base.task / "test.jsonl", "is an input"), (base.task / "val.jsonl", "is an input"),
                          (base.task, "an input")):
        assert_refused_and_unchanged(base, tmp_path, [*FILE_COMMANDS["eval --predictions"](base, out),
                                                      "--overwrite"], fragment, capsys=capsys)


def test_predictions_and_plots_replace_their_own_earlier_output_with_overwrite(base, tmp_path, capsys):
    predictions, picture = tmp_path / "predictions.jsonl", tmp_path / "activations.png"
    for argv in (FILE_COMMANDS["eval --predictions"](base, predictions),
                 FILE_COMMANDS["plot activations"](base, picture)):
        out = Path(argv[-1])
        out.write_text("an earlier result")
        assert run_cli(capsys, *argv, "--overwrite")[0] == 0
        assert out.read_bytes() != b"an earlier result"
    assert [json.loads(line)["reference"] for line in predictions.read_text().splitlines()] == \
        [record["answers"] for record in QA * 2]
    assert not temporaries(tmp_path)


# ---- D1, D2, D7, D8: commands that write a directory ----

DIRECTORY_COMMANDS = {
    "tasks make": lambda b, out: ["tasks", "make", "genre", "--out", out, "--overwrite"],
    "compare": lambda b, out: ["compare", b.run, "--out", out, "--overwrite"],
    "export hf": lambda b, out: ["export", b.run, "--format", "hf", "--out", out, "--overwrite"],
    "import": lambda b, out: ["import", b.hf, "--out", out, "--overwrite"],
    "prepare": lambda b, out: ["prepare", "--source", b.corpus, "--tokenizer", "char", "--workers", "1",
                               "--out", out, "--overwrite", "--quiet"],
    "train": lambda b, out: ["train", "--config", b.config, "--data", b.data, "--out", out, "--overwrite",
                             "--quiet"],
    "finetune": lambda b, out: ["finetune", b.run, "--task", "qa", "--data", b.task, "--out", out, "--overwrite",
                                "--max-steps", "1", "--quiet"],
    "sweep": lambda b, out: ["sweep", "--config", b.config, "--data", b.data, "--out", out,
                             "--param", "model.n_embd=16", "--trials", "1", "--quiet"],
}
# The commands that write a run: --overwrite may replace a run there, and a directory of other files is where
# train, prepare and sweep write beside what is there (their files only), so those two places are not theirs.
WRITES_A_RUN = ("import", "train", "finetune")
WRITES_BESIDE = ("prepare", "train", "finetune", "sweep")

DIRECTORY_PLACES = {
    "the current directory": lambda b, cwd: Path("."),
    "the directory above": lambda b, cwd: Path(".."),
    "the root": lambda b, cwd: Path("/"),
    "a path ending in ..": lambda b, cwd: b.task / "..",
    "a run": lambda b, cwd: b.run,
    "inside a run": lambda b, cwd: b.run / "out",
    "inside a checkpoint": lambda b, cwd: next((b.run / "checkpoints").iterdir()) / "out",
    "a file": lambda b, cwd: b.notes,
    "below a file": lambda b, cwd: b.notes / "out",
    "below a device": lambda b, cwd: Path("/dev/null/out"),
    "a directory of the user's files": lambda b, cwd: b.root,
}


def directory_cases() -> list:
    cases = []
    for command in DIRECTORY_COMMANDS:
        for place in DIRECTORY_PLACES:
            if place == "a run" and command in ("import", "train"):
                continue  # replacing a run with --overwrite is what they do
            if place == "a directory of the user's files" and command in WRITES_BESIDE:
                continue
            cases.append(pytest.param(command, place, id=f"{command}-{place}"))
    return cases


@pytest.mark.parametrize(("command", "place"), directory_cases())
def test_a_directory_output_is_refused_where_it_would_destroy_something(command, place, base, tmp_path, capsys,
                                                                        monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = DIRECTORY_PLACES[place](base, cwd)
    assert_refused_and_unchanged(base, cwd, DIRECTORY_COMMANDS[command](base, out), capsys=capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cwd"]


@pytest.mark.parametrize("command", [name for name in DIRECTORY_COMMANDS if name != "tasks make"])
def test_no_directory_output_holds_one_of_the_commands_inputs(command, base, tmp_path, capsys, monkeypatch):
    """The directory that holds the run, the data, the corpus or the task: never made an output."""
    monkeypatch.chdir(tmp_path)
    out = base.corpus.parent if command == "prepare" else base.root
    before = checksums(out)
    code, _, err = run_cli(capsys, *DIRECTORY_COMMANDS[command](base, out))
    assert_one_line_error(code, err)
    assert checksums(out) == before


def test_tasks_make_overwrite_replaces_only_its_own_files(base, tmp_path, capsys):
    out = tmp_path / "genre"
    assert run_cli(capsys, "tasks", "make", "genre", "--out", out)[0] == 0
    made = checksums(out)
    code, _, err = run_cli(capsys, "tasks", "make", "genre", "--out", out)
    assert_one_line_error(code, err, "already exists", "--overwrite")

    (out / "mine").mkdir()
    (out / "mine" / "thesis.txt").write_text("years of work")
    (out / "notes.txt").write_text("mine too")
    before = checksums(out)
    code, _, err = run_cli(capsys, "tasks", "make", "genre", "--out", out, "--overwrite")
    assert_one_line_error(code, err, "mine", "notes.txt", "did not write")
    assert checksums(out) == before

    shutil.rmtree(out / "mine")
    (out / "notes.txt").unlink()
    (out / "train.jsonl").write_text("an older train split\n")
    assert run_cli(capsys, "tasks", "make", "genre", "--out", out, "--overwrite")[0] == 0
    assert checksums(out) == made
    assert sorted(path.name for path in tmp_path.iterdir()) == ["genre"]


def test_compare_replaces_its_comparison_only_with_overwrite(base, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run_cli(capsys, "compare", base.run, "--out", out)[0] == 0
    (out / "compare.md").write_text("an earlier comparison")
    code, _, err = run_cli(capsys, "compare", base.run, "--out", out)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "compare.md").read_text() == "an earlier comparison"
    assert run_cli(capsys, "compare", base.run, "--out", out, "--overwrite")[0] == 0
    assert (out / "compare.md").read_text().startswith("# Comparison")


def test_a_failed_start_keeps_the_files_that_were_there(base, tmp_path, capsys):
    """A directory holding a config.toml of the user's (no run): train refuses it and deletes nothing."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.toml").write_text("# my own settings\n")
    before = checksums(out)
    code, _, err = run_cli(capsys, "train", "--config", base.config, "--data", base.data, "--out", out, "--quiet")
    assert_one_line_error(code, err, "already holds a run")
    assert checksums(out) == before
    assert sorted(path.name for path in out.iterdir()) == ["config.toml"]


def test_a_run_resumed_from_inside_it_may_name_the_current_directory(base, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(base.run, run)
    monkeypatch.chdir(run)
    code, _, err = run_cli(capsys, "train", "--resume", "--out", ".", "--data", base.data, "--max-steps", "12",
                           "--quiet")
    assert code == 0, err
    assert (run / "checkpoints" / "step_0000012").is_dir()


# ---- D7, D8: a full disk while the output is being made ----

FULL_DISK = {
    "train": lambda b, out: ["train", "--config", b.config, "--data", b.data, "--out", out, "--quiet"],
    "finetune": lambda b, out: ["finetune", b.run, "--task", "qa", "--data", b.task, "--out", out,
                                "--max-steps", "1", "--quiet"],
    "tasks make": lambda b, out: ["tasks", "make", "genre", "--out", out],
}


@pytest.mark.parametrize("limit", [3, 200], ids=["the lock's PID", "the config"])
@pytest.mark.parametrize("command", FULL_DISK)
def test_a_full_disk_leaves_nothing_of_the_new_output(command, limit, base, tmp_path):
    out = tmp_path / "parent" / "out"
    code, _, err = child_cli(*FULL_DISK[command](base, out), file_size_limit=limit)
    assert_one_line_error(code, err, "could not write", "File too large")
    assert list(tmp_path.iterdir()) == []  # no run or task directory, no .lock, no .out.tmp, not even parent/


def test_a_full_disk_keeps_an_existing_empty_directory_empty(base, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code, _, err = child_cli(*FULL_DISK["train"](base, out), file_size_limit=200)
    assert_one_line_error(code, err, "could not write", "File too large")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("command", FULL_DISK)
def test_a_read_only_place_is_one_line_and_leaves_nothing(command, base, tmp_path, capsys, monkeypatch):
    """Read-only is simulated by a mkdir that fails there with EROFS (as root, chmod would not stop a write)."""
    read_only = tmp_path / "read-only"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == read_only or read_only in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, _, err = run_cli(capsys, *FULL_DISK[command](base, read_only / "out"))
    assert_one_line_error(code, err, "could not write", "Read-only file system")
    assert list(tmp_path.iterdir()) == []


def test_the_report_never_writes_through_a_link_in_place_of_its_directory(base, tmp_path, capsys):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(base.run, run)
    elsewhere.mkdir()
    (elsewhere / "loss.png").write_bytes(b"a picture of the user's")
    (run / "report").symlink_to(elsewhere)
    before = checksums(tmp_path)
    code, _, err = run_cli(capsys, "report", run)
    assert_one_line_error(code, err, "symbolic link")
    assert checksums(tmp_path) == before
