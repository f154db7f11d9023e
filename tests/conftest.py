"""Shared fixtures and helpers: a tiny multi-document corpus, its prepared data directory, tiny configs, and
the readers the tests share (run logs, command-line output, pictures)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.cli import main
from lmforge.config.load import load_config
from lmforge.config.sections import Config
from lmforge.data.prepare import prepare

# Tiny models gain nothing from intra-op threads, and on a shared machine the threads' spinning costs
# seconds per test.
torch.set_num_threads(1)

WORDS = ("the cat sat on a mat . a dog ran to the park and the bird sang in a tree . "
         "we read books , they write code , you drink tea .").split()

# Small enough that a few dozen steps take a second or two on one CPU core; roomy enough (block_size 16)
# for a couple of hundred training windows and a validation split of several windows.
TINY_OVERRIDES = {
    "model.n_layer": "1",
    "model.n_embd": "32",
    "model.n_head": "2",
    "model.block_size": "16",
    "train.batch_size": "4",
    "train.max_steps": "8",
    "train.warmup_steps": "2",
    "train.eval_every": "0",
    "train.eval_tokens": "64",
    "train.checkpoint_every": "0",
    "train.log_every": "1",
    "train.device": "cpu",
    "train.precision": "fp32",
    "train.compile": "false",
    "optim.lr": "1e-2",
}


def write_corpus(directory: Path, documents: int = 24, seed: int = 0) -> Path:
    """Documents of short sentences over a small vocabulary: learnable structure, a few KB in all."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(4)]
        (directory / f"doc{index:03d}.txt").write_text(f"story {index}\n" + "\n".join(sentences) + "\n")
    return directory


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The run's log.jsonl records, in order; only those of one kind (train, eval, start, end...) if given."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


def train_losses(run_dir: Path) -> dict[int, float]:
    """Each logged step's training loss. A step logged twice fails: a resumed run trims what it redoes, and
    under torchrun only rank 0 logs."""
    losses: dict[int, float] = {}
    for record in records(run_dir, "train"):
        assert record["step"] not in losses, f"step {record['step']} was logged twice"
        losses[record["step"]] = record["loss"]
    return losses


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `lmforge ARGV` in this process: the exit code, stdout and stderr."""
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


ROOT = Path(__file__).resolve().parent.parent

# The ceiling, in seconds, on every wait for an event in the tests (a server up, a step logged, a reply shown, a
# child finished). Only a hang reaches it: a slow or busy machine must never fail a test, so no wait is tighter.
PATIENCE = 600.0


def start_child_cli(*argv, cwd: Path = ROOT, file_size_limit: int | None = None) -> subprocess.Popen:
    """`python -m lmforge ARGV` in a child process (stdout and stderr piped, as text); with `file_size_limit`,
    no file it writes may grow past that many bytes: a write beyond fails with EFBIG, as a full disk fails."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.Popen([sys.executable, "-m", "lmforge", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=limit if file_size_limit else None)


def child_cli(*argv, cwd: Path = ROOT, file_size_limit: int | None = None) -> tuple[int, str, str]:
    """start_child_cli, waited for: the exit code, stdout and stderr."""
    child = start_child_cli(*argv, cwd=cwd, file_size_limit=file_size_limit)
    out, err = child.communicate(timeout=PATIENCE)
    return child.returncode, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """Bad input's contract: exit 2, one line on stderr naming each fragment, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def checksums(path: Path) -> dict[str, str]:
    """Every file under `path` (or `path` itself) by relative name, with its SHA-256."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_picture(path: Path, min_width: int = 200, min_height: int = 150) -> None:
    """A PNG that decodes, is at least this big, and shows something: more than a handful of distinct
    colours (a blank or single-colour canvas has one or two)."""
    import matplotlib.image

    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), f"{path} is not a PNG"
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert width >= min_width and height >= min_height, f"{path} is only {width}x{height} pixels"
    colours = len(set(map(tuple, pixels.reshape(-1, pixels.shape[-1]).round(3).tolist())))
    assert colours > 16, f"{path} is nearly blank ({colours} colours)"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_corpus) -> Path:
    """A char-tokenized data directory (train and val shards) shared by every test: it is only read."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare([str(tiny_corpus)], out, "char", val_fraction=0.2, workers=1, quiet=True)
    return out


@pytest.fixture
def tiny_config():
    """Make a tiny CPU config: the defaults, TINY_OVERRIDES, then the caller's `section.key` overrides."""

    def make(**overrides: object) -> Config:
        dotted = {key.replace("__", "."): str(value) for key, value in overrides.items()}
        return load_config(None, {**TINY_OVERRIDES, **dotted})

    return make


@pytest.fixture(autouse=True, scope="session")
def flops_cache(tmp_path_factory):
    """MFU's reference FLOP rate is measured once per machine and cached (hardware.peak_flops): the tests
    share a cache of their own, so they measure once per session and never read or write the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


# A tiny run's config for the command-line tests: 20 steps, an evaluation and a checkpoint at 10 and 20.
TINY_RUN_TOML = """
[model]
n_layer = 1
n_embd = 16
n_head = 2
block_size = 16

[train]
batch_size = 4
max_steps = 20
warmup_steps = 2
eval_every = 10
eval_tokens = 64
log_every = 5
checkpoint_every = 10
device = "cpu"
precision = "fp32"
compile = false

[optim]
lr = 1e-2
"""


def prepare_and_train(root: Path, corpus: Path, *train_flags: str) -> SimpleNamespace:
    """Through the command line, in `root`: tiny.toml (TINY_RUN_TOML), `prepare` of the corpus (char) into data/
    and `train` into run/ with `train_flags`; their paths, with the corpus's."""
    config, data, run = root / "tiny.toml", root / "data", root / "run"
    config.write_text(TINY_RUN_TOML)
    assert main(["prepare", "--source", str(corpus), "--tokenizer", "char", "--val-fraction", "0.2",
                 "--workers", "1", "--out", str(data), "--quiet"]) == 0
    assert main(["train", "--config", str(config), "--data", str(data), "--out", str(run), "--quiet",
                 *train_flags]) == 0
    return SimpleNamespace(root=root, config=config, data=data, run=run, corpus=corpus)


def require_llama_cpp():
    """The llama_cpp module (llama-cpp-python), or the test skips with one line saying why. `make test` builds it
    once per venv; where the build failed its log says why. In CI (LMFORGE_REQUIRE_LLAMA_CPP set) it must be
    there: the test fails instead of skipping."""
    try:
        import llama_cpp
    except Exception as err:  # not installed, or its compiled library fails to load
        reason = (f"llama-cpp-python is not importable ({type(err).__name__}: {err}); `make test` builds it "
                  "(see .venv/llama-cpp-build.log)")
        if os.environ.get("LMFORGE_REQUIRE_LLAMA_CPP"):
            pytest.fail(reason)
        pytest.skip(reason)
    return llama_cpp
