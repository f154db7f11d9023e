"""The engines behind one interface: what the trainer and `lmforge bench` need to take an optimizer step.

An engine has `step(next_batch, accumulation, grad_clip) -> (mean loss, gradient norm before clipping)`, a
`forward` for evaluation and samples ((idx, targets=None) -> (logits, loss)), `optimizers` whose state goes
into checkpoints (and whose rates the schedule sets), and `close()`. `build_engine` makes the one the config
asks for; the loop never asks which it holds.

- `TorchEngine`: PyTorch autograd, mixed precision, torch.compile, and DDP/FSDP under torchrun.
- `ScratchEngine`: NumPy forward, backward and AdamW on the torch model's own memory. For
  `train.engine = "scratch"` the parameters are NumPy views of the torch GPT's CPU float32 tensors: the torch
  module is only the container that initialization, checkpoints, parameter counts and samples already use,
  while every number of a training step is computed by `lmforge.scratch`. The optimizer state is kept in torch
  AdamW's layout (the same `optimizer.safetensors` keys and groups), so a checkpoint written by either engine
  resumes in the other.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lmforge.config.sections import Config, OptimConfig
from lmforge.errors import UserError
from lmforge.hardware import autocast, resolve_compile, resolve_device, resolve_precision
from lmforge.model.gpt import GPT
from lmforge.scratch.adamw import AdamW, clip_grad_norm
from lmforge.scratch.gpt import check_scratch_config, gpt_backward, gpt_forward
from lmforge.scratch.module import ScratchForward
from lmforge.train.distributed import Cluster, mean_over_ranks, skip_gradient_sync, whole
from lmforge.train.optim import build_optimizers

Batches = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def check_engine(config: Config) -> None:
    """Refuse an unknown engine, and every setting the scratch engine does not implement, naming the option."""
    train = config.train
    if train.engine != "scratch":
        return
    check_scratch_config(config.model)
    if train.threads:
        raise UserError(f"the scratch engine does not support train.threads = {train.threads}: its matrix "
                        "products are NumPy's, whose threads OMP_NUM_THREADS sets before the start; leave "
                        "train.threads at 0")
    for option, value, supported in (("optim.name", config.optim.name, ("adamw",)),
                                     ("train.device", train.device, ("auto", "cpu")),
                                     ("train.precision", train.precision, ("auto", "fp32")),
                                     ("train.compile", train.compile, (None, False))):
        if value not in supported:
            raise UserError(f"the scratch engine does not support {option} = {value!r} (it runs NumPy float32 "
                            f"on the CPU with AdamW); use --engine torch")


class ScratchOptimizer:
    """The scratch AdamW seen through torch.optim's interface: `param_groups` (the schedule writes `lr`),
    and `state_dict`/`load_state_dict` in torch AdamW's layout (parameters numbered across the groups,
    state `step`, `exp_avg`, `exp_avg_sq`; torch's other group options carried along unchanged)."""

    def __init__(self, model: GPT, params: dict[str, np.ndarray], config: OptimConfig):
        self.params = params
        self.grads = {name: np.zeros_like(value) for name, value in params.items()}
        self.adamw = AdamW(params, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                           weight_decay=config.weight_decay)
        self.param_groups = self.adamw.param_groups
        template = build_optimizers(model, config, torch.device("cpu"))[0].state_dict()["param_groups"]
        self.torch_options = [{k: v for k, v in group.items() if k not in self.param_groups[0]} for group in template]
        self.names = [name for group in self.param_groups for name in group["params"]]
        if [len(g["params"]) for g in template] != [len(g["params"]) for g in self.param_groups]:
            raise RuntimeError("the scratch AdamW's groups differ from the torch engine's")

    def step(self) -> None:
        self.adamw.step(self.params, self.grads)

    def state_dict(self) -> dict:
        groups, first = [], 0
        for group, options in zip(self.param_groups, self.torch_options, strict=True):
            count = len(group["params"])
            groups.append({**options, **group, "params": list(range(first, first + count))})
            first += count
        state = {self.names.index(name): {"step": torch.tensor(float(values["step"])),
                                          "exp_avg": torch.from_numpy(values["exp_avg"]),
                                          "exp_avg_sq": torch.from_numpy(values["exp_avg_sq"])}
                 for name, values in self.adamw.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise UserError("the checkpoint's optimizer state does not fit this model's parameters")
        for group, saved in zip(self.param_groups, groups, strict=True):
            group.update({k: v for k, v in saved.items() if k in group and k != "params" or k == "initial_lr"})
            group["betas"] = tuple(group["betas"])
        self.adamw.state = {}
        for param_id, values in state_dict["state"].items():
            name = self.names[int(param_id)]
            self.adamw.state[name] = {
                "step": int(values["step"]),
                "exp_avg": np.array(values["exp_avg"].numpy(), dtype=self.params[name].dtype),
                "exp_avg_sq": np.array(values["exp_avg_sq"].numpy(), dtype=self.params[name].dtype)}


class ScratchEngine:
    """The NumPy engine: its own forward, backward and AdamW (GPT only, fp32 on the CPU)."""

    def __init__(self, model: GPT, config: Config):
        check_scratch_config(config.model)
        self.config = config.model
        self.forward = ScratchForward(model)
        self.optimizer = ScratchOptimizer(model, self.forward.params, config.optim)
        self.optimizers = [self.optimizer]
        self.compiled = False

    def step(self, next_batch: Batches, accumulation: int, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over `accumulation` micro-batches, then one clipped AdamW update; returns the
        mean loss and the gradient norm before clipping, as TorchEngine.step."""
        params, grads = self.optimizer.params, self.optimizer.grads
        for grad in grads.values():
            grad.fill(0)
        loss_sum = 0.0
        for _ in range(accumulation):
            inputs, targets = next_batch()
            _, loss, cache = gpt_forward(params, inputs.numpy(), self.config, targets.numpy())
            loss_sum += loss
            gpt_backward(cache, params, grads, self.config)
            del cache  # the activations of one micro-batch at a time
        if accumulation > 1:  # gradients of the mean over the whole global batch
            for grad in grads.values():
                grad *= grad.dtype.type(1 / accumulation)
        grad_norm = clip_grad_norm(grads, grad_clip)
        self.optimizer.step()
        return torch.tensor(loss_sum / accumulation), torch.tensor(grad_norm)

    def close(self) -> None:
        pass


class TorchEngine:
    """The PyTorch engine. `forward` is the model itself or its compiled version (for evaluation and samples);
    `train_forward` is that, wrapped in DDP when several ranks replicate the model."""

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], *, device: torch.device,
                 precision: str, forward: nn.Module | None = None, train_forward: nn.Module | None = None):
        self.model = model
        self.optimizers = optimizers
        self.device = device
        self.precision = precision
        self.forward = forward if forward is not None else model
        self.train_forward = train_forward if train_forward is not None else self.forward
        self.compiled = self.forward is not model
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(self, next_batch: Batches, accumulation: int, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over `accumulation` micro-batches, then one clipped update.

        Returns the mean loss over the global batch (all ranks) and the gradient norm before clipping, both
        still on the device (reading them costs a sync). Under DDP or FSDP the micro-steps before the last
        accumulate their gradients unreduced.
        """
        model, scaler, optimizers = self.model, self.scaler, self.optimizers
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(accumulation):
            inputs, targets = next_batch()
            last = micro_step == accumulation - 1
            with contextlib.nullcontext() if last else skip_gradient_sync(model, self.train_forward):
                with autocast(self.device, self.precision):
                    _, loss = self.train_forward(inputs, targets)
                loss_sum += loss.detach()
                loss = loss / accumulation  # gradients of the mean over the whole global batch
                (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            for optimizer in optimizers:
                scaler.unscale_(optimizer)
        grad_norm = whole(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf))
        for optimizer in optimizers:
            scaler.step(optimizer) if scaler else optimizer.step()
        if scaler:
            scaler.update()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        return mean_over_ranks(loss_sum / accumulation), grad_norm

    def close(self) -> None:
        self.train_forward = self.forward  # DDP's reducer holds the process group: let go of it first


Engine = TorchEngine | ScratchEngine


def engine_device(config: Config) -> tuple[torch.device, str]:
    """The device and precision the config's engine runs on (the scratch engine: NumPy fp32 on the CPU)."""
    check_engine(config)
    if config.train.engine == "scratch":
        return torch.device("cpu"), "fp32"
    device = resolve_device(config.train.device)
    return device, resolve_precision(config.train.precision, device)


def build_engine(config: Config, model: nn.Module, device: torch.device, precision: str,
                 cluster: Cluster | None = None, say: Callable[[str], None] | None = None) -> Engine:
    """The engine the config asks for, around a model already on `device`. Under torchrun, `cluster` shards
    the model (FSDP: before the optimizers, which must hold the shards) or replicates its forward (DDP).
    `say` hears about choices the config did not spell out (Muon on a model without hidden matrices)."""
    cluster = cluster or Cluster(device=device)
    if config.train.engine == "scratch":
        return ScratchEngine(model, config)
    if config.train.threads:  # for the whole process: the trainer's evaluations and samples run on them too
        torch.set_num_threads(config.train.threads)
    cluster.shard(model)
    optimizers = build_optimizers(model, config.optim, device, say)
    forward = torch.compile(model) if resolve_compile(config.train.compile, device) else model
    return TorchEngine(model, optimizers, device=device, precision=precision, forward=forward,
                       train_forward=cluster.replicate(forward))
