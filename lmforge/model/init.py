"""Initialization, step 3 of the recipe: the starting weights, by one of three schemes.

- normal: every matrix and embedding N(0, init_std) (GPT-2's 0.02); the projections that write into the
  residual stream (`attn.proj`, `mlp.proj`) get init_std / sqrt(2 * n_layer), so that the sum of
  2 * n_layer residual branches starts with about the variance of one.
- xavier: matrices uniform in ±sqrt(6 / (fan_in + fan_out)), which keeps activation and gradient variance
  alike through tanh-like layers.
- kaiming: matrices N(0, 2 / fan_in), which keeps activation variance through ReLU-like layers.
With `model.zero_init_proj` those residual projections start at zero instead, under every scheme: each block
then starts as the identity and the first updates shape the residual stream (modded-nanogpt's choice). Under
every scheme embeddings are N(0, init_std), biases start at 0 and norm gains at 1; the rows that only
pad the vocabulary start (and stay) at 0. The recurrent models' matrices (torch's LSTM and GRU included) follow
the same schemes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config.sections import ModelConfig


@torch.no_grad()
def init_weights(model: nn.Module, config: ModelConfig) -> None:
    residual_std = config.init_std / math.sqrt(2 * max(config.n_layer, 1))  # a bigram has no layers
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=config.init_std)
        elif isinstance(module, nn.Linear):
            if config.init == "xavier":
                nn.init.xavier_uniform_(module.weight)
            elif config.init == "kaiming":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            else:
                std = residual_std if getattr(module, "residual", False) else config.init_std
                nn.init.normal_(module.weight, std=std)
            if config.zero_init_proj and getattr(module, "residual", False):
                nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.RNNBase):  # torch's LSTM and GRU: input and hidden matrices of every layer
            for name, param in module.named_parameters():
                if name.startswith("bias"):
                    nn.init.zeros_(param)
                elif config.init == "xavier":
                    nn.init.xavier_uniform_(param)
                elif config.init == "kaiming":
                    nn.init.kaiming_normal_(param, nonlinearity="relu")
                else:
                    nn.init.normal_(param, std=config.init_std)
        elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    for weight in (model.wte.weight, model.head_weight()):
        weight[config.vocab_size :] = 0
