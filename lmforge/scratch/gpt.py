"""The whole GPT-2 model, forward and backward, over a dict of NumPy arrays named as the torch engine's; with
`model.arch = "encoder"` the same model with bidirectional attention (its masked-LM targets IGNORE the positions
not chosen, which the cross-entropy leaves out).

Parameters are `wte.weight` (padded vocabulary V_pad x C; only the first vocab_size rows are ever used, so
the padding rows get zero gradient), `wpe.weight`, `blocks.{i}.{norm_1,attn.qkv,attn.proj,norm_2,mlp.fc,
mlp.proj}.{weight,bias}` and `norm_f.{weight,bias}`, in nn.Linear's (out, in) layout: the same names and
shapes as `lmforge.model.gpt.GPT`, so one checkpoint serves both engines. The head is tied to `wte`.
"""

from __future__ import annotations

import numpy as np

from lmforge.config.sections import ModelConfig
from lmforge.errors import UserError
from lmforge.scratch.layers import (
    LAYERNORM_EPS,
    attention_backward,
    attention_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)


def check_scratch_config(config: ModelConfig) -> None:
    """Refuse, naming the option, every model setting the scratch engine does not implement."""
    if config.arch not in ("gpt", "encoder"):
        raise UserError(f"the scratch engine implements the GPT-2 transformer only (as a decoder or an encoder), not "
                        f"model.arch = '{config.arch}'; use --engine torch")
    unsupported = [
        ("model.position", config.position, "learned"),
        ("model.norm", config.norm, "layernorm"),
        ("model.mlp", config.mlp, "gelu"),
        ("model.qk_norm", config.qk_norm, False),
        ("model.n_kv_head", config.n_kv_head if config.n_kv_head not in (0, config.n_head) else 0, 0),
        ("model.tie_embeddings", config.tie_embeddings, True),
        ("model.bias", config.bias, True),
        ("model.logit_softcap", config.logit_softcap, 0.0),
        ("model.value_embeddings", config.value_embeddings, False),
        ("model.multi_token", config.multi_token, 0),
        ("model.dropout", config.dropout, 0.0),
        ("model.norm_eps", config.norm_eps if config.norm_eps != LAYERNORM_EPS else 0.0, 0.0),
    ]
    for option, value, supported in unsupported:
        if value != supported:
            raise UserError(f"the scratch engine does not support {option} = {value!r} (it builds GPT-2: "
                            f"{option} = {supported!r}); use --engine torch")


def gpt_forward(params: dict[str, np.ndarray], idx: np.ndarray, config: ModelConfig,
                targets: np.ndarray | None = None) -> tuple[np.ndarray, float | None, dict]:
    """Logits (B, T, vocab_size) for token ids idx (B, T), the mean cross-entropy against targets (or None),
    and the cache `gpt_backward` needs."""
    batch, length = idx.shape
    if length > config.block_size:
        raise ValueError(f"sequence of {length} tokens exceeds block_size {config.block_size}")
    rows, channels, vocab = batch * length, config.n_embd, config.vocab_size
    x = embedding_forward(params["wte.weight"], params["wpe.weight"], idx).reshape(rows, channels)
    layers = []
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        h1, norm_1 = layernorm_forward(x, params[p + "norm_1.weight"], params[p + "norm_1.bias"])
        qkv = linear_forward(h1, params[p + "attn.qkv.weight"], params[p + "attn.qkv.bias"])
        heads, attention = attention_forward(qkv.reshape(batch, length, -1), config.n_head,
                                             causal=config.arch == "gpt")
        heads = heads.reshape(rows, channels)
        x = x + linear_forward(heads, params[p + "attn.proj.weight"], params[p + "attn.proj.bias"])
        h2, norm_2 = layernorm_forward(x, params[p + "norm_2.weight"], params[p + "norm_2.bias"])
        fc = linear_forward(h2, params[p + "mlp.fc.weight"], params[p + "mlp.fc.bias"])
        gelu, tanh_u = gelu_forward(fc)
        x = x + linear_forward(gelu, params[p + "mlp.proj.weight"], params[p + "mlp.proj.bias"])
        layers.append((h1, norm_1, attention, heads, h2, norm_2, fc, gelu, tanh_u))
    hf, norm_f = layernorm_forward(x, params["norm_f.weight"], params["norm_f.bias"])
    logits = linear_forward(hf, params["wte.weight"][:vocab], None)  # tied head over the real vocabulary
    cache = {"idx": idx, "layers": layers, "hf": hf, "norm_f": norm_f}
    loss = None
    if targets is not None:
        loss, cache["probs"] = cross_entropy_forward(logits, targets.reshape(-1))
        cache["targets"] = targets.reshape(-1)
    return logits.reshape(batch, length, vocab), loss, cache


def gpt_backward(cache: dict, params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
                 config: ModelConfig) -> None:
    """Add the gradient of the forward's loss to `grads` (arrays shaped like `params`), output to input."""
    idx = cache["idx"]
    batch, length = idx.shape
    vocab = config.vocab_size

    def add(name: str, value: np.ndarray) -> None:
        grads[name] += value

    dlogits = cross_entropy_backward(cache["probs"], cache["targets"])
    dhf, dhead, _ = linear_backward(dlogits, cache["hf"], params["wte.weight"][:vocab])
    grads["wte.weight"][:vocab] += dhead
    dx, dw, db = layernorm_backward(dhf, cache["norm_f"], params["norm_f.weight"])
    add("norm_f.weight", dw)
    add("norm_f.bias", db)
    for i in reversed(range(config.n_layer)):
        p = f"blocks.{i}."
        h1, norm_1, attention, heads, h2, norm_2, fc, gelu, tanh_u = cache["layers"][i]
        # x_out = x_mid + mlp(norm_2(x_mid)): the residual passes dx to x_mid unchanged, plus the MLP's path
        dgelu, dw, db = linear_backward(dx, gelu, params[p + "mlp.proj.weight"])
        add(p + "mlp.proj.weight", dw)
        add(p + "mlp.proj.bias", db)
        dfc = gelu_backward(dgelu, fc, tanh_u)
        dh2, dw, db = linear_backward(dfc, h2, params[p + "mlp.fc.weight"])
        add(p + "mlp.fc.weight", dw)
        add(p + "mlp.fc.bias", db)
        dnorm, dw, db = layernorm_backward(dh2, norm_2, params[p + "norm_2.weight"])
        add(p + "norm_2.weight", dw)
        add(p + "norm_2.bias", db)
        dx = dx + dnorm
        # x_mid = x_in + proj(attention(qkv(norm_1(x_in)))): the same shape of sum
        dheads, dw, db = linear_backward(dx, heads, params[p + "attn.proj.weight"])
        add(p + "attn.proj.weight", dw)
        add(p + "attn.proj.bias", db)
        dqkv = attention_backward(dheads.reshape(batch, length, -1), attention).reshape(batch * length, -1)
        dh1, dw, db = linear_backward(dqkv, h1, params[p + "attn.qkv.weight"])
        add(p + "attn.qkv.weight", dw)
        add(p + "attn.qkv.bias", db)
        dnorm, dw, db = layernorm_backward(dh1, norm_1, params[p + "norm_1.weight"])
        add(p + "norm_1.weight", dw)
        add(p + "norm_1.bias", db)
        dx = dx + dnorm
    embedding_backward(dx.reshape(batch, length, -1), idx, grads["wte.weight"], grads["wpe.weight"])
