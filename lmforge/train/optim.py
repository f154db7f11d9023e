"""Optimizers: AdamW with weight decay on matrices only, and Muon for the hidden matrices.

Muon (momentum, then orthogonalize the update with a few Newton-Schulz iterations) trains the 2-D weights
inside the transformer blocks; embeddings, the output head, norms and biases stay with AdamW, as in the
speed-run recipes that made Muon popular. Every optimizer's `lr` is the peak rate; the trainer scales each
group by the schedule through the group's `initial_lr`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lmforge.config.sections import OptimConfig

# Coefficients of the quintic Newton-Schulz iteration tuned for speed of convergence (Keller Jordan, 2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U·Vᵀ of the SVD U·S·Vᵀ: every singular value pushed toward 1 (roughly 0.7 to 1.2)."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(torch.bfloat16 if matrix.is_cuda else torch.float32)
    transposed = x.size(0) > x.size(1)
    if transposed:  # iterate on the short side: X·Xᵀ is then the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1, inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.T
    return x.to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalized; for 2-D hidden weight matrices only."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - group["momentum"])
                update = param.grad.lerp(buffer, group["momentum"])  # Nesterov: look one step ahead
                if isinstance(update, DTensor):
                    update = _orthogonalize_sharded(update, group["ns_steps"])
                else:
                    update = orthogonalize(update.reshape(update.size(0), -1), group["ns_steps"]).view_as(param)
                # An orthogonal update has RMS 1/sqrt(max dim); rescale so tall and wide matrices move alike.
                scale = max(1.0, param.size(0) / math.prod(param.shape[1:])) ** 0.5
                if group["weight_decay"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"] * scale)


def _orthogonalize_sharded(update: DTensor, steps: int) -> DTensor:
    """Under FSDP each rank holds some rows of the update, but Newton-Schulz needs the whole matrix (X·Xᵀ mixes
    all rows): gather it, orthogonalize it on every rank (the same result everywhere), keep this rank's rows.
    The momentum buffer stays sharded; only one matrix at a time is ever whole. Each rank repeating the
    iteration costs compute rather than memory or code; for a few GPUs that is the cheaper side."""
    whole = update.full_tensor()
    whole = orthogonalize(whole.reshape(whole.size(0), -1), steps).view_as(whole)
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)


def _adamw(groups: list[dict], config: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             fused=device.type == "cuda")


def hidden_matrices(model: nn.Module) -> list[str]:
    """Names of the matrices Muon trains: every 2-D (or larger) weight except the embeddings (nn.Embedding
    tables, looked up row by row rather than multiplied) and the output head."""
    embeddings = {id(p) for module in model.modules() if isinstance(module, nn.Embedding)
                  for p in module.parameters(recurse=False)}
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.dim() >= 2 and id(p) not in embeddings and not name.startswith("lm_head.")]


def build_optimizers(model: nn.Module, config: OptimConfig, device: torch.device,
                     say: Callable[[str], None] | None = None) -> list[torch.optim.Optimizer]:
    """One or two optimizers that together own every trainable parameter of the model exactly once.

    Muon: on the hidden matrices, AdamW on the rest; a model without hidden matrices (a bigram table) trains
    with AdamW alone, and `say` is told so."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    matrices = [p for _, p in named if p.dim() >= 2]
    vectors = [p for _, p in named if p.dim() < 2]
    if config.name == "adamw":
        return [_adamw([{"params": matrices, "weight_decay": config.weight_decay},
                        {"params": vectors, "weight_decay": 0.0}], config, device)]
    # muon: the other optim.name choice lmforge/config/ allows
    hidden_names = set(hidden_matrices(model))
    hidden = [p for name, p in named if name in hidden_names]
    hidden_ids = {id(p) for p in hidden}
    others = [p for p in matrices if id(p) not in hidden_ids]
    adamw = _adamw([{"params": others, "weight_decay": config.weight_decay},
                    {"params": vectors, "weight_decay": 0.0}], config, device)
    if not hidden:
        if say is not None:
            say("optim.name = muon: this model has no hidden matrices for Muon (only embeddings and the "
                "head), so AdamW trains all of it")
        return [adamw]
    muon = Muon(hidden, lr=config.muon_lr, momentum=config.muon_momentum, weight_decay=0.0)
    return [adamw, muon]


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> float:
    """Scale every group's peak rate by the schedule; returns the first group's rate (for the log)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * multiplier
    return optimizers[0].param_groups[0]["lr"]
