"""Golden losses: ten steps of tiny fixed runs must reproduce the stored loss sequences bit for bit.

Every other training test checks a property (the loss falls, resume continues it, the engines agree with
each other); none notices a change that moves every engine the same way, such as a different init, data
order or schedule. These runs pin the numbers, as llm.c's expected losses and torchtitan's loss files do.

The cases run through the command line on committed text (tests/golden/text), so they depend on nothing
but the public interface. A run is bit-identical from one launch to the next on the same CPU, PyTorch build
and thread count (fp32, no compile), so the assertion is exact. The thread count matters: with two torch
threads instead of one the muon case already rounds differently at step 2, so these runs pin one thread.
PyTorch does not promise identical results across releases or platforms, which is why the stored file records
the version it was made with.

When a change is meant to move the numbers, regenerate on purpose and say why in the commit:

    LMFORGE_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden.py     (or: make golden)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from tests.conftest import records

GOLDEN = Path(__file__).parent / "golden"
LOSSES_FILE = GOLDEN / "losses.json"
REGENERATE = os.environ.get("LMFORGE_REGENERATE_GOLDEN") == "1"
STEPS = 10

# Everything that moves the numbers is spelled out, so a change of a default shows up as a deliberate edit
# here rather than as a silent regeneration. Two micro-batches per step exercise gradient accumulation.
BASE_CONFIG = {
    "model": {"arch": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0,
              "init": "normal", "init_std": 0.02},
    "train": {"batch_size": 4, "tokens_per_step": 128, "max_steps": STEPS, "schedule": "cosine",
              "warmup_steps": 2, "min_lr_ratio": 0.1, "grad_clip": 1.0, "eval_every": 0, "eval_tokens": 64,
              "checkpoint_every": 0, "log_every": 1, "seed": 1337, "device": "cpu", "precision": "fp32"},
    "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95},
}
CASES = {
    "torch-gpt-adamw": {},
    "scratch-gpt-adamw": {"train": {"engine": "scratch"}},
    "torch-gpt-muon": {"optim": {"name": "muon", "muon_lr": 0.02, "muon_momentum": 0.95}},
    "torch-lstm-adamw": {"model": {"arch": "lstm", "n_layer": 1}},
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def case_config(case: str) -> dict[str, dict]:
    config = {section: dict(values) for section, values in BASE_CONFIG.items()}
    for section, values in CASES[case].items():
        config[section].update(values)
    return config


def toml(config: dict[str, dict]) -> str:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("golden") / "data"
    code = main(["prepare", "--source", str(GOLDEN / "text" / "train.txt"), "--val-source",
                 str(GOLDEN / "text" / "val.txt"), "--tokenizer", "char", "--workers", "1", "--out", str(out),
                 "--quiet"])
    assert code == 0
    return out


def run_case(case: str, data: Path, root: Path) -> dict:
    config = root / f"{case}.toml"
    config.write_text(toml(case_config(case)))
    run = root / case
    assert main(["train", "--config", str(config), "--data", str(data), "--out", str(run), "--quiet"]) == 0
    train = records(run, "train")
    final = [r for r in records(run, "eval") if r.get("final")]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)) and len(final) == 1
    return {"train_loss": [r["loss"] for r in train], "final_val_loss": final[0]["val_loss"]}


def stored() -> dict:
    return json.loads(LOSSES_FILE.read_text()) if LOSSES_FILE.exists() else {"cases": {}}


@pytest.mark.parametrize("case", CASES)
def test_ten_steps_reproduce_the_golden_losses(case, golden_data, tmp_path):
    result = run_case(case, golden_data, tmp_path)
    golden = stored()
    if REGENERATE:
        golden["cases"][case] = result
        golden["torch_version"] = torch.__version__
        golden["regenerate"] = "LMFORGE_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden.py"
        golden["cases"] = {name: golden["cases"][name] for name in sorted(golden["cases"]) if name in CASES}
        LOSSES_FILE.write_text(json.dumps(golden, indent=1) + "\n")
        pytest.skip(f"regenerated {case} in {LOSSES_FILE}")
    assert case in golden["cases"], f"no golden losses for {case}: regenerate them (see this file's docstring)"
    expected = golden["cases"][case]
    where = f"(golden made with torch {golden['torch_version']}, this is {torch.__version__})"
    assert result["train_loss"] == expected["train_loss"], where
    assert result["final_val_loss"] == expected["final_val_loss"], where


def test_the_engines_agree_on_the_golden_losses_to_float32_rounding():
    # The two engines compute the same model in different orders: close, never expected to be equal. If the
    # stored sequences drifted apart, one engine's goldens were regenerated over a bug.
    cases = stored()["cases"]
    torch_losses, scratch_losses = cases["torch-gpt-adamw"]["train_loss"], cases["scratch-gpt-adamw"]["train_loss"]
    assert scratch_losses == pytest.approx(torch_losses, abs=1e-4)
    assert torch_losses[-1] < torch_losses[0] - 0.5  # the runs learn: a stuck loss would pin nothing
