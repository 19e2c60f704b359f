"""The process's current workspace, and the ``fsx://`` fsspec protocol bound to it.

The kernel sets the current workspace at start; ``fsspec.open("fsx://data.csv")`` and
``pandas.read_csv("fsx://data.csv")`` then use it. fsspec finds the protocol through the
``fsspec.specs`` entry point (pyproject.toml) even before tierkernel is imported.
"""

from __future__ import annotations

import threading
from typing import Any

from fsspec.spec import _Cached

from tierkernel.errors import FsxConfigError
from tierkernel.fsx.facade import FsxFacade
from tierkernel.fsx.filesystem import FsxFileSystem

_lock = threading.Lock()
_current: FsxFacade | None = None


def set_current(facade: FsxFacade | None) -> None:
    """Make ``facade`` the workspace that ``fsx://`` URLs name in this process."""
    global _current
    with _lock:
        _current = facade


def current() -> FsxFacade:
    """The current workspace; a clear error if none was set."""
    facade = _current
    if facade is None:
        raise FsxConfigError(
            "fsx:// names a tierkernel kernel's workspace, and this process has none: in a "
            "notebook cell it works in every tier; a program a cell starts reads the "
            "workspace's files by path instead (its working directory, $TIERKERNEL_WORKSPACE "
            "in the process tier, /workspace in wasm and sandbox). Library use: "
            "tierkernel.fsx.set_current(Fsx(url=...).facade()) first")
    return facade


class _CurrentMeta(_Cached):  # type: ignore[misc]
    """Constructing the ``fsx`` protocol class gives the current workspace's filesystem, so
    fsspec's ``filesystem("fsx")`` (and every URL-taking API) lands on the kernel's workspace
    rather than a new, empty one."""

    def __call__(cls, *args: Any, **storage_options: Any) -> FsxFileSystem:
        if args or storage_options:
            raise TypeError("fsx:// takes no storage options: it is the current workspace "
                            f"(got {sorted(storage_options) or list(args)})")
        return current().fs


class CurrentFsxFileSystem(FsxFileSystem, metaclass=_CurrentMeta):
    """The class registered for ``fsx://``; never instantiated itself (see the metaclass)."""
