"""Several processes training one model: torchrun's environment, DDP or FSDP2, and what the ranks share.

`torchrun --nproc_per_node N -m lmforge train ...` starts N copies of the trainer with RANK, WORLD_SIZE and
LOCAL_RANK set; without them (or with WORLD_SIZE=1) training is the ordinary single process, untouched by
anything here. Backend: nccl on CUDA (one GPU per local rank), gloo on the CPU.

- Parallelism (`train.parallel`): `ddp` keeps a whole replica on every rank and averages gradients with an
  all-reduce; `fsdp` shards parameters, gradients and optimizer state over the ranks with FSDP2's
  `fully_shard` (each transformer block one unit, then the root), gathering a block's weights only for its
  forward and backward.
- Data and accumulation: each rank reads its own slice of every global batch (`TrainLoader`), and runs
  tokens_per_step / (batch_size x block_size x ranks) micro-steps; the micro-steps before the last skip the
  gradient reduction (DDP `no_sync`, FSDP2 `set_requires_gradient_sync(False)`), so it happens once a step.
- Agreement: max_steps and epochs come out the same on every rank by construction; the clock (max_time,
  and the schedule that follows it) and signals do not, so before every step the ranks take the maximum of
  [elapsed seconds, stop requested] with one all-reduce over a CPU (gloo) group, which costs no GPU sync.
- Checkpoints: a gathered full state dict. Rank 0 writes exactly the files one process writes (whole
  tensors; the optimizer state keyed as `torch.optim` numbers parameters), so a checkpoint from any number
  of ranks resumes on any other number, in one process too, and `sample`, `eval` and `export` read it
  unchanged; torch.distributed.checkpoint would save in parallel but in a format of its own. On resume every
  rank reads the files (the run directory must be visible to every node) and keeps its own shard. The cost:
  saving gathers the model and optimizer state into rank 0's CPU memory, one tensor at a time.
- Failures: the process group has a timeout, `train.dist_timeout` seconds. When a rank dies its sockets
  close and the others' next collective fails at once; when it hangs, the others' collective gives up after
  the timeout (gloo raises; NCCL's watchdog aborts the process). Each surviving rank then stops with one
  line naming its rank (exit code 2), and resuming from the last checkpoint continues. torchrun's agent
  also stops the other ranks when one exits with an error.
- Muon: under DDP every rank holds the same averaged gradient and orthogonalizes it as one process would;
  under FSDP each rank gathers one whole matrix update at a time (`optim._orthogonalize_sharded`).
- Randomness: every rank starts from the same seed (FSDP shards the initial weights without a broadcast,
  so they must be equal everywhere); dropout masks are therefore the same on every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from lmforge.config.sections import TrainConfig
from lmforge.errors import UserError


@dataclass
class Cluster:
    """Where this process stands among the ranks of one training job (a lone process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    parallel: str = "ddp"
    device: torch.device | None = None
    control: Any = None  # the CPU process group for agreement: the default one under gloo, its own under nccl

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, logs, samples and writes files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.distributed and self.parallel == "fsdp"

    def shard(self, model: nn.Module) -> None:
        """FSDP: shard the model in place (before its optimizers are built: they must hold the shards)."""
        if not self.sharded:
            return
        # GPT's forward returns its logits as a slice (the padded vocabulary cut off), and FSDP2 warns that an
        # in-place op on such a view would skip its hooks; nothing in lmforge changes logits in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for block in getattr(model, "blocks", ()):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def replicate(self, forward: nn.Module) -> nn.Module:
        """DDP: the module that trains (averaging gradients across ranks); otherwise `forward` itself."""
        if not self.distributed or self.sharded:
            return forward
        return DistributedDataParallel(forward, device_ids=[self.device] if self.device.type == "cuda" else None)

    def agree(self, elapsed: float, stop_requested: bool) -> tuple[float, bool]:
        """The latest clock of any rank, and whether any rank was asked to stop: one answer for all."""
        if not self.distributed:
            return elapsed, stop_requested
        view = torch.tensor([elapsed, float(stop_requested)], dtype=torch.float64)
        dist.all_reduce(view, op=dist.ReduceOp.MAX, group=self.control)
        return view[0].item(), bool(view[1].item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.control)

    def gather_full(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """A model state dict with every shard gathered whole, on rank 0 (None elsewhere). A collective: every
        rank calls it with the same keys. Each tensor goes to the CPU as soon as it is whole, so the full model
        never has to fit on one device."""
        full = {}
        for key, value in state.items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
            if self.is_main:
                full[key] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
        return full if self.is_main else None

    def gather_optimizer(self, state: dict) -> dict | None:
        """An optimizer state dict (parameter number -> name -> tensor) gathered whole, on rank 0."""
        gathered = {index: self.gather_full(values) for index, values in sorted(state["state"].items())}
        return {"state": gathered, "param_groups": state["param_groups"]} if self.is_main else None

    def gather_rows(self, value: torch.Tensor) -> torch.Tensor | None:
        """Every rank's batch rows (dim 1) side by side in rank order, the global batch's rows, on rank 0's CPU
        (None elsewhere). A collective: every rank calls it with a tensor of the same shape."""
        if not self.distributed:
            return value.detach().cpu()
        parts = [torch.empty_like(value) for _ in range(self.world_size)]
        dist.all_gather(parts, value.detach().contiguous())
        return torch.cat(parts, dim=1).cpu() if self.is_main else None

    def own_rows(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's share of global batch rows (dim 1), as `gather_rows` put them together."""
        rows = value.size(1) // self.world_size
        return value[:, self.rank * rows : (self.rank + 1) * rows]

    def shard_like(self, full: dict[str, torch.Tensor], reference: dict[str, Any]) -> dict[str, Any]:
        """Whole tensors cut to the shards `reference` holds (FSDP), for load_state_dict; else `full` itself.
        Every rank already has the whole tensor (read from the checkpoint), so no communication is needed."""
        if not self.sharded:
            return full
        shards = dict(full)
        for key, value in full.items():
            target = reference.get(key)
            if isinstance(target, DTensor) and value.shape == target.shape:
                shards[key] = distribute_tensor(value.to(target.device), target.device_mesh, target.placements,
                                                src_data_rank=None)
        return shards

    def shard_optimizer(self, optimizer: torch.optim.Optimizer, state: dict) -> dict:
        """A whole optimizer state dict cut to this rank's shards of the parameters it belongs to."""
        if not self.sharded:
            return state
        params = [param for group in optimizer.param_groups for param in group["params"]]
        shards = {index: self.shard_like(values, dict.fromkeys(values, params[index]))
                  for index, values in state["state"].items() if index < len(params)}
        return {"state": shards, "param_groups": state["param_groups"]}

    @contextlib.contextmanager
    def collective_failures(self) -> Iterator[None]:
        """Turn a failed collective (another rank died or hung past the timeout) into one clear line."""
        try:
            yield
        except RuntimeError as err:
            # Why the text: a collective whose peer went away raises dist.DistError where torch wraps the
            # failure, but gloo's transport errors ("[.../gloo/transport/tcp/pair.cc:NNN] Connection closed by
            # peer ...") and NCCL's reach us as a bare RuntimeError, and the backend's name in the message is
            # the only mark they carry. Any other RuntimeError is a bug and keeps its traceback. The reason
            # shown is gloo's text after its "[file:line]" prefix, up to the first sentence.
            message = str(err)
            if not self.distributed or not (isinstance(err, dist.DistError) or "gloo" in message
                                            or "NCCL" in message):
                raise
            reason = message.split("]", 1)[-1].strip().split(". ")[0]
            # Tear the broken group down now: left to the interpreter's exit, gloo's threads abort the process.
            dist.destroy_process_group()
            raise UserError(f"rank {self.rank} of {self.world_size}: lost contact with another rank, which died, "
                            f"hung past train.dist_timeout or stopped early ({reason}); see the other ranks' "
                            f"output, then continue from the last checkpoint with --resume") from None

    def close(self) -> None:
        """Leave the job, once every rank is done. A gloo worker thread frees the tensors of a finished
        collective (FSDP's all-gathers, say) a moment later, and needs the GIL to do it: tearing the group down
        or letting the interpreter exit before then deadlocks or aborts the process. Hence a barrier, then a
        pause that leaves the GIL free to those threads, then the teardown. torch offers no call that waits for
        those threads, so the pause stays; 0.1 s is ample for a free of local buffers and is paid once per run."""
        if self.distributed and dist.is_initialized():
            dist.barrier(group=self.control)
            time.sleep(0.1)
            dist.destroy_process_group()


def start_cluster(train: TrainConfig, device: torch.device) -> tuple[Cluster, torch.device]:
    """Join the job torchrun started (a process group and, on CUDA, this local rank's GPU), or stay alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Cluster(parallel=train.parallel, device=device), device
    if train.engine == "scratch":
        raise UserError("the scratch engine trains in one process; run it without torchrun")
    if device.type == "mps":
        raise UserError("several processes need CUDA GPUs or the CPU, not MPS; use --train.device cpu")
    if train.parallel == "fsdp" and train.precision == "fp16":
        raise UserError("--parallel fsdp does not support train.precision fp16 (its loss scaling would differ "
                        "between shards); use bf16")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                            f"start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=train.dist_timeout))
    control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return Cluster(rank=rank, world_size=world_size, parallel=train.parallel, device=device, control=control), device


def skip_gradient_sync(model: nn.Module, forward: nn.Module) -> contextlib.AbstractContextManager:
    """What a micro-step before the last runs under: its gradients accumulate locally, not reduced yet."""
    if isinstance(forward, DistributedDataParallel):
        return forward.no_sync()
    if isinstance(model, FSDPModule):
        return _fsdp_without_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_without_sync(model: FSDPModule) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a per-rank value over all ranks (the value itself in one process); no host sync."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    total = value.clone()
    dist.all_reduce(total)  # gloo has no AVG: sum, then divide
    return total / dist.get_world_size()


def whole(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a DTensor result (FSDP's gradient norm), else the value itself."""
    return value.full_tensor() if isinstance(value, DTensor) else value
