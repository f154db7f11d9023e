"""Gradient checks: every analytic backward against the limit definition of the derivative, and against torch.

f'(x) = lim (f(x + h) - f(x - h)) / 2h: in float64, with h = 1e-5, the central difference is exact to about
1e-9, so an analytic gradient that disagrees by more than 1e-6 is wrong. Each layer is checked on a scalar
objective sum(out * R) with a fixed random R (its gradient with respect to the output is R), every input
element perturbed in turn. The whole tiny model is checked the same way on its loss, and against the torch
engine's autograd on the same weights and batch. The error of a tensor is max |analytic - reference| /
max |reference|: the worst element, relative to the tensor's scale (an element-wise ratio explodes at 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lmforge.config.sections import ModelConfig
from lmforge.model.masking import IGNORE
from lmforge.scratch import layers as L
from lmforge.scratch.gpt import gpt_backward, gpt_forward

STEP = 1e-5
FD_TOLERANCE = 1e-6  # float64 against central differences
TORCH_TOLERANCE = {np.float64: 1e-8, np.float32: 1e-4}


@dataclass
class Check:
    """One tensor's worst relative error against one reference."""

    case: str  # the layer, or "model"
    tensor: str
    reference: str  # "finite difference" or "torch autograd"
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.error < self.tolerance


def relative_error(analytic: np.ndarray, reference: np.ndarray) -> float:
    scale = float(np.abs(reference).max(initial=0.0))
    return float(np.abs(analytic - reference).max(initial=0.0)) / max(scale, 1e-30)


def finite_difference(objective: Callable[[], float], array: np.ndarray, step: float = STEP) -> np.ndarray:
    """d objective / d array by central differences, perturbing each element of `array` in place."""
    grad = np.zeros_like(array)
    flat, flat_grad = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + step
        plus = objective()
        flat[i] = saved - step
        minus = objective()
        flat[i] = saved
        flat_grad[i] = (plus - minus) / (2 * step)
    return grad


@dataclass
class LayerCase:
    """A layer as a function of named float64 inputs, with its analytic gradients of sum(out * R)."""

    name: str
    inputs: dict[str, np.ndarray]
    forward: Callable[[dict], np.ndarray]
    backward: Callable[[dict, np.ndarray], dict[str, np.ndarray]]  # (inputs, R) -> gradient per input
    torch_forward: Callable[[dict], object]  # the same layer in torch, on torch tensors


def _layer_cases(rng: np.random.Generator) -> list[LayerCase]:
    import torch
    import torch.nn.functional as F

    batch, length, channels, n_head, vocab = 2, 5, 8, 2, 11
    rows = batch * length

    def away_from_zero(shape):  # ReLU's kink at 0 has no derivative: keep finite differences off it
        x = rng.standard_normal(shape)
        return x + np.sign(x) * 0.1

    idx = rng.integers(0, vocab, (batch, length))
    targets = rng.integers(0, vocab, rows)

    def attention_torch(t):
        q, k, v = t["qkv"].view(batch, length, 3, n_head, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(batch, length, channels)

    def attention_backward(x, r, causal=True):
        return {"qkv": L.attention_backward(r, L.attention_forward(x["qkv"], n_head, causal)[1])}

    def bidirectional_attention_torch(t):
        q, k, v = t["qkv"].view(batch, length, 3, n_head, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return y.transpose(1, 2).reshape(batch, length, channels)

    masked_targets = np.where(rng.random(rows) < 0.3, targets, IGNORE)  # masked LM: some rows score nothing
    masked_targets[0] = targets[0]

    def layernorm_backward(x, r):
        dx, dw, db = L.layernorm_backward(r, L.layernorm_forward(x["x"], x["w"], x["b"])[1], x["w"])
        return {"x": dx, "w": dw, "b": db}

    def linear_backward(x, r):
        dx, dw, db = L.linear_backward(r, x["x"], x["w"])
        return {"x": dx, "w": dw, "b": db}

    def embedding_backward(x, r):
        dwte, dwpe = np.zeros_like(x["wte"]), np.zeros_like(x["wpe"])
        L.embedding_backward(r, idx, dwte, dwpe)
        return {"wte": dwte, "wpe": dwpe}

    def softmax_backward(x, r):  # the JVP J r (J symmetric: the same as the vector-Jacobian product)
        return {"x": L.softmax_jvp(L.softmax_forward(x["x"]), r)}

    def cross_entropy_backward(x, r):  # the loss is a scalar: R is one number
        return {"logits": r * L.cross_entropy_backward(L.cross_entropy_forward(x["logits"], targets)[1], targets)}

    def gelu_backward(x, r):
        _, tanh_u = L.gelu_forward(x["x"])
        return {"x": L.gelu_backward(r, x["x"], tanh_u)}

    return [
        LayerCase("sigmoid", {"x": rng.standard_normal((rows, channels)) * 3}, lambda x: L.sigmoid_forward(x["x"]),
                  lambda x, r: {"x": L.sigmoid_backward(r, L.sigmoid_forward(x["x"]))},
                  lambda t: torch.sigmoid(t["x"])),
        LayerCase("tanh", {"x": rng.standard_normal((rows, channels))}, lambda x: L.tanh_forward(x["x"]),
                  lambda x, r: {"x": L.tanh_backward(r, L.tanh_forward(x["x"]))}, lambda t: torch.tanh(t["x"])),
        LayerCase("relu", {"x": away_from_zero((rows, channels))}, lambda x: L.relu_forward(x["x"]),
                  lambda x, r: {"x": L.relu_backward(r, x["x"])}, lambda t: torch.relu(t["x"])),
        LayerCase("gelu", {"x": rng.standard_normal((rows, channels)) * 2}, lambda x: L.gelu_forward(x["x"])[0],
                  gelu_backward, lambda t: F.gelu(t["x"], approximate="tanh")),
        LayerCase("softmax", {"x": rng.standard_normal((rows, channels))}, lambda x: L.softmax_forward(x["x"]),
                  softmax_backward, lambda t: torch.softmax(t["x"], dim=-1)),
        LayerCase("embedding", {"wte": rng.standard_normal((vocab, channels)),
                                "wpe": rng.standard_normal((length + 2, channels))},
                  lambda x: L.embedding_forward(x["wte"], x["wpe"], idx), embedding_backward,
                  lambda t: t["wte"][torch.from_numpy(idx)] + t["wpe"][:length]),
        LayerCase("linear", {"x": rng.standard_normal((rows, channels)), "w": rng.standard_normal((3, channels)),
                             "b": rng.standard_normal(3)},
                  lambda x: L.linear_forward(x["x"], x["w"], x["b"]), linear_backward,
                  lambda t: F.linear(t["x"], t["w"], t["b"])),
        LayerCase("layernorm", {"x": rng.standard_normal((rows, channels)) * 2 + 1,
                                "w": rng.standard_normal(channels), "b": rng.standard_normal(channels)},
                  lambda x: L.layernorm_forward(x["x"], x["w"], x["b"])[0], layernorm_backward,
                  lambda t: F.layer_norm(t["x"], (channels,), t["w"], t["b"], eps=L.LAYERNORM_EPS)),
        LayerCase("attention", {"qkv": rng.standard_normal((batch, length, 3 * channels))},
                  lambda x: L.attention_forward(x["qkv"], n_head)[0], attention_backward, attention_torch),
        LayerCase("cross_entropy", {"logits": rng.standard_normal((rows, vocab)) * 2},
                  lambda x: np.array(L.cross_entropy_forward(x["logits"], targets)[0]), cross_entropy_backward,
                  lambda t: F.cross_entropy(t["logits"], torch.from_numpy(targets))),
        LayerCase("bidir_attention", {"qkv": rng.standard_normal((batch, length, 3 * channels))},
                  lambda x: L.attention_forward(x["qkv"], n_head, causal=False)[0],
                  lambda x, r: attention_backward(x, r, causal=False), bidirectional_attention_torch),
        LayerCase("masked_lm_loss", {"logits": rng.standard_normal((rows, vocab)) * 2},
                  lambda x: np.array(L.cross_entropy_forward(x["logits"], masked_targets)[0]),
                  lambda x, r: {"logits": r * L.cross_entropy_backward(
                      L.cross_entropy_forward(x["logits"], masked_targets)[1], masked_targets)},
                  lambda t: F.cross_entropy(t["logits"], torch.from_numpy(masked_targets))),
    ]


def check_layers(seed: int = 0) -> list[Check]:
    """Every layer in float64: analytic gradients against central differences and against torch autograd."""
    import torch

    rng = np.random.default_rng(seed)
    results = []
    for case in _layer_cases(rng):
        weights = rng.standard_normal(case.forward(case.inputs).shape)  # R: the gradient of sum(out * R)
        analytic = case.backward(case.inputs, weights)
        tensors = {name: torch.tensor(value, requires_grad=True) for name, value in case.inputs.items()}
        (case.torch_forward(tensors) * torch.from_numpy(weights)).sum().backward()
        for name, value in case.inputs.items():
            numeric = finite_difference(lambda c=case, r=weights: float((c.forward(c.inputs) * r).sum()), value)
            results.append(Check(case.name, name, "finite difference", relative_error(analytic[name], numeric),
                                 FD_TOLERANCE))
            results.append(Check(case.name, name, "torch autograd",
                                 relative_error(analytic[name], tensors[name].grad.numpy()),
                                 TORCH_TOLERANCE[np.float64]))
    return results


def tiny_model_config(arch: str = "gpt") -> ModelConfig:
    # init_std 0.3, not 0.02: with GPT-2's small weights the inner layers' gradients are so small that
    # the finite differences' rounding error (about 1e-16 * loss / h) would swamp them
    return ModelConfig(arch=arch, vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, init_std=0.3)


def model_gradients(params: dict[str, np.ndarray], idx: np.ndarray, targets: np.ndarray, config: ModelConfig
                    ) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
    """Logits, loss and the gradient of every parameter, from the scratch engine."""
    logits, loss, cache = gpt_forward(params, idx, config, targets)
    grads = {name: np.zeros_like(value) for name, value in params.items()}
    gpt_backward(cache, params, grads, config)
    return logits, loss, grads


def torch_reference(config: ModelConfig, dtype: type, seed: int = 0, batch: int = 2):
    """A torch-engine GPT with every weight randomized (padding rows of wte kept at zero), a random batch,
    and its logits, loss and gradients: (params, idx, targets, logits, loss, grads) as NumPy."""
    import torch
    import torch.nn.functional as F

    from lmforge.model.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(config).to(torch.float64 if dtype is np.float64 else torch.float32)
    with torch.no_grad():  # biases at 0 and gains at 1 would leave half the chain rule untested
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
        model.wte.weight[config.vocab_size :] = 0
    generator = np.random.default_rng(seed)
    idx = generator.integers(0, config.vocab_size, (batch, config.block_size))
    targets = generator.integers(0, config.vocab_size, (batch, config.block_size))
    if config.arch == "encoder":  # masked LM: only some positions are scored
        targets = np.where(generator.random(targets.shape) < 0.3, targets, IGNORE)
        targets[:, 0] = idx[:, 0]
    logits, _ = model(torch.from_numpy(idx))
    # The loss outside the model: the torch engine upcasts logits to float32 for it, float64 must stay float64
    loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), torch.from_numpy(targets).reshape(-1))
    loss.backward()
    params = {name: p.detach().numpy().copy() for name, p in model.named_parameters()}
    grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters()}
    return params, idx, targets, logits.detach().numpy(), loss.item(), grads


def check_model(config: ModelConfig | None = None, seed: int = 0, finite_differences: bool = True) -> list[Check]:
    """The whole model: scratch gradients against central differences (float64) and against the torch
    engine's autograd, in float64 and float32."""
    config = config or tiny_model_config()
    case = "model" if config.arch == "gpt" else config.arch
    results = []
    for dtype in (np.float64, np.float32):
        params, idx, targets, logits, loss, torch_grads = torch_reference(config, dtype, seed)
        ours_logits, ours_loss, grads = model_gradients(params, idx, targets, config)
        tolerance = TORCH_TOLERANCE[dtype]
        kind = f"torch autograd ({np.dtype(dtype).name})"
        results.append(Check(case, "logits", kind, relative_error(ours_logits, logits), tolerance))
        results.append(Check(case, "loss", kind, abs(ours_loss - loss) / abs(loss), tolerance))
        for name in params:
            results.append(Check(case, name, kind, relative_error(grads[name], torch_grads[name]), tolerance))
        if finite_differences and dtype is np.float64:
            for name, value in params.items():
                numeric = finite_difference(lambda p=params, i=idx, t=targets: gpt_forward(p, i, config, t)[1], value)
                results.append(Check(case, name, "finite difference", relative_error(grads[name], numeric),
                                     FD_TOLERANCE))
    return results
