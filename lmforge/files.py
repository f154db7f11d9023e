"""Files: atomic writes, the user's cache directory, and the checks and loads that every command shares.

Atomic writes: a file or directory appears whole under its final name, or not at all. Each is written
under a hidden temporary name beside its destination (same filesystem, so the final rename is atomic) and
then moved into place; a crash leaves at most a hidden leftover, never half a file, and a failed write
(disk full, read-only, a file where a directory should be) removes its temporary and ends in one line.

Where an output may go is checked here for every command, before its work starts (`check_output`, or
`check_output_place` for the commands that write beside what a directory holds): never below a file, never
the current directory or one above it, never inside a run directory or one of the command's inputs; an
existing file only with `--overwrite`, and never a device, a special file or a symbolic link.

Replacing an output (`--overwrite`) removes only what lmforge writes there: a directory that holds anything
else is refused, naming what it holds, so a mistyped `--out` never deletes the user's files.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING

from lmforge.errors import UserError

if TYPE_CHECKING:
    import torch

# safetensors reports the operating system's error only inside its message: "... (os error 28)".
_WRAPPED_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class WriteError(UserError, OSError):
    """An output that could not be written (disk full, read-only, ...): one line for the user, and still an
    OSError to code that tolerates a failed write (a cache that is only an optimization)."""


def write_error_number(error: BaseException) -> int | None:
    """The errno of an operating-system failure to write: an OSError's, or the one a SafetensorError wraps."""
    if isinstance(error, OSError):
        return error.errno
    if type(error).__name__ == "SafetensorError":
        match = _WRAPPED_OS_ERROR.search(str(error))
        return int(match.group(1)) if match else None
    return None


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB" if size >= 100_000 else f"{size:,} bytes"


def write_error_message(path: Path, number: int | None, needed: int | None = None) -> str:
    """One line: what could not be written, why, and (disk full) how much it needed against what is free."""
    reason = os.strerror(number) if number else "an operating-system error"
    if number == errno.ENOTDIR:
        reason += " (a part of the path is a file, not a directory)"
    if number in _FULL:
        details = [f"it needs {_megabytes(needed)}"] if needed is not None else []
        if number != errno.EFBIG:  # EFBIG is a limit on one file's size, not the disk's free space
            existing = next((parent for parent in (path, *path.parents) if parent.exists()), Path("."))
            try:
                details.append(f"{_megabytes(shutil.disk_usage(existing).free)} free on that disk")
            except OSError:
                pass
        if details:
            reason += f"; {', '.join(details)}"
    return f"could not write {path}: {reason}"


def remove_path(path: Path) -> None:
    """Delete a file, link or directory tree if it is there; a leftover that cannot be deleted stays."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def writing(path: Path, *temporaries: Path, needed: int | None = None) -> Iterator[None]:
    """Guard the block that writes the output `path` through `temporaries`: on any failure they are deleted
    (outputs written earlier stay as they were), and an operating-system failure to write (disk full, file
    too large, read-only, no permission, a file where a directory should be) becomes a WriteError, one line
    naming `path` (`needed`: the bytes it takes, when known, for the message). A WriteError from a `writing`
    block inside passes through as it is: the innermost path is the most precise."""
    try:
        yield
    except BaseException as error:
        for temporary in temporaries:
            remove_path(temporary)
        number = write_error_number(error)
        if isinstance(error, WriteError) or (number is None and not isinstance(error, OSError)):
            raise
        failure = WriteError(write_error_message(Path(path), number, needed))
        failure.errno = number
        raise failure from None


def missing_directories(path: Path) -> list[Path]:
    """`path` and the directories above it that do not exist (yet), innermost first: what writing it makes."""
    return [directory for directory in (Path(path), *Path(path).parents) if not directory.exists()]


def remove_empty_directories(directories: Iterable[Path]) -> None:
    """Remove `missing_directories`' list once a failed command is done with it, innermost first, each only if
    it is empty: a failed command leaves no empty directory behind, and never removes anything else."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:  # not made after all, or not empty: it and those above it stay
            break


@contextmanager
def removing_new_parents(path: Path) -> Iterator[None]:
    """On any failure in the block, remove the directories the block made for `path` (and `path` itself), once
    empty."""
    missing = missing_directories(path)
    try:
        yield
    except BaseException:
        remove_empty_directories(missing)
        raise


def temporary_beside(path: Path) -> Path:
    """The temporary a write to `path` goes through before its move into place: `.NAME.PID.tmp`, one per
    process, so that two processes writing one output never write into each other's temporary (the later
    move wins whole, or the output check refuses it). run/directory.py recognises the `.*.tmp` names."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` through its `temporary_beside`."""
    path = Path(path)
    data = data.encode("utf-8") if isinstance(data, str) else data
    temporary = temporary_beside(path)
    with writing(path, temporary, needed=len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(data)
        os.replace(temporary, path)


def move_into_place(temporary: Path, final: Path) -> None:
    """Rename a finished file or directory to `final`; one already there is swapped out, then deleted. If the
    swap fails, the one there stays and the temporary is deleted."""
    with writing(final, temporary):
        if final.exists() or final.is_symlink():
            old = final.with_name(f".old-{final.name}")
            remove_path(old)  # the leftover of an earlier interrupted swap
            os.replace(final, old)
            try:
                os.replace(temporary, final)
            except BaseException:
                os.replace(old, final)
                raise
            remove_path(old)
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


def _matches(parts: tuple[str, ...], pattern: str) -> bool:
    pattern_parts = tuple(pattern.split("/"))
    return len(parts) == len(pattern_parts) and all(map(fnmatch.fnmatchcase, parts, pattern_parts))


def foreign_files(directory: Path, owned: Iterable[str]) -> list[str]:
    """What `directory` holds that lmforge did not write: paths relative to it ('/'-separated, sorted) that no
    pattern of `owned` names. A pattern is a relative path whose parts may hold wildcards
    ('checkpoints/step_*/*'); a directory is owned when a pattern names it or something inside it. Links
    are not followed."""
    patterns = list(owned)
    folders = {"/".join(pattern.split("/")[:depth]) for pattern in patterns
               for depth in range(1, pattern.count("/") + 1)}
    foreign = []
    for root, dirs, files in os.walk(directory):
        base = Path(root).relative_to(directory).parts
        for name in sorted(dirs):
            parts = (*base, name)
            if Path(root, name).is_symlink() or not any(_matches(parts, p) for p in [*patterns, *folders]):
                foreign.append("/".join(parts))
        dirs[:] = sorted(name for name in dirs if "/".join((*base, name)) not in foreign)
        foreign.extend("/".join((*base, name)) for name in sorted(files)
                       if not any(_matches((*base, name), pattern) for pattern in patterns))
    return sorted(foreign)


def refuse_file_in_path(path: Path) -> None:
    """Refuse, before any work, an output below a file (`notes.txt/out`, `/dev/null/x`): its directory cannot be
    made."""
    existing = next((parent for parent in Path(path).parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"cannot write {path}: {existing} is a file, not a directory")


# A run directory (lmforge.run.directory's layout, recognised here, below it): its config beside its checkpoints or
# its log.
RUN_CONFIG_FILE, RUN_LOG_FILE, RUN_CHECKPOINTS = "config.toml", "log.jsonl", "checkpoints"


def is_run_directory(path: Path) -> bool:
    """Whether `path` holds a run: config.toml and checkpoints/ or log.jsonl."""
    path = Path(path)
    return (path / RUN_CONFIG_FILE).is_file() and ((path / RUN_CHECKPOINTS).is_dir() or (path / RUN_LOG_FILE).is_file())


def _same_path(first: Path, second: Path) -> bool:
    """The same file or directory (a hard link or a symbolic link to it included), or the same resolved path."""
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist
        return first.resolve() == second.resolve()


def check_output_place(final: Path, *, directory: bool, inputs: Iterable[str | Path] = (),
                       allow_current: bool = False, allow_run: bool = False) -> None:
    """Where an output may go, whatever is there now: refused, with one line, when a part of its path is a
    file, when it is the current directory or one above it (unless `allow_current`) or ends in '..', when it
    is a run directory (unless `allow_run`: the commands that write runs) or lies inside one (a run's files
    are lmforge's to write, command by command), or when it is one of the command's `inputs` or a directory
    holding one."""
    final = Path(final)
    what = "directory" if directory else "file"
    refuse_file_in_path(final)
    resolved, here = final.resolve(), Path.cwd().resolve()
    if not allow_current and (resolved == here or resolved in here.parents):
        raise UserError(f"{final} is the current directory or one above it; name a new {what} to write")
    if not allow_current and final.name in ("", ".."):  # the temporary beside it would need a name
        raise UserError(f"{final} ends in '..' and names no {what} of its own; name a new {what} to write "
                        f"(e.g. {Path(final, 'out')})")
    if not allow_run and is_run_directory(resolved):
        raise UserError(f"{final} is a run directory; choose another path for this {what}")
    run = next((parent for parent in resolved.parents if is_run_directory(parent)), None)
    if run is not None:
        raise UserError(f"{final} lies inside the run directory {run}, whose files lmforge alone writes; "
                        "choose a path outside it")
    for given in inputs:
        source = Path(given)
        if _same_path(final, source):
            raise UserError(f"{final} is an input of this command; write the output somewhere else")
        if resolved in source.resolve().parents:
            raise UserError(f"{final} holds {source}, an input of this command; write the output somewhere else")


def check_output(final: Path, overwrite: bool, *, directory: bool, owned: Iterable[str] = (),
                 inputs: Iterable[str | Path] = ()) -> None:
    """The checks before writing a named output, a file or (`directory`) a directory of the files `owned`
    names: `check_output_place`, then, for one already there: refused unless `overwrite` (an empty directory
    where a directory goes counts as free), and even then when it is a symbolic link, a device or other
    special file, a directory where a file goes or the reverse, or a directory holding anything lmforge did
    not write (naming it)."""
    final = Path(final)
    # A run there is refused below (it exists; its files are foreign to every owner but a run's own).
    check_output_place(final, directory=directory, inputs=inputs, allow_run=True)
    if not (final.exists() or final.is_symlink()):
        return
    if final.is_symlink():
        raise UserError(f"{final} is a symbolic link; remove it or choose another output path")
    if not (final.is_dir() or final.is_file()):
        raise UserError(f"{final} is a device or other special file, not a regular file; lmforge never replaces "
                        "one: choose another output path")
    if directory and not final.is_dir():
        raise UserError(f"{final} is a file and this writes a directory; remove it or choose another path")
    if not directory and final.is_dir():
        raise UserError(f"{final} is a directory and this writes a file; name a file "
                        f"(e.g. {final / ('out' + final.suffix)})")
    if directory and not any(final.iterdir()):
        return
    refuse_to_replace(final, overwrite)
    foreign = foreign_files(final, owned) if directory else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{final} holds {shown}, which lmforge did not write; --overwrite replaces only "
                        "lmforge's own files: move them away or choose another path")


def replace_output(temporary: Path, final: Path, overwrite: bool, owned: Iterable[str] = ()) -> None:
    """Move a finished temporary file or directory to `final` after `check_output` (which a command should
    also call before it starts the work); on a refusal or a failure the temporary is deleted and whatever
    was at `final` stays as it was."""
    with writing(final, temporary):
        check_output(final, overwrite, directory=temporary.is_dir(), owned=owned)
        move_into_place(temporary, final)


def load_safetensors(path: Path, what: str, hint: str = "") -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, on the CPU; a missing or corrupt file is a UserError naming `what`
    (say "checkpoint runs/x/checkpoints/step_0000100"), then `hint`, what to do about it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as err:
        raise UserError(f"{what} is unreadable ({err})" + (f"; {hint}" if hint else "")) from None


def take_directory_lock(directory: Path, lock_path: Path) -> IO:
    """The lock of an output directory (a run, a prepared dataset) for as long as the returned file stays open:
    the lock file, opened, locked (fcntl; the kernel drops it when the holder dies, even by kill -9) and holding
    this process's PID. A second writer gets a UserError naming the holder's PID; on any other failure the file
    is closed, and deleted if this call made it."""
    made_lock = not lock_path.exists()
    handle = open(lock_path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UserError(f"{directory} is being written by another lmforge process (PID {holder}); wait for it "
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
