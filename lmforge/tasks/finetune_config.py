"""A fine-tuning run's config, from the base run and the flags: `lmforge finetune` (lmforge/tasks/finetune.py)
and the sweep's fine-tuning trials (lmforge/lab/sweep.py) set up their runs here.

A new run takes its base run's [model] and the fine-tuning defaults below for [train] and [optim] (a base run's
own are not inherited); a resumed run keeps its own, and refuses flags that would change what trains.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmforge.config.load import canonical_key, set_value
from lmforge.config.sections import Config, FinetuneConfig, OptimConfig, TrainConfig, check_config
from lmforge.errors import UserError
from lmforge.run import checkpoints as run_checkpoints
from lmforge.run import directory as rundir
from lmforge.tasks.kinds import TRAINABLE, task_kind

# Fine-tuning is short and gentle next to pretraining: these replace the pretraining defaults (a base run's
# own [train] and [optim] are not inherited); --section.key flags override them.
FINETUNE_DEFAULTS = {
    "train.batch_size": 8, "train.max_steps": 300, "train.warmup_steps": 10, "train.eval_every": 25,
    "train.log_every": 5, "train.keep_last": 1, "train.schedule": "cosine", "optim.weight_decay": 0.0,
}
LR_DEFAULTS = {"full": 1e-4, "lora": 1e-3}  # LoRA's few zero-started parameters take a larger step
# The [finetune] keys a user may set (task, method and train_blocks also have flags; the rest is derived);
# all but patience decide which parameters exist and train, so a resumed run keeps them.
USER_KEYS = ("finetune.patience", "finetune.train_blocks", "finetune.lora_rank", "finetune.lora_alpha",
             "finetune.lora_dropout", "finetune.lora_targets")


def user_spelling(key: str) -> str:
    return key.replace("finetune.lora_", "lora.")


def check_method_keys(method: str, keys: list[str]) -> None:
    """Refuse settings that would do nothing with this method: the LoRA keys on a full fine-tuning run (the
    opposite, finetune.train_blocks with LoRA, is also FinetuneConfig.check_combination's, on values). A sweep
    checks its --param keys here before its first trial, as `finetune` checks its flags."""
    keys = [canonical_key(key) for key in keys]
    if method != "lora":
        unused = [user_spelling(key) for key in keys if key.startswith("finetune.lora_")]
        if unused:
            raise UserError(f"--{', --'.join(unused)}: LoRA settings apply to --method lora only; this run's method "
                            f"is {method}, which would ignore them")
    elif "finetune.train_blocks" in keys:
        raise UserError("finetune.train_blocks chooses what full fine-tuning trains; with --method lora the "
                        "adapters train (choose layers with --lora.targets)")


def configure(base_run: str, run_dir: Path, task: str | None, method: str | None, train_blocks: int | None,
              overrides: dict[str, str], resume: bool) -> Config:
    """The fine-tuning run's config: a resumed run's own (checked against the flags), or a new one on the base
    run's model with the fine-tuning defaults; then the overrides, every value checked."""
    config = (resumed_config(base_run, run_dir, task, method, train_blocks) if resume
              else new_config(base_run, task, method, train_blocks))
    finetune = config.finetune
    for dotted, value in overrides.items():
        key = canonical_key(dotted)
        if key.startswith("finetune."):
            if key not in USER_KEYS:
                raise UserError(f"unknown fine-tuning key '{dotted}'; valid keys: "
                                f"{', '.join(user_spelling(valid) for valid in USER_KEYS)}")
            check_method_keys(finetune.method, [key])
            before = dataclasses.replace(finetune)
            set_value(config, key, value)
            if resume and key != "finetune.patience" and finetune != before:
                raise UserError(f"--{dotted}: a resumed run keeps the settings it started with (they decide "
                                "which parameters exist and train); start a new run to change them")
        elif key.startswith("model."):
            raise UserError(f"--{dotted}: a fine-tuning run keeps its base run's model settings")
        else:
            set_value(config, key, value)
    check_config(config)
    train = config.train
    if not train.eval_every and "finetune.patience" in map(canonical_key, overrides) and finetune.patience:
        raise UserError("--finetune.patience counts evaluations without improvement, but train.eval_every is 0 "
                        "(one evaluation, at the end): set --train.eval_every too, or drop --finetune.patience")
    if train.engine != "torch":
        raise UserError(f"fine-tuning runs on the torch engine; train.engine '{train.engine}' is not supported "
                        "(the scratch engine has no backward for heads, masks or LoRA)")
    if config.optim.name != "adamw":  # Muon finds its matrices by the plain model's names ("blocks.")
        raise UserError(f"fine-tuning uses optim.name 'adamw', not '{config.optim.name}'")
    task_kind(finetune.task).check_arch(config.model.arch)
    return config


def resumed_config(base_run: str, run_dir: Path, task: str | None, method: str | None,
                   train_blocks: int | None) -> Config:
    """The config of the run to resume, after checking that the flags given agree with it."""
    if not run_checkpoints.list_checkpoints(run_dir):
        raise UserError(f"--resume: {run_dir} holds no checkpoint to resume from")
    config = rundir.read_config(run_dir)
    finetune = config.finetune
    if finetune is None:
        raise UserError(f"--resume: {run_dir} is not a fine-tuning run")
    asked = {"--task": (task, finetune.task), "--method": (method, finetune.method),
             "--train-blocks": (train_blocks, finetune.train_blocks)}
    for flag, (given, stored) in asked.items():
        if given is not None and given != stored:
            raise UserError(f"--resume: {run_dir} was started with {flag} {stored}, not {given}")
    given_dir, given_checkpoint = (path.resolve() for path in run_checkpoints.resolve_checkpoint(base_run))
    named_checkpoint = (Path(base_run) / rundir.WEIGHTS_FILE).is_file()
    if given_dir != Path(finetune.base_run) or (
            named_checkpoint and given_checkpoint != Path(finetune.base_checkpoint)):
        raise UserError(f"--resume: {run_dir} fine-tunes {finetune.base_checkpoint}, not {base_run}; "
                        f"resume it with that base run (lmforge finetune {finetune.base_run} --resume "
                        f"--out {run_dir} ...)")
    return config


def new_config(base_run: str, task: str | None, method: str | None, train_blocks: int | None) -> Config:
    """A new run's config: the base run's model, the fine-tuning defaults, the task's [finetune] section."""
    if task is None:
        raise UserError(f"finetune needs --task ({', '.join(TRAINABLE[:-1])} or {TRAINABLE[-1]})")
    base_config = rundir.read_config(run_checkpoints.resolve_checkpoint(base_run)[0])
    finetune = FinetuneConfig(task=task, method=method or "full", train_blocks=train_blocks or 0,
                              base_run=str(run_checkpoints.resolve_checkpoint(base_run)[0].resolve()),
                              template=task_kind(task).template)
    config = Config(model=base_config.model, train=TrainConfig(), optim=OptimConfig(), finetune=finetune)
    for dotted, value in {**FINETUNE_DEFAULTS, "optim.lr": LR_DEFAULTS[finetune.method]}.items():
        set_value(config, dotted, value)
    return config
