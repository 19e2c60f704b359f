"""The fsx facade: the workspace as user code sees it (``fs`` in a notebook).

Operations and errors follow the execution-layer spec's FileSystem interface (Node's ``fs``),
in Python names: ``fs.read_file("data.csv")``, ``fs.write_file("out/report.txt", text)``,
``fs.readdir("/", with_types=True)``... Errors are the builtin ``OSError`` subclasses with errno
and the path, as for host files.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Literal, cast, overload

from tierkernel.fsx.engine import PosixEngine, TimeValue
from tierkernel.fsx.nodes import DirEntry, FsxStat

if TYPE_CHECKING:
    # At run time only once a workspace is opened: it imports fsspec (kernel start-up time).
    from tierkernel.fsx.filesystem import FsxFileSystem

Data = str | bytes | bytearray | memoryview | BinaryIO


class FsxFacade:
    """One workspace's operations, for user code in every tier.

    The backend is opened on first use (``opener``), so a kernel whose workspace is never
    touched never creates a database file, and a misconfigured URL is reported where it is
    used, not as a kernel that fails to start.
    """

    def __init__(self, opener: FsxFileSystem | Callable[[], FsxFileSystem],
                 url: str = "") -> None:
        # An open filesystem can exist only once its module is loaded, so the test needs no
        # import of it (which would import fsspec for a facade that is never used).
        filesystem = sys.modules.get("tierkernel.fsx.filesystem")
        opened = filesystem is not None and isinstance(opener, filesystem.FsxFileSystem)
        self._fs: FsxFileSystem | None = cast("FsxFileSystem", opener) if opened else None
        self._opener = None if opened else cast("Callable[[], FsxFileSystem]", opener)
        self._lock = threading.Lock()
        self.url = url or (self._fs.url if self._fs is not None else "")

    @property
    def fs(self) -> FsxFileSystem:
        """The fsspec filesystem of this workspace (opened now if it was not yet)."""
        if self._fs is None:
            with self._lock:
                if self._fs is None:
                    assert self._opener is not None
                    self._fs = self._opener()
        return self._fs

    @property
    def engine(self) -> PosixEngine:
        """The POSIX engine (for bridges: wasm mount, container sync)."""
        return self.fs.engine

    @property
    def opened(self) -> bool:
        """Whether the backend has been opened yet."""
        return self._fs is not None

    def __repr__(self) -> str:
        return f"<fsx workspace {self.url}>"

    # -- content --------------------------------------------------------------------------
    @overload
    def read_file(self, path: str, encoding: None) -> bytes: ...
    @overload
    def read_file(self, path: str, encoding: str = "utf-8") -> str: ...

    def read_file(self, path: str, encoding: str | None = "utf-8") -> str | bytes:
        """The content of file ``path``: text decoded with ``encoding``, or bytes when
        ``encoding=None``."""
        data = self.engine.read(path)
        return data if encoding is None else data.decode(encoding)

    def write_file(self, path: str, data: Data, encoding: str = "utf-8",
                   exclusive: bool = False) -> None:
        """Replace the content of ``path`` (creating it) with ``data``: text (encoded with
        ``encoding``), bytes, or a binary stream. Atomic. ``exclusive``: EEXIST if it exists."""
        self.engine.write(path, _as_bytes(data, encoding), exclusive=exclusive)

    def append_file(self, path: str, data: Data, encoding: str = "utf-8") -> None:
        """Add ``data`` at the end of ``path`` (creating it)."""
        self.engine.write(path, _as_bytes(data, encoding), append=True)

    def open(self, path: str, mode: str = "r", encoding: str | None = None) -> IO[Any]:
        """A file object (modes r, w, a, x, with b for bytes). Writes are committed whole when
        it is closed."""
        if "b" in mode:
            return self.fs.open(path, mode)  # type: ignore[no-any-return]
        return self.fs.open(path, mode, encoding=encoding or "utf-8")  # type: ignore[no-any-return]

    def truncate(self, path: str, length: int = 0) -> None:
        """Cut ``path`` to ``length`` bytes, or extend it with zero bytes."""
        self.engine.truncate(path, length)

    # -- directories ----------------------------------------------------------------------
    def mkdir(self, path: str, recursive: bool = False, mode: int = 0o777) -> None:
        """Make directory ``path``. ``recursive``: also its parents, and no error if it
        exists (as ``mkdir -p``); otherwise FileExistsError if it exists."""
        self.engine.mkdir(path, parents=recursive, exist_ok=recursive, mode=mode)

    def rmdir(self, path: str, recursive: bool = False) -> None:
        """Remove directory ``path``; ``recursive`` removes what it holds too (symlinks are
        removed, never followed). OSError ENOTEMPTY otherwise."""
        self.engine.rmdir(path, recursive=recursive)

    @overload
    def readdir(self, path: str = "/", with_types: Literal[False] = False) -> list[str]: ...
    @overload
    def readdir(self, path: str = "/", *, with_types: Literal[True]) -> list[DirEntry]: ...
    @overload
    def readdir(self, path: str, with_types: Literal[True]) -> list[DirEntry]: ...

    def readdir(self, path: str = "/", with_types: bool = False) -> list[str] | list[DirEntry]:
        """The names in directory ``path``, sorted; with ``with_types``, :class:`DirEntry`
        objects whose ``is_file()``/``is_dir()``/``is_symlink()`` describe each entry."""
        entries = self.engine.readdir(path)
        return entries if with_types else [entry.name for entry in entries]

    # -- metadata -------------------------------------------------------------------------
    def stat(self, path: str) -> FsxStat:
        """Status of ``path``, following symlinks."""
        return self.engine.stat(path)

    def lstat(self, path: str) -> FsxStat:
        """Status of ``path`` itself (symlinks are not followed)."""
        return self.engine.lstat(path)

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists (a dangling symlink does not)."""
        return self.engine.exists(path)

    def realpath(self, path: str) -> str:
        """The canonical workspace path: symlinks, '.' and '..' resolved."""
        return self.engine.realpath(path)

    def chmod(self, path: str, mode: int) -> None:
        """Set the permission bits of ``path``."""
        self.engine.chmod(path, mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        """Set the owner of ``path`` (-1 keeps the current value)."""
        self.engine.chown(path, uid, gid)

    def utimes(self, path: str, atime: TimeValue, mtime: TimeValue) -> None:
        """Set access and modification times (seconds since the epoch, or datetimes)."""
        self.engine.utimes(path, atime, mtime)

    # -- names ----------------------------------------------------------------------------
    def unlink(self, path: str) -> None:
        """Remove file or symlink ``path``."""
        self.engine.unlink(path)

    def rename(self, old_path: str, new_path: str) -> None:
        """Move ``old_path`` to ``new_path`` atomically, replacing a file there."""
        self.engine.rename(old_path, new_path)

    def copy_file(self, src: str, dest: str, exclusive: bool = False) -> None:
        """Copy file ``src`` to ``dest`` (replacing it unless ``exclusive``)."""
        self.engine.copy_file(src, dest, exclusive=exclusive)

    def symlink(self, target: str, path: str) -> None:
        """Make ``path`` a symlink to ``target`` (absolute targets start at the workspace
        root)."""
        self.engine.symlink(target, path)

    def readlink(self, path: str) -> str:
        """The target of symlink ``path``."""
        return self.engine.readlink(path)

    # -- about ----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Backend, URL, number of files and their total size."""
        files, size = self.engine.usage()
        return {"backend": self.fs.backend, "url": self.fs.url, "files": files, "bytes": size}

    def close(self) -> None:
        """Release the backend if it was opened."""
        if self._fs is not None:
            self._fs.close()


def _as_bytes(data: Data, encoding: str) -> bytes | BinaryIO:
    if isinstance(data, str):
        return data.encode(encoding)
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    if isinstance(data, bytes) or hasattr(data, "read"):
        return data
    raise TypeError(f"fsx data must be str, bytes or a binary stream, not {type(data).__name__}")
