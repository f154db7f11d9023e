"""The scratch engine inside the trainer: NumPy forward, backward and AdamW, on the torch model's own memory.

The trainer's loop, schedule, logging, evaluation, checkpoints and resume are one code path for both
engines. For `train.engine = "scratch"` the parameters are NumPy views of the torch GPT's CPU float32
tensors: the torch module is only the container that initialization, checkpoints, parameter counts and
samples already use, while every number of a training step is computed by `lmforge.scratch`. The optimizer
state is kept in torch AdamW's layout (the same `optimizer.safetensors` keys and groups), so a checkpoint
written by either engine resumes in the other.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lmforge.config import ENGINES, Config, OptimConfig
from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.scratch.adamw import AdamW, clip_grad_norm
from lmforge.scratch.gpt import check_scratch_config, gpt_backward, gpt_forward
from lmforge.train.optim import build_optimizers


def check_engine(config: Config) -> None:
    """Refuse an unknown engine, and every setting the scratch engine does not implement, naming the option."""
    train = config.train
    if train.engine not in ENGINES:
        raise UserError(f"unknown engine '{train.engine}'; choose torch or scratch")
    if train.engine != "scratch":
        return
    if config.model.arch != "gpt":
        raise UserError(f"the scratch engine implements the GPT-2 transformer only, not model.arch = "
                        f"'{config.model.arch}'; use --engine torch")
    if config.model.activation not in ("", "gelu"):
        raise UserError(f"the scratch engine implements GPT-2's GELU only, not model.activation = "
                        f"'{config.model.activation}'; use --engine torch")
    check_scratch_config(config.model)
    for option, value, supported in (("optim.name", config.optim.name, ("adamw",)),
                                     ("train.device", train.device, ("auto", "cpu")),
                                     ("train.precision", train.precision, ("auto", "fp32")),
                                     ("train.compile", train.compile, (None, False))):
        if value not in supported:
            raise UserError(f"the scratch engine does not support {option} = {value!r} (it runs NumPy float32 "
                            f"on the CPU with AdamW); use --engine torch")


def numpy_parameters(model: GPT) -> dict[str, np.ndarray]:
    """Views (not copies) of the model's parameters: writing one writes the other."""
    return {name: param.detach().numpy() for name, param in model.named_parameters()}


class ScratchForward(nn.Module):
    """The scratch engine's forward behind the torch model's call signature, for evaluate() and generate():
    (idx, targets=None) -> (logits, loss). It holds no parameters of its own; `wte` and `config` are the
    model's, because generate() reads the device and the context length from them."""

    def __init__(self, model: GPT):
        super().__init__()
        check_scratch_config(model.config)
        self.config = model.config
        self.wte = model.wte
        self.params = numpy_parameters(model)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, loss, _ = gpt_forward(self.params, idx.numpy(), self.config,
                                      None if targets is None else targets.numpy())
        return torch.from_numpy(logits), None if loss is None else torch.tensor(loss)


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
    """What the trainer needs of an engine: an optimizer step over micro-batches, a forward for evaluation,
    and an optimizer whose state goes into checkpoints."""

    def __init__(self, model: GPT, config: Config):
        check_scratch_config(config.model)
        self.config = config.model
        self.forward = ScratchForward(model)
        self.optimizer = ScratchOptimizer(model, self.forward.params, config.optim)

    def step(self, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], accumulation: int,
             grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over `accumulation` micro-batches, then one clipped AdamW update; returns the
        mean loss and the gradient norm before clipping, as the torch engine's optimizer_step."""
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
