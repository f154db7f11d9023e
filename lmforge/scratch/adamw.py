"""AdamW and gradient clipping written out, the same arithmetic as torch.optim.AdamW and clip_grad_norm_.

The update runs over each tensor in chunks that fit in the CPU cache, with one scratch buffer: six passes
over a chunk in cache cost far less than six passes over a 150 MB embedding in memory.
"""

from __future__ import annotations

import math

import numpy as np

CHUNK = 1 << 15  # elements per cache-sized piece of the update


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients so their joint L2 norm is at most max_norm (0: no clipping); returns the norm
    before clipping. As torch: scale = min(1, max_norm / (norm + 1e-6))."""
    norm = math.sqrt(sum(float(np.dot(g.reshape(-1), g.reshape(-1))) for g in grads.values()))
    if max_norm > 0:
        scale = min(1.0, max_norm / (norm + 1e-6))
        if scale < 1.0:
            for g in grads.values():
                g *= g.dtype.type(scale)
    return norm


def adamw_update(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray, *,
                 step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step on one tensor, in place (step counts from 1):
    p <- p (1 - lr wd)                                  decoupled weight decay
    m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2   moving averages of the gradient and its square
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)   bias-corrected step."""
    dtype = param.dtype.type
    decay = dtype(1 - lr * weight_decay)
    step_size = dtype(lr / (1 - beta1**step))
    bias2_sqrt = dtype(math.sqrt(1 - beta2**step))
    one_minus_b1, b2, one_minus_b2, eps = dtype(1 - beta1), dtype(beta2), dtype(1 - beta2), dtype(eps)
    p, g, m, v = (a.reshape(-1) for a in (param, grad, exp_avg, exp_avg_sq))
    buffer = np.empty(min(CHUNK, p.size), dtype=param.dtype)
    for start in range(0, p.size, CHUNK):
        piece = slice(start, start + CHUNK)
        pc, gc, mc, vc = p[piece], g[piece], m[piece], v[piece]
        t = buffer[: pc.size]
        if weight_decay:
            pc *= decay
        np.subtract(gc, mc, out=t)  # m + (1 - b1)(g - m), torch's lerp
        t *= one_minus_b1
        mc += t
        vc *= b2
        np.multiply(gc, gc, out=t)
        t *= one_minus_b2
        vc += t
        np.sqrt(vc, out=t)
        t /= bias2_sqrt
        t += eps
        np.divide(mc, t, out=t)
        t *= step_size
        pc -= t


class AdamW:
    """AdamW over named NumPy parameters. Two groups, as the torch engine: matrices (2-D and up) with weight
    decay, vectors (biases, norm gains) without. `param_groups[i]["lr"]` is what the schedule sets."""

    def __init__(self, params: dict[str, np.ndarray], *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float):
        groups = [([n for n, p in params.items() if p.ndim >= 2], weight_decay),
                  ([n for n, p in params.items() if p.ndim < 2], 0.0)]
        self.param_groups = [{"params": names, "lr": lr, "betas": betas, "eps": eps, "weight_decay": decay}
                             for names, decay in groups if names]
        self.state: dict[str, dict] = {}  # name -> {"step": int, "exp_avg": array, "exp_avg_sq": array}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for name in group["params"]:
                state = self.state.get(name)
                if state is None:
                    state = self.state[name] = {"step": 0, "exp_avg": np.zeros_like(params[name]),
                                                "exp_avg_sq": np.zeros_like(params[name])}
                state["step"] += 1
                adamw_update(params[name], grads[name], state["exp_avg"], state["exp_avg_sq"], step=state["step"],
                             lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"])
