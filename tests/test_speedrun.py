"""The speedrun's options and tools: zero-initialised projections, value embeddings, multi-token prediction, the
batch-size and context warmups, intra-op threads, the wsd schedule in a run,
the weight average (train.ema_decay), the trainer's time estimate, and benchmarks/speedrun.py's statistics and
table (the benchmark itself, at its real budgets, is run alone, never here)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import math
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.run import directory as rundir
from lmforge.train.ema import WeightAverage, decay_at
from lmforge.train.optim import hidden_matrices
from lmforge.train.schedule import warmup_divisor
from lmforge.train.trainer import Trainer
from tests.conftest import ROOT, TINY_RUN_TOML, records, run_cli, train_losses

RESIDUAL_PROJECTIONS = ("attn.proj.weight", "mlp.proj.weight")


def residual_projections(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()
            if name.endswith(RESIDUAL_PROJECTIONS)}


def test_zero_init_proj_starts_every_block_as_the_identity(tiny_config):
    config = tiny_config(model__n_layer=2, model__zero_init_proj="true", model__vocab_size=40).model
    torch.manual_seed(0)
    model = GPT(config)
    projections = residual_projections(model)
    assert len(projections) == 2 * config.n_layer
    assert all(not weight.any() for weight in projections.values())
    # Every block adds zero to the residual stream, so the blocks' output is the embedding itself.
    idx = torch.randint(0, 40, (2, 8))
    seen = []
    model.norm_f.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    model(idx)
    torch.testing.assert_close(seen[0], model.wte(idx) + model.wpe(torch.arange(8)))
    # The default keeps GPT-2's scaled normal init.
    torch.manual_seed(0)
    default = residual_projections(GPT(tiny_config(model__n_layer=2, model__vocab_size=40).model))
    assert all(weight.std() > 0 for weight in default.values())


def test_zero_init_proj_trains(tiny_config, tiny_data, tmp_path):
    config = tiny_config(model__zero_init_proj="true", train__max_steps=30, train__log_every=1)
    trainer = Trainer(config, tiny_data, tmp_path / "run", quiet=True)
    trainer.run()
    losses = [record["loss"] for record in records(tmp_path / "run", "train")]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    # The projections left zero: the gradient reaches them through the loss from the first step.
    assert all(weight.abs().max() > 0 for weight in residual_projections(trainer.model).values())


def test_zero_init_proj_is_refused_where_there_is_no_residual_projection(tiny_config):
    with pytest.raises(UserError, match="model.zero_init_proj .* arch 'lstm'"):
        tiny_config(model__arch="lstm", model__zero_init_proj="true")


def test_train_threads_sets_torch_threads_and_the_scratch_engine_refuses_it(tiny_config, tiny_data, tmp_path):
    before = torch.get_num_threads()
    try:
        Trainer(tiny_config(train__threads=2, train__max_steps=2), tiny_data, tmp_path / "run", quiet=True).run()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UserError, match="scratch engine does not support train.threads = 1: .*OMP_NUM_THREADS"):
        Trainer(tiny_config(train__threads=1, train__engine="scratch"), tiny_data, tmp_path / "scratch", quiet=True)
    assert not (tmp_path / "scratch").exists()


def test_wsd_run_holds_the_peak_then_decays_linearly_to_min_lr_ratio(tiny_config, tiny_data, tmp_path):
    config = tiny_config(train__schedule="wsd", train__cooldown_fraction=0.5, train__min_lr_ratio=0.1,
                         train__max_steps=20, train__warmup_steps=2, optim__lr=1e-2)
    Trainer(config, tiny_data, tmp_path / "run", quiet=True).run()
    lr = {record["step"]: record["lr"] for record in records(tmp_path / "run", "train")}
    # The logged rate is the one step `step` used, at progress (step - 1) / 20.
    assert [lr[step] for step in range(3, 11)] == pytest.approx([1e-2] * 8)
    cooldown = [lr[step] for step in range(12, 21)]
    assert all(later < earlier for earlier, later in zip(cooldown, cooldown[1:], strict=False))
    assert lr[20] == pytest.approx(1e-2 * (0.1 + 0.9 * (1 - 19 / 20) / 0.5))
    steps = list(range(12, 21))  # a straight line: equal decrements
    decrements = [lr[a] - lr[b] for a, b in zip(steps, steps[1:], strict=False)]
    assert decrements == pytest.approx([decrements[0]] * len(decrements))


ESTIMATE = re.compile(r"about (\d+) s of training on this machine \((\d+) ms per step over the first (\d+)\)")


def test_training_says_once_per_launch_how_long_it_will_take(tiny_data, tmp_path, capsys):
    config, run = tmp_path / "tiny.toml", tmp_path / "run"
    config.write_text(TINY_RUN_TOML)
    launches = [("--config", str(config), "--max-steps", "40"), ("--resume", "--max-steps", "60")]
    # Logged every 3 steps: the first log at least 10 steps into the launch is step 12, then step 51 (40 + 11).
    for steps, first_timed, flags in zip((40, 20), (12, 11), launches, strict=True):
        code, out, _ = run_cli(capsys, "train", "--data", str(tiny_data), "--out", str(run), *flags,
                               "--train.log_every", "3")
        assert code == 0
        estimates = ESTIMATE.findall(out)
        assert len(estimates) == 1, out
        seconds, milliseconds, timed = map(int, estimates[0])
        assert timed == first_timed
        # The estimate is this launch's steps at the pace measured so far (both figures rounded).
        assert abs(seconds - milliseconds * steps / 1000) <= 0.5 + steps * 0.5 / 1000 + 1e-9


# ----- model.value_embeddings -----
def randomise(parameters, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def test_value_embeddings_start_at_zero_and_then_add_to_each_layers_values(tiny_config):
    plain_config = tiny_config(model__n_layer=2, model__n_kv_head=1, model__position="rope",
                               model__vocab_size=40).model
    config = tiny_config(model__n_layer=2, model__n_kv_head=1, model__position="rope", model__vocab_size=40,
                         model__value_embeddings="true").model
    plain, model = GPT(plain_config), GPT(config)
    assert set(model.state_dict()) - set(plain.state_dict()) == {"value_embeds.0.weight", "value_embeds.1.weight"}
    # One table per layer, as wide as its (grouped) values; the model starts as the plain one computes.
    assert tuple(model.value_embeds[0].weight.shape) == (40, config.n_embd // config.n_head)
    assert not any(table.weight.any() for table in model.value_embeds)
    model.load_state_dict(plain.state_dict(), strict=False)
    idx = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(model(idx)[0], plain(idx)[0])
    # Then: layer l's values are its projection's plus the token's row of table l (a hook on the projection
    # adds the same rows to the plain model's values, by hand).
    randomise(model.value_embeds.parameters())
    width = config.n_embd
    for layer, block in enumerate(plain.blocks):
        table = model.value_embeds[layer].weight
        block.attn.qkv.register_forward_hook(lambda module, inputs, output, table=table: torch.cat(
            (output[..., : width + table.size(1)], output[..., width + table.size(1):] + table[idx]), dim=-1))
    torch.testing.assert_close(model(idx)[0], plain(idx)[0])


def test_value_embeddings_give_the_same_logits_with_and_without_the_kv_cache(tiny_config):
    model = GPT(tiny_config(model__n_layer=2, model__vocab_size=40, model__position="rope",
                            model__value_embeddings="true").model).eval()
    randomise(model.value_embeds.parameters())
    idx = torch.randint(0, 40, (2, 10))
    cache = model.new_cache(2, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        full = model(idx)[0]
        pieces = [model(idx[:, start:end], cache=cache)[0] for start, end in ((0, 6), (6, 8), (8, 10))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_value_embeddings_train_and_are_refused_where_nothing_computes_them(tiny_config, tiny_data, tmp_path):
    trainer = Trainer(tiny_config(model__value_embeddings="true", train__max_steps=30, train__log_every=1),
                      tiny_data, tmp_path / "run", quiet=True)
    trainer.run()
    losses = [record["loss"] for record in records(tmp_path / "run", "train")]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert all(table.weight.abs().max() > 0 for table in trainer.model.value_embeds)  # they learned
    # AdamW trains them, as it trains every embedding; Muon takes only the matrices inside the blocks.
    assert not any(name.startswith("value_embeds") for name in hidden_matrices(trainer.model))
    with pytest.raises(UserError, match="scratch engine does not support model.value_embeddings"):
        Trainer(tiny_config(model__value_embeddings="true", train__engine="scratch"), tiny_data,
                tmp_path / "scratch", quiet=True)
    with pytest.raises(UserError, match="model.value_embeddings .* arch 'encoder'"):
        tiny_config(model__arch="encoder", model__value_embeddings="true")


# ----- model.multi_token -----
def test_multi_token_loss_is_the_next_token_loss_with_the_extra_heads_gradient(tiny_config):
    config = tiny_config(model__n_layer=2, model__vocab_size=40, model__multi_token=2,
                         model__multi_token_weight=0.3, model__logit_softcap=5).model
    model = GPT(config).train()
    randomise(model.ahead.parameters(), seed=1)
    idx, targets = torch.randint(0, 40, (3, 12)), torch.randint(0, 40, (3, 12))
    targets[0, 4] = -100  # an ignored target is ignored by every head
    _, loss = model(idx, targets)
    loss.backward()
    trained = {name: param.grad.clone() for name, param in model.named_parameters()}
    # The value: the next-token loss alone, as evaluation (model.eval()) reports it.
    with torch.no_grad():
        model.eval()
        assert loss.item() == pytest.approx(model(idx, targets)[1].item(), rel=1e-6)
        model.train()
    # The gradient: that of next-token loss + 0.3 x the mean over k = 1, 2 of head k's loss on the token k
    # places further on, written out here from the parts.
    model.zero_grad()
    states = model.hidden_states(idx)
    head = model.head_weight()[:40]
    logits = 5 * torch.tanh(states @ head.T / 5)
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), targets.reshape(-1))
    extra = []
    for k, projection in ((1, model.ahead[0]), (2, model.ahead[1])):
        shifted = states[:, :-k] + states[:, :-k] @ projection.weight.T
        shifted = shifted / shifted.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt()
        extra.append(torch.nn.functional.cross_entropy((5 * torch.tanh(shifted @ head.T / 5)).reshape(-1, 40),
                                                       targets[:, k:].reshape(-1)))
    (total + 0.3 * sum(extra) / 2).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(trained[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert all(trained[f"ahead.{k}.weight"].abs().max() > 0 for k in (0, 1))


def test_multi_token_trains_and_is_refused_where_nothing_computes_it(tiny_config, tiny_data, tmp_path):
    Trainer(tiny_config(model__multi_token=2, train__max_steps=30, train__log_every=1), tiny_data,
            tmp_path / "run", quiet=True).run()
    losses = [record["loss"] for record in records(tmp_path / "run", "train")]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    with pytest.raises(UserError, match="scratch engine does not support model.multi_token"):
        Trainer(tiny_config(model__multi_token=1, train__engine="scratch"), tiny_data, tmp_path / "scratch",
                quiet=True)
    with pytest.raises(UserError, match="model.multi_token .* arch 'lstm'"):
        tiny_config(model__arch="lstm", model__multi_token=1)
    with pytest.raises(UserError, match="model.multi_token = 16: .* model.block_size = 16 never holds"):
        tiny_config(model__multi_token=16)


# ----- train.batch_warmup and train.context_warmup -----
def test_warmup_stages_are_a_quarter_a_half_then_all():
    assert [warmup_divisor(p, 0.3) for p in (0.0, 0.099, 0.1, 0.199, 0.2, 0.299, 0.3, 1.0)] == [4, 4, 2, 2, 2, 2, 1, 1]
    assert warmup_divisor(0.0, 0.0) == 1


def warmup_batches(tiny_config, tiny_data, tmp_path, **overrides):
    """Each step's micro-batch (inputs, targets), a straight run of 12 steps."""
    trainer = Trainer(tiny_config(train__max_steps=12, train__batch_size=8, **overrides), tiny_data,
                      tmp_path / "run", quiet=True)
    batches = []
    next_batch = trainer.task.next_batch
    trainer.task.next_batch = lambda: batches.append(next_batch()) or batches[-1]
    trainer.run()
    return trainer, batches


def test_context_warmup_cuts_the_same_windows_into_shorter_sequences(tiny_config, tiny_data, tmp_path):
    _, plain = warmup_batches(tiny_config, tiny_data, tmp_path / "plain")
    trainer, warm = warmup_batches(tiny_config, tiny_data, tmp_path / "warm", train__context_warmup=0.5)
    # Steps 0-1 (progress < 1/6): four sequences of 4 per window; steps 2-5: two of 8; then the whole 16.
    assert [tuple(inputs.shape) for inputs, _ in warm] == [(32, 4)] * 2 + [(16, 8)] * 4 + [(8, 16)] * 6
    for (inputs, targets), (warm_inputs, warm_targets) in zip(plain, warm, strict=True):  # the same tokens
        assert torch.equal(warm_inputs.reshape(8, 16), inputs) and torch.equal(warm_targets.reshape(8, 16), targets)
    assert [record["tokens"] for record in records(tmp_path / "warm" / "run", "train")][-1] == 12 * 8 * 16


def test_batch_warmup_reads_fewer_windows_early_and_counts_them(tiny_config, tiny_data, tmp_path):
    _, plain = warmup_batches(tiny_config, tiny_data, tmp_path / "plain")
    trainer, warm = warmup_batches(tiny_config, tiny_data, tmp_path / "warm", train__batch_warmup=0.5)
    assert [inputs.size(0) for inputs, _ in warm] == [2] * 2 + [4] * 4 + [8] * 6
    # The windows in the same order, fewer per step: the loader's stream is the plain run's, re-cut.
    assert torch.equal(torch.cat([inputs for inputs, _ in warm]), torch.cat([inputs for inputs, _ in plain])[:68])
    assert trainer.task.loader.cursor == 68
    assert [record["tokens"] for record in records(tmp_path / "warm" / "run", "train")][-1] == 68 * 16


class StoppedAtStep5(Trainer):
    """A run stopped at step 5 as a signal stops it (the schedule still spans the whole run's steps)."""

    def stop_reason(self, elapsed: float) -> str | None:
        if self.progress.step == 5:
            self.stop_signal = "SIGINT"
        return super().stop_reason(elapsed)


def test_a_warmup_run_resumes_exactly(tiny_config, tiny_data, tmp_path):
    config = tiny_config(train__batch_warmup=0.5, train__context_warmup=0.8, train__batch_size=8,
                         train__max_steps=12)
    straight = Trainer(config, tiny_data, tmp_path / "straight", quiet=True)
    straight.run()
    assert StoppedAtStep5(config, tiny_data, tmp_path / "resumed", quiet=True).run()["step"] == 5
    resumed = Trainer(config, tiny_data, tmp_path / "resumed", resume=True, quiet=True)
    resumed.run()
    for name, param in straight.model.state_dict().items():
        assert torch.equal(param, resumed.model.state_dict()[name]), name


@pytest.mark.parametrize(("overrides", "fragment"), [
    (dict(model__arch="encoder", train__batch_warmup=0.2), "train.batch_warmup .* model.arch = encoder"),
    (dict(model__arch="lstm", data__sequential="true", train__context_warmup=0.2),
     "train.context_warmup .* data.sequential = true"),
    (dict(model__block_size=18, train__context_warmup=0.2), r"model.block_size \(18\) must be a multiple of 4"),
    (dict(model__multi_token=4, train__context_warmup=0.2), "sequences of model.block_size / 4 = 4 tokens first"),
])
def test_data_warmups_are_refused_where_they_do_not_apply(tiny_config, tiny_data, tmp_path, overrides, fragment):
    with pytest.raises(UserError, match=fragment):
        Trainer(tiny_config(**overrides), tiny_data, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


# ----- benchmarks/speedrun.py -----
@functools.cache
def speedrun_module():
    """The script as a module (benchmarks/ is not a package); registered, as its dataclass needs."""
    spec = importlib.util.spec_from_file_location("speedrun", ROOT / "benchmarks" / "speedrun.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# Student's t two-sided 5% and 1% critical values (any statistics table).
@pytest.mark.parametrize(("t", "df", "p"), [(12.7062, 1, 0.05), (2.7764, 4, 0.05), (4.6041, 4, 0.01),
                                            (2.2281, 10, 0.05), (1.9600, 1e9, 0.05), (0.0, 3, 1.0)])
def test_t_distribution_p_values_match_the_tables(t, df, p):
    assert speedrun_module().t_two_sided_p(t, df) == pytest.approx(p, abs=2e-5)


def test_t_distribution_p_values_match_scipy_at_fractional_degrees_of_freedom():
    stats = pytest.importorskip("scipy.stats")
    speedrun = speedrun_module()
    for t in (0.3, 1.0, 2.5, 7.0, -3.0):
        for df in (1.3, 2.0, 3.7, 8.2, 40.0):
            assert speedrun.t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9, abs=1e-12)


def test_welch_sees_a_steady_difference_and_not_noise():
    welch = speedrun_module().welch
    t, df, p = welch([2.30, 2.31, 2.29], [2.40, 2.42, 2.41])
    assert t < 0 and 2 <= df <= 4 and p < 0.001
    assert welch([2.30, 2.40, 2.35], [2.36, 2.29, 2.41])[2] > 0.5
    assert all(math.isnan(value) for value in welch([2.3], [2.4, 2.5]))


TINY_SETTINGS = ["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=16",
                 "train.batch_size=4", "train.warmup_steps=2", "train.device=cpu", "train.compile=false"]


def lmforge_in_process(*argv: str) -> str:
    """The script's `lmforge` (a child process per command), in this process: the same commands without a Python
    start-up each."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    if code:
        sys.exit(f"lmforge {' '.join(argv)} failed with exit code {code}")
    return out.getvalue()


def test_speedrun_runs_both_budgets_per_seed_and_tests_each_ablation(tiny_data, tmp_path, capsys, monkeypatch):
    speedrun = speedrun_module()
    monkeypatch.setattr(speedrun, "lmforge", lmforge_in_process)
    # This shared machine is never quiet, and one-second runs vary in pace: neither may mark the runs here.
    monkeypatch.setattr(speedrun.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    monkeypatch.setattr(speedrun, "SLOW_RUN", 0.0)
    argv = ["--data", str(tiny_data), "--work", str(tmp_path), "--seconds", "1", "--tokens", "640", "--seeds", "2",
            "--ablation", "untied", "--ignore-load", *[item for pair in TINY_SETTINGS for item in ("--set", pair)]]
    speedrun.main(argv)
    out = capsys.readouterr().out
    runs = json.loads((tmp_path / "speedrun.json").read_text())
    assert {(run["arm"], run["budget"], run["seed"]) for run in runs} == {
        (arm, budget, seed) for arm in ("baseline", "untied") for budget in ("time", "tokens") for seed in (1337, 1338)}
    for run in runs:
        if run["budget"] == "tokens":  # 640 tokens of 4 x 16 per step
            assert (run["steps"], run["tokens"]) == (10, 640)
        else:
            assert run["train_s"] >= 1.0
    # The untied arm has its own head; the baseline ties it (the override reached the run).
    assert "lm_head.weight" in load_file(tmp_path / "untied-tokens-1337" / "checkpoints" / "step_0000010" /
                                         "model.safetensors")
    # Seeds differ, and the score is `lmforge eval`'s on the whole held-out split.
    seeds = [run["bits_per_char"] for run in runs if run["arm"] == "baseline" and run["budget"] == "tokens"]
    assert seeds[0] != seeds[1]
    code, evaluated, _ = run_cli(capsys, "eval", str(tmp_path / "baseline-tokens-1337"), "--data", str(tiny_data))
    assert code == 0 and json.loads(evaluated)["bpc"] == pytest.approx(seeds[0], rel=1e-5)
    table = [line for line in out.splitlines() if line.startswith("| untied |")]
    assert len(table) == 2 and all(re.search(r"\| 0\.\d{3} \|$|\| 1\.000 \|$", line) for line in table), out
    assert "0 of 8 runs shared the CPU" in out


def test_speedrun_refuses_a_busy_machine_and_a_bad_setting(monkeypatch, tmp_path):
    speedrun = speedrun_module()
    monkeypatch.setattr(speedrun.os, "getloadavg", lambda: (3.2, 2.0, 1.0))
    with pytest.raises(SystemExit, match="load average is 3.20: something else is running"):
        speedrun.main(["--work", str(tmp_path)])
    with pytest.raises(UserError, match="model.n_layr"):
        speedrun.main(["--work", str(tmp_path), "--ignore-load", "--set", "model.n_layr=2"])
    assert not list(tmp_path.iterdir())  # refused before any work


# ----- train.ema_decay -----
def test_weight_average_follows_the_ramped_decay_and_swaps_in_and_out_exactly():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, ema_decay=0.9)
    start = [param.detach().clone() for param in model.parameters()]
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    average.update(step=1)  # the ramp: (1 + 1) / (10 + 1) of the old average
    expected = [old * (2 / 11) + (old + 1.0) * (9 / 11) for old in start]
    for got, want in zip(average.average, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert decay_at(1000, 0.9) == 0.9
    trained = [param.detach().clone() for param in model.parameters()]
    with average.swapped_in():
        for param, want in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(param.detach(), want)
    assert all(torch.equal(param, weights) for param, weights in zip(model.parameters(), trained, strict=True))


def test_ema_run_evaluates_and_saves_the_average_and_resumes_exactly(tiny_config, tiny_data, tmp_path, capsys):
    options = dict(train__ema_decay=0.8, train__schedule="constant", train__checkpoint_every=4,
                   train__eval_every=0, optim__lr=3e-2)
    Trainer(tiny_config(train__max_steps=8, **options), tiny_data, tmp_path / "whole", quiet=True).run()
    Trainer(tiny_config(train__max_steps=4, **options), tiny_data, tmp_path / "halves", quiet=True).run()
    Trainer(tiny_config(train__max_steps=8, **options), tiny_data, tmp_path / "halves", resume=True,
            quiet=True).run()
    whole, halves = train_losses(tmp_path / "whole"), train_losses(tmp_path / "halves")
    assert [halves[step] for step in range(5, 9)] == [whole[step] for step in range(5, 9)]  # bit for bit
    checkpoint = rundir.checkpoint_dir(tmp_path / "whole", 8)
    for name in ("model.safetensors", "training.safetensors"):
        saved_whole, saved_halves = load_file(checkpoint / name), load_file(
            rundir.checkpoint_dir(tmp_path / "halves", 8) / name)
        assert all(torch.equal(saved_whole[key], saved_halves[key]) for key in saved_whole), name
    averaged, trained = load_file(checkpoint / "model.safetensors"), load_file(checkpoint / "training.safetensors")
    assert not torch.equal(averaged["blocks.0.mlp.fc.weight"], trained["blocks.0.mlp.fc.weight"])
    # The run's final evaluation is of the average, and so is every reader's (model.safetensors).
    final = [record for record in records(tmp_path / "whole", "eval") if record["final"]][-1]
    code, out, _ = run_cli(capsys, "eval", str(tmp_path / "whole"), "--data", str(tiny_data))
    assert code == 0 and json.loads(out)["loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    # Off, a checkpoint has no second set of weights.
    Trainer(tiny_config(train__max_steps=2), tiny_data, tmp_path / "plain", quiet=True).run()
    assert not (rundir.checkpoint_dir(tmp_path / "plain", 2) / "training.safetensors").exists()


def test_ema_reaches_the_scratch_engine_forward(tiny_config, tiny_data, tmp_path, capsys):
    config = tiny_config(train__engine="scratch", train__ema_decay=0.8, train__max_steps=6, optim__lr=3e-2)
    Trainer(config, tiny_data, tmp_path / "run", quiet=True).run()
    final = [record for record in records(tmp_path / "run", "eval") if record["final"]][-1]
    code, out, _ = run_cli(capsys, "eval", str(tmp_path / "run"), "--data", str(tiny_data))
    assert code == 0 and json.loads(out)["loss"] == pytest.approx(final["val_loss"], rel=1e-5)
