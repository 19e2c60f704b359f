"""What a backend stores for one path (:class:`Node`) and what callers get back
(:class:`FsxStat`, :class:`DirEntry`)."""

from __future__ import annotations

import stat as stat_mod
from dataclasses import dataclass, replace
from typing import Literal

Kind = Literal["file", "dir", "symlink"]

_TYPE_BITS: dict[str, int] = {
    "file": stat_mod.S_IFREG,
    "dir": stat_mod.S_IFDIR,
    "symlink": stat_mod.S_IFLNK,
}
DEFAULT_MODE: dict[str, int] = {"file": 0o644, "dir": 0o755, "symlink": 0o777}


@dataclass(frozen=True)
class Node:
    """One entry of a backend: its kind, permission bits, owner, size, times and link target.

    Times are integer nanoseconds since the epoch, as ``os.stat`` gives them, so nothing is
    lost between backends. ``perm`` holds only the permission bits (``0o7777``); the type bits
    come from ``kind``.
    """

    kind: Kind
    perm: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    birth_ns: int
    target: str = ""  # a symlink's target, verbatim; empty for files and directories

    def with_(self, **changes: object) -> Node:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FsxStat:
    """What ``stat``/``lstat`` return: ``os.stat_result``'s names, plus ``is_*`` helpers.

    ``st_mode`` has the type bits and the permission bits, so ``stat.S_ISDIR(st.st_mode)``
    works as for a host file. Float ``st_*time`` fields are seconds; ``*_ns`` are exact.
    """

    st_mode: int
    st_size: int
    st_uid: int
    st_gid: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_birthtime_ns: int
    st_nlink: int = 1

    @classmethod
    def of(cls, node: Node) -> FsxStat:
        """The stat of a stored node."""
        return cls(
            st_mode=_TYPE_BITS[node.kind] | (node.perm & 0o7777),
            st_size=node.size,
            st_uid=node.uid,
            st_gid=node.gid,
            st_atime_ns=node.atime_ns,
            st_mtime_ns=node.mtime_ns,
            st_ctime_ns=node.ctime_ns,
            st_birthtime_ns=node.birth_ns,
            st_nlink=2 if node.kind == "dir" else 1,
        )

    @property
    def st_atime(self) -> float:
        """Last access, in seconds."""
        return self.st_atime_ns / 1e9

    @property
    def st_mtime(self) -> float:
        """Last modification of the content, in seconds."""
        return self.st_mtime_ns / 1e9

    @property
    def st_ctime(self) -> float:
        """Last change of content or metadata, in seconds."""
        return self.st_ctime_ns / 1e9

    @property
    def st_birthtime(self) -> float:
        """Creation, in seconds."""
        return self.st_birthtime_ns / 1e9

    def is_file(self) -> bool:
        """A regular file."""
        return stat_mod.S_ISREG(self.st_mode)

    def is_dir(self) -> bool:
        """A directory."""
        return stat_mod.S_ISDIR(self.st_mode)

    def is_symlink(self) -> bool:
        """A symbolic link (only ``lstat`` reports this)."""
        return stat_mod.S_ISLNK(self.st_mode)


@dataclass(frozen=True, order=True)
class DirEntry:
    """One entry of ``readdir(path, with_types=True)``: a name and its kind (not followed)."""

    name: str
    kind: Kind

    def is_file(self) -> bool:
        """A regular file."""
        return self.kind == "file"

    def is_dir(self) -> bool:
        """A directory."""
        return self.kind == "dir"

    def is_symlink(self) -> bool:
        """A symbolic link."""
        return self.kind == "symlink"
