"""The scratch engine: every backward against finite differences and torch, the whole model against the torch
engine, AdamW step for step, checkpoints that cross engines, exact resume, and refusals of what it lacks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.config.sections import Config, ModelConfig, OptimConfig
from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.run import checkpoints as run_checkpoints
from lmforge.run import directory as rundir
from lmforge.scratch import layers
from lmforge.scratch.gpt import gpt_backward, gpt_forward
from lmforge.scratch.gradcheck import check_layers, check_model, tiny_model_config
from lmforge.scratch.module import numpy_parameters
from lmforge.train.engine import ScratchEngine, TorchEngine
from lmforge.train.optim import build_optimizers
from lmforge.train.trainer import Trainer
from tests.conftest import train_losses

LAYERS = {"sigmoid", "tanh", "relu", "gelu", "softmax", "embedding", "linear", "layernorm", "attention",
          "cross_entropy", "bidir_attention", "masked_lm_loss"}


# ---- gradients ----


def test_every_layer_matches_finite_differences_and_torch_autograd_in_float64():
    results = check_layers()
    assert {r.case for r in results} == LAYERS
    by_reference = {r.reference for r in results}
    assert by_reference == {"finite difference", "torch autograd"}
    for result in results:
        assert result.error < (1e-6 if result.reference == "finite difference" else 1e-8), result


def test_a_wrong_derivative_is_caught(monkeypatch):
    # GELU's derivative without the tanh term's chain rule: plausible, and wrong.
    monkeypatch.setattr(layers, "gelu_backward", lambda dout, x, tanh_u: dout * 0.5 * (1 + tanh_u))
    failed = {(r.case, r.reference) for r in check_layers() if not r.passed}
    assert failed == {("gelu", "finite difference"), ("gelu", "torch autograd")}


def test_softmax_jvp_is_the_jacobian_times_a_vector():
    rng = np.random.default_rng(0)
    x, v = rng.standard_normal(6), rng.standard_normal(6)
    s = layers.softmax_forward(x)
    jacobian = np.diag(s) - np.outer(s, s)
    np.testing.assert_allclose(layers.softmax_jvp(s, v), jacobian @ v, rtol=1e-12, atol=1e-15)


def test_whole_model_matches_the_torch_engine_and_finite_differences():
    config = tiny_model_config()
    results = check_model(config)
    names = {name for name, _ in GPT(config).named_parameters()}
    for reference, tolerance in (("torch autograd (float64)", 1e-8), ("torch autograd (float32)", 1e-4),
                                 ("finite difference", 1e-6)):
        checked = {r.tensor: r.error for r in results if r.reference == reference}
        expected = names | ({"logits", "loss"} if reference.startswith("torch") else set())
        assert set(checked) == expected
        assert max(checked.values()) < tolerance, (reference, checked)


# ---- AdamW and the engines side by side ----


def engines_side_by_side(model_config: ModelConfig, optim: OptimConfig, seed: int = 0):
    """A torch-engine model with its AdamW, and a scratch engine on a separate copy of the same weights."""
    torch.manual_seed(seed)
    torch_model = GPT(model_config)
    scratch_model = GPT(model_config)
    scratch_model.load_state_dict(torch_model.state_dict())
    engine = ScratchEngine(scratch_model, Config(model=model_config, optim=optim))
    return torch_model, build_optimizers(torch_model, optim, torch.device("cpu")), engine


def test_ten_adamw_steps_give_the_same_losses_in_both_engines():
    config = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    optim = OptimConfig(lr=3e-3, weight_decay=0.1)
    torch_model, optimizers, engine = engines_side_by_side(config, optim)
    batch = torch.randint(0, config.vocab_size, (4, config.block_size + 1), generator=torch.Generator().manual_seed(1))

    def next_batch():
        return batch[:, :-1], batch[:, 1:]

    torch_losses, scratch_losses = [], []
    torch_engine = TorchEngine(torch_model, optimizers, device=torch.device("cpu"), precision="fp32")
    for _ in range(10):
        loss, norm = torch_engine.step(next_batch, 2, grad_clip=0.5)
        torch_losses.append(loss.item())
        loss, scratch_norm = engine.step(next_batch, 2, grad_clip=0.5)
        scratch_losses.append(loss.item())
        assert scratch_norm.item() == pytest.approx(norm.item(), rel=1e-4)
    assert torch_losses[-1] < torch_losses[0] - 0.5  # the steps do move the model
    assert max(abs(a - b) for a, b in zip(torch_losses, scratch_losses, strict=True)) < 1e-4
    weights = dict(torch_model.named_parameters())
    for name, value in engine.optimizer.params.items():
        np.testing.assert_allclose(value, weights[name].detach().numpy(), atol=1e-5)
    # The optimizer state in torch's layout: a torch AdamW takes it and holds the same step and moments.
    fresh = build_optimizers(torch_model, optim, torch.device("cpu"))[0]
    fresh.load_state_dict(engine.optimizer.state_dict())
    names = {id(param): name for name, param in torch_model.named_parameters()}
    loaded = {names[id(param)]: state for param, state in fresh.state.items()}
    assert set(loaded) == set(engine.optimizer.params)
    for name, state in loaded.items():
        assert state["step"].item() == 10
        np.testing.assert_array_equal(state["exp_avg_sq"].numpy(), engine.optimizer.adamw.state[name]["exp_avg_sq"])


# ---- the trainer with the scratch engine ----


def test_a_scratch_training_run_learns(tiny_data, tiny_config, tmp_path):
    config = tiny_config(train__max_steps=120, train__batch_size=8, train__engine="scratch")
    trainer = Trainer(config, tiny_data, tmp_path / "run", quiet=True)
    result = trainer.run()
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 121))
    assert losses[1] == pytest.approx(math.log(trainer.config.model.vocab_size), abs=0.15)
    assert np.mean([losses[step] for step in range(111, 121)]) < 0.75 * losses[1]
    assert result["val"]["val_loss"] < 0.75 * losses[1]  # evaluated by the scratch forward
    assert trainer.model.wte.weight[trainer.config.model.vocab_size :].abs().max() == 0  # padding rows stay zero


def test_scratch_resume_continues_the_exact_loss_sequence(tiny_data, tiny_config, tmp_path):
    options = dict(train__schedule="constant", train__checkpoint_every=4, train__engine="scratch",
                   train__tokens_per_step=2 * 4 * 16)
    Trainer(tiny_config(train__max_steps=8, **options), tiny_data, tmp_path / "whole", quiet=True).run()
    Trainer(tiny_config(train__max_steps=4, **options), tiny_data, tmp_path / "halves", quiet=True).run()
    Trainer(tiny_config(train__max_steps=8, **options), tiny_data, tmp_path / "halves", resume=True,
            quiet=True).run()
    whole, halves = train_losses(tmp_path / "whole"), train_losses(tmp_path / "halves")
    assert len(set(whole.values())) == 8
    assert [halves[step] for step in range(1, 9)] == [whole[step] for step in range(1, 9)]  # bit for bit
    final_whole = run_checkpoints.load_checkpoint(rundir.checkpoint_dir(tmp_path / "whole", 8))[0]
    final_halves = run_checkpoints.load_checkpoint(rundir.checkpoint_dir(tmp_path / "halves", 8))[0]
    assert all(torch.equal(final_whole[name], final_halves[name]) for name in final_whole)


@pytest.mark.parametrize("first, second", [("torch", "scratch"), ("scratch", "torch")])
def test_a_checkpoint_continues_in_the_other_engine(first, second, tiny_data, tiny_config, tmp_path):
    options = dict(train__schedule="constant", train__checkpoint_every=4)
    Trainer(tiny_config(train__max_steps=8, train__engine=first, **options), tiny_data, tmp_path / "whole",
            quiet=True).run()
    Trainer(tiny_config(train__max_steps=4, train__engine=first, **options), tiny_data, tmp_path / "crossed",
            quiet=True).run()
    resumed = Trainer(tiny_config(train__max_steps=8, train__engine=second, **options), tiny_data,
                      tmp_path / "crossed", resume=True, quiet=True)
    assert resumed.progress.step == 4
    resumed.run()
    whole, crossed = train_losses(tmp_path / "whole"), train_losses(tmp_path / "crossed")
    assert sorted(crossed) == list(range(1, 9))
    # Steps 5-8 ran in the other engine from the first one's weights and AdamW moments: had either been
    # lost (moments restarted at zero, step count reset), the losses would differ by far more than this.
    assert max(abs(whole[step] - crossed[step]) for step in range(5, 9)) < 1e-4
    assert len(set(whole.values())) == 8


@pytest.mark.parametrize("override, option", [
    ({"model__position": "rope"}, "model.position"),
    ({"model__norm": "rmsnorm"}, "model.norm"),
    ({"model__mlp": "swiglu"}, "model.mlp"),
    ({"model__mlp": "relu2"}, "model.mlp"),
    ({"model__qk_norm": "true"}, "model.qk_norm"),
    ({"model__n_kv_head": "1"}, "model.n_kv_head"),
    ({"model__tie_embeddings": "false"}, "model.tie_embeddings"),
    ({"model__bias": "false"}, "model.bias"),
    ({"model__logit_softcap": "30"}, "model.logit_softcap"),
    ({"model__dropout": "0.1"}, "model.dropout"),
    ({"optim__name": "muon"}, "optim.name"),
    ({"train__precision": "bf16"}, "train.precision"),
])
def test_unsupported_settings_are_refused_by_name(override, option, tiny_data, tiny_config, tmp_path):
    config = tiny_config(train__engine="scratch", **override)
    with pytest.raises(UserError, match=rf"scratch engine does not support {option.replace('.', '[.]')} ="):
        Trainer(config, tiny_data, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_unknown_engine_is_refused(tiny_data, tiny_config, tmp_path):
    with pytest.raises(UserError, match="unknown train.engine 'jax'"):
        tiny_config(train__engine="jax")


def test_float32_stays_float32_through_forward_backward_and_update():
    # A float64 NumPy scalar anywhere would silently promote the whole step to float64 (3x slower).
    config = ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config)
    params = numpy_parameters(model)
    idx = np.random.default_rng(0).integers(0, 50, (2, 16))
    logits, _, cache = gpt_forward(params, idx, config, idx)
    grads = {name: np.zeros_like(value) for name, value in params.items()}
    gpt_backward(cache, params, grads, config)

    def arrays(value):
        if isinstance(value, np.ndarray):
            yield value
        elif isinstance(value, tuple | list):
            for item in value:
                yield from arrays(item)

    cached = [a for a in arrays(cache["layers"]) if a.dtype.kind == "f"]
    assert cached and logits.dtype == np.float32
    assert {a.dtype for a in cached} | {g.dtype for g in grads.values()} == {np.dtype(np.float32)}


# ---- the command line ----


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_data):
    from lmforge.config.load import load_config
    from tests.conftest import TINY_OVERRIDES

    run = tmp_path_factory.mktemp("scratch") / "run"
    Trainer(load_config(None, {**TINY_OVERRIDES, "train.max_steps": "30", "train.engine": "scratch"}),
            tiny_data, run, quiet=True).run()
    return run


def test_gradcheck_prints_a_table_and_passes(capsys):
    assert main(["gradcheck", "--layers"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{layer} " in out for layer in LAYERS)
    assert "34 of 34 checks within tolerance" in out


def test_gradcheck_exits_non_zero_on_a_wrong_gradient(monkeypatch, capsys):
    monkeypatch.setattr(layers, "layernorm_backward", lambda dout, cache, w: (dout * w, dout.sum(0), dout.sum(0)))
    with pytest.raises(SystemExit) as exit_info:
        main(["gradcheck", "--layers"])
    assert exit_info.value.code == 1
    assert "FAIL" in capsys.readouterr().out


def test_eval_and_sample_with_the_scratch_engine_match_the_torch_engine(tiny_run, tiny_data, capsys):
    results = {}
    for engine in ("torch", "scratch"):
        assert main(["eval", str(tiny_run), "--data", str(tiny_data), "--engine", engine]) == 0
        results[engine] = json.loads(capsys.readouterr().out)
    assert results["scratch"]["loss"] == pytest.approx(results["torch"]["loss"], abs=1e-5)
    samples = {}
    for engine in ("torch", "scratch"):
        assert main(["sample", str(tiny_run), "--prompt", "the ", "--temperature", "0", "--max-new-tokens", "20",
                     "--engine", engine]) == 0
        samples[engine] = capsys.readouterr().out
    assert samples["scratch"] == samples["torch"] and len(samples["torch"]) > len("the ")


def test_the_cli_refuses_an_unsupported_config_in_one_line(tmp_path, tiny_data, capsys):
    code = main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--engine", "scratch",
                 "--config", "configs/llama-small.toml", "--train.device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "scratch engine does not support model." in err
