"""Learning-rate schedules: linear warmup, then cosine, linear, constant or warmup-stable-decay (wsd); and the
limits that end a run.

`progress` runs from 0 to 1 over the run. The trainer measures it in steps (step / max_steps) or, when a
time budget ends the run sooner, in time (elapsed / max_time), so the decay always finishes with the run.
"""

from __future__ import annotations

import math

from lmforge.config.sections import TrainConfig

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def lr_multiplier(schedule: str, step: int, progress: float, *, warmup_steps: int, min_lr_ratio: float,
                  cooldown_fraction: float) -> float:
    """The factor applied to the peak learning rate at this step (1.0 at the peak)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:  # wsd, the last of the train.schedule choices lmforge/config/ checked
        cooldown_start = 1.0 - cooldown_fraction
        decay = 1.0 if progress < cooldown_start else (1.0 - progress) / max(cooldown_fraction, 1e-12)
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


# The train keys of the data warmups: pretraining a decoder reshapes its batches by them (lmforge/train/language.py);
# every other kind of training refuses them.
DATA_WARMUPS = ("batch_warmup", "context_warmup")


def warmup_divisor(progress: float, fraction: float) -> int:
    """How many times smaller a data warmup (train.batch_warmup, train.context_warmup) makes this step's batch
    or sequences: 4 over the first third of the warmup's `fraction` of the run, 2 over the other two thirds,
    then 1."""
    if progress >= fraction:
        return 1
    return 4 if progress < fraction / 3 else 2


def limit_reached(train: TrainConfig, *, step: int, elapsed: float, epochs: float, interrupted: bool) -> str | None:
    """Why a training loop stops now (a signal, or the first of train.max_steps, max_time and max_epochs to be
    reached), or None to go on."""
    if interrupted:
        return "interrupted"
    if step >= train.max_steps:
        return "max_steps"
    if 0 < train.max_time <= elapsed:
        return "max_time"
    if 0 < train.max_epochs <= epochs:
        return "max_epochs"
    return None
