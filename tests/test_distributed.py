"""Training on several processes (gloo, 2 CPU ranks): the same losses as one process, checkpoints that move
between world sizes, and a lost rank that stops the others instead of hanging them.

Each multi-process run is the real command line under torchrun (`python -m torch.distributed.run`), with a
timeout so that a hang fails the test. The global batch is 2 micro-batches of 4 x 16 tokens: one process
accumulates two micro-steps, each of two ranks runs one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.config.load import load_config
from lmforge.errors import UserError
from lmforge.run import checkpoints as run_checkpoints
from lmforge.run import directory as rundir
from lmforge.train.trainer import Trainer
from tests.conftest import PATIENCE, TINY_OVERRIDES, records, train_losses

STEPS = 10
SETTINGS = {**TINY_OVERRIDES, "train.tokens_per_step": str(2 * 4 * 16), "train.max_steps": str(STEPS),
            "train.checkpoint_every": "5", "train.keep_last": "5", "train.eval_every": "5"}
TOLERANCE = 1e-5
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LAUNCH_TIMEOUT = PATIENCE


def settings(**overrides: str) -> dict[str, str]:
    return {**SETTINGS, **{key.replace("__", "."): value for key, value in overrides.items()}}


def flags(options: dict[str, str]) -> list[str]:
    return [item for key, value in options.items() for item in (f"--{key}", value)]


def assert_same_losses(ours: dict[int, float], reference: dict[int, float], steps: range) -> None:
    assert sorted(ours) == list(steps)
    differences = {step: abs(ours[step] - reference[step]) for step in steps}
    assert max(differences.values()) < TOLERANCE, differences


def torchrun(config: Path, data: Path, out: Path, options: dict[str, str], *extra: str) -> str:
    """`torchrun --standalone --nproc_per_node 2 -m lmforge train ...`; returns its output, failing on error."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lmforge", "train", "--config", str(config), "--data", str(data), "--out", str(out),
               *flags(options), *extra]
    done = subprocess.run(command, env=CHILD_ENV, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


def train_in_process(data: Path, out: Path, options: dict[str, str], *, resume: bool = False) -> None:
    Trainer(load_config(None, options), data, out, resume=resume, quiet=True).run()


def rewind(run_dir: Path, copy: Path, step: int) -> Path:
    """A copy of a run as it was when the checkpoint at `step` was its newest."""
    shutil.copytree(run_dir, copy)
    for path in run_checkpoints.list_checkpoints(copy):
        if int(path.name.removeprefix(rundir.CHECKPOINT_PREFIX)) > step:
            shutil.rmtree(path)
    return copy


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """Runs shared by the tests, each made once: {(launch, optimizer): run dir}, launch 'one', 'ddp' or 'fsdp'."""
    root = tmp_path_factory.mktemp("distributed")
    config = root / "empty.toml"
    config.write_text("")
    made: dict[tuple[str, str], Path] = {}

    def get(launch: str, optimizer: str) -> Path:
        if (launch, optimizer) not in made:
            out = root / f"{launch}-{optimizer}"
            options = settings(optim__name=optimizer)
            if launch == "one":
                train_in_process(tiny_data, out, options)
            else:
                torchrun(config, tiny_data, out, options, "--parallel", launch)
            made[launch, optimizer] = out
        return made[launch, optimizer]

    get.root, get.config = root, config
    return get


# Two of the four (parallel, optimizer) pairs train whole on two ranks; the other two resume there from one
# process (test_a_checkpoint_from_one_process_resumes_on_two_ranks), so every pair meets the one-process losses.
WHOLE_ON_TWO_RANKS = [("ddp", "adamw"), ("fsdp", "muon")]


@pytest.mark.parametrize(("parallel", "optimizer"), WHOLE_ON_TWO_RANKS)
def test_two_ranks_train_the_same_loss_sequence_as_one_process(parallel, optimizer, runs):
    reference, run = train_losses(runs("one", optimizer)), runs(parallel, optimizer)
    assert_same_losses(train_losses(run), reference, range(1, STEPS + 1))
    assert len(set(reference.values())) == STEPS  # the losses move, so agreement is not trivial
    (start,) = records(run, "start")
    assert (start["world_size"], start["parallel"], start["tokens_per_step"]) == (2, parallel, 2 * 4 * 16)
    # Evaluation is averaged over both ranks' windows: the same validation loss as one process.
    ours, theirs = records(run, "eval"), records(runs("one", optimizer), "eval")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [5, 10]  # 10: the final one (whole split)
    assert all(abs(a["val_loss"] - b["val_loss"]) < TOLERANCE for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize(("parallel", "optimizer"), WHOLE_ON_TWO_RANKS)
def test_a_checkpoint_from_two_ranks_resumes_in_one_process(parallel, optimizer, runs, tiny_data):
    run = rewind(runs(parallel, optimizer), runs.root / f"{parallel}-{optimizer}-to-one", 5)
    train_in_process(tiny_data, run, settings(optim__name=optimizer), resume=True)
    assert_same_losses(train_losses(run), train_losses(runs("one", optimizer)), range(1, STEPS + 1))
    assert [r["world_size"] for r in records(run, "start")] == [2, 1]


@pytest.mark.parametrize(("parallel", "optimizer"), [("fsdp", "adamw"), ("ddp", "muon")])
def test_a_checkpoint_from_one_process_resumes_on_two_ranks(parallel, optimizer, runs, tiny_data):
    run = rewind(runs("one", optimizer), runs.root / f"one-to-{parallel}-{optimizer}", 5)
    torchrun(runs.config, tiny_data, run, settings(optim__name=optimizer), "--parallel", parallel, "--resume")
    assert_same_losses(train_losses(run), train_losses(runs("one", optimizer)), range(1, STEPS + 1))
    assert [r["world_size"] for r in records(run, "start")] == [1, 2]


def test_two_ranks_resume_a_recurrent_models_carried_state(runs, tiny_data):
    # Truncated BPTT on two ranks: each rank carries the hidden state of its own rows of the global batch; the
    # checkpoint holds every rank's rows, and each takes its own back on resume.
    options = settings(model__arch="lstm", data__sequential="true")
    whole = runs.root / "lstm-whole"
    torchrun(runs.config, tiny_data, whole, options)
    hidden = run_checkpoints.load_checkpoint(rundir.checkpoint_dir(whole, 5))[3]
    assert {name: value.shape[1] for name, value in hidden.items()} == {"h": 2 * 4, "c": 2 * 4}
    run = rewind(whole, runs.root / "lstm-resumed", 5)
    torchrun(runs.config, tiny_data, run, options, "--resume")
    assert_same_losses(train_losses(run), train_losses(whole), range(1, STEPS + 1))
    assert len(set(train_losses(whole).values())) == STEPS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(config: Path, data: Path, out: Path, options: dict[str, str]) -> list[subprocess.Popen]:
    """Two ranks started by hand (torchrun's agent would stop the survivor itself, hiding what it does alone)."""
    port = free_port()
    command = [sys.executable, "-m", "lmforge", "train", "--config", str(config), "--data", str(data),
               "--out", str(out), "--quiet", *flags(options)]
    return [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**CHILD_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                  "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
            for rank in (0, 1)]


def wait_for_step(run_dir: Path, step: int, ranks: list[subprocess.Popen], timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = run_dir / "log.jsonl"
        if log.exists() and any(r["step"] >= step for r in records(run_dir, "train")):
            return
        assert all(rank.poll() is None for rank in ranks), [rank.communicate() for rank in ranks]
        time.sleep(0.1)
    raise AssertionError(f"the ranks did not reach step {step} in {timeout} s")


@pytest.mark.parametrize("fate", ["killed", "frozen"])
def test_a_lost_rank_stops_the_other_with_a_clear_error(fate, runs, tiny_data):
    """Killed: its sockets close and the survivor's next collective fails at once. Frozen (SIGSTOP): nothing
    closes, and the survivor gives up after train.dist_timeout seconds."""
    out = runs.root / f"lost-{fate}"
    ranks = launch_ranks(runs.config, tiny_data, out, settings(train__max_steps="100000", train__eval_every="0",
                                                                train__checkpoint_every="0",
                                                                train__dist_timeout="3"))
    try:
        wait_for_step(out, 3, ranks)
        ranks[1].send_signal(signal.SIGKILL if fate == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=PATIENCE)
        waited = time.monotonic() - start
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.communicate()
    assert ranks[0].returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge train: error: rank 0 of 2: lost contact with another "
                                                    "rank"), stderr
    assert "--resume" in lines[0]
    if fate == "frozen":
        assert 2.5 < waited < 60  # the timeout, not an instant socket error (nor a hang: 20x the timeout)
    else:
        assert waited < 10


def test_an_unknown_parallel_mode_is_a_user_error(tiny_data, tmp_path):
    with pytest.raises(UserError, match="train.parallel 'zero'; choose ddp or fsdp"):
        Trainer(load_config(None, settings(train__parallel="zero")), tiny_data, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_the_scratch_engine_refuses_several_processes(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    options = settings(train__engine="scratch", model__position="learned", model__norm="layernorm",
                       model__mlp="gelu", model__bias="true")
    with pytest.raises(UserError, match="scratch engine trains in one process"):
        Trainer(load_config(None, options), tiny_data, tmp_path / "run", quiet=True)
