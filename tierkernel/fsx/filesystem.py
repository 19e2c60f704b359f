"""fsspec filesystems over the engine: one :class:`FsxFileSystem` subclass per backend.

They are ordinary fsspec filesystems (``ls``, ``info``, ``open``, ``cat``, ``pipe``, ``rm``,
``makedirs``...), so pandas, dask and anything else that takes an fsspec URL can use a workspace.
The ``fsx://`` protocol is bound to the process's current workspace in ``current.py``.
"""

from __future__ import annotations

import errno
import io
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from tierkernel.fsx.engine import PosixEngine
from tierkernel.fsx.errors import fs_error
from tierkernel.fsx.local import LocalStore
from tierkernel.fsx.memory import MemoryStore
from tierkernel.fsx.nodes import FsxStat, Node
from tierkernel.fsx.paths import PROTOCOL, child, lexical
from tierkernel.fsx.quota import Quota
from tierkernel.fsx.sqlite import SqliteStore
from tierkernel.fsx.store import Reader, Store

# Up to this many bytes a file being written stays in memory; beyond, in a temporary file.
SPOOL_MEMORY = 8 << 20


def info_dict(path: str, node: Node, islink: bool = False) -> dict[str, Any]:
    """fsspec's ``info`` for a node, with the POSIX fields LocalFileSystem also gives."""
    kind = {"file": "file", "dir": "directory"}.get(node.kind, "other")
    st = FsxStat.of(node)
    out: dict[str, Any] = {
        "name": path,
        "size": node.size if node.kind == "file" else 0,
        "type": kind,
        "mode": st.st_mode,
        "uid": node.uid,
        "gid": node.gid,
        "mtime": node.mtime_ns / 1e9,
        "created": node.birth_ns / 1e9,
        "islink": islink,
    }
    if node.kind == "symlink":
        out["destination"] = node.target
    return out


class FsxReadFile(AbstractBufferedFile):  # type: ignore[misc]
    """A file opened for reading: fsspec's buffering over the engine's :class:`Reader`."""

    def __init__(self, fs: FsxFileSystem, path: str, reader: Reader, block_size: Any = None,
                 cache_options: Any = None) -> None:
        self._reader = reader
        super().__init__(fs, path, mode="rb", block_size=block_size or "default",
                         cache_type="readahead", cache_options=cache_options,
                         size=reader.size)

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self._reader.pread(start, end - start)

    def close(self) -> None:
        """Close the file and its reader."""
        if not self.closed:
            super().close()
            self._reader.close()


class FsxWriteFile(io.RawIOBase):
    """A file opened for writing: bytes are staged and committed whole on close, in one
    transaction, so no reader (in any tier) ever sees a half-written file.

    Quotas: a write that would stage more than the workspace's quotas leave room for fails
    at once (an endless writer is stopped as it passes the quota, not at close, and never
    fills the host's temporary folder); the file is then left as it was: closing the handle
    writes nothing.
    """

    def __init__(self, engine: PosixEngine, path: str, mode: str) -> None:
        super().__init__()
        self.path, self.mode = path, mode
        self._engine = engine
        self._append = "a" in mode
        self._exclusive = "x" in mode
        # Fail at open, as open(2) does, not at close: a missing parent, a directory, a
        # quota that allows no new file here.
        physical, node = engine.walk_path(path, True)
        if node is not None and self._exclusive:
            raise fs_error(errno.EEXIST, path)
        if (node is not None and node.kind == "dir") or physical == "/":
            raise fs_error(errno.EISDIR, path)
        self._room, self._over = engine.write_limit(path, self._append)
        self._failed: OSError | None = None
        # Closed in close()/discard(): the handle outlives this constructor by design.
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115

    def writable(self) -> bool:
        """Always."""
        return True

    def write(self, data: Any) -> int:
        """Stage ``data``; an OSError (EDQUOT, EFBIG) if that would pass a quota."""
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if self._failed is not None:
            raise self._failed
        size = memoryview(data).nbytes
        if self._spool.tell() + size > self._room:
            # Asked again before refusing: another write may have freed room meanwhile.
            self._room, self._over = self._engine.write_limit(self.path, self._append)
            if self._spool.tell() + size > self._room:
                self._failed = self._over
                raise self._over
        return self._spool.write(data)

    def tell(self) -> int:
        """Bytes staged so far."""
        return self._spool.tell()

    def close(self) -> None:
        """Commit the staged bytes (one transaction), then release them."""
        if self.closed:
            return
        if self._failed is not None:  # left as it was: the error was raised by write()
            self.discard()
            return
        try:
            self._spool.seek(0)
            self._engine.write(self.path, self._spool, append=self._append,  # type: ignore[arg-type]
                               exclusive=self._exclusive)
        finally:
            self._spool.close()
            super().close()

    def discard(self) -> None:
        """Drop the staged bytes without writing (fsspec's transaction abort)."""
        self._spool.close()
        super().close()

    def commit(self) -> None:
        """fsspec's transaction commit: the same as close."""
        self.close()


class FsxFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """An fsspec filesystem over one fsx workspace. Subclasses pick the store.

    Paths are workspace paths: ``/data.csv``, ``data.csv`` and ``fsx://data.csv`` name the same
    file. ``rename`` is POSIX rename (atomic, replaces); ``mv`` keeps fsspec's semantics.
    """

    protocol = PROTOCOL
    root_marker = "/"
    # Each constructed instance owns its connection/descriptors; fsspec must not share them.
    cachable = False

    def __init__(self, store: Store, quota: Quota | None = None,
                 **storage_options: Any) -> None:
        super().__init__(**storage_options)
        self.store = store
        self.engine = PosixEngine(store, quota)

    @property
    def backend(self) -> str:
        """"memory", "sqlite" or "local"."""
        return self.store.backend

    @property
    def url(self) -> str:
        """The URL the workspace was opened from."""
        return self.store.url

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text = str(path)
        if text.startswith(f"{PROTOCOL}://"):
            text = text[len(PROTOCOL) + 3:]
        text = "/" + text.strip("/") if text.strip("/") else "/"
        return text

    def _norm(self, path: str) -> str:
        return str(lexical(self._strip_protocol(path)))

    # -- fsspec reading -------------------------------------------------------------------
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """Entries of a directory (or the file itself), as fsspec does."""
        path = self._norm(path)
        try:
            entries = self.engine.listing(path)
        except NotADirectoryError:
            found = [self.info(path)]
            return found if detail else [path]
        if not detail:
            return [child(path, name) for name, _ in entries]
        out = []
        for name, node in entries:
            full = child(path, name)
            if node.kind == "symlink":
                out.append(self.info(full))
            else:
                out.append(info_dict(full, node))
        return out

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """Details of ``path``, following a symlink (a dangling one is type "other")."""
        path = self._norm(path)
        _, lnode = self.engine.walk_path(path, False)
        if lnode is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if lnode.kind != "symlink":
            return info_dict(path, lnode)
        try:
            _, node = self.engine.walk_path(path, True)
        except OSError:
            node = None
        return info_dict(path, node if node is not None else lnode, islink=True)

    def exists(self, path: str, **kwargs: Any) -> bool:
        """Whether ``path`` exists (following symlinks)."""
        try:
            return self.engine.exists(self._norm(path))
        except OSError:
            return False

    def created(self, path: str) -> datetime:
        """Creation time, as a timezone-aware datetime."""
        return datetime.fromtimestamp(self.engine.stat(self._norm(path)).st_birthtime, UTC)

    def modified(self, path: str) -> datetime:
        """Modification time, as a timezone-aware datetime."""
        return datetime.fromtimestamp(self.engine.stat(self._norm(path)).st_mtime, UTC)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes:
        """The bytes of ``path`` (or of a range of it)."""
        reader = self.engine.open_reader(self._norm(path))
        try:
            size = reader.size
            first = 0 if start is None else (start if start >= 0 else max(size + start, 0))
            stop = size if end is None else (end if end >= 0 else max(size + end, 0))
            return reader.pread(first, max(stop - first, 0))
        finally:
            reader.close()

    def _open(self, path: str, mode: str = "rb", block_size: Any = None,
              autocommit: bool = True, cache_options: Any = None, **kwargs: Any) -> Any:
        path = self._norm(path)
        if mode == "rb":
            return FsxReadFile(self, path, self.engine.open_reader(path), block_size,
                               cache_options)
        if mode in ("wb", "ab", "xb"):
            return FsxWriteFile(self.engine, path, mode)
        raise ValueError(f"fsx files open in modes rb, wb, ab or xb (or text r, w, a, x), "
                         f"not {mode!r}")

    # -- fsspec writing -------------------------------------------------------------------
    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite",
                  **kwargs: Any) -> None:
        """Write ``value`` to ``path`` in one transaction (``mode="create"``: EEXIST if it
        exists)."""
        self.engine.write(self._norm(path), value, exclusive=mode == "create")

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """fsspec's mkdir: FileExistsError if ``path`` exists."""
        self.engine.mkdir(self._norm(path), parents=create_parents)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Make ``path`` and its missing parents."""
        self.engine.mkdir(self._norm(path), parents=True, exist_ok=exist_ok)

    def rmdir(self, path: str) -> None:
        """Remove an empty directory."""
        self.engine.rmdir(self._norm(path))

    def rm_file(self, path: str) -> None:
        """Remove a file or symlink."""
        self.engine.unlink(self._norm(path))

    def _rm(self, path: str) -> None:
        path = self._norm(path)
        if self.engine.lstat(path).is_dir():
            self.engine.rmdir(path)
        else:
            self.engine.unlink(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """fsspec's rm; a recursive removal of one directory is one transaction."""
        if isinstance(path, str) and recursive and maxdepth is None and not any(
                c in path for c in "*?["):
            norm = self._norm(path)
            if self.engine.lstat(norm).is_dir():
                self.engine.rmdir(norm, recursive=True)
                return
        super().rm(path, recursive=recursive, maxdepth=maxdepth)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Copy one file; for a directory, make it at ``path2`` (fsspec's recursive copy calls
        this for every directory it meets, as LocalFileSystem.cp_file expects)."""
        source, target = self._norm(path1), self._norm(path2)
        if self.engine.stat(source).is_dir():
            self.engine.mkdir(target, parents=True, exist_ok=True)
        else:
            self.engine.copy_file(source, target)

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        """Create an empty file, or (``truncate=False``) update the times of an existing one."""
        path = self._norm(path)
        if truncate or not self.engine.exists(path):
            self.engine.write(path, b"")
        else:
            now = time.time()
            self.engine.utimes(path, now, now)

    def islink(self, path: str) -> bool:
        """Whether ``path`` is a symlink (as LocalFileSystem.islink)."""
        try:
            return self.engine.lstat(self._norm(path)).is_symlink()
        except OSError:
            return False

    def symlink(self, target: str, path: str) -> None:
        """Make ``path`` a symlink to ``target``."""
        self.engine.symlink(target, self._norm(path))

    def close(self) -> None:
        """Release the store (connection, descriptors)."""
        self.store.close()


class FsxMemoryFileSystem(FsxFileSystem):
    """``memory://``: an ephemeral workspace in this process."""

    def __init__(self, quota: Quota | None = None, **storage_options: Any) -> None:
        super().__init__(MemoryStore(), quota, **storage_options)


class FsxSqliteFileSystem(FsxFileSystem):
    """``sqlite:///path/ws.db``: a persistent workspace in one SQLite file."""

    def __init__(self, path: str | Path, synchronous: str = "full", url: str = "",
                 quota: Quota | None = None, **storage_options: Any) -> None:
        super().__init__(SqliteStore(path, url=url, synchronous=synchronous), quota,
                         **storage_options)


class FsxLocalFileSystem(FsxFileSystem):
    """``file:///dir``: a host directory as the workspace root, with no way out of it."""

    def __init__(self, root: str | Path, url: str = "", quota: Quota | None = None,
                 **storage_options: Any) -> None:
        super().__init__(LocalStore(root, url=url), quota, **storage_options)
