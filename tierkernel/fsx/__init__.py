"""fsx: the virtual filesystem every tier shares.

``Fsx(url=...).facade()`` opens a workspace (``memory://``, ``sqlite:///path/ws.db``,
``file:///dir``); the facade is ``fs`` in a notebook; ``fsx://`` URLs name the current one.
"""

from typing import TYPE_CHECKING, Any

from tierkernel.errors import FsxConfigError, FsxQuotaError
from tierkernel.fsx.config import Fsx, default_url, open_url
from tierkernel.fsx.current import current, set_current
from tierkernel.fsx.facade import FsxFacade
from tierkernel.fsx.nodes import DirEntry, FsxStat
from tierkernel.fsx.quota import Quota

if TYPE_CHECKING:
    from tierkernel.fsx.filesystem import (
        FsxFileSystem,
        FsxLocalFileSystem,
        FsxMemoryFileSystem,
        FsxSqliteFileSystem,
    )

#: Names of tierkernel.fsx.filesystem, imported on first access: that module imports fsspec,
#: which a kernel needs only once a cell opens its workspace (kernel start-up time).
_FILESYSTEMS = frozenset({"FsxFileSystem", "FsxLocalFileSystem", "FsxMemoryFileSystem",
                          "FsxSqliteFileSystem"})


def __getattr__(name: str) -> Any:
    """The fsspec filesystem classes, imported when first asked for (see _FILESYSTEMS)."""
    if name in _FILESYSTEMS:
        from tierkernel.fsx import filesystem

        return getattr(filesystem, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DirEntry",
    "Fsx",
    "FsxConfigError",
    "FsxFacade",
    "FsxFileSystem",
    "FsxLocalFileSystem",
    "FsxMemoryFileSystem",
    "FsxQuotaError",
    "FsxSqliteFileSystem",
    "FsxStat",
    "Quota",
    "current",
    "default_url",
    "open_url",
    "set_current",
]
