"""The model a fine-tuning run trains and serves: a base model with a classifier's head and/or LoRA adapters.

`build_finetune_model` is the one place that decides it from a run's [finetune] section, for the training
loop (lmforge/tasks/finetune.py) and for loading a fine-tuned run (lmforge/infer/load.py) alike; `check_task`
says whether a run can do a task at all (a classify run predicts labels, not text).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lmforge.config import Config, FinetuneConfig
from lmforge.errors import UserError
from lmforge.model.factory import build_model
from lmforge.tasks import lora
from lmforge.tasks.heads import Classifier, train_only_last_blocks


def build_finetune_model(config: Config, finetune: FinetuneConfig, body: nn.Module | None) -> nn.Module:
    """The model a fine-tuning run trains, on `body` (the base model; None: a freshly built one, for loading a
    full fine-tuning checkpoint into): a classifier's new head, LoRA's adapters, the blocks that train."""
    body = build_model(config.model) if body is None else body
    model = Classifier(body, finetune.labels) if finetune.task == "classify" else body
    if finetune.method == "lora":
        model = lora.apply_lora(model, rank=finetune.lora_rank, alpha=finetune.lora_alpha,
                                dropout=finetune.lora_dropout, targets=finetune.lora_targets,
                                arch=config.model.arch)
        if finetune.task == "classify":  # the new head has nothing to adapt: it trains whole
            for param in model.base_model.model.score.parameters():
                param.requires_grad_(True)
    elif finetune.train_blocks:
        train_only_last_blocks(model, body, finetune.train_blocks)
    return model


def check_task(run_dir: str | Path, finetune: FinetuneConfig | None, task: str) -> None:
    """A UserError unless the run was fine-tuned for `task` (a run never fine-tuned suits every task but
    classify, which needs the head)."""
    trained = finetune.task if finetune else None
    if task == "classify" and trained != "classify":
        raise UserError(f"{run_dir} was not fine-tuned for classify (it was "
                        f"{'fine-tuned for ' + trained if trained else 'never fine-tuned'}); it has no "
                        "classification head: lmforge finetune RUN --task classify ...")
    if trained == "classify" and task != "classify":
        raise UserError(f"{run_dir} was fine-tuned for classify: it predicts labels, not text, so it cannot "
                        f"do {task}")
