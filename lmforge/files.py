"""Files: atomic writes, the user's cache directory, and the checks and loads that every command shares.

Atomic writes: a file or directory appears whole under its final name, or not at all. Each is written
under a hidden temporary name beside its destination (same filesystem, so the final rename is atomic) and
then moved into place; a crash leaves at most a hidden leftover, never half a file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.errors import UserError

if TYPE_CHECKING:
    import torch


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` through `.{name}.tmp`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(temporary, path)


def move_into_place(temporary: Path, final: Path) -> None:
    """Rename a finished file or directory to `final`; one already there is swapped out, then deleted."""
    if final.exists() or final.is_symlink():
        old = final.with_name(f".old-{final.name}")
        os.replace(final, old)
        os.replace(temporary, final)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(temporary, final)


def user_cache_dir() -> Path:
    """Where lmforge keeps what it measured once per machine: $LMFORGE_CACHE_DIR, else
    $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge. Not created here."""
    if os.environ.get("LMFORGE_CACHE_DIR"):
        return Path(os.environ["LMFORGE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"


def refuse_to_replace(path: Path, overwrite: bool) -> None:
    """The one "already exists" check of every command that writes a named output: UserError unless the
    user passed --overwrite."""
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")


def load_safetensors(path: Path, what: str, hint: str = "") -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, on the CPU; a missing or corrupt file is a UserError naming `what`
    (say "checkpoint runs/x/checkpoints/step_0000100"), then `hint`, what to do about it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as err:
        raise UserError(f"{what} is unreadable ({err})" + (f"; {hint}" if hint else "")) from None
