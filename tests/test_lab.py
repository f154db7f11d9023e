"""The learning lab: every architecture learns and is causal, recurrent state carries as logged, compare's
table matches the logs, the sweep searches and resumes, and the pictures show something."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.config.sections import ModelConfig
from lmforge.data.loader import TrainLoader
from lmforge.errors import UserError
from lmforge.infer.generate import generate
from lmforge.infer.load import load_run
from lmforge.model.factory import ARCHS, build_model
from lmforge.train.trainer import Trainer
from tests.conftest import assert_picture, records

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ARCH_OVERRIDES = {"model.dropout": "0.0", "model.n_layer": "1"}
# The archs that predict the next token; the encoder (masked LM) and the encoder-decoder (span corruption) are
# trained, loaded and checked for their own masks in tests/test_encoder.py and tests/test_encoder_decoder.py.
NEXT_TOKEN_ARCHS = [arch for arch in ARCHS if arch not in ("encoder", "encoder-decoder")]


def small_model(arch: str, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    values = dict(arch=arch, vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=16, context=3)
    return build_model(ModelConfig(**{**values, **changes})).eval()


# ---- architectures ----


@pytest.mark.parametrize("arch", NEXT_TOKEN_ARCHS)
def test_every_arch_trains_and_its_loss_falls(arch, tiny_data, tiny_config, tmp_path):
    # A lookup table learns one row per token, and recurrent nets sit on a unigram plateau before they learn to
    # use their state: both need larger steps than the rest to get going in 100 steps.
    lr = {"bigram": 0.1, "rnn": 3e-2, "lstm": 3e-2, "gru": 3e-2}.get(arch, 1e-2)
    config = tiny_config(model__arch=arch, train__max_steps=100, train__batch_size=8, optim__lr=lr,
                         **{k.replace(".", "__"): v for k, v in ARCH_OVERRIDES.items()})
    trainer = Trainer(config, tiny_data, tmp_path / arch, quiet=True)
    trainer.run()
    losses = [r["loss"] for r in records(tmp_path / arch, "train")]
    assert losses[0] == pytest.approx(math.log(trainer.config.model.vocab_size), abs=0.3)  # starts near uniform
    assert np.mean(losses[-5:]) < 0.8 * losses[0]
    assert records(tmp_path / arch, "start")[0]["arch"] == arch
    # The saved run loads back as the model that trained: its architecture, its weights, its outputs.
    loaded = load_run(tmp_path / arch)
    model = loaded.model
    trained = trainer.model.eval()
    assert loaded.config.model.arch == arch and type(model) is type(trained)
    saved, kept = model.state_dict(), trained.state_dict()
    assert saved.keys() == kept.keys() and all(torch.equal(saved[name], kept[name]) for name in kept)
    inputs = torch.randint(0, trainer.config.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.eval()(inputs)[0], trained(inputs)[0])
    assert len(list(generate(model, [1, 2, 3], 20, temperature=1.0, generator=torch.Generator().manual_seed(0)))) == 20


@pytest.mark.parametrize("arch", NEXT_TOKEN_ARCHS)
def test_changing_a_future_token_never_changes_earlier_logits(arch):
    model = small_model(arch)
    idx = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    for position in (0, 5, 11):
        changed = idx.clone()
        changed[:, position] = (changed[:, position] + 7) % 40
        before, _ = model(idx)
        after, _ = model(changed)
        assert torch.equal(before[:, :position], after[:, :position])
        if arch != "bigram" or position < 11:  # the changed token's own logits depend on it
            assert not torch.allclose(before[:, position:], after[:, position:])


@pytest.mark.parametrize("arch", ["mlp", "rnn"])
@pytest.mark.parametrize("name", ["tanh", "relu", "gelu", "sigmoid"])
def test_the_activation_is_used(arch, name):
    x = torch.randint(0, 40, (1, 12))
    default, _ = small_model(arch)(x)
    chosen, _ = small_model(arch, activation=name)(x)
    assert torch.equal(default, chosen) == (name == "tanh")  # tanh is the default; others change the function


@pytest.mark.parametrize("arch", ["bigram", "lstm"])
def test_an_activation_where_it_means_nothing_is_refused(arch):
    with pytest.raises(UserError, match="does not apply"):
        small_model(arch, activation="relu")


def scheme_std(init: str, weight: torch.Tensor, residual: bool, n_layer: int, init_std: float = 0.02) -> float:
    """The standard deviation a matrix should start with, from lmforge/model/init.py's docstring."""
    fan_out, fan_in = weight.shape
    if init == "xavier":
        return math.sqrt(6 / (fan_in + fan_out)) / math.sqrt(3)  # uniform in +-a has std a / sqrt(3)
    if init == "kaiming":
        return math.sqrt(2 / fan_in)
    return init_std / math.sqrt(2 * n_layer) if residual else init_std


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("init", ["normal", "xavier", "kaiming"])
def test_every_weight_starts_with_its_schemes_distribution(arch, init):
    # Wide enough (thousands of entries per matrix) that a sample std lands within a few percent of the truth.
    vocab, width, n_layer = 100, 64, 2
    model = small_model(arch, init=init, vocab_size=vocab, n_embd=width, n_layer=n_layer)
    matrices = 0
    for name, weight in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        if weight.dim() == 1:  # biases start at 0, norm gains at 1, and the LSTM's forget gate open
            gain = isinstance(owner, torch.nn.LayerNorm | torch.nn.RMSNorm) and name.endswith(".weight")
            expected_vector = torch.full_like(weight, 1.0 if gain else 0.0)
            if isinstance(owner, torch.nn.LSTM) and name.rpartition(".")[2].startswith("bias_ih"):
                expected_vector[width : 2 * width] = 1.0  # gates in torch's order: input, forget, cell, output
            assert torch.equal(weight, expected_vector), name
            continue
        if isinstance(owner, torch.nn.Embedding) and arch != "bigram":  # N(0, init_std) under every scheme
            expected = 0.02
        else:  # a bigram's table is its one matrix: the scheme applies to it
            expected = scheme_std(init, weight, getattr(owner, "residual", False), n_layer)
        vocab_rows = weight is model.head_weight() or isinstance(owner, torch.nn.Embedding)
        values = weight[:vocab] if vocab_rows else weight  # the rows that pad the vocabulary start at 0
        assert values.std().item() == pytest.approx(expected, rel=0.1), name
        assert abs(values.mean().item()) < 0.1 * expected, name
        matrices += 1
    assert matrices >= (1 if arch == "bigram" else 3)


def test_recurrent_generation_with_the_state_equals_recomputing_the_window():
    model = small_model("lstm", block_size=64)
    with_state = list(generate(model, [3, 1, 4], 30, temperature=0))
    recomputed = list(generate(model, [3, 1, 4], 30, temperature=0, use_cache=False))
    assert with_state == recomputed


def test_the_scratch_engine_refuses_other_archs(tiny_data, tiny_config, tmp_path):
    with pytest.raises(UserError, match="scratch engine implements the GPT-2 transformer only"):
        Trainer(tiny_config(model__arch="gru", train__engine="scratch"), tiny_data, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


# ---- hidden state: carried with sequential reading, reset otherwise ----


def test_sequential_batches_continue_every_rows_stream(tiny_data):
    loader = TrainLoader(tiny_data, 16, 4, sequential=True)
    per_row = loader.stream_windows
    batches = [loader.next_batch() for _ in range(per_row)]
    for (_, targets), (inputs, _) in zip(batches, batches[1:], strict=False):
        assert torch.equal(targets[:, -1], inputs[:, 0])  # each row picks up where it stopped
    seen = torch.cat([inputs for inputs, _ in batches])
    assert len({tuple(row.tolist()) for row in seen}) == 4 * per_row  # one epoch: no window twice
    assert loader.epoch == pytest.approx(1.0)


@pytest.mark.parametrize("sequential", [True, False])
def test_the_hidden_state_is_carried_or_reset_as_the_log_says(sequential, tiny_data, tiny_config, tmp_path, capsys):
    config = tiny_config(model__arch="rnn", data__sequential=sequential, train__max_steps=3)
    trainer = Trainer(config, tiny_data, tmp_path / "run")
    trainer.run()
    start = records(tmp_path / "run", "start")[0]
    assert start["recurrent_state"] == ("carried" if sequential else "reset")
    assert start["data_order"] == ("sequential" if sequential else "shuffled")
    assert ("truncated BPTT" in capsys.readouterr().out) == sequential
    model = trainer.model.train()
    inputs = torch.randint(0, trainer.config.model.vocab_size, (4, 16))
    first, _ = model(inputs)
    second, _ = model(inputs)  # the same windows again: different logits only if the state carried over
    assert torch.equal(first, second) != sequential
    if sequential:
        assert not model.carried.requires_grad  # truncated: no gradient into the previous batch


def test_gpt_logs_no_recurrent_state(tiny_data, tiny_config, tmp_path):
    Trainer(tiny_config(train__max_steps=1), tiny_data, tmp_path / "run", quiet=True).run()
    assert records(tmp_path / "run", "start")[0]["recurrent_state"] is None


def test_the_cli_trains_and_samples_a_recurrent_run(tiny_data, tmp_path, capsys):
    config = tmp_path / "gru.toml"
    config.write_text('[model]\narch = "gru"\nn_layer = 1\nn_embd = 16\nblock_size = 16\n'
                      '[train]\nbatch_size = 4\nmax_steps = 2\neval_every = 0\ncheckpoint_every = 0\n'
                      'device = "cpu"\n')
    assert main(["train", "--config", str(config), "--data", str(tiny_data), "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
    assert main(["sample", str(tmp_path / "run"), "--prompt", "the", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the")


# ---- compare ----


def test_compare_tables_the_numbers_of_the_run_logs(tiny_data, tiny_config, tmp_path, capsys):
    runs = []
    for arch in ("bigram", "gpt"):
        config = tiny_config(model__arch=arch, train__max_steps=6, train__eval_every=3)
        Trainer(config, tiny_data, tmp_path / arch, quiet=True).run()
        runs.append(tmp_path / arch)
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith("| bigram") or line.startswith("| gpt")}
    for run in runs:
        start, end = records(run, "start")[0], records(run, "end")[0]
        evals = records(run, "eval")
        cells = rows[run.name]
        assert cells[1] == run.name and cells[2] == "next token"
        assert cells[3] == f"{start['params']:,}" and cells[4] == f"{end['tokens']:,}"
        assert cells[5] == f"{end['elapsed']:.1f}"
        assert cells[6] == f"{end['tokens'] / end['elapsed']:,.0f}"
        assert cells[7] == f"{min(e['val_loss'] for e in evals):.4f}"
        assert cells[8] == f"{evals[-1]['val_bpb']:.4f}" and evals[-1]["final"]
        assert cells[9].strip(" |") == f"{end['tokens'] / start['train_tokens']:.2f}"
    assert "†" not in table  # next-token runs only: no column or note for other objectives
    for name in ("val_loss_vs_tokens.png", "val_loss_vs_time.png"):
        assert_picture(tmp_path / "cmp" / name)


def makefile_lab_archs() -> list[str]:
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text(encoding="utf-8")
    return re.search(r"^LAB_ARCHS \?= (.+)$", makefile, re.M).group(1).split()


def test_make_lab_races_every_architecture_from_its_own_preset():
    from pathlib import Path

    from lmforge.config.load import load_config

    archs = makefile_lab_archs()
    assert sorted(archs) == sorted(ARCHS)  # the encoder and the encoder-decoder included
    for arch in archs:
        assert load_config(Path(__file__).resolve().parents[1] / "configs" / f"{arch}.toml").model.arch == arch


def table_rows(table: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(the runs in the table's order, each run's cells by column name) of compare.md's table."""
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]
    return [row[0] for row in rows], {row[0]: dict(zip(header, row, strict=True)) for row in rows}


def test_the_lab_tables_an_encoder_and_an_encoder_decoder_by_their_own_loss_unranked(tiny_data, tiny_config,
                                                                                     tmp_path, capsys):
    import json

    from lmforge.data.loader import TokenWindows
    from lmforge.infer.evaluate import evaluate

    runs = {}
    for arch in ("encoder", "encoder-decoder", "gpt", "bigram"):  # given in this order; ranked as the test says
        config = tiny_config(model__arch=arch, train__max_steps=40, train__eval_every=20)
        Trainer(config, tiny_data, tmp_path / arch, quiet=True).run()
        runs[arch] = tmp_path / arch
    assert main(["compare", *map(str, runs.values()), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    order, rows = table_rows(table)
    next_token = sorted(("gpt", "bigram"), key=lambda arch: records(runs[arch], "eval")[-1]["val_bpb"])
    assert order == [*next_token, "encoder", "encoder-decoder"]  # next-token rows ranked, then the others
    for arch in next_token:
        assert rows[arch]["trained to predict"] == "next token"
        assert rows[arch]["best val loss, own objective †"] == rows[arch]["val bits/predicted token †"] == "-"
    assert rows["encoder"]["trained to predict"] == "masked tokens"
    assert rows["encoder-decoder"]["trained to predict"] == "spans behind sentinels"
    assert "† Not a next-token loss" in table and "masked-LM loss is in nats per masked token" in table
    from lmforge.lab.compare import objective

    assert objective("gpt", "classify") == ("the classify task", "classify task loss")  # a fine-tuned run's too

    capsys.readouterr()
    for arch, key in (("encoder", "masked_lm_loss"), ("encoder-decoder", "span_loss")):
        row, evals = rows[arch], records(runs[arch], "eval")
        assert row["best val loss"] == row["val bits/byte"] == "-"  # never in the next-token columns
        assert row["best val loss, own objective †"] == f"{min(e['val_loss'] for e in evals):.4f}"
        # The bits are the objective's own loss, as `lmforge eval` recomputes it from the checkpoint (not the
        # next-token loss of the same model, which the check below tells apart).
        assert main(["eval", str(runs[arch]), "--data", str(tiny_data)]) == 0
        own = json.loads(capsys.readouterr().out)[key]
        assert float(row["val bits/predicted token †"]) == pytest.approx(own / math.log(2), abs=2e-4)
        if arch == "encoder":
            loaded = load_run(runs[arch])
            windows = TokenWindows(tiny_data, "val", loaded.config.model.block_size)
            next_token_loss = evaluate(loaded.model, windows, batch_size=4, max_windows=None,
                                       device=torch.device("cpu"), precision="fp32", bytes_per_token=None)["loss"]
            # Early in training both sit near the unigram plateau, yet apart by far more than the match's tolerance.
            assert abs(next_token_loss - own) / math.log(2) > 50 * 2e-4, (next_token_loss, own)
    for name in ("val_loss_vs_tokens.png", "val_loss_vs_time.png"):
        assert_picture(tmp_path / "cmp" / name)


def test_compare_refuses_a_directory_that_is_not_a_finished_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "cmp")]) == 2
    assert "not a run directory" in capsys.readouterr().err


# ---- sweep ----

SWEEP_CONFIG = """[model]
n_layer = 1
n_head = 2
block_size = 16
[train]
batch_size = 4
max_steps = 6
warmup_steps = 1
eval_every = 3
eval_tokens = 64
checkpoint_every = 0
log_every = 3
device = "cpu"
compile = "false"
"""
GRID = ["--param", "optim.lr=0.003,0.03", "--param", "model.n_embd=16,32", "--method", "grid"]


def run_sweep(tiny_data, tmp_path, *extra: str) -> int:
    config = tmp_path / "sweep.toml"
    config.write_text(SWEEP_CONFIG)
    return main(["sweep", "--config", str(config), "--data", str(tiny_data), "--out", str(tmp_path / "sw"),
                 "--quiet", *extra])


def combinations(sweep_dir) -> list[tuple[float, int]]:
    from lmforge.config.load import load_config

    found = []
    for run in sorted(sweep_dir.glob("trial_*")):
        if records(run, "end"):
            config = load_config(run / "config.toml")
            found.append((config.optim.lr, config.model.n_embd))
    return found


def test_a_grid_runs_every_combination_once_and_reports_the_best(tiny_data, tmp_path):
    assert run_sweep(tiny_data, tmp_path, *GRID) == 0
    out = tmp_path / "sw"
    assert sorted(combinations(out)) == [(0.003, 16), (0.003, 32), (0.03, 16), (0.03, 32)]
    results = [line.split(" | ") for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    losses = [float(row[5]) for row in results[1:]]
    assert len(losses) == 4 and losses == sorted(losses)
    best_run = next(row for row in results[1:] if row[2] == "complete")[1]
    from lmforge.config.load import load_config

    best = load_config(out / "best.toml")
    trial = load_config(out / best_run / "config.toml")
    assert (best.optim.lr, best.model.n_embd) == (trial.optim.lr, trial.model.n_embd)
    assert best.train.max_steps == 6  # the base config, with only the swept keys changed
    for name in ("param_optim.lr.png", "param_model.n_embd.png"):
        assert_picture(out / name)


def test_an_interrupted_sweep_resumes_without_repeating_finished_trials(tiny_data, tmp_path, monkeypatch):
    from lmforge.lab import sweep as sweep_module

    original_run = sweep_module.TrialTrainer.run
    calls = {"n": 0}

    def run_then_interrupt(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third trial
        return original_run(self)

    monkeypatch.setattr(sweep_module.TrialTrainer, "run", run_then_interrupt)
    assert run_sweep(tiny_data, tmp_path, *GRID) == 130
    first = combinations(tmp_path / "sw")
    assert len(first) == 2
    calls["n"] = -100  # no more interruptions
    assert run_sweep(tiny_data, tmp_path, *GRID) == 0
    assert calls["n"] == -98  # exactly the two combinations not yet run
    assert sorted(combinations(tmp_path / "sw")) == [(0.003, 16), (0.003, 32), (0.03, 16), (0.03, 32)]
    assert run_sweep(tiny_data, tmp_path, *GRID) == 0  # all finished: nothing runs again
    assert calls["n"] == -98


def test_the_median_pruner_stops_a_trial_that_falls_behind(tiny_data, tmp_path):
    # Four learning rates, one of which (1e-8) cannot learn: once two trials have finished, a trial whose val loss
    # at its first evaluation (step 3 of 6) is worse than the median of the finished trials there stops.
    assert run_sweep(tiny_data, tmp_path, "--param", "optim.lr=0.01,0.006,0.003,1e-8", "--method", "grid") == 0
    trials = sorted((tmp_path / "sw").glob("trial_*"))
    firsts = [records(run, "eval")[0]["val_loss"] for run in trials]  # each trial's step-3 evaluation
    pruned = [records(run, "end")[0]["reason"] == "pruned" for run in trials]
    assert [records(run, "eval")[0]["step"] for run in trials] == [3] * 4
    assert any(pruned)
    for number, run in enumerate(trials):
        earlier = [loss for loss, was_pruned in zip(firsts[:number], pruned[:number], strict=True) if not was_pruned]
        behind = len(earlier) >= 2 and firsts[number] > float(np.median(earlier))
        assert pruned[number] == behind
        assert records(run, "train")[-1]["step"] == (3 if pruned[number] else 6)
    results = (tmp_path / "sw" / "results.md").read_text()
    assert results.count("| pruned |") == sum(pruned)


@pytest.mark.parametrize("param, message", [
    ("optim.lrr=1e-3,1e-2", "did you mean 'optim.lr'"),
    ("optim.lr", "expected KEY=v1,v2"),
    ("optim.lr=log:1e-2:1e-4", "LOW must be below HIGH"),
    ("optim.lr=log:0:1", "LOW > 0"),
    ("optim.lr=log:a:b", "two numbers"),
    ("model.n_layer=two,3", "expects int"),
    ("model.arch=log:1:2", "needs a numeric key"),
])
def test_a_bad_param_spec_is_one_clear_line_and_exit_2(param, message, tiny_data, tmp_path, capsys):
    assert run_sweep(tiny_data, tmp_path, "--param", param) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "sw").exists()


def test_a_grid_over_a_range_is_refused(tiny_data, tmp_path, capsys):
    assert run_sweep(tiny_data, tmp_path, "--param", "optim.lr=log:1e-4:1e-2", "--method", "grid") == 2
    assert "grid needs value lists" in capsys.readouterr().err


# ---- pictures ----


def test_plot_activations_writes_a_png(tmp_path, capsys):
    assert main(["plot", "activations", "--out", str(tmp_path / "act.png")]) == 0
    assert_picture(tmp_path / "act.png", min_width=800)  # the functions and their derivatives, side by side
    assert main(["plot", "activations", "--out", str(tmp_path / "new" / "act.png")]) == 0  # makes its directory
    assert (tmp_path / "new" / "act.png").is_file()
    assert main(["plot", "activations", "--out", str(tmp_path / "act.png" / "x.png")]) == 2  # below a file


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_the_report_shows_weights_gradients_and_a_transformers_attention(arch, tiny_data, tiny_config, tmp_path):
    from lmforge.report import write_report

    Trainer(tiny_config(model__arch=arch, train__max_steps=2), tiny_data, tmp_path / "run", quiet=True).run()
    report = write_report(tmp_path / "run").read_text()
    out = tmp_path / "run" / "report"
    pictures = ["weights.png", "gradients.png"] + (["attention.png"] if arch == "gpt" else [])
    for name in pictures:
        assert f"]({name})" in report
        assert_picture(out / name)
    assert (out / "attention.png").exists() == (arch == "gpt")
    for section in ("Summary", "Model", "Config", "Plots", "Fresh sample", "Inside the model"):
        assert f"\n## {section}\n" in report, section


def test_attention_maps_are_causal_probabilities():
    model = small_model("gpt")
    weights = model.attention_maps(torch.randint(0, 40, (1, 12)), layer=1)
    assert weights.shape == (1, 2, 12, 12)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 2, 12))
    assert torch.all(weights.triu(1) == 0)


def test_attention_maps_leave_no_work_in_later_forwards(monkeypatch):
    from lmforge.model.gpt import Attention

    model = small_model("gpt")
    model.attention_maps(torch.randint(0, 40, (1, 12)), layer=0)
    calls = []
    monkeypatch.setattr(Attention, "probabilities", lambda *args: calls.append(args))
    model(torch.randint(0, 40, (1, 12)))
    assert calls == []


def test_a_diverged_trial_is_a_result_of_the_sweep_not_an_error(tiny_data, tmp_path, monkeypatch):
    from lmforge.errors import TrainingDiverged
    from lmforge.lab import sweep as sweep_module

    original_run = sweep_module.TrialTrainer.run

    def diverge_at_high_lr(self):
        if self.config.optim.lr == 0.03:
            raise TrainingDiverged("training loss became nan at step 1")
        return original_run(self)

    monkeypatch.setattr(sweep_module.TrialTrainer, "run", diverge_at_high_lr)
    assert run_sweep(tiny_data, tmp_path, "--param", "optim.lr=0.003,0.03", "--method", "grid") == 0
    rows = [line.split(" | ") for line in (tmp_path / "sw" / "results.md").read_text().splitlines()
            if line.startswith("| ")][1:]
    assert len(rows) == 2 and float(rows[0][4]) < 10 and rows[1][4] == "inf"  # the diverged one last
