"""Shared fixtures: a tiny multi-document corpus, its prepared data directory, and tiny configs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lmforge.config import Config, load_config
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
