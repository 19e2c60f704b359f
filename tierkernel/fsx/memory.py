"""The ``memory://`` backend: an ephemeral workspace held in this process, for tests and
scratch work. Lost when the process ends."""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from typing import Any, BinaryIO

from tierkernel.fsx.nodes import DEFAULT_MODE, Kind, Node
from tierkernel.fsx.paths import basename, child, is_within, parent
from tierkernel.fsx.store import COPY_CHUNK, BytesReader, Reader, Store, process_owner


class MemoryStore(Store):
    """Nodes in a dict by path, contents as immutable ``bytes`` (so a reader's snapshot cannot
    change under it), a per-directory name index for listings, one re-entrant lock, and the
    totals the quotas read (entries, bytes of content), kept as nodes come and go."""

    backend = "memory"

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.RLock()
        now = time.time_ns()
        uid, gid = process_owner()
        self._nodes: dict[str, Node] = {
            "/": Node("dir", DEFAULT_MODE["dir"], uid, gid, 0, now, now, now, now)}
        self._data: dict[str, bytes] = {}
        self._index: dict[str, set[str]] = {"/": set()}
        self._entries = 0  # nodes but the root
        self._bytes = 0  # content of files

    def transaction(self) -> AbstractContextManager[Any]:
        """The store's lock: every engine operation runs whole, without interleaving."""
        return self._lock

    def external_version(self) -> object | None:
        """Always 0: no other process can reach this workspace."""
        return 0

    def tally(self) -> tuple[int, int]:
        """The counters: no walk."""
        with self._lock:
            return self._entries, self._bytes

    def lookup(self, path: str) -> Node | None:
        """The node at ``path``."""
        with self._lock:
            return self._nodes.get(path)

    def children(self, path: str) -> list[tuple[str, Node]]:
        """The entries of directory ``path``."""
        with self._lock:
            return [(name, self._nodes[child(path, name)]) for name in self._index[path]]

    def create(self, path: str, kind: Kind, perm: int, target: str = "") -> None:
        """A new empty file, directory or symlink."""
        with self._lock:
            now = time.time_ns()
            uid, gid = process_owner()
            size = len(target.encode("utf-8", "surrogateescape")) if kind == "symlink" else 0
            self._nodes[path] = Node(kind, perm, uid, gid, size, now, now, now, now, target)
            self._index[parent(path)].add(basename(path))
            self._entries += 1
            if kind == "dir":
                self._index[path] = set()
            elif kind == "file":
                self._data[path] = b""

    def open_reader(self, path: str) -> Reader:
        """A reader over the content as it is now."""
        with self._lock:
            return BytesReader(self._data[path])

    def put(self, path: str, source: BinaryIO, append: bool) -> None:
        """Replace or extend the content; the new bytes are read before anything changes."""
        pieces = []
        while chunk := source.read(COPY_CHUNK):
            pieces.append(chunk)
        data = b"".join(pieces)
        with self._lock:
            if path not in self._nodes:
                self.create(path, "file", DEFAULT_MODE["file"])
            if append:
                data = self._data[path] + data
            self._bytes += len(data) - len(self._data[path])
            self._data[path] = data
            now = time.time_ns()
            self._nodes[path] = self._nodes[path].with_(size=len(data), mtime_ns=now,
                                                        ctime_ns=now)

    def truncate(self, path: str, length: int) -> None:
        """Cut or zero-extend."""
        with self._lock:
            data = self._data[path]
            self._bytes += length - len(data)
            data = data[:length] + b"\0" * (length - len(data))
            self._data[path] = data
            now = time.time_ns()
            self._nodes[path] = self._nodes[path].with_(size=length, mtime_ns=now, ctime_ns=now)

    def copy(self, src: str, dst: str) -> None:
        """Share the immutable bytes; only the node is new."""
        with self._lock:
            if dst not in self._nodes:
                self.create(dst, "file", self._nodes[src].perm)
            self._bytes += len(self._data[src]) - len(self._data[dst])
            self._data[dst] = self._data[src]
            now = time.time_ns()
            self._nodes[dst] = self._nodes[dst].with_(
                size=len(self._data[src]), perm=self._nodes[src].perm, mtime_ns=now,
                ctime_ns=now)

    def set_meta(self, path: str, *, perm: int | None = None, uid: int | None = None,
                 gid: int | None = None, atime_ns: int | None = None,
                 mtime_ns: int | None = None) -> None:
        """Record the given fields; ctime becomes now."""
        with self._lock:
            node = self._nodes[path]
            self._nodes[path] = node.with_(
                perm=node.perm if perm is None else perm,
                uid=node.uid if uid is None else uid,
                gid=node.gid if gid is None else gid,
                atime_ns=node.atime_ns if atime_ns is None else atime_ns,
                mtime_ns=node.mtime_ns if mtime_ns is None else mtime_ns,
                ctime_ns=time.time_ns(),
            )

    def remove(self, path: str) -> None:
        """Drop one node."""
        with self._lock:
            del self._nodes[path]
            self._bytes -= len(self._data.pop(path, b""))
            self._entries -= 1
            self._index.pop(path, None)
            self._index[parent(path)].discard(basename(path))

    def remove_tree(self, path: str) -> None:
        """Drop a directory and every node below it."""
        with self._lock:
            for key in [key for key in self._nodes if is_within(key, path)]:
                del self._nodes[key]
                self._bytes -= len(self._data.pop(key, b""))
                self._entries -= 1
                self._index.pop(key, None)
            self._index[parent(path)].discard(basename(path))

    def rename(self, src: str, dst: str) -> None:
        """Re-key ``src`` and its subtree under ``dst``, dropping what ``dst`` held."""
        with self._lock:
            if dst in self._nodes:
                self.remove_tree(dst) if self._nodes[dst].kind == "dir" else self.remove(dst)
            moved = [key for key in self._nodes if is_within(key, src)]
            for key in moved:
                new = dst + key[len(src):]
                self._nodes[new] = self._nodes.pop(key)
                if key in self._data:
                    self._data[new] = self._data.pop(key)
                if key in self._index:
                    self._index[new] = self._index.pop(key)
            self._index[parent(src)].discard(basename(src))
            self._index[parent(dst)].add(basename(dst))
            self._nodes[dst] = self._nodes[dst].with_(ctime_ns=time.time_ns())
