"""The run directory, the unit every command passes around: its layout, its files, and who may write it.

Layout of a run directory:
- `config.toml`: the settings it was trained with; `tokenizer.json`: the tokenizer of its data
- `log.jsonl`: one JSON record per line (lmforge/run/log.py)
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
This module holds the names of those files, reads and writes the config and the tokenizer, creates, refuses,
repairs (leftovers of a kill) and removes runs, takes the one-writer lock, and writes runs imported from
weights trained elsewhere. Checkpoints are read and written by lmforge/run/checkpoints.py, the log by
lmforge/run/log.py.
"""

from __future__ import annotations

import json
import os
import shutil
import typing
from pathlib import Path
from typing import IO

import torch
from safetensors.torch import save_file

from lmforge.config.load import dumps_config, load_config
from lmforge.config.sections import Config, ModelConfig
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
    remove_empty_directories,
    remove_path,
    removing_new_parents,
    replace_output,
    take_directory_lock,
    write_atomic,
    write_error_message,
    write_error_number,
    writing,
)
from lmforge.model.gpt import GPT

CONFIG_FILE, LOG_FILE, CHECKPOINTS = RUN_CONFIG_FILE, RUN_LOG_FILE, RUN_CHECKPOINTS  # files.is_run_directory
TOKENIZER_FILE = "tokenizer.json"
RUN_FILES = (CONFIG_FILE, TOKENIZER_FILE, LOG_FILE, CHECKPOINTS, CHAT_TEMPLATE_FILE, "report", "tensorboard")
CHECKPOINT_PREFIX = "step_"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
HIDDEN_FILE = "hidden.safetensors"
# train.ema_decay: the weights as trained, which resume continues; model.safetensors holds their average
TRAINING_WEIGHTS_FILE = "training.safetensors"
CHECKPOINT_FILES = (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE, HIDDEN_FILE, TRAINING_WEIGHTS_FILE)
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


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives (lmforge/run/checkpoints.py reads and writes it)."""
    return Path(run_dir) / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{step:07d}"


# ----- config and tokenizer -----
def read_config(run_dir: Path) -> Config:
    return load_config(Path(run_dir) / CONFIG_FILE)


def write_config(run_dir: Path, config: Config) -> None:
    write_atomic(Path(run_dir) / CONFIG_FILE, dumps_config(config))


def read_tokenizer(run_dir: Path) -> Tokenizer:
    return load_tokenizer(Path(run_dir) / TOKENIZER_FILE)


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
            return take_directory_lock(run_dir, lock_path)
    except OSError as error:
        if isinstance(error, UserError):
            raise
        failed = lock_path if run_dir.is_dir() else run_dir
        raise UserError(write_error_message(failed, write_error_number(error))) from None


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
