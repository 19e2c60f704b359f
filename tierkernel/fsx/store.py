"""The storage contract each backend implements, below POSIX semantics.

A :class:`Store` keeps nodes by their *resolved* path: the engine (``engine.py``) has already
followed symlinks, checked kinds and raised the right errno, so a store only does what it is
told. One exception: the local store re-checks every component on disk without following
symlinks, because another process can change a host directory between the engine's check and
the store's action.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, BinaryIO

from tierkernel.fsx.nodes import Kind, Node
from tierkernel.fsx.quota import byte_length, depth

COPY_CHUNK = 1 << 20  # bytes moved per step when streaming file content


class Reader(ABC):
    """A file opened for reading: a consistent view of the content it had when opened.

    Backends that cannot keep an old version (sqlite when another writer replaced the file and
    its blob is gone) raise ``OSError(ESTALE)`` rather than return a mix of two versions.
    """

    size: int

    @abstractmethod
    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the file)."""

    def close(self) -> None:  # noqa: B027 - most readers hold nothing
        """Release what the reader holds."""


class BytesReader(Reader):
    """A reader over an immutable ``bytes`` snapshot."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def pread(self, offset: int, length: int) -> bytes:
        """A slice of the snapshot."""
        return self._data[offset:offset + length]


class Store(ABC):
    """Primitive, path-keyed storage for one workspace. Thread-safe.

    Who calls it: only :class:`tierkernel.fsx.engine.PosixEngine`, which resolves paths and
    validates every call first. Paths are normalized absolute workspace paths with no symlink
    in any component except where a method says otherwise.
    """

    #: backend name shown by ``%fsx info`` ("memory", "sqlite", "local")
    backend: str = ""
    #: the URL the workspace was opened from
    url: str = ""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Any]:
        """A group of calls applied atomically (one SQLite transaction, holding the writer
        lock from the start); re-entrant. The engine wraps every write operation in one."""

    def snapshot(self) -> AbstractContextManager[Any]:
        """A group of reads that see one consistent state; by default a transaction."""
        return self.transaction()

    def external_version(self) -> object | None:
        """A value that changes when another process changes the workspace, or None when the
        store cannot tell (the default). Writes through this store object are counted by the
        engine; this is for the rest."""
        return None

    @abstractmethod
    def lookup(self, path: str) -> Node | None:
        """The node at ``path`` (a symlink itself, not its target), or None."""

    @abstractmethod
    def children(self, path: str) -> list[tuple[str, Node]]:
        """The entries of the directory ``path``, as (name, node), in any order."""

    @abstractmethod
    def create(self, path: str, kind: Kind, perm: int, target: str = "") -> None:
        """Make an empty file, an empty directory or a symlink at ``path``, which is free and
        whose parent is a directory. Owner is the current process's; times are now."""

    @abstractmethod
    def open_reader(self, path: str) -> Reader:
        """A reader of the regular file at ``path``."""

    @abstractmethod
    def put(self, path: str, source: BinaryIO, append: bool) -> None:
        """Replace (or, with ``append``, extend) the content of the file at ``path`` with the
        rest of ``source``, creating the file if missing. Atomic: a crash leaves the old content
        or the new, never a mix."""

    @abstractmethod
    def truncate(self, path: str, length: int) -> None:
        """Cut or zero-extend the file at ``path`` to ``length`` bytes."""

    @abstractmethod
    def copy(self, src: str, dst: str) -> None:
        """Copy the content and permission bits of file ``src`` to ``dst`` (replaced or
        created)."""

    @abstractmethod
    def set_meta(
        self,
        path: str,
        *,
        perm: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        """Change the given metadata of ``path`` (not following a final symlink is the
        caller's business: ``path`` is already resolved); ctime becomes now."""

    def entries_changed(self, directory: str, now_ns: int) -> None:
        """An entry of ``directory`` was added, removed or renamed: its mtime and ctime become
        ``now_ns``. A host filesystem does this itself."""
        self.set_meta(directory, mtime_ns=now_ns)

    @abstractmethod
    def remove(self, path: str) -> None:
        """Remove one file, symlink or empty directory."""

    @abstractmethod
    def remove_tree(self, path: str) -> None:
        """Remove the directory ``path`` and everything below it, following no symlink."""

    @abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` (with its subtree) to ``dst``, atomically replacing what is at ``dst``
        (the engine has checked that this is allowed: a file, or an empty directory)."""

    def usage(self) -> tuple[int, int]:
        """(number of files, total bytes of file content) in the workspace."""
        files = size = 0
        for _, node in self.walk("/"):
            if node.kind == "file":
                files += 1
                size += node.size
        return files, size

    def tally(self) -> tuple[int, int]:
        """(entries, bytes): the files, folders and links of the workspace (its root not
        counted) and the bytes of file content, as of the running transaction.

        Who calls it: the engine, inside a write transaction, before a write that a quota
        bounds; so backends keep these totals cheaply (this default walks the tree)."""
        entries = size = 0
        for _, node in self.counted_walk("/"):
            entries += 1
            if node.kind == "file":
                size += node.size
        return entries, size

    def extent(self, path: str) -> tuple[int, int]:
        """(deepest, longest): the most names, and the most bytes, in the path of ``path`` or
        of anything below it, following no symlink. The engine asks before a rename that puts
        a tree deeper than it was."""
        deepest, longest = depth(path), byte_length(path)
        for below, _ in self.counted_walk(path):
            deepest = max(deepest, depth(below))
            longest = max(longest, byte_length(below))
        return deepest, longest

    def counted_walk(self, top: str) -> Iterator[tuple[str, Node]]:
        """What the quotas count below ``top``: :meth:`walk`, unless a store hides from it
        something that still takes room (see ``LocalStore``)."""
        return self.walk(top)

    def walk(self, top: str) -> Iterator[tuple[str, Node]]:
        """Every node below directory ``top`` (not ``top`` itself), parents before children,
        never following a symlink."""
        pending = [top]
        while pending:
            directory = pending.pop()
            for name, node in sorted(self.children(directory)):
                path = f"/{name}" if directory == "/" else f"{directory}/{name}"
                yield path, node
                if node.kind == "dir":
                    pending.append(path)

    def close(self) -> None:  # noqa: B027 - the memory store holds nothing to release
        """Release connections and descriptors. Further calls are errors."""


def process_owner() -> tuple[int, int]:
    """(uid, gid) recorded as the owner of new nodes in virtual backends."""
    getuid = getattr(os, "getuid", None)
    getgid = getattr(os, "getgid", None)
    return (getuid() if getuid else 0, getgid() if getgid else 0)
