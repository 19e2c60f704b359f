"""The process's current workspace, which the ``fsx://`` fsspec protocol is bound to.

The kernel sets the current workspace at start; ``fsspec.open("fsx://data.csv")`` and
``pandas.read_csv("fsx://data.csv")`` then use it. fsspec finds the protocol through the
``fsspec.specs`` entry point (pyproject.toml) even before tierkernel is imported; the class it
names is in :mod:`tierkernel.fsx.protocol`.
"""

from __future__ import annotations

import threading
from typing import Any

from tierkernel.errors import FsxConfigError
from tierkernel.fsx.facade import FsxFacade

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


def __getattr__(name: str) -> Any:
    """``CurrentFsxFileSystem``, the class the ``fsx`` entry point names (pyproject.toml),
    from :mod:`tierkernel.fsx.protocol`, imported when fsspec asks for it: it subclasses
    fsspec's AbstractFileSystem, and the kernel sets the current workspace without importing
    fsspec (deferred for kernel start-up time until a cell opens the workspace)."""
    if name == "CurrentFsxFileSystem":
        from tierkernel.fsx.protocol import CurrentFsxFileSystem

        return CurrentFsxFileSystem
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
