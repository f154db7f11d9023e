"""The trainer: loss goes down, resume is exact, epochs are real, checkpoints are safe, bad runs stop."""

from __future__ import annotations

import json
import math
import os
import re
import signal
from collections import Counter

import numpy as np
import pytest
import torch

import lmforge.train.language as language_module
from lmforge.data.loader import TokenWindows, TrainLoader
from lmforge.errors import UserError
from lmforge.infer.load import load_run
from lmforge.run import checkpoints as run_checkpoints
from lmforge.run import directory as rundir
from lmforge.train.engine import TorchEngine
from lmforge.train.trainer import Trainer
from tests.conftest import records, train_losses

ORIGINAL_ENGINE_STEP = TorchEngine.step
CHECKPOINT_FILES = {"model.safetensors", "optimizer.safetensors", "state.json"}


def checkpoint_steps(run_dir) -> list[int]:
    return [int(path.name.removeprefix(rundir.CHECKPOINT_PREFIX)) for path in run_checkpoints.list_checkpoints(run_dir)]


def weights_of(checkpoint_path) -> dict[str, torch.Tensor]:
    return run_checkpoints.load_checkpoint(checkpoint_path)[0]


def call_counter(monkeypatch, before=None, after=None):
    """Wrap the torch engine's step so a test can act just before or after its n-th call (1-based)."""
    original = TorchEngine.step
    calls = {"n": 0}

    def wrapped(self, *args, **kwargs):
        calls["n"] += 1
        if before:
            before(calls["n"], self.model)
        result = original(self, *args, **kwargs)
        if after:
            after(calls["n"])
        return result

    monkeypatch.setattr(TorchEngine, "step", wrapped)
    return calls


# ---- learning ----


def test_loss_falls_well_below_its_start(tiny_data, tiny_config, tmp_path):
    config = tiny_config(train__max_steps=150, train__batch_size=8)
    trainer = Trainer(config, tiny_data, tmp_path / "run", quiet=True)
    result = trainer.run()
    assert trainer.model.wte.weight[trainer.config.model.vocab_size :].abs().max() == 0  # padding rows stay zero
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 151))  # log_every=1: every step logged
    first = losses[1]
    assert first == pytest.approx(math.log(trainer.config.model.vocab_size), abs=0.15)  # starts near uniform
    final_eval = records(tmp_path / "run", "eval")[-1]
    assert final_eval["final"] and final_eval["val_loss"] == result["val"]["val_loss"]
    assert final_eval["val_loss"] < 0.7 * first
    assert np.mean([losses[step] for step in range(141, 151)]) < 0.75 * first


# ---- exact resume ----

RESUME_VARIANTS = {
    "adamw": {},
    "accumulation": {"train__tokens_per_step": 2 * 4 * 16},
    "muon": {"optim__name": "muon"},
    # Truncated BPTT: the hidden state carried into the next batch must come back from the checkpoint too.
    "lstm_carried_state": {"model__arch": "lstm", "data__sequential": True},
}


@pytest.mark.parametrize("variant", RESUME_VARIANTS)
def test_resume_continues_the_exact_loss_sequence(variant, tiny_data, tiny_config, tmp_path):
    # Constant schedule: the first launch stops by its own (lower) max_steps, which under a decaying
    # schedule would change the learning rates. Dropout makes the restored RNG state matter.
    options = dict(train__schedule="constant", train__checkpoint_every=4, model__dropout=0.1,
                   **RESUME_VARIANTS[variant])
    Trainer(tiny_config(train__max_steps=8, **options), tiny_data, tmp_path / "whole", quiet=True).run()
    Trainer(tiny_config(train__max_steps=4, **options), tiny_data, tmp_path / "halves", quiet=True).run()
    resumed = Trainer(tiny_config(train__max_steps=8, **options), tiny_data, tmp_path / "halves",
                      resume=True, quiet=True)
    assert resumed.progress.step == 4
    resumed.run()

    whole, halves = train_losses(tmp_path / "whole"), train_losses(tmp_path / "halves")
    assert sorted(halves) == list(range(1, 9))
    assert [halves[step] for step in range(5, 9)] == [whole[step] for step in range(5, 9)]  # bit for bit
    assert len(set(whole.values())) == 8  # the losses do move, so equality is not trivial
    assert [r["resumed_from_step"] for r in records(tmp_path / "halves", "start")] == [0, 4]
    final_whole = weights_of(rundir.checkpoint_dir(tmp_path / "whole", 8))
    final_halves = weights_of(rundir.checkpoint_dir(tmp_path / "halves", 8))
    assert all(torch.equal(final_whole[name], final_halves[name]) for name in final_whole)


def test_resume_after_an_interrupt_matches_an_uninterrupted_cosine_run(tiny_data, tiny_config, tmp_path,
                                                                        monkeypatch):
    options = dict(train__max_steps=8, train__schedule="cosine", model__dropout=0.1)
    Trainer(tiny_config(**options), tiny_data, tmp_path / "whole", quiet=True).run()
    trainer = Trainer(tiny_config(**options), tiny_data, tmp_path / "split", quiet=True)
    call_counter(monkeypatch, after=lambda n: n == 3 and trainer._on_signal(signal.SIGTERM, None))
    assert trainer.run()["reason"] == "interrupted"
    # The resumed launch measures the CPU's FLOP rate for MFU (an empty cache), as a first launch on a machine
    # does: that must not draw from the RNG state just restored (dropout masks come from it).
    monkeypatch.setattr(TorchEngine, "step", ORIGINAL_ENGINE_STEP)
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "empty-cache"))
    Trainer(tiny_config(**options), tiny_data, tmp_path / "split", resume=True, quiet=True).run()
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "whole")


def test_resume_after_a_crash_keeps_one_log_record_per_step(tiny_data, tiny_config, tmp_path):
    # A crash after step 6 was logged but before it was saved: the newest checkpoint is step 4, and the
    # kill cut the last log line short. Resuming runs steps 5 and 6 again; the log must not hold them twice.
    run = tmp_path / "run"
    options = dict(train__schedule="constant", train__checkpoint_every=4)
    Trainer(tiny_config(train__max_steps=6, **options), tiny_data, run, quiet=True).run()
    crashed = rundir.checkpoint_dir(run, 6)
    for file in crashed.iterdir():
        file.unlink()
    crashed.rmdir()
    with open(run / "log.jsonl", "a") as log:
        log.write('{"kind": "train", "step": 7, "lo')
    Trainer(tiny_config(train__max_steps=8, **options), tiny_data, run, resume=True, quiet=True).run()
    steps = [r["step"] for r in records(run, "train")]  # records() fails on a corrupt line
    assert steps == list(range(1, 9))
    assert [r["step"] for r in records(run, "eval")] == [8]  # the crashed launch's final eval (step 6) is gone


def test_resume_with_another_model_shape_is_a_user_error(tiny_data, tiny_config, tmp_path):
    Trainer(tiny_config(train__max_steps=2), tiny_data, tmp_path / "run", quiet=True).run()
    with pytest.raises(UserError, match="model.n_embd is 32 there, 48 here"):
        Trainer(tiny_config(train__max_steps=4, model__n_embd=48), tiny_data, tmp_path / "run", resume=True,
                quiet=True)


def test_resume_with_another_optimizer_is_a_user_error(tiny_data, tiny_config, tmp_path):
    Trainer(tiny_config(train__max_steps=2), tiny_data, tmp_path / "run", quiet=True).run()
    with pytest.raises(UserError, match="optim.name"):
        Trainer(tiny_config(train__max_steps=4, optim__name="muon"), tiny_data, tmp_path / "run", resume=True,
                quiet=True)


# ---- epochs and the loader ----


def full_windows(inputs: torch.Tensor, targets: torch.Tensor) -> list[tuple[int, ...]]:
    """The (block_size + 1)-token windows a batch was cut from."""
    return [tuple(row) for row in torch.cat([inputs, targets[:, -1:]], dim=1).tolist()]


@pytest.mark.parametrize("shuffle", [True, False])
def test_one_epoch_visits_every_window_exactly_once(tiny_data, shuffle):
    loader = TrainLoader(tiny_data, 16, 4, shuffle=shuffle, seed=3)
    windows = TokenWindows(tiny_data, "train", 16)
    corpus_order = [tuple(row) for row in windows.gather(np.arange(windows.num_windows)).tolist()]
    seen: list[tuple[int, ...]] = []
    while loader.epoch < 2:
        seen += full_windows(*loader.next_batch())
    count = windows.num_windows
    first_epoch, second_epoch = seen[:count], seen[count : 2 * count]
    assert Counter(first_epoch) == Counter(corpus_order)
    assert Counter(second_epoch) == Counter(corpus_order)
    if shuffle:  # a fresh permutation each epoch
        assert first_epoch != corpus_order and second_epoch != first_epoch
    else:
        assert first_epoch == corpus_order == second_epoch


def test_loader_state_dict_continues_the_identical_stream(tiny_data):
    loader = TrainLoader(tiny_data, 16, 4, shuffle=True, seed=5)
    per_epoch = loader.windows.num_windows
    for _ in range(per_epoch // 4 - 2):  # stop a few batches before the epoch ends
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # as stored in state.json
    expected = [full_windows(*loader.next_batch()) for _ in range(6)]  # runs across the epoch boundary
    assert loader.epoch > 1
    fresh = TrainLoader(tiny_data, 16, 4, shuffle=True, seed=999)  # the seed comes from the state
    fresh.load_state_dict(state)
    assert [full_windows(*fresh.next_batch()) for _ in range(6)] == expected
    other_block = TrainLoader(tiny_data, 8, 4)
    with pytest.raises(UserError, match="training data changed"):
        other_block.load_state_dict(state)


def test_max_epochs_stops_after_one_pass_over_every_window(tiny_data, tiny_config, tmp_path):
    config = tiny_config(train__max_epochs=1, train__max_steps=1000, train__batch_size=8)
    trainer = Trainer(config, tiny_data, tmp_path / "run", quiet=True)
    seen: list[tuple[int, ...]] = []
    next_batch = trainer.loader.next_batch

    def recording_next_batch(rows=None):
        batch = next_batch(rows)
        seen.extend(full_windows(*batch))
        return batch

    trainer.loader.next_batch = recording_next_batch
    result = trainer.run()
    count = trainer.loader.windows.num_windows
    assert result["reason"] == "max_epochs"
    assert result["step"] == math.ceil(count / 8)
    all_windows = trainer.loader.windows.gather(np.arange(count)).tolist()
    assert Counter(seen[:count]) == Counter(tuple(row) for row in all_windows)
    assert records(tmp_path / "run", "train")[-1]["epoch"] >= 1


# ---- checkpoints ----


def test_checkpoints_keep_the_last_ones_and_the_best(tiny_data, tiny_config, tmp_path, monkeypatch):
    # Scripted validation losses: the best (1.0) is at step 4, well before the last two checkpoints.
    scripted = iter([3.0, 1.0, 2.0, 2.5, 2.7, 2.7])

    def fake_evaluate(*args, **kwargs):
        loss = next(scripted)
        return {"loss": loss, "perplexity": math.exp(loss), "bpb": loss, "tokens": 1}

    monkeypatch.setattr(language_module, "evaluate", fake_evaluate)
    config = tiny_config(train__max_steps=10, train__eval_every=2, train__checkpoint_every=2,
                         train__keep_last=2)
    run = tmp_path / "run"
    Trainer(config, tiny_data, run, quiet=True).run()
    assert checkpoint_steps(run) == [4, 8, 10]
    for path in run_checkpoints.list_checkpoints(run):
        assert {file.name for file in path.iterdir()} == CHECKPOINT_FILES
    state = json.loads((rundir.checkpoint_dir(run, 10) / "state.json").read_text())
    assert state["progress"]["step"] == 10 and state["progress"]["best_checkpoint_step"] == 4
    assert state["loader"]["cursor"] == 10 * 4
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_leftover_temporary_checkpoint_is_never_listed(tiny_data, tiny_config, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(train__max_steps=3), tiny_data, run, quiet=True)
    trainer.run()
    weights = trainer.model.state_dict()
    partial = run / "checkpoints" / ".tmp-step_0000099"  # what a crash in the middle of a save leaves
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert run_checkpoints.list_checkpoints(run) == [rundir.checkpoint_dir(run, 3)]
    assert run_checkpoints.resolve_checkpoint(run) == (run, rundir.checkpoint_dir(run, 3))
    loaded = load_run(run)
    model, used = loaded.model, loaded.checkpoint
    assert used == rundir.checkpoint_dir(run, 3)
    assert all(torch.equal(model.state_dict()[name], weights[name]) for name in weights)
    resumed = Trainer(tiny_config(train__max_steps=5), tiny_data, run, resume=True, quiet=True)
    assert resumed.progress.step == 3
    resumed.run()
    assert checkpoint_steps(run) == [3, 5]


# ---- runs that must stop ----


def test_an_absurd_learning_rate_stops_with_the_step_and_keeps_the_last_good_checkpoint(
        tiny_data, tiny_config, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(optim__lr=1e6, train__grad_clip=0, train__warmup_steps=0, train__max_steps=50,
                         train__checkpoint_every=1, train__keep_last=100)
    with pytest.raises(UserError, match=r"at step \d+") as caught:
        Trainer(config, tiny_data, run, quiet=True).run()
    step = int(re.search(r"at step (\d+)", str(caught.value)).group(1))
    end = records(run)[-1]
    assert end["kind"] == "end" and end["reason"] == "non_finite_loss" and end["step"] == step
    assert all(math.isfinite(r["loss"]) for r in records(run, "train"))  # the bad loss is not logged as one
    assert checkpoint_steps(run) == list(range(1, step))  # nothing saved at or after the bad step
    last_good = rundir.checkpoint_dir(run, step - 1)
    assert str(last_good) in str(caught.value)
    loaded = load_run(run)
    model, used = loaded.model, loaded.checkpoint
    assert used == last_good
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_between_log_steps_is_caught_before_the_checkpoint(tiny_data, tiny_config, tmp_path,
                                                                   monkeypatch):
    def poison(n, model):
        if n == 5:
            with torch.no_grad():
                model.norm_f.weight.fill_(float("nan"))

    call_counter(monkeypatch, before=poison)
    run = tmp_path / "run"
    config = tiny_config(train__max_steps=10, train__log_every=100, train__checkpoint_every=2)
    with pytest.raises(UserError, match="at step 6; the last good checkpoint is .*step_0000004"):
        Trainer(config, tiny_data, run, quiet=True).run()
    assert checkpoint_steps(run) == [2, 4]
    model = load_run(rundir.checkpoint_dir(run, 4)).model
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_in_the_last_unlogged_steps_is_not_saved_as_the_newest_checkpoint(tiny_data, tiny_config,
                                                                               tmp_path, monkeypatch):
    def poison(n, model):
        if n == 7:
            with torch.no_grad():
                model.norm_f.weight.fill_(float("nan"))

    call_counter(monkeypatch, before=poison)
    run = tmp_path / "run"
    config = tiny_config(train__max_steps=7, train__log_every=100, train__checkpoint_every=2)
    with pytest.raises(UserError, match="at step 7"):
        Trainer(config, tiny_data, run, quiet=True).run()
    loaded = load_run(run)  # what sample, eval and resume would pick up
    model, used = loaded.model, loaded.checkpoint
    assert used == rundir.checkpoint_dir(run, 6)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class Sentinel(Exception):
    pass


def sentinel_handler(signum, frame):
    raise Sentinel(signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_stops(signum, tiny_data, tiny_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(train__max_steps=10), tiny_data, run, quiet=True)
    call_counter(monkeypatch, after=lambda n: n == 3 and os.kill(os.getpid(), signum))
    # Our own handler stands in for the default (which for SIGTERM would end pytest): if the trainer did not
    # install its handler, the test fails with Sentinel instead.
    previous = signal.signal(signum, sentinel_handler)
    try:
        result = trainer.run()
        assert signal.getsignal(signum) is sentinel_handler  # put back after the run
    finally:
        signal.signal(signum, previous)
    assert (result["reason"], result["step"]) == ("interrupted", 3)
    assert checkpoint_steps(run) == [3]
    assert {file.name for file in rundir.checkpoint_dir(run, 3).iterdir()} == CHECKPOINT_FILES
    log = records(run)
    assert log[-1] == {**log[-1], "kind": "end", "step": 3, "reason": "interrupted"}
    assert log[-2]["kind"] == "eval" and log[-2]["final"] and log[-2]["step"] == 3


def test_an_existing_run_is_not_clobbered(tiny_data, tiny_config, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(train__max_steps=2), tiny_data, run, quiet=True).run()
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    with pytest.raises(UserError, match="--resume.*--overwrite"):
        Trainer(tiny_config(train__max_steps=3), tiny_data, run, quiet=True)
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
    Trainer(tiny_config(train__max_steps=3), tiny_data, run, overwrite=True, quiet=True).run()
    assert len(records(run, "start")) == 1 and checkpoint_steps(run) == [3]
    with pytest.raises(UserError, match="no run to resume"):
        Trainer(tiny_config(), tiny_data, tmp_path / "empty", resume=True, quiet=True)


def test_a_config_error_leaves_no_half_made_run_behind(tiny_data, tiny_config, tmp_path):
    """A run that fails its checks must not block the corrected command with 'already holds a run'."""
    run = tmp_path / "run"
    with pytest.raises(UserError, match="multiple of"):
        Trainer(tiny_config(train__tokens_per_step=100), tiny_data, run, quiet=True)
    Trainer(tiny_config(train__max_steps=1), tiny_data, run, quiet=True).run()
    assert checkpoint_steps(run) == [1]


def test_the_flop_rate_is_measured_once_per_machine_and_a_corrupt_cache_is_measured_again(tmp_path,
                                                                                           monkeypatch):
    from lmforge import hardware

    measured = []
    monkeypatch.setattr(hardware, "measure_matmul_flops",
                        lambda device, dtype, size: measured.append(size) or 5e10 + len(measured))
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    assert hardware.peak_flops(cpu, "fp32") == hardware.peak_flops(cpu, "fp32") == 5e10 + 1
    assert len(measured) == 1
    (tmp_path / hardware.FLOPS_CACHE).write_text("{not json")
    assert hardware.peak_flops(cpu, "fp32") == 5e10 + 2
    assert list(json.loads((tmp_path / hardware.FLOPS_CACHE).read_text()).values()) == [5e10 + 2]
