"""A run's checkpoints: listing and resolving them (and the best one), saving and loading them whole (weights,
optimizer state, RNG state, carried hidden state), pruning them, and the weights' fingerprints that tie a LoRA
run to its base checkpoint (the base keeps those checkpoints when it prunes). The file names are the run
directory's (lmforge/run/directory.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.config.sections import ModelConfig
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.files import load_safetensors, move_into_place, remove_path, write_atomic, writing
from lmforge.model.gpt import mlp_hidden_size, norm_eps
from lmforge.run.directory import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS,
    CONFIG_FILE,
    HIDDEN_FILE,
    LORA_DEPENDENTS,
    OPTIMIZER_FILE,
    STATE_FILE,
    TRAINING_WEIGHTS_FILE,
    WEIGHTS_FILE,
    checkpoint_dir,
    read_config,
    read_tokenizer,
)


# ----- checkpoints -----
def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are not listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) for a run dir (its newest checkpoint) or a checkpoint dir inside one."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return path.parent.parent, path
    if not path.is_dir():
        raise UserError(f"run directory not found: {path}")
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise UserError(f"{path} holds no checkpoint; train it first (lmforge train --out {path})")
    return path, checkpoints[-1]


def run_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a run (given as the run or a checkpoint inside it)."""
    return read_tokenizer(resolve_checkpoint(path)[0])


def best_checkpoint(run_dir: Path) -> Path:
    """A fine-tuning run's best checkpoint by the task's validation metric, as its newest checkpoint records
    it (the newest itself if that one is gone)."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise UserError(f"{run_dir} holds no checkpoint")
    try:
        state = json.loads((checkpoints[-1] / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        if not checkpoints[-1].is_dir():
            raise removed_meanwhile(checkpoints[-1]) from None
        raise UserError(f"checkpoint {checkpoints[-1]} is unreadable ({err})") from None
    best = state.get("progress", {}).get("best_step")
    best_path = checkpoint_dir(run_dir, best) if best is not None else checkpoints[-1]
    return best_path if best_path.is_dir() else checkpoints[-1]


def _flatten_optimizers(optimizer_states: list[dict]) -> tuple[dict, list]:
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for index, state in enumerate(optimizer_states):
        for param_id, values in state["state"].items():
            for name, value in values.items():
                tensors[f"{index}.{param_id}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        groups.append(state["param_groups"])
    return tensors, groups


def _unflatten_optimizers(tensors: dict[str, torch.Tensor], groups: list) -> list[dict]:
    states: list[dict] = [{"state": {}, "param_groups": g} for g in groups]
    for key, tensor in tensors.items():
        index, param_id, name = key.split(".", 2)
        states[int(index)]["state"].setdefault(int(param_id), {})[name] = tensor
    return states


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor],
                    optimizer_states: list[dict], trainer_state: dict,
                    hidden_state: dict[str, torch.Tensor] | None = None,
                    training_weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a complete checkpoint under a temporary name, then rename it into place; `optimizer_states` are
    the optimizers' `state_dict()`s, `hidden_state` a recurrent model's carried state (global batch rows),
    `training_weights` the weights as trained when `model_state` holds their average (train.ema_decay)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    tensors, groups = _flatten_optimizers(optimizer_states)
    needed = sum(t.nelement() * t.element_size()
                 for part in (model_state, tensors, hidden_state or {}, training_weights or {}) for t in part.values())
    # A failure (disk full, read-only) deletes the partial checkpoint and ends in one line; earlier ones stay.
    with writing(final, tmp, needed=needed):
        remove_path(tmp)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / WEIGHTS_FILE)
        save_file(tensors, tmp / OPTIMIZER_FILE)
        if hidden_state:
            save_file({k: v.contiguous() for k, v in hidden_state.items()}, tmp / HIDDEN_FILE)
        if training_weights:
            save_file({k: v.detach().cpu().contiguous() for k, v in training_weights.items()},
                      tmp / TRAINING_WEIGHTS_FILE)
        state = dict(trainer_state, optimizer_groups=groups, rng=rng_state())
        (tmp / STATE_FILE).write_text(json.dumps(state))
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    move_into_place(tmp, final)  # re-saving a step (e.g. interrupted right after a save) swaps the old out
    return final


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], origin: Path) -> None:
    """Copy checkpoint weights into a model, with a clear error when the two do not match."""
    try:
        model.load_state_dict(weights)
    except RuntimeError:  # parameter shapes or names differ: model.* changed since the checkpoint
        raise UserError(f"checkpoint {origin} does not fit this model: it was written with other model.* "
                        "settings (the run's own are in RUN/config.toml)") from None


def read_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights of one checkpoint directory, or a UserError if the file cannot be read."""
    try:
        return load_safetensors(checkpoint / WEIGHTS_FILE, f"checkpoint {checkpoint}")
    except UserError:
        if not Path(checkpoint).is_dir():
            raise removed_meanwhile(checkpoint) from None
        raise


def read_training_weights(checkpoint: Path) -> dict[str, torch.Tensor] | None:
    """The weights as trained of a checkpoint written with train.ema_decay (its model.safetensors holds their
    average), or None for one without."""
    path = Path(checkpoint) / TRAINING_WEIGHTS_FILE
    return load_safetensors(path, f"checkpoint {checkpoint}") if path.is_file() else None


def removed_meanwhile(checkpoint: Path) -> UserError:
    """The error for a checkpoint that existed when a command chose it and was gone when it read it: a
    training run writing into the same run pruned it in between (not a damaged file)."""
    left = ", ".join(path.name for path in list_checkpoints(Path(checkpoint).parent.parent)) or "none"
    return UserError(f"checkpoint {checkpoint} was removed while being read (a run training there pruned it); "
                     f"run the command again (checkpoints there now: {left})")


def weights_fingerprint(checkpoint: Path) -> str:
    """The SHA-256 of a checkpoint's weights file: what a LoRA run records of its base, to tell the same
    weights from others later written at the same path (the base retrained into the same directory)."""
    digest = hashlib.sha256()
    try:
        with open(Path(checkpoint) / WEIGHTS_FILE, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError as err:
        raise UserError(f"checkpoint {checkpoint} is unreadable ({err})") from None
    return digest.hexdigest()


def load_checkpoint(path: Path, schema: dict[str, type] | None = None
                    ) -> tuple[dict[str, torch.Tensor], list[dict], dict, dict[str, torch.Tensor]]:
    """Model weights, optimizer state dicts, trainer state and carried hidden state (empty if the run carried
    none) of one checkpoint directory; state.json must have the keys of `schema` (default STATE_SCHEMA), each
    of its type."""
    what = f"checkpoint {path}"
    weights = read_weights(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        if not path.is_dir():
            raise removed_meanwhile(path) from None
        raise UserError(f"{what} is unreadable ({err})") from None
    missing = [key for key, kind in (schema or STATE_SCHEMA).items() if not isinstance(state, dict)
               or not isinstance(state.get(key), kind)]
    if missing:
        raise UserError(f"{what} is unreadable ({STATE_FILE} lacks {', '.join(missing)})")
    try:
        optimizer_tensors = load_safetensors(path / OPTIMIZER_FILE, what)
        hidden = load_safetensors(path / HIDDEN_FILE, what) if (path / HIDDEN_FILE).is_file() else {}
    except UserError:
        if not path.is_dir():
            raise removed_meanwhile(path) from None
        raise
    try:
        optimizer_states = _unflatten_optimizers(optimizer_tensors, state["optimizer_groups"])
    except (ValueError, IndexError) as err:
        raise UserError(f"{what} is unreadable (its optimizer state does not match {STATE_FILE}: {err})") from None
    return weights, optimizer_states, state, hidden


# What every state.json holds, and the type of each (a loop adds its own keys: the trainer's data loader).
STATE_SCHEMA = {"progress": dict, "rng": dict, "optimizer_groups": list}


def newest_readable_checkpoint(run_dir: Path, say, schema: dict[str, type] | None = None) -> tuple[Path, tuple]:
    """The newest checkpoint of a run that loads (`load_checkpoint(path, schema)`'s result with it); an
    unreadable one is skipped, saying so through `say`, for the one before it."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise UserError(f"--resume: {run_dir} holds no checkpoint to resume from")
    for index in range(len(checkpoints) - 1, -1, -1):
        try:
            return checkpoints[index], load_checkpoint(checkpoints[index], schema)
        except UserError as err:
            if index == 0:
                raise UserError(f"--resume: no checkpoint of {run_dir} is readable (the oldest: {err})") from None
            say(f"{err}: resuming from {checkpoints[index - 1].name} instead")
    raise AssertionError("unreachable")


def prune_checkpoints(run_dir: Path, keep_last: int, keep_step: int | None, said: set[Path] | None = None
                      ) -> list[str]:
    """Delete all but the newest `keep_last` checkpoints, the one at `keep_step` (the best) and those a LoRA
    run still adapts; return a line for each checkpoint kept for a LoRA run, but those already in `said` (the
    caller's set of checkpoints it has told about, which this updates)."""
    said = set() if said is None else said
    checkpoints = list_checkpoints(run_dir)
    keep = set(checkpoints[-max(keep_last, 1):])  # the newest always stays: it is where resume starts
    if keep_step is not None:
        keep.add(checkpoint_dir(run_dir, keep_step))
    leaving = [path for path in checkpoints if path not in keep]
    adapted = lora_dependents(run_dir, leaving) if leaving else {}
    notes = []
    for path in leaving:
        if path in adapted:
            if path not in said:
                said.add(path)
                notes.append(f"kept {path}, beyond train.keep_last: the LoRA run {', '.join(adapted[path])} adapts "
                             "it (delete that run, then this checkpoint, when it is no longer needed)")
            continue
        shutil.rmtree(path)
    return notes


def record_lora_dependent(base_checkpoint: Path, lora_run: Path) -> None:
    """Note in the base run that `lora_run` adapts `base_checkpoint`, so that its pruning keeps it. A base run
    this process cannot write (read-only) goes without the note: the LoRA run still refuses a base that is gone
    or changed when it loads."""
    base_checkpoint, lora_run = Path(base_checkpoint).resolve(), Path(lora_run).resolve()
    note = base_checkpoint.parent.parent / LORA_DEPENDENTS / \
        f"{hashlib.sha256(str(lora_run).encode()).hexdigest()[:16]}.json"
    try:
        write_atomic(note, json.dumps({"run": str(lora_run), "checkpoint": base_checkpoint.name}) + "\n")
    except UserError:
        pass


def lora_dependents(run_dir: Path, checkpoints: list[Path]) -> dict[Path, list[str]]:
    """Which of `checkpoints` LoRA runs still adapt: {checkpoint: [LoRA run, ...]}. A note counts while its run
    exists, names this checkpoint in its [finetune] section and recorded these very weights (a run deleted,
    overwritten or on weights since replaced holds nothing)."""
    notes = Path(run_dir) / LORA_DEPENDENTS
    if not notes.is_dir():
        return {}
    wanted = {path.resolve(): path for path in checkpoints}
    adapted: dict[Path, list[str]] = {}
    for note in sorted(notes.glob("*.json")):
        try:
            recorded = json.loads(note.read_text(encoding="utf-8"))
            finetune = read_config(Path(recorded["run"])).finetune
        except (OSError, ValueError, KeyError, TypeError, UserError):
            continue
        if finetune is None or finetune.method != "lora":
            continue
        checkpoint = wanted.get(Path(finetune.base_checkpoint))
        if checkpoint is not None and finetune.base_fingerprint in ("", weights_fingerprint(checkpoint)):
            adapted.setdefault(checkpoint, []).append(recorded["run"])
    return adapted


def architecture(config: ModelConfig) -> dict:
    """The model settings that decide the shapes and the function computed (not dropout or initialization),
    with defaults spelled out, so that `n_kv_head = 0` and `n_kv_head = n_head` compare equal."""
    values = dataclasses.asdict(config)
    for key in ("dropout", "init", "init_std"):
        del values[key]
    values.update(n_kv_head=config.n_kv_head or config.n_head, mlp_hidden=mlp_hidden_size(config),
                  norm_eps=norm_eps(config))
    return values


def check_same_model(path: str | Path, config: ModelConfig, flag: str) -> None:
    """A UserError naming every model setting in which `config` differs from the run's own (given as the run or
    a checkpoint in it): its weights would not fit, or would compute another function."""
    run_dir = resolve_checkpoint(path)[0] if (Path(path) / WEIGHTS_FILE).is_file() else Path(path)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{flag}: no run to resume in {run_dir} (it has no {CONFIG_FILE})")
    theirs, ours = architecture(read_config(run_dir).model), architecture(config)
    differences = [f"model.{key} is {theirs[key]} there, {ours[key]} here" for key in ours if ours[key] != theirs[key]]
    if differences:
        raise UserError(f"{flag} {path}: the model settings differ from that run's ({'; '.join(differences)}); "
                        f"keep its [model] section (in {run_dir / CONFIG_FILE})")


def init_from_run(model: torch.nn.Module, path: str | Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Copy a run's weights into a new model (`train --init-from`): the model settings must be the run's.
    `weights`: the run's model as loaded for inference (a fine-tuning run's, merged) instead of its newest
    checkpoint's file."""
    run_dir, checkpoint = resolve_checkpoint(path)
    check_same_model(run_dir, model.config, "--init-from")
    load_weights(model, read_weights(checkpoint) if weights is None else weights, checkpoint)
    return checkpoint
