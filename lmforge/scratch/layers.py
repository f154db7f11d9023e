"""Every layer of GPT-2 (and of the encoder: attention without its mask) as a forward/backward pair of plain
NumPy functions, the chain rule written out.

Each `*_backward` sits right under its `*_forward`. It takes the gradient of the loss with respect to the
forward's output (`dout`, same shape as the output) and whatever the forward kept (its `cache`), and returns
the gradients with respect to the forward's inputs and parameters. Shapes: N rows (batch x time folded
together, so every matmul is one BLAS call), C channels, B batch, T time, H heads, D = C / H head size,
V vocabulary. Everything runs in the dtype of its inputs (float32 to train, float64 to check gradients).
"""

from __future__ import annotations

import math

import numpy as np

from lmforge.model.masking import IGNORE

# Python floats, not NumPy scalars: a float64 NumPy scalar would promote float32 arrays to float64
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715
LAYERNORM_EPS = 1e-5


# ----- activations -----


def sigmoid_forward(x: np.ndarray) -> np.ndarray:
    # s = 1 / (1 + e^-x), written so that neither branch overflows
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def sigmoid_backward(dout: np.ndarray, out: np.ndarray) -> np.ndarray:
    # ds/dx = s (1 - s)
    return dout * out * (1 - out)


def tanh_forward(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


def tanh_backward(dout: np.ndarray, out: np.ndarray) -> np.ndarray:
    # d tanh(x)/dx = 1 - tanh(x)^2
    return dout * (1 - out * out)


def relu_forward(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def relu_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    # d max(x, 0)/dx = 1 where x > 0, else 0 (0 at the kink, as torch)
    return dout * (x > 0)


def gelu_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # GPT-2's tanh approximation: g = x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3); keeps tanh(u)
    tanh_u = np.tanh(GELU_SCALE * (x + GELU_CUBIC * x * x * x))
    return 0.5 * x * (1 + tanh_u), tanh_u


def gelu_backward(dout: np.ndarray, x: np.ndarray, tanh_u: np.ndarray) -> np.ndarray:
    # dg/dx = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) du/dx,  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    # (in place on two buffers: on the 124M model this runs over 12 x 256 x 3072 elements)
    grad = x * x
    grad *= 3 * GELU_CUBIC * GELU_SCALE
    grad += GELU_SCALE
    grad *= x
    grad *= 0.5
    sech2 = tanh_u * tanh_u
    np.subtract(1, sech2, out=sech2)
    grad *= sech2
    np.add(tanh_u, 1, out=sech2)
    sech2 *= 0.5
    grad += sech2
    grad *= dout
    return grad


def softmax_forward(x: np.ndarray) -> np.ndarray:
    # s_i = e^(x_i - max x) / sum_j e^(x_j - max x) over the last axis (the shift changes nothing but overflow)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def softmax_jvp(s: np.ndarray, v: np.ndarray) -> np.ndarray:
    # J v with J = diag(s) - s s^T: (J v)_i = s_i (v_i - sum_j s_j v_j). J is symmetric, so this is also
    # the backward (dout^T J): softmax_backward(dout, s) = softmax_jvp(s, dout).
    return s * (v - (s * v).sum(axis=-1, keepdims=True))


# ----- layers with parameters -----


def embedding_forward(wte: np.ndarray, wpe: np.ndarray, idx: np.ndarray) -> np.ndarray:
    # (B, T) token ids -> (B, T, C): token row plus position row
    return wte[idx] + wpe[: idx.shape[1]]


def embedding_backward(dout: np.ndarray, idx: np.ndarray, dwte: np.ndarray, dwpe: np.ndarray) -> None:
    # each output row is a sum of two looked-up rows, so its gradient flows to both unchanged; repeated
    # tokens (and every batch row, for positions) add up. Accumulates into dwte (V, C) and dwpe (T_max, C).
    channels = dout.shape[-1]
    np.add.at(dwte, idx.reshape(-1), dout.reshape(-1, channels))
    dwpe[: idx.shape[1]] += dout.sum(axis=0)


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    # (N, in) @ (out, in)^T + (out,) -> (N, out); w in nn.Linear's (out, in) layout
    out = x @ w.T
    if b is not None:
        out += b
    return out


def linear_backward(dout: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # y = x w^T + b:  dx = dout w (N, in),  dw = dout^T x (out, in),  db = sum over rows of dout (out,)
    return dout @ w, dout.T @ x, dout.sum(axis=0)


def layernorm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, tuple]:
    # (N, C): xhat = (x - mean) / sqrt(var + eps) per row (biased variance), out = xhat * w + b
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    rstd = 1.0 / np.sqrt((centered * centered).mean(axis=-1, keepdims=True) + LAYERNORM_EPS)
    xhat = centered * rstd
    return xhat * w + b, (xhat, rstd)


def layernorm_backward(dout: np.ndarray, cache: tuple, w: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # dxhat = dout w;  dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) per row (the mean and the
    # scale both depend on every x of the row);  dw = sum of dout xhat, db = sum of dout over rows
    xhat, rstd = cache
    dxhat = dout * w
    dx = dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    dx *= rstd
    return dx, (dout * xhat).sum(axis=0), dout.sum(axis=0)


def attention_forward(qkv: np.ndarray, n_head: int, causal: bool = True) -> tuple[np.ndarray, tuple]:
    # (B, T, 3C) fused q, k, v -> (B, T, C): per head, softmax(q k^T / sqrt(D) + causal mask) v; an encoder
    # (causal False) has no mask: every position attends to every other, and the backward is the same
    batch, length, three_c = qkv.shape
    channels = three_c // 3
    heads = qkv.reshape(batch, length, 3, n_head, channels // n_head).transpose(2, 0, 3, 1, 4)
    q, k, v = heads[0], heads[1], heads[2]  # (B, H, T, D) each
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale  # (B, H, T, T)
    if causal:
        scores[..., np.triu(np.ones((length, length), dtype=bool), k=1)] = -np.inf  # no peeking at the future
    att = softmax_forward(scores)
    y = att @ v  # (B, H, T, D)
    return y.transpose(0, 2, 1, 3).reshape(batch, length, channels), (q, k, v, att, scale)


def attention_backward(dout: np.ndarray, cache: tuple) -> np.ndarray:
    # y = A v:  dA = dy v^T,  dv = A^T dy;  A = softmax(S):  dS = A * (dA - rowsum(A * dA)) (the softmax
    # JVP; masked entries have A = 0, so they get no gradient);  S = q k^T s:  dq = dS k s,  dk = dS^T q s.
    # Every product is a batched (B, H) matmul: one BLAS call per head, no loop over time.
    q, k, v, att, scale = cache
    batch, n_head, length, head_size = q.shape
    dy = dout.reshape(batch, length, n_head, head_size).transpose(0, 2, 1, 3)
    datt = dy @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dy
    dscores = softmax_jvp(att, datt)
    dscores *= scale
    dq = dscores @ k
    dk = dscores.transpose(0, 1, 3, 2) @ q
    dqkv = np.stack((dq, dk, dv))  # (3, B, H, T, D) -> (B, T, 3, H, D), the fused layout
    return dqkv.transpose(1, 3, 0, 2, 4).reshape(batch, length, 3 * n_head * head_size)


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    # (N, V) logits, (N,) targets -> mean over scored rows of logsumexp(logits) - logits[target]; keeps the
    # softmax. A target of IGNORE (masked LM: a position not chosen) scores nothing, as in torch.
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    sums = probs.sum(axis=-1, keepdims=True)
    probs /= sums
    rows = np.flatnonzero(targets != IGNORE)
    return float((np.log(sums[rows, 0]) - shifted[rows, targets[rows]]).mean()), probs


def cross_entropy_backward(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    # d loss / d logits = (softmax - onehot(target)) / N over the N scored rows: the probabilities, minus 1 at
    # the right answer; an ignored row's gradient is exactly zero
    scored = targets != IGNORE
    rows = np.flatnonzero(scored)
    dlogits = probs * scored[:, None]
    dlogits[rows, targets[rows]] -= 1
    dlogits /= len(rows)
    return dlogits
