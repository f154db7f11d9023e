"""Files the user names as input: only regular files (and directories, where a command takes one) are read.

A fifo blocks the reader until some other process writes to it, and a device such as /dev/zero or
/dev/urandom never ends: read as input, either hangs the command or fills memory. Every command checks an
input path here before opening it, and refuses such a path in one line instead.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lmforge.errors import UserError

_SPECIAL_KINDS = {stat.S_IFIFO: "a fifo (named pipe)", stat.S_IFCHR: "a character device",
                  stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def refuse_special_file(path: str | Path, what: str) -> None:
    """Raise UserError if `path` (after symbolic links) is a fifo, device or socket, or a loop of links.

    A missing path passes: each caller says in its own words what it expected to find there."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:  # a loop of symbolic links, a name too long, no permission to look
        raise UserError(f"cannot read {what} {path}: {err.strerror}") from None
    kind = _SPECIAL_KINDS.get(stat.S_IFMT(mode))
    if kind is not None:
        raise UserError(f"{what} {path} is {kind}, not a regular file; give a regular file")
