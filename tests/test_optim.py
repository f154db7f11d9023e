"""Schedules and optimizers: warmup and decay shapes, Muon's orthogonalization, parameter grouping."""

import math

import pytest
import torch

from lmforge.config.sections import ModelConfig, OptimConfig
from lmforge.model.factory import ARCHS, build_model
from lmforge.model.gpt import GPT
from lmforge.model.spans import corrupt_spans
from lmforge.train.engine import build_engine
from lmforge.train.optim import build_optimizers, hidden_matrices, orthogonalize, set_lr
from lmforge.train.schedule import lr_multiplier

KW = dict(warmup_steps=10, min_lr_ratio=0.1, cooldown_fraction=0.2)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_warmup_rises_linearly_to_the_peak(schedule):
    values = [lr_multiplier(schedule, step, 0.0, **KW) for step in range(10)]
    assert values == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_decay_shapes():
    assert lr_multiplier("cosine", 50, 0.5, **KW) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier("cosine", 99, 1.0, **KW) == pytest.approx(0.1)
    assert lr_multiplier("linear", 50, 0.25, **KW) == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_multiplier("constant", 50, 0.9, **KW) == 1.0
    assert lr_multiplier("wsd", 50, 0.7, **KW) == 1.0  # stable until the last 20%
    assert lr_multiplier("wsd", 50, 0.9, **KW) == pytest.approx(0.1 + 0.9 * 0.5)


def test_orthogonalize_pushes_singular_values_toward_one():
    # Five quintic iterations lift a singular value by at most ~3.4^5 = 490 relative to the Frobenius norm,
    # so the spread is kept to 100x: enough that the input is far from orthogonal.
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 64)]:
        matrix = torch.randn(*shape) @ torch.diag(torch.logspace(-1, 1, shape[1])) if shape[0] > shape[1] \
            else torch.diag(torch.logspace(-1, 1, shape[0])) @ torch.randn(*shape)
        singular = torch.linalg.svdvals(orthogonalize(matrix))
        before = torch.linalg.svdvals(matrix)
        assert before.max() / before.min() > 30
        assert singular.min() > 0.5 and singular.max() < 1.3


def _tiny():
    return GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))


def test_adamw_decays_matrices_only_and_owns_every_parameter_once():
    model = _tiny()
    (optimizer,) = build_optimizers(model, OptimConfig(name="adamw"), torch.device("cpu"))
    decayed = [p for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed and all(p.dim() >= 2 for p in decayed)
    owned = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = _tiny()
    adamw, muon = build_optimizers(model, OptimConfig(name="muon"), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    assert muon_names and all(n.startswith("blocks.") for n in muon_names)
    assert "wte.weight" in [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    owned = [id(p) for o in (adamw, muon) for g in o.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizer_lowers_the_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    model = _tiny()
    optimizers = build_optimizers(model, OptimConfig(name=name, lr=3e-3), torch.device("cpu"))
    x = torch.randint(0, 50, (4, 16))
    losses = []
    for _ in range(30):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        for o in optimizers:
            o.step()
            o.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert math.isfinite(losses[-1])


def test_set_lr_scales_from_the_peak_not_cumulatively():
    optimizers = build_optimizers(_tiny(), OptimConfig(name="muon", lr=1e-3, muon_lr=0.02), torch.device("cpu"))
    set_lr(optimizers, 0.5)
    assert set_lr(optimizers, 0.5) == pytest.approx(5e-4)
    assert optimizers[1].param_groups[0]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_every_optimizer_trains_every_arch(optimizer, arch, tiny_config):
    config = tiny_config(optim__name=optimizer, model__arch=arch, model__vocab_size=20, train__compile="false")
    torch.manual_seed(0)
    model = build_model(config.model)
    said = []
    engine = build_engine(config, model, torch.device("cpu"), "fp32", say=said.append)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = torch.randint(0, 20, (4, config.model.block_size + 1), generator=torch.Generator().manual_seed(1))
    def next_batch():  # the encoder-decoder reads a source and writes a target (span corruption)
        if arch == "encoder-decoder":
            return corrupt_spans(batch[:, :-1], config.model)
        return batch[:, :-1], batch[:, 1:]

    for _ in range(2):
        loss, grad_norm = engine.step(next_batch, 1, grad_clip=1.0)
        assert math.isfinite(loss.item()) and math.isfinite(grad_norm.item())
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert changed, f"{optimizer} did not move any parameter of {arch}"
    owned = [p for optimizer_ in engine.optimizers for group in optimizer_.param_groups for p in group["params"]]
    assert sorted(map(id, owned)) == sorted(id(p) for p in model.parameters())  # each exactly once
    muon_without_matrices = optimizer == "muon" and not hidden_matrices(model)
    assert len(said) == muon_without_matrices  # one line when Muon has nothing to train
    assert len(engine.optimizers) == 1 + (optimizer == "muon" and not muon_without_matrices)
