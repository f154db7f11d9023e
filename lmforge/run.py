"""The run directory, the unit every command passes around: its files, its checkpoints and its log.

Layout of a run directory:
- `config.toml`: the settings it was trained with; `tokenizer.json`: the tokenizer of its data
- `log.jsonl`: one JSON record per line, of the kinds below (start, train, eval, sample, end)
- `checkpoints/step_0000100/`: one directory per checkpoint, written whole under a temporary name and renamed,
  so a crash never leaves half of one:
  - `model.safetensors`: the weights, by parameter name (float32 as trained)
  - `optimizer.safetensors`: every optimizer's per-parameter state, keys `{optimizer}.{param}.{name}`
  - `state.json`: step, tokens, elapsed time, best val loss, data-loader position, RNG states and the
    optimizers' hyperparameter groups: everything else needed to continue the exact same run
  - `hidden.safetensors` (recurrent models reading sequentially): the hidden state carried into the next
    batch, one row per row of the global batch, so truncated BPTT resumes mid-stream
- `report/` (lmforge report) and `tensorboard/` (train.tensorboard)
- a fine-tuning run (lmforge finetune) also has a [finetune] section in its config.toml and, for the chat
  tasks, `chat_template.json`; its log's records carry the task's metric

A run on several ranks writes the same files, with whole tensors, so a checkpoint resumes on any number of ranks.
This module knows files, not training: the trainer, the inference loader, import/export and the report all
read and write runs through it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import typing
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, ClassVar

import torch
from safetensors.torch import save_file

from lmforge.config import Config, ModelConfig, dumps_config, load_config
from lmforge.data.template import TEMPLATE_FILE as CHAT_TEMPLATE_FILE
from lmforge.data.tokenizer import Tokenizer, load_tokenizer
from lmforge.errors import UserError
from lmforge.files import (
    RUN_CHECKPOINTS,
    RUN_CONFIG_FILE,
    RUN_LOG_FILE,
    check_output,
    check_output_place,
    foreign_files,
    load_safetensors,
    move_into_place,
    remove_empty_directories,
    remove_path,
    removing_new_parents,
    replace_output,
    write_atomic,
    write_error_message,
    write_error_number,
    writing,
)
from lmforge.model.gpt import GPT, mlp_hidden_size, norm_eps

CONFIG_FILE, LOG_FILE, CHECKPOINTS = RUN_CONFIG_FILE, RUN_LOG_FILE, RUN_CHECKPOINTS  # files.is_run_directory
TOKENIZER_FILE = "tokenizer.json"
RUN_FILES = (CONFIG_FILE, TOKENIZER_FILE, LOG_FILE, CHECKPOINTS, CHAT_TEMPLATE_FILE, "report", "tensorboard")
CHECKPOINT_PREFIX = "step_"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
HIDDEN_FILE = "hidden.safetensors"
CHECKPOINT_FILES = (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE, HIDDEN_FILE)
LOCK_FILE = ".lock"  # held (fcntl) by the one process writing the run: lock_run
# LoRA runs on this run's checkpoints, one small JSON file each ({"run", "checkpoint"}): pruning keeps those
# checkpoints, as the LoRA runs' own checkpoints hold only adapters (record_lora_dependent).
LORA_DEPENDENTS = "lora_runs"
# Every file lmforge writes in a run directory, as `files.foreign_files` patterns: --overwrite replaces a run
# only if it holds nothing else (the checkpoint patterns cover the temporary and swapped-out names too).
RUN_OWNED = (CONFIG_FILE, TOKENIZER_FILE, LOG_FILE, LOCK_FILE, ".*.tmp",
             *(f"{CHECKPOINTS}/{folder}/{name}" for folder in ("step_*", ".tmp-step_*", ".old-step_*")
               for name in CHECKPOINT_FILES),
             "report/*.md", "report/*.png", "report/.*.tmp", "tensorboard/events.out.tfevents.*")


# ----- config and tokenizer -----
def read_config(run_dir: Path) -> Config:
    return load_config(Path(run_dir) / CONFIG_FILE)


def write_config(run_dir: Path, config: Config) -> None:
    write_atomic(Path(run_dir) / CONFIG_FILE, dumps_config(config))


def read_tokenizer(run_dir: Path) -> Tokenizer:
    return load_tokenizer(Path(run_dir) / TOKENIZER_FILE)


def run_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a run (given as the run or a checkpoint inside it)."""
    return read_tokenizer(resolve_checkpoint(path)[0])


# ----- creating a run -----
def existing_run_files(run_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def refuse_existing_run(run_dir: Path, overwrite: bool) -> list[str]:
    """The run files already in `run_dir`; a UserError if there are some and `overwrite` is off, or if
    overwriting would delete files lmforge did not write."""
    existing = existing_run_files(run_dir)
    if existing and not overwrite:
        raise UserError(f"{run_dir} already holds a run ({', '.join(existing)}); "
                        f"continue it with --resume or replace it with --overwrite")
    # Only the run's own entries are replaced; files beside them stay, so only those entries must be ours.
    foreign = [path for path in foreign_files(run_dir, RUN_OWNED) if path.split("/")[0] in RUN_FILES] \
        if existing else []
    if foreign:
        raise UserError(f"{run_dir} holds files lmforge did not write ({', '.join(foreign[:5])}"
                        f"{', ...' if len(foreign) > 5 else ''}); --overwrite replaces a run, nothing else: move "
                        "them away or choose another --out")
    return existing


def _is_temporary(name: str) -> bool:
    """Names of lmforge's temporaries: `.NAME.tmp` files, `.tmp-NAME` and `.old-NAME` swaps."""
    return name.startswith((".tmp-", ".old-")) or (name.startswith(".") and name.endswith(".tmp"))


def clean_leftovers(run_dir: Path) -> list[str]:
    """Finish or undo what a kill interrupted, and say what: a checkpoint swapped out (`.old-step_N`) whose
    replacement never arrived is put back; other swaps and temporaries (`.tmp-step_N`, `.NAME.tmp`) are
    deleted. Returns one line per repair."""
    run_dir = Path(run_dir)
    repairs = []
    for directory in (run_dir, run_dir / CHECKPOINTS, run_dir / "report"):
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if not _is_temporary(path.name):
                continue
            original = path.with_name(path.name.removeprefix(".old-"))
            if path.name.startswith(".old-") and not original.exists():
                os.replace(path, original)
                repairs.append(f"restored {original} from {path.name}, left by an interrupted save")
                continue
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            repairs.append(f"removed {path}, left by an interrupted save")
    return repairs


def remove_run(run_dir: Path, made: typing.Sequence[Path]) -> None:
    """Undo a start that failed before its first checkpoint, so the corrected command needs no --overwrite:
    the run's files go, and the directories this start `made` (`files.missing_directories(run_dir)` before it
    began) too, once empty."""
    run_dir = Path(run_dir)
    for name in (*RUN_FILES, LOCK_FILE):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    remove_empty_directories(made)


# ----- one writer at a time -----
def lock_run(run_dir: Path, *, resume: bool = False, inputs: typing.Sequence[str | Path] = ()) -> IO:
    """Take the run directory's lock for as long as the returned file stays open: a second process that
    would write the run gets a UserError naming the holder's PID. The kernel drops the lock when the holder
    dies (even by kill -9), so a crashed run never leaves a stale lock behind.

    The place is checked before anything is made there (`files.check_output_place`: never one of the
    command's `inputs` or a directory holding one; a new run may not be the current directory or one above
    it, a resumed one may), and a failure to make the directory or to write the lock (read-only, no
    permission, disk full) is one line that leaves nothing this call made."""
    run_dir = Path(run_dir)
    check_output_place(run_dir, directory=True, inputs=inputs, allow_current=resume, allow_run=True)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file and a run is a directory; remove it or choose another --out")
    lock_path = run_dir / LOCK_FILE
    try:
        with removing_new_parents(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            return _take_lock(run_dir, lock_path)
    except OSError as error:
        if isinstance(error, UserError):
            raise
        failed = lock_path if run_dir.is_dir() else run_dir
        raise UserError(write_error_message(failed, write_error_number(error))) from None


def _take_lock(run_dir: Path, lock_path: Path) -> IO:
    """The lock file, opened, locked and holding this process's PID; on a failure it is closed, and deleted if
    this call made it."""
    made_lock = not lock_path.exists()
    handle = open(lock_path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UserError(f"{run_dir} is being written by another lmforge process (PID {holder}); wait for it "
                            "to finish or stop it, or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except BaseException as error:
        with suppress(OSError):  # a PID the disk refused: the error to report is the write's
            handle.close()
        if made_lock and not isinstance(error, UserError):
            remove_path(lock_path)
        raise
    return handle


def create_run(run_dir: Path, config: Config, tokenizer: Tokenizer, replace: list[str]) -> None:
    """Start a fresh run: delete the run files named in `replace`, then write the config and the tokenizer."""
    run_dir = Path(run_dir)
    for name in replace:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config)
    tokenizer.save(run_dir / TOKENIZER_FILE)


def check_weights(config: ModelConfig, weights: dict[str, torch.Tensor], origin: str) -> None:
    """The weights must be exactly the parameters of GPT(config): same names, same shapes, finite values."""
    with torch.device("meta"):  # shapes only: no memory, no initialization cost
        expected = {name: tuple(tensor.shape) for name, tensor in GPT(config).state_dict().items()}
    got = {name: tuple(tensor.shape) for name, tensor in weights.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(name for name in set(got) & set(expected) if got[name] != expected[name])
        raise UserError(f"{origin}: its weights do not make the model its config describes "
                        f"(missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {wrong[:3]})")
    # A model with a NaN or infinite weight computes NaN everywhere: sampling from it fails deep in torch and
    # its evaluation prints NaN. Refuse it at the door.
    for name, tensor in weights.items():
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{origin}: weight '{name}' holds NaN or infinite values (a diverged or corrupt "
                            "model); cannot import it")


def check_import_output(out: str | Path, overwrite: bool, inputs: typing.Sequence[str | Path] = ()) -> None:
    """The checks of `write_run`'s output, for an import to make before it reads weights (which takes long)."""
    check_output(Path(out), overwrite, directory=True, owned=RUN_OWNED, inputs=inputs)


def write_run(out: str | Path, model_config: ModelConfig, tokenizer: dict, weights: dict[str, torch.Tensor], *,
              origin: str, overwrite: bool = False, inputs: typing.Sequence[str | Path] = ()) -> Path:
    """A run directory made from weights trained elsewhere (import): config, tokenizer and these weights as its
    step-0 checkpoint, written atomically; returns it. It has no optimizer state or log, so `train --resume`
    does not apply to it; `sample`, `eval`, `export` and `train --init-from` read only its weights. `inputs`:
    the files it was made from, which `out` may not be or hold."""
    out = Path(out)
    check_import_output(out, overwrite, inputs)
    check_weights(model_config, weights, origin)
    if tokenizer["vocab_size"] > model_config.vocab_size:
        raise UserError(f"{origin}: the tokenizer has {tokenizer['vocab_size']} tokens, more than the model's "
                        f"vocabulary of {model_config.vocab_size}")
    temporary = out.with_name(f".tmp-{out.name}")
    with writing(out, temporary, needed=sum(tensor.numel() * 4 for tensor in weights.values())):
        remove_path(temporary)
        checkpoint = checkpoint_dir(temporary, 0)
        checkpoint.mkdir(parents=True)
        (temporary / CONFIG_FILE).write_text(dumps_config(Config(model=model_config)))
        (temporary / TOKENIZER_FILE).write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
        save_file({name: tensor.detach().to(torch.float32).contiguous() for name, tensor in weights.items()},
                  checkpoint / WEIGHTS_FILE)
    replace_output(temporary, out, overwrite, RUN_OWNED)
    return out


# ----- checkpoints -----
def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{step:07d}"


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
                    hidden_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a complete checkpoint under a temporary name, then rename it into place; `optimizer_states` are
    the optimizers' `state_dict()`s, `hidden_state` a recurrent model's carried state (global batch rows)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    tensors, groups = _flatten_optimizers(optimizer_states)
    needed = sum(t.nelement() * t.element_size() for part in (model_state, tensors, hidden_state or {})
                 for t in part.values())
    # A failure (disk full, read-only) deletes the partial checkpoint and ends in one line; earlier ones stay.
    with writing(final, tmp, needed=needed):
        remove_path(tmp)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / WEIGHTS_FILE)
        save_file(tensors, tmp / OPTIMIZER_FILE)
        if hidden_state:
            save_file({k: v.contiguous() for k, v in hidden_state.items()}, tmp / HIDDEN_FILE)
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


# ----- the log: one typed record per kind -----
# Each record is one JSON object per line of log.jsonl with its fields under these names, in this order, plus
# "kind". A field with a default may be missing from older logs; one without must be there with its type.
@dataclass(kw_only=True)
class StartRecord:
    """A launch (the first, or a resume): the model's size, where it runs and on what data."""

    kind: ClassVar[str] = "start"
    time: float = 0.0
    params: int
    params_non_embedding: int
    flops_per_token: int
    train_tokens: int | None = None
    val_tokens: int | None = None
    tokens_per_step: int | None = None
    iters_per_epoch: float | None = None
    device: str
    precision: str
    engine: str | None = None
    world_size: int | None = None
    parallel: str | None = None
    resumed_from_step: int
    data_order: str | None = None
    recurrent_state: str | None = None
    arch: str = "gpt"
    data: str | None = None
    task: str | None = None  # fine-tuning runs: the task, the method and how many parameters train
    method: str | None = None
    trainable_params: int | None = None


@dataclass(kw_only=True)
class TrainRecord:
    """One logged optimizer step; loss and gradient norm are those of that step's global batch."""

    kind: ClassVar[str] = "train"
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    epoch: float | None = None
    mfu: float | None = None
    elapsed: float


@dataclass(kw_only=True)
class EvalRecord:
    """A validation: on the first train.eval_tokens of the split during training, the whole split if final."""

    kind: ClassVar[str] = "eval"
    step: int
    tokens: int
    val_loss: float
    val_ppl: float
    val_bpb: float | None = None  # None on data without byte counts
    elapsed: float
    final: bool = False
    val_accuracy: float | None = None  # fine-tuning runs for classify: the task's metrics
    val_macro_f1: float | None = None


@dataclass(kw_only=True)
class SampleRecord:
    kind: ClassVar[str] = "sample"
    step: int
    prompt: str = ""
    text: str


@dataclass(kw_only=True)
class EndRecord:
    """Why and where a launch stopped (a limit, a signal, a non-finite loss, a pruned trial)."""

    kind: ClassVar[str] = "end"
    step: int
    tokens: int
    elapsed: float
    reason: str
    best_step: int | None = None  # fine-tuning runs: the step of the best checkpoint by the task's metric


Record = StartRecord | TrainRecord | EvalRecord | SampleRecord | EndRecord
RECORD_TYPES: dict[str, type[Record]] = {t.kind: t for t in (StartRecord, TrainRecord, EvalRecord, SampleRecord,
                                                             EndRecord)}


def record_json(record: Record) -> str:
    """One line of log.jsonl: the kind first, then the fields in their declared order."""
    return json.dumps({"kind": record.kind, **{f.name: getattr(record, f.name) for f in dataclasses.fields(record)}})


class LogWriter:
    """Appends records to RUN/log.jsonl, one flushed line each, so a reader sees every finished step. A line
    that cannot be written (disk full) is a WriteError; the part of it written is an unfinished last line,
    which `read_log` skips and a resume trims."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOG_FILE
        with writing(self.path):
            self.file = open(self.path, "a")

    def write(self, record: Record) -> None:
        with writing(self.path):
            self.file.write(record_json(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        with suppress(OSError):  # what the disk refused was reported when it was written
            self.file.close()


@dataclass
class RunLog:
    """The records of one log.jsonl, by kind, in file order."""

    starts: list[StartRecord] = dataclasses.field(default_factory=list)
    train: list[TrainRecord] = dataclasses.field(default_factory=list)
    evals: list[EvalRecord] = dataclasses.field(default_factory=list)
    samples: list[SampleRecord] = dataclasses.field(default_factory=list)
    end: EndRecord | None = None  # the latest launch's end record; None while it runs or after a hard kill


def read_log(path: str | Path) -> RunLog:
    """Parse log.jsonl; a line that is not a complete record raises UserError naming its line number.

    An unfinished last line (no newline yet) is skipped: the trainer may be writing it right now. Records of a
    kind this version does not know are skipped too.
    """
    path = Path(path)
    log = RunLog()
    lists = {"start": log.starts, "train": log.train, "eval": log.evals, "sample": log.samples}
    with open(path, "rb") as file:  # bytes, so that invalid UTF-8 is reported with its line like bad JSON
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = parse_record(line, f"{path}, line {number}")
            except UserError:
                if line.endswith(b"\n"):
                    raise
                break
            if isinstance(record, StartRecord):
                log.end = None  # a new launch: the end of an earlier one no longer describes the run
            if isinstance(record, EndRecord):
                log.end = record
            elif record is not None:
                lists[record.kind].append(record)
    return log


def parse_record(line: bytes | str, where: str) -> Record | None:
    """One line of the log as its typed record (None for an unknown kind), or a UserError saying what is wrong."""
    fix = "repair or delete that line and run the command again"
    try:
        values = json.loads(line)
    except UnicodeDecodeError:
        raise UserError(f"{where} of the log is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{where} of the log is not valid JSON ({err.msg}); {fix}") from None
    if not isinstance(values, dict) or not isinstance(values.get("kind"), str):
        raise UserError(f"{where} of the log is not a record (a JSON object with a 'kind'); {fix}")
    kind = values["kind"]
    record_type = RECORD_TYPES.get(kind)
    if record_type is None:
        return None
    types = typing.get_type_hints(record_type)
    present, bad = {}, []
    for field in dataclasses.fields(record_type):
        if field.name in values:
            if _has_type(values[field.name], types[field.name]):
                present[field.name] = values[field.name]
            else:
                bad.append(field.name)
        elif field.default is dataclasses.MISSING:
            bad.append(field.name)
    if bad:
        raise UserError(f"{where} of the log: the {kind} record lacks {', '.join(bad)} "
                        f"(or has the wrong type); {fix}")
    return record_type(**present)


def _has_type(value: object, annotation: object) -> bool:
    """Whether a JSON value fits a record field's type; any number fits int and float (JSON does not keep the
    difference, and a log written by hand may write 1 for 1.0)."""
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int | float):
        return int in allowed or float in allowed
    return any(isinstance(value, kind) for kind in allowed if isinstance(kind, type))


def last_per_step(records: list) -> list:
    """One record per step, the last one logged, in step order.

    A run interrupted after logging steps that no checkpoint holds logs those steps again when resumed from
    its earlier checkpoint; the later records are the ones the run went on from.
    """
    by_step = {record.step: record for record in records}
    return [by_step[step] for step in sorted(by_step)]


def trim_log(run_dir: Path, step: int) -> None:
    """Drop what the log says happened after the checkpoint a run resumes from (those steps run again) and any
    line a kill cut short, so log.jsonl reads as one consistent history."""
    path = Path(run_dir) / LOG_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") in ("start", "end") or record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))

