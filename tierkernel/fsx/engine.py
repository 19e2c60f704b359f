"""POSIX semantics over a :class:`~tierkernel.fsx.store.Store`: path resolution with symlinks,
the checks that pick each errno, and one transaction per write operation.

Every backend shares this code, so memory, sqlite and local answer every call with the same
result and the same error; the contract suite in ``tests/fsx`` holds them to it.
"""

from __future__ import annotations

import errno
import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import BinaryIO

from tierkernel.errors import FsxQuotaError
from tierkernel.fsx.errors import escapes_root, fs_error, not_found
from tierkernel.fsx.nodes import DEFAULT_MODE, DirEntry, FsxStat, Node
from tierkernel.fsx.paths import PATH_MAX, components, is_within, join, parent
from tierkernel.fsx.quota import UNLIMITED, CappedReader, Quota, byte_length, depth
from tierkernel.fsx.store import Reader, Store

# Linux gives up after 40 symlinks in one lookup (MAXSYMLINKS); the same limit makes a loop
# fail with ELOOP instead of spinning.
MAX_SYMLINKS = 40

TimeValue = int | float | datetime


def _to_ns(value: TimeValue, what: str) -> int:
    """Seconds (int or float) or a datetime, as integer nanoseconds."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be seconds (int or float) or a datetime, not bool")
    if isinstance(value, datetime):
        return round(value.timestamp() * 1e9)
    if isinstance(value, int):
        return value * 1_000_000_000
    if isinstance(value, float):
        return round(value * 1e9)
    raise TypeError(f"{what} must be seconds (int or float) or a datetime, "
                    f"not {type(value).__name__}")


def _check_int(value: object, what: str, low: int, high: int | None, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{oct(high) if what == 'mode' else high}" if high is not None else (
            f">= {low}")
        raise fs_error(errno.EINVAL, path, detail=f"Invalid argument: {what} {value} is not in "
                       f"{bound}")
    return value


class PosixEngine:
    """The operations of the fsx facade, with POSIX's behaviour and errors, over one store.

    Who calls it: :class:`~tierkernel.fsx.facade.FsxFacade` (user code in every tier) and
    :class:`~tierkernel.fsx.filesystem.FsxFileSystem` (fsspec, pandas). Thread-safe as far as
    the store is: each write operation is one ``store.transaction()`` (see ``_writing``).

    Every write of every tier comes through here, so here is where the workspace's ``quota``
    holds: each write is checked, inside its transaction and before anything changes, against
    the totals the store keeps (``Store.tally``), and one that would go over raises
    :class:`~tierkernel.errors.FsxQuotaError` and changes nothing.
    """

    def __init__(self, store: Store, quota: Quota | None = None) -> None:
        self.store = store
        self.quota = quota or Quota()
        self._writes = 0
        #: Inside :meth:`bulk`: directories met while resolving, so a path whose parent is
        #: among them is resolved with two lookups instead of one per component.
        self._dirs: set[str] | None = None

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """Many operations on nearby paths (the sandbox tier's copy back): path resolution
        and the store (``Store.bulk``) remember directories, so the work grows with the number
        of paths, not with their depth times their number. Same results and errors as
        without; re-entrant."""
        if self._dirs is not None:
            yield
            return
        self._dirs = {"/"}
        try:
            with self.store.bulk():
                yield
        finally:
            self._dirs = None

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One write operation: a store transaction, counted for :meth:`change_token`."""
        with self.store.transaction():
            try:
                yield
            finally:  # counted once done: a token read meanwhile is older, so never stale
                self._writes += 1

    def change_token(self) -> object | None:
        """A value that changes whenever the workspace may have changed: this process's write
        operations, plus the store's own sign of other processes' writes. None when the store
        cannot tell (a host folder anyone may change): then every caller must look itself.

        Who calls it: the sandbox tier, before each cell, to skip copying an unchanged
        workspace into its container (and the walk that finds out).
        """
        external = self.store.external_version()
        return None if external is None else (self._writes, external)

    # -- resolution -----------------------------------------------------------------------
    def walk_path(self, path: str, follow_last: bool = True) -> tuple[str, Node | None]:
        """Resolve ``path`` to (physical path, node or None if the last component is missing).

        Raises ENOENT for a missing or ENOTDIR for a non-directory intermediate component,
        ELOOP after :data:`MAX_SYMLINKS` links, EACCES for '..' above the root. Absolute
        symlink targets are read from the workspace root, as in a chroot: no target can name a
        host path.
        """
        pending = components(path)
        dirs = self._dirs
        if dirs is not None:
            quick = self._walk_known(path, pending, follow_last, dirs)
            if quick is not None:
                return quick
        must_be_dir = path.endswith("/") and bool(pending)
        resolved: list[str] = []
        node: Node | None = self.store.lookup("/")
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == ".":
                continue
            if part == "..":
                if not resolved:
                    raise escapes_root(path)
                resolved.pop()
                node = self.store.lookup(join(resolved))
                continue
            candidate = [*resolved, part]
            node = self.store.lookup(join(candidate))
            last = not pending
            if node is None:
                if last:
                    return join(candidate), None
                raise not_found(path)
            if node.kind == "symlink" and (not last or follow_last or must_be_dir):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise fs_error(errno.ELOOP, path)
                target = components(node.target)
                if node.target.startswith("/"):
                    resolved = []
                pending = target + pending
                node = self.store.lookup(join(resolved))
                continue
            if not last and node.kind != "dir":
                raise fs_error(errno.ENOTDIR, path)
            resolved = candidate
            if dirs is not None and node.kind == "dir":
                dirs.add(join(resolved))
        if must_be_dir and node is not None and node.kind != "dir":
            raise fs_error(errno.ENOTDIR, path)
        return join(resolved), node

    def _walk_known(self, path: str, parts: list[str], follow_last: bool,
                    dirs: set[str]) -> tuple[str, Node | None] | None:
        """:meth:`walk_path` for a plain path (no '.', '..' or trailing '/') whose parent
        was met as a directory in this :meth:`bulk`, or None to take the long way. The parent
        is looked up again: a store holds nodes only below directories, so a directory there
        now means no link on the way, whoever changed the workspace meanwhile."""
        if not parts or path.endswith("/") or "." in parts or ".." in parts:
            return None
        physical = join(parts)
        above = parent(physical)
        if above not in dirs:
            return None
        holder = self.store.lookup(above)
        if holder is None or holder.kind != "dir":
            dirs.discard(above)
            return None
        node = self.store.lookup(physical)
        if node is not None and node.kind == "symlink" and follow_last:
            return None
        if node is not None and node.kind == "dir":
            dirs.add(physical)
        return physical, node

    def _existing(self, path: str, follow: bool = True) -> tuple[str, Node]:
        physical, node = self.walk_path(path, follow)
        if node is None:
            raise not_found(path)
        return physical, node

    # -- quotas ---------------------------------------------------------------------------
    def _tally(self) -> tuple[int, int]:
        """(entries, bytes) of the workspace when a quota needs them; nothing is counted for a
        workspace without one."""
        return self.store.tally() if self.quota.counts_usage else (0, 0)

    def _check_new(self, path: str, physical: str) -> None:
        """A new entry at ``physical``: its depth, its length, and one more entry."""
        self.quota.check_name(path, physical)
        if self.quota.max_entries < UNLIMITED:
            self.quota.check_entries(path, self.store.tally()[0])

    def write_limit(self, path: str, append: bool = False) -> tuple[int, OSError]:
        """(most bytes, the error past them) that a write of file ``path`` could hand over
        now; raises what creating ``path`` would (too deep, too long, too many entries).

        Who calls it: a file opened for writing, at open and again when its staged bytes
        pass the limit, so a stream is cut as it goes over, not only when it is closed (the
        write at close is checked again in its own transaction)."""
        with self.store.snapshot():
            physical, node = self.walk_path(path, True)
            if (node is not None and node.kind != "file") or physical == "/":
                return UNLIMITED, fs_error(errno.EISDIR, path)  # the write itself says so
            entries, used = self._tally()
            if node is None:
                self.quota.check_name(path, physical)
                self.quota.check_entries(path, entries)
            return self.quota.content_limit(path, node.size if node is not None else 0,
                                            append, used)

    def _touch_parent(self, physical: str, now: int) -> None:
        """A directory's mtime/ctime change when an entry is added, removed or renamed."""
        if physical != "/":
            self.store.entries_changed(parent(physical), now)

    # -- reading --------------------------------------------------------------------------
    def stat(self, path: str) -> FsxStat:
        """Status of ``path``, following symlinks."""
        with self.store.snapshot():
            return FsxStat.of(self._existing(path, True)[1])

    def lstat(self, path: str) -> FsxStat:
        """Status of ``path`` itself (a symlink is reported as a symlink)."""
        with self.store.snapshot():
            return FsxStat.of(self._existing(path, False)[1])

    def exists(self, path: str) -> bool:
        """Whether ``path`` names something, following symlinks (False for a dangling link,
        a loop, or any path that cannot be resolved)."""
        try:
            with self.store.snapshot():
                return self.walk_path(path, True)[1] is not None
        except (OSError, ValueError):
            return False

    def realpath(self, path: str) -> str:
        """The canonical workspace path of ``path``: no symlink, '.' or '..' left."""
        with self.store.snapshot():
            return self._existing(path, True)[0]

    def readlink(self, path: str) -> str:
        """The target of the symlink ``path``, as it was written; EINVAL if not a symlink."""
        with self.store.snapshot():
            _, node = self._existing(path, False)
        if node.kind != "symlink":
            raise fs_error(errno.EINVAL, path, detail="Invalid argument: not a symlink")
        return node.target

    def readdir(self, path: str) -> list[DirEntry]:
        """The entries of directory ``path`` (following a symlink to it), sorted by name."""
        with self.store.snapshot():
            physical, node = self._existing(path, True)
            if node.kind != "dir":
                raise fs_error(errno.ENOTDIR, path)
            entries = self.store.children(physical)
        return sorted(DirEntry(name, child.kind) for name, child in entries)

    def listing(self, path: str) -> list[tuple[str, Node]]:
        """Like :meth:`readdir`, with each entry's node (for fsspec's ``ls(detail=True)``)."""
        with self.store.snapshot():
            physical, node = self._existing(path, True)
            if node.kind != "dir":
                raise fs_error(errno.ENOTDIR, path)
            return sorted(self.store.children(physical))

    def open_reader(self, path: str) -> Reader:
        """A reader of file ``path``: EISDIR for a directory."""
        with self.store.snapshot():
            physical, node = self._existing(path, True)
            if node.kind == "dir":
                raise fs_error(errno.EISDIR, path)
            return self.store.open_reader(physical)

    def read(self, path: str) -> bytes:
        """The whole content of file ``path``."""
        reader = self.open_reader(path)
        try:
            return reader.pread(0, reader.size)
        finally:
            reader.close()

    def walk_tree(self, path: str = "/") -> Iterator[tuple[str, Node]]:
        """Every node below directory ``path`` (resolved), never following symlinks."""
        physical, node = self._existing(path, True)
        if node.kind != "dir":
            raise fs_error(errno.ENOTDIR, path)
        yield from self.store.walk(physical)

    # -- writing --------------------------------------------------------------------------
    def write(self, path: str, data: bytes | BinaryIO, append: bool = False,
              exclusive: bool = False) -> None:
        """Write (or append) ``data`` to file ``path``, creating it; one atomic transaction.

        ``data`` may be bytes or a binary stream read to its end (large files never need to
        be in memory at once). ``exclusive`` refuses an existing path with EEXIST.
        """
        source: BinaryIO = io.BytesIO(data) if isinstance(data, bytes | bytearray
                                                          | memoryview) else data
        with self._writing():
            physical, node = self.walk_path(path, True)
            if node is not None:
                if exclusive:
                    raise fs_error(errno.EEXIST, path)
                if node.kind == "dir":
                    raise fs_error(errno.EISDIR, path)
            elif physical == "/":
                raise fs_error(errno.EISDIR, path)
            entries, used = self._tally()
            if node is None:
                self.quota.check_name(path, physical)
                self.quota.check_entries(path, entries)
            limit, over = self.quota.content_limit(path, node.size if node is not None else 0,
                                                   append, used)
            if isinstance(data, bytes | bytearray | memoryview):
                size = memoryview(data).nbytes
                if size > limit:
                    if over.setting == "max_file_size":
                        # The size is known here (not for a stream): say it.
                        size += node.size if append and node is not None else 0
                        raise self.quota.file_size_error(path, size)
                    raise over
            elif limit < UNLIMITED:
                # Cut while the store reads it: nothing past the limit is taken, and the
                # store's transaction (or its own clean-up) leaves the file as it was.
                source = CappedReader(source, limit, over)  # type: ignore[assignment]
            self.store.put(physical, source, append)
            if node is None:
                self._touch_parent(physical, time.time_ns())

    def truncate(self, path: str, length: int = 0) -> None:
        """Cut file ``path`` to ``length`` bytes, or extend it with zero bytes."""
        _check_int(length, "length", 0, None, path)
        with self._writing():
            physical, node = self._existing(path, True)
            if node.kind == "dir":
                raise fs_error(errno.EISDIR, path)
            if length > node.size:
                self.quota.check_file_size(path, length)
                self.quota.check_bytes(path, self._tally()[1], length - node.size)
            self.store.truncate(physical, length)

    def mkdir(self, path: str, parents: bool = False, exist_ok: bool = False,
              mode: int = 0o777) -> None:
        """Make directory ``path``; with ``parents`` also its missing ancestors.

        EEXIST if it exists, unless ``exist_ok`` and it is a directory (or a symlink to one).
        ``mode`` is masked by 0o755, as a typical umask (022) would on the host.
        """
        _check_int(mode, "mode", 0, 0o7777, path)
        perm = mode & DEFAULT_MODE["dir"] if mode != 0o777 else DEFAULT_MODE["dir"]
        with self._writing():
            now = time.time_ns()
            if not parents:
                physical, node = self.walk_path(path, False)
                if node is not None:
                    if exist_ok and self._resolves_to_dir(path):
                        return
                    raise fs_error(errno.EEXIST, path)
                self._check_new(path, physical)
                self.store.create(physical, "dir", perm)
                self._touch_parent(physical, now)
                if self._dirs is not None:
                    self._dirs.add(physical)
                return
            parts = components(path)
            created: list[str] = []
            entries: int | None = None
            try:
                for count in range(1, len(parts) + 1):
                    prefix = join(parts[:count])
                    physical, node = self.walk_path(prefix, True)
                    last = count == len(parts)
                    if node is None:
                        self.quota.check_name(path, physical)
                        if self.quota.max_entries < UNLIMITED:
                            if entries is None:  # counted once: this call adds the rest
                                entries = self.store.tally()[0]
                            self.quota.check_entries(path, entries + len(created))
                        self.store.create(physical, "dir", perm)
                        created.append(physical)
                        self._touch_parent(physical, now)
                    elif node.kind != "dir":
                        raise fs_error(errno.EEXIST if last else errno.ENOTDIR, path)
                    elif last and not exist_ok and parts[-1] not in (".", ".."):
                        raise fs_error(errno.EEXIST, path)
            except FsxQuotaError:
                # Refused part way down: take back the folders made above it, so every
                # backend is left as it was (SQLite's rollback would do it; the others have
                # none).
                for made in reversed(created):
                    self.store.remove(made)
                raise

    def _resolves_to_dir(self, path: str) -> bool:
        try:
            node = self.walk_path(path, True)[1]
        except OSError:
            return False
        return node is not None and node.kind == "dir"

    def rmdir(self, path: str, recursive: bool = False) -> None:
        """Remove directory ``path``: ENOTEMPTY unless empty or ``recursive`` (which removes
        everything below, following no symlink). A symlink is ENOTDIR: use unlink."""
        with self._writing():
            physical, node = self._existing(path, False)
            if node.kind != "dir":
                raise fs_error(errno.ENOTDIR, path)
            if physical == "/":
                raise fs_error(errno.EBUSY, path, detail="Device or resource busy: the "
                               "workspace root cannot be removed")
            if recursive:
                self.store.remove_tree(physical)
            else:
                if self.store.children(physical):
                    raise fs_error(errno.ENOTEMPTY, path)
                self.store.remove(physical)
            self._touch_parent(physical, time.time_ns())

    def unlink(self, path: str) -> None:
        """Remove file or symlink ``path`` (never its target); EISDIR for a directory."""
        with self._writing():
            physical, node = self._existing(path, False)
            if node.kind == "dir":
                raise fs_error(errno.EISDIR, path)
            self.store.remove(physical)
            self._touch_parent(physical, time.time_ns())

    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst`` atomically, replacing a file at ``dst`` or an empty
        directory when ``src`` is a directory, as POSIX rename(2)."""
        with self._writing():
            source, snode = self.walk_path(src, False)
            if snode is None:
                raise fs_error(errno.ENOENT, src, dst)
            target, tnode = self.walk_path(dst, False)
            if source == "/" or target == "/":
                raise fs_error(errno.EBUSY, src, dst, "Device or resource busy: the "
                               "workspace root cannot be renamed or replaced")
            if source == target:
                return
            if snode.kind == "dir" and is_within(target, source):
                raise fs_error(errno.EINVAL, src, dst, "Invalid argument: cannot move a "
                               "directory into itself")
            if tnode is not None:
                if snode.kind == "dir" and tnode.kind != "dir":
                    raise fs_error(errno.ENOTDIR, src, dst)
                if snode.kind != "dir" and tnode.kind == "dir":
                    raise fs_error(errno.EISDIR, src, dst)
                if tnode.kind == "dir" and self.store.children(target):
                    raise fs_error(errno.ENOTEMPTY, src, dst)
            deeper = depth(target) - depth(source)
            longer = byte_length(target) - byte_length(source)
            if (deeper > 0 or longer > 0) and self.quota.bounds_shape:
                # The moved tree may now pass the shape quotas: its deepest and longest path
                # decide (a walk of it, except where the store can ask an index).
                deepest, longest = (self.store.extent(source) if snode.kind == "dir"
                                    else (depth(source), byte_length(source)))
                self.quota.check_shape(dst, deepest + deeper, longest + longer)
            self.store.rename(source, target)
            now = time.time_ns()
            self._touch_parent(source, now)
            self._touch_parent(target, now)

    def copy_file(self, src: str, dst: str, exclusive: bool = False) -> None:
        """Copy the content (and permission bits) of file ``src`` to ``dst``."""
        with self._writing():
            source, snode = self._existing(src, True)
            if snode.kind == "dir":
                raise fs_error(errno.EISDIR, src, dst)
            target, tnode = self.walk_path(dst, True)
            if tnode is not None:
                if exclusive:
                    raise fs_error(errno.EEXIST, src, dst)
                if tnode.kind == "dir":
                    raise fs_error(errno.EISDIR, src, dst)
            elif target == "/":
                raise fs_error(errno.EISDIR, src, dst)
            if source == target:
                return
            if tnode is None:
                self._check_new(dst, target)
            self.quota.check_file_size(dst, snode.size)
            self.quota.check_bytes(dst, self._tally()[1],
                                   snode.size - (tnode.size if tnode is not None else 0))
            self.store.copy(source, target)
            if tnode is None:
                self._touch_parent(target, time.time_ns())

    def symlink(self, target: str, path: str) -> None:
        """Make ``path`` a symlink to ``target`` (stored verbatim; it need not exist).
        Absolute targets are read from the workspace root."""
        if not isinstance(target, str):
            raise TypeError(f"a symlink target must be a str, not {type(target).__name__}")
        if not target or "\0" in target or len(target.encode("utf-8", "surrogateescape")) > (
                PATH_MAX):
            raise fs_error(errno.EINVAL, path, detail="Invalid argument: a symlink target "
                           "must be a non-empty path without NUL")
        with self._writing():
            physical, node = self.walk_path(path, False)
            if node is not None or physical == "/":
                raise fs_error(errno.EEXIST, path)
            self.quota.check_target(path, target)
            self._check_new(path, physical)
            self.store.create(physical, "symlink", DEFAULT_MODE["symlink"], target)
            self._touch_parent(physical, time.time_ns())

    def chmod(self, path: str, mode: int) -> None:
        """Set the permission bits (0..0o7777) of ``path``, following symlinks."""
        _check_int(mode, "mode", 0, 0o7777, path)
        with self._writing():
            physical, _ = self._existing(path, True)
            self.store.set_meta(physical, perm=mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        """Set the owner of ``path`` (-1 keeps one), following symlinks."""
        _check_int(uid, "uid", -1, 2**32 - 2, path)
        _check_int(gid, "gid", -1, 2**32 - 2, path)
        with self._writing():
            physical, _ = self._existing(path, True)
            self.store.set_meta(physical, uid=None if uid == -1 else uid,
                                gid=None if gid == -1 else gid)

    def utimes(self, path: str, atime: TimeValue, mtime: TimeValue) -> None:
        """Set access and modification times (seconds or datetimes), following symlinks."""
        atime_ns, mtime_ns = _to_ns(atime, "atime"), _to_ns(mtime, "mtime")
        with self._writing():
            physical, _ = self._existing(path, True)
            self.store.set_meta(physical, atime_ns=atime_ns, mtime_ns=mtime_ns)

    def usage(self) -> tuple[int, int]:
        """(number of files, bytes of file content) in the workspace."""
        with self.store.snapshot():
            return self.store.usage()
