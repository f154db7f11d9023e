"""Checkpoints: written whole to a temporary directory and renamed, so a crash never leaves half of one.

Layout of `RUN/checkpoints/step_0000100/`:
- `model.safetensors`: the weights, by parameter name (float32 as trained)
- `optimizer.safetensors`: every optimizer's per-parameter state, keys `{optimizer}.{param}.{name}`
- `state.json`: step, tokens, elapsed time, best val loss, data-loader position, RNG states and the
  optimizers' hyperparameter groups: everything else needed to continue the exact same run.
- `hidden.safetensors` (recurrent models reading sequentially): the hidden state carried into the next batch,
  one row per row of the global batch, so truncated BPTT resumes mid-stream.

A run on several ranks writes the same files, with whole tensors (lmforge/train/distributed.py gathers FSDP's
shards), so a checkpoint resumes on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.config import Config, ModelConfig, load_config
from lmforge.data.tokenizer import Tokenizer, load_tokenizer
from lmforge.errors import UserError
from lmforge.files import load_safetensors, move_into_place
from lmforge.model.factory import build_model
from lmforge.model.gpt import mlp_hidden_size, norm_eps

PREFIX = "step_"
HIDDEN_FILE = "hidden.safetensors"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are not listed)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


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
                    hidden_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a complete checkpoint under a temporary name, then rename it into place; `optimizer_states` are
    the optimizers' `state_dict()`s, `hidden_state` a recurrent model's carried state (global batch rows)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
    tensors, groups = _flatten_optimizers(optimizer_states)
    save_file(tensors, tmp / "optimizer.safetensors")
    if hidden_state:
        save_file({k: v.contiguous() for k, v in hidden_state.items()}, tmp / HIDDEN_FILE)
    state = dict(trainer_state, optimizer_groups=groups, rng=rng_state())
    (tmp / "state.json").write_text(json.dumps(state))
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


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], list[dict], dict, dict[str, torch.Tensor]]:
    """Model weights, optimizer state dicts, trainer state and carried hidden state (empty if the run carried
    none) of one checkpoint directory."""
    what, hint = f"checkpoint {path}", "pass an earlier checkpoint"
    weights = load_safetensors(path / "model.safetensors", what, hint)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{what} is unreadable ({err}); {hint}") from None
    optimizer_tensors = load_safetensors(path / "optimizer.safetensors", what, hint)
    hidden = load_safetensors(path / HIDDEN_FILE, what, hint) if (path / HIDDEN_FILE).is_file() else {}
    return weights, _unflatten_optimizers(optimizer_tensors, state["optimizer_groups"]), state, hidden


def prune_checkpoints(run_dir: Path, keep_last: int, keep_step: int | None) -> None:
    """Delete all but the newest `keep_last` checkpoints and the one at `keep_step` (the best)."""
    checkpoints = list_checkpoints(run_dir)
    keep = set(checkpoints[-max(keep_last, 1):])  # the newest always stays: it is where resume starts
    if keep_step is not None:
        keep.add(checkpoint_dir(run_dir, keep_step))
    for path in checkpoints:
        if path not in keep:
            shutil.rmtree(path)


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) for a run dir (its newest checkpoint) or a checkpoint dir inside one."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path.parent.parent, path
    if not path.is_dir():
        raise UserError(f"run directory not found: {path}")
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise UserError(f"{path} holds no checkpoint; train it first (lmforge train --out {path})")
    return path, checkpoints[-1]


def load_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, Config, Tokenizer, Path]:
    """The trained model of a run (in eval mode), its config and tokenizer, and the checkpoint used."""
    run_dir, checkpoint = resolve_checkpoint(path)
    config = load_config(run_dir / "config.toml")
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    model = build_model(config.model)
    load_weights(model, load_safetensors(checkpoint / "model.safetensors", f"checkpoint {checkpoint}"), checkpoint)
    return model.to(device).eval(), config, tokenizer, checkpoint


def architecture(config: ModelConfig) -> dict:
    """The model settings that decide the shapes and the function computed (not dropout or initialization),
    with defaults spelled out, so that `n_kv_head = 0` and `n_kv_head = n_head` compare equal."""
    values = dataclasses.asdict(config)
    for key in ("dropout", "init", "init_std"):
        del values[key]
    values.update(n_kv_head=config.n_kv_head or config.n_head, mlp_hidden=mlp_hidden_size(config),
                  norm_eps=norm_eps(config))
    return values


def run_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a run (given as the run or a checkpoint inside it)."""
    return load_tokenizer(resolve_checkpoint(path)[0] / "tokenizer.json")


def init_from_run(model: torch.nn.Module, path: str | Path) -> Path:
    """Copy a run's weights into a new model (`train --init-from`): the model settings must be the run's."""
    run_dir, checkpoint = resolve_checkpoint(path)
    theirs, ours = architecture(load_config(run_dir / "config.toml").model), architecture(model.config)
    differences = [f"model.{key} is {theirs[key]} there, {ours[key]} here" for key in ours if ours[key] != theirs[key]]
    if differences:
        raise UserError(f"--init-from {path}: the model settings differ from that run's ({'; '.join(differences)}); "
                        f"keep its [model] section (in {run_dir / 'config.toml'})")
    load_weights(model, load_safetensors(checkpoint / "model.safetensors", f"checkpoint {checkpoint}"), checkpoint)
    return checkpoint
