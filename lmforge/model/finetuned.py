"""The model a fine-tuning run trains and serves: a base model with a classifier's head and/or LoRA adapters.

`build_finetune_model` is the one place that decides it from a run's [finetune] section, for the trainer
(fine-tuning: lmforge/tasks/finetune.py) and for loading a fine-tuned run (lmforge/infer/load.py) alike. A
run with label names (`finetune.labels`, which only a classify run has) gets the classifier's head over them.
"""

from __future__ import annotations

from torch import nn

from lmforge.config.sections import Config, FinetuneConfig
from lmforge.model import lora
from lmforge.model.factory import build_model
from lmforge.model.heads import Classifier, train_only_last_blocks


def build_finetune_model(config: Config, finetune: FinetuneConfig, body: nn.Module | None) -> nn.Module:
    """The model a fine-tuning run trains, on `body` (the base model; None: a freshly built one, for loading a
    full fine-tuning checkpoint into): a classifier's new head, LoRA's adapters, the blocks that train."""
    body = build_model(config.model) if body is None else body
    model = Classifier(body, finetune.labels) if finetune.labels else body
    if finetune.method == "lora":
        model = lora.apply_lora(model, rank=finetune.lora_rank, alpha=finetune.lora_alpha,
                                dropout=finetune.lora_dropout, targets=finetune.lora_targets,
                                arch=config.model.arch)
        if finetune.labels:  # the new head has nothing to adapt: it trains whole
            for param in model.base_model.model.score.parameters():
                param.requires_grad_(True)
    elif finetune.train_blocks:
        train_only_last_blocks(model, body, finetune.train_blocks)
    return model
