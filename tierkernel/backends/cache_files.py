"""Small JSON files in the user's cache folder, through which one kernel tells the next what
it learned (the sandbox settings of ``sandbox/learned.py``, the tiers used in ``tier_use.py``).

Only JSON is ever read back (no code is loaded from there), from a folder and file of the
user's own (0700, 0600, never through a link: with XDG_CACHE_HOME in a shared folder, another
user could otherwise plant content or redirect a write), and written whole or not at all,
since another kernel may read it meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

#: Environment variables that decide where a kernel looks for its configuration: part of
#: what makes two kernel starts "the same set-up".
CONFIG_ENV = ("HOME", "XDG_CONFIG_HOME", "IPYTHONDIR", "JUPYTER_CONFIG_DIR",
              "JUPYTER_CONFIG_PATH", "JUPYTER_PREFER_ENV_PATH", "JUPYTER_PLATFORM_DIRS",
              "JUPYTER_NO_CONFIG", "CONDA_PREFIX", "VIRTUAL_ENV")


def folder() -> Path:
    """``$XDG_CACHE_HOME/tierkernel`` (``~/.cache/tierkernel``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tierkernel"


def without_connection_file(argv: list[str]) -> list[str]:
    """A kernel's ``argv`` without its connection file, which differs for every kernel."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-f", "--f", "--IPKernelApp.connection_file"):
            skip = True
        elif not arg.startswith(("--f=", "--IPKernelApp.connection_file=")):
            out.append(arg)
    return out


def read_json(path: Path, limit: int = 1 << 20) -> Any:
    """The JSON value in ``path`` (at most ``limit`` bytes read), or None when the file is
    missing, unreadable, not JSON, or not a regular file of this user's in a folder of this
    user's."""
    try:
        if not _own(os.lstat(path.parent), stat.S_IFDIR):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as file:
            if not _own(os.fstat(file.fileno()), stat.S_IFREG):
                return None
            return json.loads(file.read(limit))
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: Any) -> None:
    """Replace ``path`` with ``value`` as JSON, atomically; the folder is made 0700 if
    missing. Raises OSError when the folder is not this user's or the write fails."""
    with contextlib.suppress(FileExistsError):
        path.parent.mkdir(mode=0o700, parents=True)
    if not _own(os.lstat(path.parent), stat.S_IFDIR):
        raise OSError(f"{path.parent} is not a folder of this user's")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(fd, "w") as file:
            file.write(json.dumps(value))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _own(info: os.stat_result, kind: int) -> bool:
    return stat.S_IFMT(info.st_mode) == kind and info.st_uid == os.getuid()
