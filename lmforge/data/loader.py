"""Batches of token windows from the shards, in an order that makes epochs real and resume exact.

The training tokens are cut into non-overlapping windows of `block_size + 1` tokens (inputs and their
next-token targets share the boundary token), never crossing a shard boundary. One epoch visits every
window exactly once, in a fresh seeded permutation (or in corpus order with `shuffle=False`).

With `sequential=True` (for recurrent models' truncated BPTT) the windows are instead dealt into parallel
streams, one per row of the global batch: row j reads windows j*L, j*L + 1, ... (L = windows // rows), so
each batch continues every row exactly where the previous batch left it, and an epoch is L batches (the
few windows past rows * L are left out). The rows are those of one micro-batch on every rank (batch_size *
world_size): with gradient accumulation the micro-steps of one step continue the same streams, so in this mode
the order depends on how the global batch is split, and a resume with another batch_size * world_size starts the
recurrent state again (the trainer says so).

The loader's whole state is one integer, `cursor`: how many windows the whole job (every rank) has
consumed. Window number g of the job is window perm_e[g mod n] of epoch e = g div n. At each micro-step
the ranks take consecutive, disjoint slices of the next `batch_size * world_size` windows, so the data a
run sees depends only on the global batch, not on how many processes share it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmforge.data.shards import list_shards, read_shard
from lmforge.errors import UserError


class TokenWindows:
    """Random access to the non-overlapping (block_size + 1)-token windows of one split."""

    def __init__(self, data_dir: str | Path, split: str, block_size: int):
        self.block_size = block_size
        self.shards = [read_shard(path) for path in list_shards(data_dir, split)]
        counts = [max(0, (len(tokens) - 1) // block_size) for tokens in self.shards]
        self.num_windows = int(sum(counts))
        self.num_tokens = int(sum(len(tokens) for tokens in self.shards))
        if self.num_windows == 0:
            raise UserError(
                f"the {split} split of {data_dir} has {self.num_tokens} tokens, fewer than one window of "
                f"block_size + 1 = {block_size + 1}; use a smaller model.block_size or more data"
            )
        self._starts = np.cumsum([0] + counts)  # first global window index of each shard

    def gather(self, window_ids: np.ndarray) -> np.ndarray:
        """The windows with these global indices, as a (len(ids), block_size + 1) int64 array."""
        out = np.empty((len(window_ids), self.block_size + 1), dtype=np.int64)
        shard_ids = np.searchsorted(self._starts, window_ids, side="right") - 1
        for row, (window, shard) in enumerate(zip(window_ids, shard_ids, strict=True)):
            offset = (int(window) - int(self._starts[shard])) * self.block_size
            out[row] = self.shards[shard][offset : offset + self.block_size + 1]
        return out


def to_batch(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split windows into inputs and targets on the device (pinned, non-blocking copies on CUDA)."""
    tensor = torch.from_numpy(windows)
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return tensor[:, :-1], tensor[:, 1:]


class TrainLoader:
    """Endless stream of training batches; `epoch` and `state_dict` describe where it stands."""

    def __init__(self, data_dir: str | Path, block_size: int, batch_size: int, *, shuffle: bool = True,
                 seed: int = 1337, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 sequential: bool = False):
        self.windows = TokenWindows(data_dir, "train", block_size)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.sequential = sequential
        self.streams = batch_size * world_size  # sequential: one stream per row of the global batch
        self.stream_windows = self.windows.num_windows // self.streams
        if sequential and self.stream_windows == 0:
            raise UserError(f"data.sequential needs at least one window per batch row: {self.streams} rows, "
                            f"{self.windows.num_windows} training windows; use a smaller train.batch_size")
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.cursor = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def windows_per_epoch(self) -> int:
        return self.stream_windows * self.streams if self.sequential else self.windows.num_windows

    @property
    def epoch(self) -> float:
        """Epochs completed so far, fractional: windows consumed / windows per epoch."""
        return self.cursor / self.windows_per_epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            count = self.windows.num_windows
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(count)
            else:
                self._order = np.arange(count)
            self._order_epoch = epoch
        return self._order

    def _window_ids(self, first: int, count: int) -> np.ndarray:
        if self.sequential:  # global window g: row g mod streams of batch g div streams
            batch, row = np.divmod(np.arange(first, first + count), self.streams)
            return row * self.stream_windows + batch % self.stream_windows
        ids = np.empty(count, dtype=np.int64)
        per_epoch = self.windows.num_windows
        for i in range(count):  # a batch rarely spans more than two epochs, so this stays cheap
            epoch, index = divmod(first + i, per_epoch)
            ids[i] = self._epoch_order(epoch)[index]
        return ids

    def next_batch(self, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch: `rows` windows on every rank (default: batch_size; a batch-size warmup asks
        for fewer; the sequential streams are batch_size wide and take no other)."""
        rows = self.batch_size if rows is None else rows
        if self.sequential and rows != self.batch_size:
            raise ValueError("sequential streams read batch_size rows per micro-batch")
        first = self.cursor + self.rank * rows
        ids = self._window_ids(first, rows)
        self.cursor += rows * self.world_size
        return to_batch(self.windows.gather(ids), self.device)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "seed": self.seed, "shuffle": self.shuffle, "sequential": self.sequential,
                "num_windows": self.windows.num_windows}

    def load_state_dict(self, state: dict) -> None:
        if state["num_windows"] != self.windows.num_windows:
            raise UserError(
                f"the training data changed since this checkpoint ({state['num_windows']} windows then, "
                f"{self.windows.num_windows} now); resume with the same --data and model.block_size"
            )
        self.cursor = int(state["cursor"])
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.sequential = bool(state.get("sequential", False))


def eval_window_count(windows: TokenWindows, max_windows: int | None) -> int:
    """How many windows an evaluation of at most `max_windows` windows (all when None) reads, over all ranks."""
    return windows.num_windows if max_windows is None else min(max_windows, windows.num_windows)


def eval_batches(windows: TokenWindows, batch_size: int, max_windows: int | None, *, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu"
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `max_windows` windows of a split (all when None), in order; each rank takes a stride."""
    mine = np.arange(rank, eval_window_count(windows, max_windows), world_size)
    for start in range(0, len(mine), batch_size):
        yield to_batch(windows.gather(mine[start : start + batch_size]), torch.device(device))
