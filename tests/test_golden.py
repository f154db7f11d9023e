"""Golden losses: ten steps of tiny fixed runs must reproduce the stored loss sequences.

Every other training test checks a property (the loss falls, resume continues it, the engines agree with
each other); none notices a change that moves every engine the same way, such as a different init, data
order or schedule. These runs pin the numbers, as llm.c's expected losses and torchtitan's loss files do.

Two promises, checked separately, because they hold at different strengths:

- **Determinism, exact.** On one machine, PyTorch build and thread count (fp32, no compile), a run gives
  bit-identical losses from one launch to the next: a second process must reproduce this one's losses
  bit for bit. The thread count matters (with two threads the muon case rounds differently at step 2), so
  these runs pin one thread.
- **The stored goldens, within GOLDEN_TOLERANCE.** Another CPU (an Intel Xeon against the AMD EPYC the file
  was made on) sums in another order and differs in the 7th significant digit: at most 1.5e-7 relative over
  the ten steps, measured. GOLDEN_TOLERANCE is 2e-6 relative per step: over ten times that difference, and
  small enough that real changes fail it, which tests below prove on fresh runs: the learning rate moved by
  1e-4 relative (about 1e-5 relative at the worst step, so the 1e-5 one might first reach for would let it
  pass) and a one-line model change (the norm's epsilon 1e-5 -> 1e-6, about 9e-5). A change below float32
  noise (GPT-2's tanh GELU replaced by the exact one moves these tiny runs by 7e-8) is beyond any golden
  file; the equivalence tests against transformers pin such details.

Fine-tuning is pinned the same way (FINETUNE_CASES: classify and sft, full and LoRA, from a base trained like
torch-gpt-adamw, on the committed records of tests/golden/tasks/), so that moving the fine-tuning loop onto
the trainer cannot move its numbers.

The cases run through the command line on committed text (tests/golden/text), so they depend on nothing
but the public interface. When a change is meant to move the numbers, regenerate on purpose and say why in
the commit:

    LMFORGE_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden.py     (or: make golden)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from tests.conftest import PATIENCE, ROOT, records

GOLDEN = Path(__file__).parent / "golden"
LOSSES_FILE = GOLDEN / "losses.json"
REGENERATE = os.environ.get("LMFORGE_REGENERATE_GOLDEN") == "1"
STEPS = 10
GOLDEN_TOLERANCE = 2e-6  # relative, per logged loss: see the module docstring for why this number

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
    # masked LM: the masks come from the trainer's seeded generator, so they are pinned too
    "torch-encoder-adamw": {"model": {"arch": "encoder"}},
    "scratch-encoder-adamw": {"model": {"arch": "encoder"}, "train": {"engine": "scratch"}},
    # span corruption: the spans, too, come from the trainer's seeded generator
    "torch-encoder-decoder-adamw": {"model": {"arch": "encoder-decoder"}},
}

# Fine-tuning from a base trained like torch-gpt-adamw on the golden text plus the chat template's markers
# (text/roles.txt: a character tokenizer must know them), on the committed records of golden/tasks/, with the
# same explicit settings; a result holds the ten training losses and the validation loss of each evaluation.
FINETUNE_FLAGS = ["--max-steps", str(STEPS), "--lr", "1e-2", "--train.eval_every", "5", "--train.warmup_steps", "2",
                  "--train.batch_size", "4", "--train.log_every", "1", "--train.seed", "1337", "--train.device", "cpu",
                  "--train.precision", "fp32", "--quiet"]
FINETUNE_CASES = {
    "finetune-classify-full": ["--task", "classify", "--data", "classify"],
    "finetune-sft-full": ["--task", "sft", "--data", "sft"],
    "finetune-sft-lora": ["--task", "sft", "--data", "sft", "--method", "lora", "--lora.rank", "4"],
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def machine() -> str:
    """The processor, as the stored file names the one its goldens were made on."""
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return f"{platform.machine()} {names[0] if names else platform.processor()}".strip()


def case_config(case: str, lr_scale: float = 1.0) -> dict[str, dict]:
    config = {section: dict(values) for section, values in BASE_CONFIG.items()}
    for section, values in CASES[case].items():
        config[section].update(values)
    for key in ("lr", "muon_lr"):
        if key in config["optim"]:
            config["optim"][key] *= lr_scale
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


def train_command(case: str, data: Path, root: Path, lr_scale: float = 1.0) -> tuple[list[str], Path]:
    """The `train` arguments of a case (its TOML written into root) and the run directory they make."""
    name = case if lr_scale == 1.0 else f"{case}-lr{lr_scale!r}"
    config = root / f"{name}.toml"
    config.write_text(toml(case_config(case, lr_scale)))
    run = root / name
    return ["train", "--config", str(config), "--data", str(data), "--out", str(run), "--quiet"], run


def result_of(run: Path) -> dict:
    train = records(run, "train")
    final = [r for r in records(run, "eval") if r.get("final")]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)) and len(final) == 1
    return {"train_loss": [r["loss"] for r in train], "final_val_loss": final[0]["val_loss"]}


def run_case(case: str, data: Path, root: Path, lr_scale: float = 1.0) -> dict:
    argv, run = train_command(case, data, root, lr_scale)
    assert main(argv) == 0
    return result_of(run)


@pytest.fixture(scope="module")
def results(golden_data, tmp_path_factory) -> dict[str, dict]:
    """Each case's losses from one run in this process (made once, shared by the tests below)."""
    root = tmp_path_factory.mktemp("golden-runs")
    return {case: run_case(case, golden_data, root) for case in CASES}


@pytest.fixture(scope="module")
def finetune_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("golden-base")
    data = root / "data"
    assert main(["prepare", "--source", str(GOLDEN / "text" / "train.txt"), "--source",
                 str(GOLDEN / "text" / "roles.txt"), "--val-source", str(GOLDEN / "text" / "val.txt"),
                 "--tokenizer", "char", "--workers", "1", "--out", str(data), "--quiet"]) == 0
    argv, run = train_command("torch-gpt-adamw", data, root)
    assert main(argv) == 0
    return run


def finetune_command(case: str, base: Path, root: Path) -> tuple[list[str], Path]:
    flags = FINETUNE_CASES[case]
    flags = [str(GOLDEN / "tasks" / flag) if previous == "--data" else flag
             for previous, flag in zip(["", *flags[:-1]], flags, strict=True)]
    return ["finetune", str(base), *flags, "--out", str(root / case), *FINETUNE_FLAGS], root / case


def finetune_result_of(run: Path) -> dict:
    train = records(run, "train")
    evals = records(run, "eval")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)) and [r["step"] for r in evals] == [5, 10]
    return {"train_loss": [r["loss"] for r in train], "val_loss": [r["val_loss"] for r in evals]}


@pytest.fixture(scope="module")
def finetune_results(finetune_base, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("golden-finetune")
    results = {}
    for case in FINETUNE_CASES:
        argv, run = finetune_command(case, finetune_base, root)
        assert main(argv) == 0
        results[case] = finetune_result_of(run)
    return results


def stored() -> dict:
    return json.loads(LOSSES_FILE.read_text()) if LOSSES_FILE.exists() else {"cases": {}}


def numbers(result: dict) -> list[float]:
    """A result's losses in one list, key by key (train_loss, final_val_loss or val_loss)."""
    values: list[float] = []
    for key in sorted(result):
        values += result[key] if isinstance(result[key], list) else [result[key]]
    return values


def worst_relative_difference(result: dict, expected: dict) -> float:
    """The largest |a - b| / |b| over every training loss and validation loss of the result."""
    ours, theirs = numbers(result), numbers(expected)
    assert sorted(result) == sorted(expected) and len(ours) == len(theirs), (result, expected)
    return max(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True))


def matches_golden(result: dict, expected: dict) -> bool:
    return worst_relative_difference(result, expected) <= GOLDEN_TOLERANCE


def check_golden(case: str, result: dict) -> None:
    """The result matches the stored losses within GOLDEN_TOLERANCE (or, regenerating, replaces them)."""
    golden = stored()
    if REGENERATE:
        golden["cases"][case] = result
        golden["torch_version"] = torch.__version__
        golden["made_on"] = {**golden.get("made_on", {}), case: machine()}
        golden["regenerate"] = "LMFORGE_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden.py"
        known = {**CASES, **FINETUNE_CASES}
        golden["cases"] = {name: golden["cases"][name] for name in sorted(golden["cases"]) if name in known}
        golden["made_on"] = {name: golden["made_on"][name] for name in sorted(golden["made_on"]) if name in known}
        LOSSES_FILE.write_text(json.dumps(golden, indent=1) + "\n")
        pytest.skip(f"regenerated {case} in {LOSSES_FILE}")
    assert case in golden["cases"], f"no golden losses for {case}: regenerate them (see this file's docstring)"
    worst = worst_relative_difference(result, golden["cases"][case])
    where = (f"made with torch {golden['torch_version']} on {golden['made_on'][case]}; "
             f"this is torch {torch.__version__} on {machine()}")
    assert worst <= GOLDEN_TOLERANCE, f"{case}: relative difference {worst:.2e} > {GOLDEN_TOLERANCE} ({where})"


@pytest.mark.parametrize("case", CASES)
def test_ten_steps_reproduce_the_golden_losses(case, results):
    check_golden(case, results[case])


@pytest.mark.parametrize("case", FINETUNE_CASES)
def test_ten_fine_tuning_steps_reproduce_the_golden_losses(case, finetune_results):
    check_golden(case, finetune_results[case])


# One fresh Python process runs every case after the other, as `lmforge ARGV` each, on one thread as the goldens'
# own runs are: a Python start-up per case would cost more than the cases themselves.
SECOND_PROCESS = """
import json, sys
from lmforge.cli import main
for argv in json.loads(sys.argv[1]):
    if main(argv) != 0:
        sys.exit(f"lmforge {' '.join(argv)} failed")
"""


@pytest.fixture(scope="module")
def second_process(golden_data, finetune_base, tmp_path_factory) -> dict[str, Path]:
    """Each case's run (pretraining and fine-tuning) made again by one other process: {case: run directory}."""
    root = tmp_path_factory.mktemp("golden-second")
    commands = {case: train_command(case, golden_data, root) for case in CASES}
    commands.update({case: finetune_command(case, finetune_base, root) for case in FINETUNE_CASES})
    child = subprocess.run([sys.executable, "-c", SECOND_PROCESS, json.dumps([argv for argv, _ in commands.values()])],
                           capture_output=True, text=True, cwd=ROOT, timeout=PATIENCE,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr
    return {case: run for case, (_, run) in commands.items()}


@pytest.mark.parametrize("case", CASES)
def test_a_second_process_reproduces_the_losses_bit_for_bit(case, results, second_process):
    assert result_of(second_process[case]) == results[case]


@pytest.mark.parametrize("case", FINETUNE_CASES)
def test_a_second_process_reproduces_the_fine_tuning_losses_bit_for_bit(case, finetune_results, second_process):
    assert finetune_result_of(second_process[case]) == finetune_results[case]


@pytest.mark.parametrize("case", CASES)
def test_a_learning_rate_moved_by_one_part_in_ten_thousand_fails_the_tolerance(case, results, golden_data,
                                                                               tmp_path):
    nudged = run_case(case, golden_data, tmp_path, lr_scale=1 + 1e-4)
    assert nudged != results[case]  # the nudge reached the run at all
    assert not matches_golden(nudged, results[case])


def test_a_one_line_model_change_fails_the_tolerance(results, golden_data, tmp_path, monkeypatch):
    import lmforge.model.gpt as gpt

    monkeypatch.setattr(gpt, "norm_eps", lambda config: 1e-6)  # LayerNorm's epsilon 1e-5 -> 1e-6
    changed = run_case("torch-gpt-adamw", golden_data, tmp_path)
    assert not matches_golden(changed, results["torch-gpt-adamw"])


def test_the_tolerance_passes_the_measured_difference_between_two_cpus():
    # torch-gpt-adamw's step 6 on an Intel Xeon against the AMD EPYC the goldens were made on (issue 17).
    xeon, epyc = 3.3078548908233643, 3.3078551292419434
    assert abs(xeon - epyc) / epyc < GOLDEN_TOLERANCE / 10


def test_the_engines_agree_on_the_golden_losses_to_float32_rounding():
    # The two engines compute the same model in different orders: close, never expected to be equal. If the
    # stored sequences drifted apart, one engine's goldens were regenerated over a bug.
    cases = stored()["cases"]
    torch_losses, scratch_losses = cases["torch-gpt-adamw"]["train_loss"], cases["scratch-gpt-adamw"]["train_loss"]
    assert scratch_losses == pytest.approx(torch_losses, abs=1e-4)
    assert torch_losses[-1] < torch_losses[0] - 0.5  # the runs learn: a stuck loss would pin nothing
    encoder = cases["torch-encoder-adamw"]["train_loss"], cases["scratch-encoder-adamw"]["train_loss"]
    assert encoder[1] == pytest.approx(encoder[0], abs=1e-4)
    assert len(set(encoder[0])) == STEPS  # the masked losses move from step to step
