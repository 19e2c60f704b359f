"""The ``fsx://`` fsspec protocol: the current workspace (:mod:`tierkernel.fsx.current`).

fsspec loads :class:`CurrentFsxFileSystem` through the ``fsspec.specs`` entry point, which
names it as ``tierkernel.fsx.current:CurrentFsxFileSystem``.
"""

from __future__ import annotations

from typing import Any

from fsspec.spec import _Cached

from tierkernel.fsx.current import current
from tierkernel.fsx.filesystem import FsxFileSystem


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
