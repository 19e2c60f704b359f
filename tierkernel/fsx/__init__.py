"""fsx: the virtual filesystem every tier shares.

``Fsx(url=...).facade()`` opens a workspace (``memory://``, ``sqlite:///path/ws.db``,
``file:///dir``); the facade is ``fs`` in a notebook; ``fsx://`` URLs name the current one.
"""

from tierkernel.errors import FsxConfigError, FsxQuotaError
from tierkernel.fsx.config import Fsx, default_url, open_url
from tierkernel.fsx.current import current, set_current
from tierkernel.fsx.facade import FsxFacade
from tierkernel.fsx.filesystem import (
    FsxFileSystem,
    FsxLocalFileSystem,
    FsxMemoryFileSystem,
    FsxSqliteFileSystem,
)
from tierkernel.fsx.nodes import DirEntry, FsxStat
from tierkernel.fsx.quota import Quota

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
