"""What the trainer asks of a task: the one seam between the loop (lmforge/train/trainer.py) and what it trains.

Two kinds of task fill it: pretraining (`LanguageModelling`, lmforge/train/language.py) and fine-tuning
(`FinetuneTask`, lmforge/tasks/finetune.py). Everything else — the run's lock, leftovers, signals, progress,
logging, the schedule, checkpoints, best-checkpoint keeping and early stopping — is the trainer's alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmforge.config.sections import Config
from lmforge.data.tokenizer import Tokenizer
from lmforge.run.log import EvalRecord, SampleRecord, StartRecord
from lmforge.train.distributed import Cluster


class TrainingTask(Protocol):
    config: Config  # settled: every value the run uses
    tokenizer: Tokenizer
    inputs: list[Path]  # what the run reads (the lock refuses a run directory among them)
    metric: tuple[str, bool]  # the eval record's field that picks the best checkpoint, and whether higher is better
    patience: int  # evaluations in a row without improvement that stop the run; 0: never
    save_at_eval: bool  # every evaluation is followed by a checkpoint (else train.checkpoint_every decides)
    evaluate_when_interrupted: bool  # a run stopped by a signal still gets its final evaluation
    final_eval_is_wider: bool  # the final evaluation reads more than the others (so it runs even after one)
    accumulation: int  # micro-batches per step
    flops_per_token: float | None  # for MFU; None: not reported

    def build_model(self, device: torch.device) -> nn.Module: ...  # after the trainer seeds the RNG

    def objective(self, model: nn.Module) -> nn.Module: ...  # what the engine steps: (inputs, targets) -> (_, loss)

    def start_data(self, cluster: Cluster, device: torch.device, precision: str) -> None: ...

    def set_progress(self, progress: float) -> None: ...  # before each step: where the run is (0 to 1)

    def next_batch(self) -> tuple[Any, torch.Tensor]: ...

    def tokens_read(self) -> int: ...  # training tokens of the step just taken

    @property
    def epoch(self) -> float: ...

    def weights(self) -> dict[str, torch.Tensor]: ...  # what a checkpoint's model.safetensors holds

    def load_weights(self, weights: dict[str, torch.Tensor], path: Path) -> None: ...

    def data_state(self) -> dict: ...  # where the data stands: saved in every checkpoint

    def load_data_state(self, state: dict) -> None: ...

    def carried_state(self) -> dict[str, torch.Tensor]: ...  # a recurrent model's hidden state, if carried

    def restore_carried_state(self, hidden: dict[str, torch.Tensor], say: Callable[[str], None]) -> None: ...

    def create_run(self, run_dir: Path, replace: bool) -> None: ...  # a new run's files

    def start_record(self, *, engine: str, device: str, precision: str, resumed_from_step: int,
                     **common) -> StartRecord: ...

    def announce(self, start: StartRecord, say: Callable[[str], None]) -> None: ...

    def resume_hint(self, run_dir: Path) -> str: ...  # the command that continues an interrupted run

    def evaluate(self, forward: nn.Module, *, final: bool, step: int, tokens: int, elapsed: float
                 ) -> tuple[EvalRecord, str]: ...  # the record, and what to say about it

    def sample(self, step: int) -> SampleRecord | None: ...
