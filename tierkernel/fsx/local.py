"""The ``file:///dir`` backend: a host directory is the workspace root.

Nothing can escape the root. The engine resolves every symlink itself, reading absolute targets
from the root and refusing '..' above it; this store then touches the disk only through file
descriptors opened one component at a time from a descriptor of the root, each with
``O_NOFOLLOW``, and acts on the last component with ``dir_fd`` and ``follow_symlinks=False``.
So even a directory swapped for a symlink by another process between the engine's check and the
store's action makes the call fail (ELOOP/ENOTDIR) instead of reaching outside.

Modes never carry setuid, setgid, sticky or world-write bits onto host disk (they are cleared,
not refused: a cell's ``chmod 4777`` leaves ``0775``).

Files are replaced atomically (written to a temporary name beside them, then renamed over), so a
crash never leaves a torn file; appends extend the file in place (and are cut back if they fail).

Quotas: the totals the engine checks (``tally``) come from one walk of the folder, then follow
this store's own writes; the folder is walked again once the count is older than ten times
what the last walk took (at least a second), so what other programs write there is counted
within moments while a big folder costs writes at most a tenth of their time.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import stat as stat_mod
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from tierkernel.errors import FsxConfigError
from tierkernel.fsx.errors import fs_error
from tierkernel.fsx.nodes import DEFAULT_MODE, Kind, Node
from tierkernel.fsx.store import COPY_CHUNK, Reader, Store

if TYPE_CHECKING:  # imported at first use: it loads ctypes, which most kernels never need
    from tierkernel.guest.tree_watch import TreeWatch

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_TMP_PREFIX = ".fsx-tmp-"
#: Permission bits fsx sets on host files: never setuid, setgid, sticky or world-writable,
#: whatever a tier asks (a sandbox cell's chmod 4777 comes back to the host this way).
_HOST_PERM = 0o0775
#: Directory descriptors a bulk operation keeps (well under the usual limit of 1024 open files).
_BULK_FDS = 64
#: The walk behind the quota totals is made again once they are older than the larger of
#: these: seconds, and times what the last walk took.
_RECOUNT_AFTER = 1.0
_RECOUNT_FACTOR = 10.0


def _node_of(st: os.stat_result, target: str = "") -> Node:
    if stat_mod.S_ISDIR(st.st_mode):
        kind: Kind = "dir"
    elif stat_mod.S_ISLNK(st.st_mode):
        kind = "symlink"
    else:
        # Special files (FIFOs, sockets, devices) are listed as files; open_reader refuses them.
        kind = "file"
    birth = getattr(st, "st_birthtime_ns", None) or st.st_ctime_ns
    return Node(kind, st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_size, st.st_atime_ns,
                st.st_mtime_ns, st.st_ctime_ns, birth, target)


class FdReader(Reader):
    """A reader over an open descriptor: it keeps reading the file it opened even if the
    path is replaced meanwhile."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.size = os.fstat(fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        """``os.pread`` until ``length`` bytes or the end."""
        parts: list[bytes] = []
        while length > 0:
            data = os.pread(self._fd, min(length, 1 << 24), offset)
            if not data:
                break
            parts.append(data)
            offset += len(data)
            length -= len(data)
        return b"".join(parts)

    def close(self) -> None:
        """Close the descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalStore(Store):
    """A host directory as the workspace, reached only through descriptors under its root."""

    backend = "local"

    def __init__(self, root: str | Path, url: str = "") -> None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FsxConfigError(f"the local workspace root {str(path)!r} is not an existing "
                                 "directory")
        self.root = path.resolve()
        self.url = url or self.root.as_uri()
        # Held for the store's life: later lookups start here, so renaming or replacing the
        # root's path on the host cannot redirect them.
        self._root_fd = os.open(self.root, _DIR_FLAGS)
        self._lock = threading.RLock()
        self._watch: TreeWatch | None = None
        #: Inside :meth:`bulk`: descriptors of directories by path, most recently used last.
        self._dir_fds: OrderedDict[str, int] | None = None
        # [entries, bytes] as of the last walk plus this store's writes since; None until a
        # quota first asks (a workspace without quotas is never walked for them).
        self._tally: list[int] | None = None
        self._counted_at = 0.0
        self._count_took = 0.0

    def transaction(self) -> AbstractContextManager[Any]:
        """Serialises this process's operations; the host filesystem gives no more."""
        return self._lock

    def external_version(self) -> object | None:
        """A count of the writes anyone made under the root, heard through inotify (see
        ``tierkernel.guest.tree_watch``); None where that cannot be trusted (then callers walk
        the tree).
        The watch is set up at the first call: only the sandbox tier asks."""
        with self._lock:
            if self._root_fd < 0:
                return None
            if self._watch is None:
                from tierkernel.guest.tree_watch import TreeWatch

                self._watch = TreeWatch(self._root_fd, str(self.root))
                if self._watch.why:
                    log.info("fsx: changes to %s are found by walking it before each sandbox "
                             "cell: %s", self.root, self._watch.why)
            watch = self._watch
        return watch.version()

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """Keep up to :data:`_BULK_FDS` directory descriptors until the end, so a call
        below a directory met before opens one component, not every one from the root.
        The descriptors are opened exactly as without (one component at a time, O_NOFOLLOW)
        and dropped when this store removes or renames what they name; what another program
        moves meanwhile is its owner's own doing, as within any single call."""
        with self._lock:
            outer = self._dir_fds is None
            if outer:
                self._dir_fds = OrderedDict()
        if not outer:
            yield
            return
        try:
            yield
        finally:
            with self._lock:
                fds, self._dir_fds = self._dir_fds or OrderedDict(), None
                for fd in fds.values():
                    os.close(fd)

    def _forget_dirs(self, path: str) -> None:
        """Drop the kept descriptors of ``path`` and of everything below it."""
        with self._lock:
            fds = self._dir_fds
            if fds:
                for key in [k for k in fds if k == path or k.startswith(path + "/")]:
                    os.close(fds.pop(key))
    def tally(self) -> tuple[int, int]:
        """The totals as of the last walk plus this store's writes since, walked again when
        older than the walk's cost allows (see the module docstring)."""
        with self._lock:
            now = time.monotonic()
            if self._tally is None or now - self._counted_at > max(
                    _RECOUNT_AFTER, _RECOUNT_FACTOR * self._count_took):
                self._tally = list(super().tally())
                self._counted_at = time.monotonic()
                self._count_took = self._counted_at - now
            return self._tally[0], self._tally[1]

    def _counted(self, entries: int, size: int) -> None:
        """One of this store's writes added ``entries`` and ``size`` bytes (either may be
        negative) to the totals, when they are kept."""
        if self._tally is not None:
            self._tally[0] += entries
            self._tally[1] += size

    # -- descriptors ----------------------------------------------------------------------
    def _open_dir(self, parts: list[str], path: str) -> int:
        with self._lock:
            fds = self._dir_fds
            if fds is None:
                return self._open_from(self._root_fd, parts, path)
            # The nearest kept ancestor (usually the directory itself or its parent).
            depth = len(parts)
            key = "/" + "/".join(parts)
            while depth and key not in fds:
                depth -= 1
                key = key.rsplit("/", 1)[0] or "/"
            if depth:
                fds.move_to_end(key)
            fd = self._open_from(fds[key] if depth else self._root_fd, [], path)
            for part in parts[depth:]:
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    raise self._dir_error(exc, path) from None
                finally:
                    os.close(fd)
                fd = next_fd
                key = f"/{part}" if key == "/" else f"{key}/{part}"
                fds[key] = os.open(".", _DIR_FLAGS, dir_fd=fd)  # the caller closes its own
                if len(fds) > _BULK_FDS:
                    os.close(fds.popitem(last=False)[1])
            return fd

    def _open_from(self, start: int, parts: list[str], path: str) -> int:
        fd = os.open(".", _DIR_FLAGS, dir_fd=start)
        try:
            for part in parts:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = next_fd
        except OSError as exc:
            os.close(fd)
            raise self._dir_error(exc, path) from None
        return fd

    @staticmethod
    def _dir_error(exc: OSError, path: str) -> OSError:
        if exc.errno == errno.ELOOP:
            return fs_error(errno.ELOOP, path, detail="Too many levels of symbolic links: "
                            "a directory became a symlink during the call; refused")
        return fs_error(exc.errno or errno.EIO, path)

    @contextmanager
    def _at(self, path: str) -> Iterator[tuple[int, str]]:
        """(descriptor of the parent directory, last name) for a path other than the root."""
        parts = path.split("/")[1:]
        fd = self._open_dir(parts[:-1], path)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    @contextmanager
    def _dir(self, path: str) -> Iterator[int]:
        fd = self._open_dir([p for p in path.split("/") if p], path)
        try:
            yield fd
        finally:
            os.close(fd)

    # -- Store ----------------------------------------------------------------------------
    def lookup(self, path: str) -> Node | None:
        """lstat of ``path`` under the root."""
        if path == "/":
            return _node_of(os.fstat(self._root_fd))
        try:
            with self._at(path) as (fd, name):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                target = os.readlink(name, dir_fd=fd) if stat_mod.S_ISLNK(st.st_mode) else ""
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise
        return _node_of(st, target)

    def children(self, path: str) -> list[tuple[str, Node]]:
        """scandir of the directory, never following an entry."""
        out: list[tuple[str, Node]] = []
        with self._dir(path) as fd, os.scandir(fd) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                    target = os.readlink(entry.name, dir_fd=fd) if entry.is_symlink() else ""
                except FileNotFoundError:
                    continue  # removed while listing
                out.append((entry.name, _node_of(st, target)))
        return out

    def create(self, path: str, kind: Kind, perm: int, target: str = "") -> None:
        """Make the node with an exclusive create, so an existing entry is never reused."""
        with self._at(path) as (fd, name):
            if kind == "dir":
                os.mkdir(name, perm, dir_fd=fd)
            elif kind == "symlink":
                os.symlink(target, name, dir_fd=fd)
            else:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 perm, dir_fd=fd))
        self._counted(1, 0)

    def open_reader(self, path: str) -> Reader:
        """Open with O_NOFOLLOW|O_NONBLOCK (a FIFO must not hang the kernel) and refuse
        anything but a regular file."""
        with self._at(path) as (fd, name):
            file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        if not stat_mod.S_ISREG(os.fstat(file_fd).st_mode):
            os.close(file_fd)
            raise fs_error(errno.EACCES, path, detail="Permission denied: not a regular file")
        return FdReader(file_fd)

    def put(self, path: str, source: BinaryIO, append: bool) -> None:
        """Append in place, or write a temporary file beside ``path`` and rename it over."""
        with self._at(path) as (fd, name):
            if append:
                self._append(fd, name, source)
                return
            try:
                old: os.stat_result | None = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            temp = f"{_TMP_PREFIX}{secrets.token_hex(8)}"
            out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                          DEFAULT_MODE["file"], dir_fd=fd)
            try:
                try:
                    _copy_to_fd(source, out)
                    size = os.fstat(out).st_size
                    if old is not None:
                        # Keep the replaced file's permissions (and owner, when allowed).
                        os.fchmod(out, old.st_mode & 0o7777)
                        with suppress(PermissionError):
                            os.fchown(out, old.st_uid, old.st_gid)
                finally:
                    os.close(out)
                os.rename(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                with suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=fd)
                raise
            self._counted(int(old is None), size - (old.st_size if old is not None else 0))

    def _append(self, fd: int, name: str, source: BinaryIO) -> None:
        """Extend ``name`` in place (creating it); a failure part way (a quota, a full disk)
        cuts it back to what it was, or removes it if this call made it."""
        created = False
        try:
            out = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError:
            out = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                          | os.O_NOFOLLOW, DEFAULT_MODE["file"], dir_fd=fd)
            created = True
        try:
            before = os.fstat(out).st_size
            try:
                _copy_to_fd(source, out)
            except BaseException:
                if created:
                    with suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=fd)
                else:
                    os.ftruncate(out, before)
                raise
            self._counted(int(created), os.fstat(out).st_size - before)
        finally:
            os.close(out)

    def truncate(self, path: str, length: int) -> None:
        """ftruncate through an O_NOFOLLOW descriptor."""
        with self._at(path) as (fd, name):
            out = os.open(name, os.O_WRONLY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            before = os.fstat(out).st_size
            os.ftruncate(out, length)
            self._counted(0, length - before)
        finally:
            os.close(out)

    def copy(self, src: str, dst: str) -> None:
        """Stream ``src`` into an atomic replace of ``dst``; keep ``src``'s permission bits."""
        reader = self.open_reader(src)
        assert isinstance(reader, FdReader)
        try:
            with os.fdopen(os.dup(reader._fd), "rb") as stream:
                perm = os.fstat(stream.fileno()).st_mode & _HOST_PERM
                self.put(dst, stream, append=False)
        finally:
            reader.close()
        self.set_meta(dst, perm=perm)

    def set_meta(self, path: str, *, perm: int | None = None, uid: int | None = None,
                 gid: int | None = None, atime_ns: int | None = None,
                 mtime_ns: int | None = None) -> None:
        """chmod through a descriptor; chown and utime with follow_symlinks=False."""
        if perm is not None:
            perm &= _HOST_PERM
        if path == "/":
            if perm is not None:
                os.fchmod(self._root_fd, perm)
            if uid is not None or gid is not None:
                os.fchown(self._root_fd, -1 if uid is None else uid, -1 if gid is None else gid)
            if atime_ns is not None or mtime_ns is not None:
                st = os.fstat(self._root_fd)
                os.utime(self._root_fd, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                                            st.st_mtime_ns if mtime_ns is None else mtime_ns))
            return
        with self._at(path) as (fd, name):
            if perm is not None:
                # Linux cannot chmod a path without following it; an O_NOFOLLOW descriptor can.
                target = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
                try:
                    os.fchmod(target, perm)
                finally:
                    os.close(target)
            if uid is not None or gid is not None:
                os.chown(name, -1 if uid is None else uid, -1 if gid is None else gid,
                         dir_fd=fd, follow_symlinks=False)
            if atime_ns is not None or mtime_ns is not None:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                os.utime(name, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                                   st.st_mtime_ns if mtime_ns is None else mtime_ns),
                         dir_fd=fd, follow_symlinks=False)

    def entries_changed(self, directory: str, now_ns: int) -> None:
        """The host filesystem updates directory times itself."""

    def remove(self, path: str) -> None:
        """unlink or rmdir, relative to the parent's descriptor."""
        self._forget_dirs(path)
        with self._at(path) as (fd, name):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat_mod.S_ISDIR(st.st_mode):
                os.rmdir(name, dir_fd=fd)
            else:
                os.unlink(name, dir_fd=fd)
        self._counted(-1, -st.st_size if stat_mod.S_ISREG(st.st_mode) else 0)

    def remove_tree(self, path: str) -> None:
        """shutil.rmtree relative to the parent's descriptor: its fd-based walk follows no
        symlink, even one swapped in during the walk."""
        gone = [1, 0]  # the folder itself, then what it holds (counted while totals are kept)
        if self._tally is not None:
            for _, node in self.counted_walk(path):
                gone[0] += 1
                gone[1] += node.size if node.kind == "file" else 0
        try:
            with self._at(path) as (fd, name):
                shutil.rmtree(name, dir_fd=fd)
        finally:  # after the walk above, which may have kept some of them
            self._forget_dirs(path)
        self._counted(-gone[0], -gone[1])

    def rename(self, src: str, dst: str) -> None:
        """rename(2) between the two parents' descriptors (atomic, replaces ``dst``)."""
        self._forget_dirs(src)
        self._forget_dirs(dst)
        with self._at(src) as (sfd, sname), self._at(dst) as (dfd, dname):
            try:
                replaced: os.stat_result | None = os.stat(dname, dir_fd=dfd,
                                                          follow_symlinks=False)
            except FileNotFoundError:
                replaced = None
            os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        if replaced is not None:  # a file, a link or an empty folder went
            self._counted(-1, -replaced.st_size if stat_mod.S_ISREG(replaced.st_mode) else 0)

    def counted_walk(self, top: str) -> Iterator[tuple[str, Node]]:
        """Everything on disk, this store's temporary names included: a user's file may be
        named so too (and a crash may leave one behind), and either takes room that the
        quotas must see, where :meth:`walk` leaves such names out."""
        return super().walk(top)

    def walk(self, top: str) -> Iterator[tuple[str, Node]]:
        """As the base class, skipping this store's temporary files of writes in progress."""
        for path, node in super().walk(top):
            if not path.rsplit("/", 1)[1].startswith(_TMP_PREFIX):
                yield path, node

    def close(self) -> None:
        """Close the root descriptor (and the watch)."""
        with self._lock:
            if self._watch is not None:
                self._watch.close()
                self._watch = None
            if self._root_fd >= 0:
                os.close(self._root_fd)
                self._root_fd = -1


def _copy_to_fd(source: BinaryIO, fd: int) -> None:
    while chunk := source.read(COPY_CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]
