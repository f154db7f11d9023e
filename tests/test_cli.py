"""The command line end to end (prepare, train, sample, eval, report) and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge import __version__
from lmforge.cli import main
from lmforge.data.datadir import load_meta
from lmforge.data.loader import TokenWindows
from lmforge.infer.generate import generate
from lmforge.infer.load import load_run
from tests.conftest import records, run_cli

CONFIG_TOML = """
[train]
warmup_steps = 2
eval_tokens = 64
log_every = 5
checkpoint_every = 10
device = "cpu"
precision = "fp32"
compile = "false"

[optim]
lr = 1e-2
"""
TINY_FLAGS = ["--model.n_layer", "1", "--model.n_embd", "16", "--model.n_head", "2",
              "--model.block_size", "16", "--train.batch_size", "4", "--max-steps", "20",
              "--train.eval_every", "10"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_corpus) -> SimpleNamespace:
    """prepare, then train, through the command line: a data dir, a config file and a finished run."""
    root = tmp_path_factory.mktemp("cli")
    data, run, config = root / "data", root / "run", root / "tiny.toml"
    config.write_text(CONFIG_TOML)
    assert main(["prepare", "--source", str(tiny_corpus), "--tokenizer", "char", "--val-fraction", "0.2",
                 "--workers", "1", "--out", str(data), "--quiet"]) == 0
    assert main(["train", "--config", str(config), "--data", str(data), "--out", str(run), "--quiet",
                 *TINY_FLAGS]) == 0
    return SimpleNamespace(root=root, data=data, run=run, config=config)


def test_train_writes_a_complete_run(trained):
    run = trained.run
    assert {"config.toml", "tokenizer.json", "log.jsonl", "checkpoints"} <= {p.name for p in run.iterdir()}
    log = records(run)
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 5, 10, 15, 20]
    evals = [(r["step"], r["final"]) for r in log if r["kind"] == "eval"]
    assert evals == [(10, False), (20, True)]  # at the last step only the final (whole-split) evaluation
    assert log[-1]["kind"] == "end" and log[-1]["reason"] == "max_steps"
    assert "n_embd = 16" in (run / "config.toml").read_text()  # the overrides were saved with the run
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000010", "step_0000020"]


def test_sample_prints_the_prompt_then_new_text_and_greedy_repeats(trained, capsys):
    argv = ["sample", trained.run, "--prompt", "the ", "--max-new-tokens", "30", "--temperature", "0",
            "--device", "cpu"]
    code, first, err = run_cli(capsys, *argv)
    assert code == 0 and err == ""
    assert first.startswith("the ") and len(first.rstrip("\n")) > len("the ")
    assert run_cli(capsys, *argv, "--seed", "99") == (0, first, "")  # greedy: no randomness at all
    loaded = load_run(trained.run)  # the same continuation as the library computes
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = list(generate(model, tokenizer.encode("the "), 30, temperature=0, stop_token=tokenizer.eot_id))
    assert first == "the " + tokenizer.decode(ids) + "\n"
    # 4 + 30 tokens overflow the 16-token context: one sample after another, as generate slides its window
    code, sampled, _ = run_cli(capsys, "sample", trained.run, "--prompt", "the ", "--max-new-tokens", "30",
                               "--num-samples", "2", "--device", "cpu")
    assert code == 0 and sampled.count("--- sample") == 2 and sampled.count("---\nthe ") == 2
    first, second = sampled.removeprefix("--- sample 1 ---\n").split("--- sample 2 ---\n")
    assert min(len(first.rstrip("\n")), len(second.rstrip("\n"))) > 16  # prompt + sample outgrow the context


def test_sample_runs_num_samples_in_one_batch_and_greedy_matches_generate(trained, capsys):
    loaded = load_run(trained.run)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = list(generate(model, tokenizer.encode("the "), 10, temperature=0, stop_token=tokenizer.eot_id))
    alone = "the " + tokenizer.decode(ids) + "\n"
    code, out, err = run_cli(capsys, "sample", trained.run, "--prompt", "the ", "--max-new-tokens", "10",
                             "--num-samples", "3", "--temperature", "0", "--device", "cpu")
    assert (code, err) == (0, "")  # 4 + 10 tokens fit the context: the batched engine ran them
    assert out == "".join(f"--- sample {index} ---\n{alone}" for index in (1, 2, 3))
    code, out, _ = run_cli(capsys, "sample", trained.run, "--prompt", "the ", "--max-new-tokens", "10",
                           "--num-samples", "2", "--temperature", "1.5", "--device", "cpu")
    first, second = out.split("--- sample 2 ---\n")
    assert code == 0 and first.removeprefix("--- sample 1 ---\n") != second  # each sample its own seed


def test_eval_prints_one_json_object_matching_the_trainers_final_eval(trained, capsys):
    code, out, err = run_cli(capsys, "eval", trained.run, "--data", trained.data, "--device", "cpu")
    assert code == 0 and err == ""
    assert len(out.strip().splitlines()) == 1
    result = json.loads(out)
    assert {"loss", "perplexity", "bpb", "tokens"} <= set(result)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    final = [r for r in records(trained.run, "eval") if r["final"]][-1]
    assert abs(result["loss"] - final["val_loss"]) < 1e-5  # same weights, whole split, other batch size
    windows = TokenWindows(trained.data, "val", 16)
    assert result["tokens"] == windows.num_windows * 16
    val = load_meta(trained.data)["splits"]["val"]
    assert result["bpb"] == pytest.approx(result["loss"] / math.log(2) * val["tokens"] / val["bytes"])


def test_report_writes_report_md(trained, capsys):
    code, out, err = run_cli(capsys, "report", trained.run)
    assert code == 0, err
    assert (trained.run / "report" / "report.md").is_file()


# ---- bad input: exit 2, one line on stderr, no traceback ----


def other_tokenizer_data(trained) -> Path:
    out = trained.root / "digits-data"
    if not out.exists():
        corpus = trained.root / "digits"
        corpus.mkdir()
        for index in range(10):
            (corpus / f"d{index}.txt").write_text(" ".join(str(index * n) for n in range(40)) + "\n")
        assert main(["prepare", "--source", str(corpus), "--tokenizer", "char", "--workers", "1",
                     "--out", str(out), "--quiet"]) == 0
    return out


def train_argv(trained, out: Path, *extra) -> list:
    return ["train", "--config", trained.config, "--data", trained.data, "--out", out, "--quiet", *TINY_FLAGS,
            *extra]


BAD_INPUTS = {
    "unknown key": (lambda t, tmp: train_argv(t, tmp / "r", "--optim.lrr", "1e-3"), "'optim.lr'"),
    "unknown section key": (lambda t, tmp: train_argv(t, tmp / "r", "--model.nlayer", "2"),
                            "'model.n_layer'"),
    "missing data": (lambda t, tmp: ["train", "--config", t.config, "--data", tmp / "nowhere",
                                     "--out", tmp / "r"], "lmforge prepare"),
    "missing config": (lambda t, tmp: ["train", "--data", t.data, "--out", tmp / "r"], "--config"),
    "wrong type": (lambda t, tmp: train_argv(t, tmp / "r", "--train.batch_size", "abc"), "expects int"),
    "sample missing run": (lambda t, tmp: ["sample", tmp / "no-run"], "run directory not found"),
    "eval missing run": (lambda t, tmp: ["eval", tmp / "no-run", "--data", t.data],
                         "run directory not found"),
    "sample empty run dir": (lambda t, tmp: ["sample", tmp], "holds no checkpoint"),
    "prompt twice": (lambda t, tmp: ["sample", t.run, "--prompt", "a", "--prompt-file", t.config],
                     "either --prompt or --prompt-file"),
    "negative temperature": (lambda t, tmp: ["sample", t.run, "--temperature", "-1", "--device", "cpu"],
                             "--temperature"),
    "eval other tokenizer": (lambda t, tmp: ["eval", t.run, "--data", other_tokenizer_data(t),
                                             "--device", "cpu"], "another tokenizer"),
    "eval unknown split": (lambda t, tmp: ["eval", t.run, "--data", t.data, "--split", "test",
                                           "--device", "cpu"], "unknown split"),
    "resume nothing": (lambda t, tmp: ["train", "--resume", "--config", t.config, "--data", t.data,
                                       "--out", tmp / "r"], "no run to resume"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(case, trained, tmp_path, capsys):
    make_argv, fragment = BAD_INPUTS[case]
    code, _, err = run_cli(capsys, *make_argv(trained, tmp_path))
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and ": error: " in err
    assert fragment in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_one_line_and_leaves_no_run(trained, tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, *train_argv(trained, out, "--train.device", "cuda"))
    assert code == 2 and err.count("\n") == 1 and "cuda" in err and "--train.device cpu" in err
    assert not (out / "config.toml").exists()  # the corrected command is not refused as "already a run"


def test_python_dash_m_lmforge_runs_the_same_command_line(tmp_path):
    version = subprocess.run([sys.executable, "-m", "lmforge", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"lmforge {__version__}"
    failed = subprocess.run([sys.executable, "-m", "lmforge", "sample", str(tmp_path / "no-run")],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert failed.returncode == 2
    assert failed.stderr.count("\n") == 1 and "run directory not found" in failed.stderr



def test_a_short_flag_and_its_dotted_spelling_are_one_setting(monkeypatch):
    seen = []
    monkeypatch.setattr("lmforge.cli.cmd_train", lambda args: seen.append(args.overrides))
    common = ["train", "--data", "d", "--out", "o"]
    assert main([*common, "--max-steps", "3", "--no-compile", "--engine", "scratch"]) == 0
    assert main([*common, "--train.max_steps", "3", "--train.compile", "false", "--train.engine", "scratch"]) == 0
    assert main([*common, "--train.max_steps", "9", "--max-steps", "3", "--compile"]) == 0
    assert seen[0] == seen[1] == {"train.max_steps": "3", "train.compile": "false", "train.engine": "scratch"}
    assert seen[2] == {"train.max_steps": "3", "train.compile": "true"}  # the short flag wins over the dotted


def test_bench_says_its_accumulation_before_it_starts(capsys):
    code, out, err = run_cli(capsys, "bench", "--json", "--steps", "1", "--model.n_layer", "1", "--model.n_embd",
                             "16", "--model.n_head", "2", "--model.block_size", "8", "--model.vocab_size", "32",
                             "--train.batch_size", "2", "--train.tokens_per_step", "64", "--train.device", "cpu")
    assert code == 0
    assert json.loads(out)["accumulation"] == 4  # 64 tokens per step / (2 x 8)
    assert err.startswith("4 micro-batches of 2 x 8 tokens per step") and "estimate:" in err


# ----- one parser, its choices from the config -----

# Flags that are not a config key's short spelling but name one of its choices.
CHOICE_FLAGS = {("sample", "--engine"): "train.engine", ("eval", "--engine"): "train.engine",
                ("finetune", "--task"): "finetune.task", ("finetune", "--method"): "finetune.method",
                ("sweep", "--task"): "finetune.task", ("sweep", "--finetune-method"): "finetune.method"}


def command_parsers() -> dict:
    import argparse

    from lmforge.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_flag_that_names_a_config_choice_offers_exactly_the_configs_choices():
    from lmforge.arguments.flags import SetConfig
    from lmforge.config.sections import KEYS

    short_flags, named = 0, set()
    for command, parser in command_parsers().items():
        for action in parser._actions:
            flag = (command, action.option_strings[0] if action.option_strings else None)
            if isinstance(action, SetConfig):
                assert tuple(action.choices or ()) == KEYS[action.key].choices, flag
                short_flags += 1
            elif flag in CHOICE_FLAGS:
                assert tuple(action.choices) == KEYS[CHOICE_FLAGS[flag]].choices, flag
                named.add(flag)
    assert short_flags >= 10 and named == set(CHOICE_FLAGS)


def test_serve_is_a_command_of_the_one_parser(capsys):
    assert "serve" in command_parsers()
    code, out, _ = run_cli(capsys, "serve", "--help")
    assert code == 0 and "--max-queue" in out and "--drain-timeout" in out
    code, _, err = run_cli(capsys, "serve", "some-run", "--port", "eighty")
    assert code == 2 and err.count("\n") == 1 and "--port" in err and "Traceback" not in err


def test_a_short_flag_refuses_a_choice_the_config_does_not_declare(capsys):
    code, _, err = run_cli(capsys, "train", "--data", "d", "--out", "o", "--parallel", "zero")
    assert code == 2 and err.count("\n") == 1 and "'ddp', 'fsdp'" in err
