"""Workspace quotas: how much a workspace may hold, checked by the engine before each write.

Every write of every tier reaches fsx through :class:`~tierkernel.fsx.engine.PosixEngine`
(native ``fs`` and fsspec, the wasm mount, the sandbox's copy back), so the engine is where a
:class:`Quota` is enforced, once. Going over one raises :class:`FsxQuotaError`, an ``OSError``
with the errno a filesystem would give (EDQUOT, EFBIG, ENAMETOOLONG) whose message names the
quota, its value and the setting that raises it. A refused write changes nothing.

The totals (entries, bytes) come from the store (``Store.tally``), which keeps them cheaply:
counters in memory, a row maintained by triggers in SQLite (so every process's writes count),
a walk then deltas for a host folder.
"""

from __future__ import annotations

import errno
import sys
from dataclasses import dataclass
from typing import BinaryIO

from tierkernel.errors import FsxQuotaError
from tierkernel.sizes import format_size

#: "No limit", for a workspace opened without a quota (a library's own use of a store).
UNLIMITED = sys.maxsize


def _shown(size: int) -> str:
    """A size as the settings take it (``512m``), or in bytes when it has no such form."""
    text = format_size(size)
    if not text.isdigit():
        return text
    return f"{text} byte" if size == 1 else f"{text} bytes"


def byte_length(path: str) -> int:
    """The length of a workspace path in bytes of UTF-8, as the path-length quota counts."""
    return len(path.encode("utf-8", "surrogateescape"))


def depth(path: str) -> int:
    """How many names a normalized absolute path has: ``/a/b`` is 2 deep, ``/`` is 0."""
    return 0 if path == "/" else path.count("/")


@dataclass(frozen=True)
class Quota:
    """The limits of one workspace (see ``tierkernel.fsx.config.Fsx`` for the defaults and
    why). Each is a maximum; :data:`UNLIMITED` means none."""

    max_bytes: int = UNLIMITED
    max_entries: int = UNLIMITED
    max_file_size: int = UNLIMITED
    max_depth: int = UNLIMITED
    max_path_length: int = UNLIMITED

    @property
    def counts_usage(self) -> bool:
        """Whether any check needs the workspace's totals (so a store without quotas is
        never asked to count)."""
        return self.max_bytes < UNLIMITED or self.max_entries < UNLIMITED

    @property
    def bounds_shape(self) -> bool:
        """Whether depth or path length is bounded (so a rename must measure what it moves)."""
        return self.max_depth < UNLIMITED or self.max_path_length < UNLIMITED

    # -- the checks (each raises FsxQuotaError, or returns) -----------------------------------
    def check_name(self, path: str, physical: str) -> None:
        """A new entry at ``physical`` (``path`` as the caller named it): its depth and its
        length."""
        self.check_shape(path, depth(physical), byte_length(physical))

    def check_shape(self, path: str, deepest: int, longest: int) -> None:
        """A tree placed at ``path`` whose deepest entry is ``deepest`` names deep and whose
        longest path is ``longest`` bytes."""
        if deepest > self.max_depth:
            raise self.error("max_depth", path, f"folders nest at most {self.max_depth} deep "
                             f"in the workspace, and this would be {deepest} deep")
        if longest > self.max_path_length:
            raise self.error("max_path_length", path, f"a workspace path is at most "
                             f"{self.max_path_length} bytes long, and this one would be "
                             f"{longest}")

    def check_target(self, path: str, target: str) -> None:
        """A symlink's target is a path too: no longer than the path-length quota."""
        length = byte_length(target)
        if length > self.max_path_length:
            raise self.error("max_path_length", path, f"a symlink's target is at most "
                             f"{self.max_path_length} bytes long, and this one is {length}")

    def check_entries(self, path: str, entries: int, adding: int = 1) -> None:
        """``adding`` new entries to a workspace that holds ``entries``."""
        if adding > 0 and entries + adding > self.max_entries:
            raise self.error("max_entries", path, f"the workspace holds at most "
                             f"{self.max_entries} files, folders and links, and has {entries}")

    def check_file_size(self, path: str, size: int) -> None:
        """One file of ``size`` bytes."""
        if size > self.max_file_size:
            raise self.file_size_error(path, size)

    def file_size_error(self, path: str, size: int | None = None) -> FsxQuotaError:
        """The error for a file over ``max_file_size`` (``size`` when known)."""
        return self.error("max_file_size", path, f"a workspace file is at most "
                          f"{_shown(self.max_file_size)}"
                          + ("" if size is None else f", and this one would be "
                             f"{_shown(size)}"))

    def check_bytes(self, path: str, used: int, growth: int) -> None:
        """A workspace holding ``used`` bytes growing by ``growth`` (a shrink always passes,
        even over the quota, as a filesystem lets a user over quota delete and truncate)."""
        if growth > 0 and used + growth > self.max_bytes:
            raise self.bytes_error(path, used)

    def bytes_error(self, path: str, used: int) -> FsxQuotaError:
        """The error for going over ``max_bytes`` from ``used``."""
        return self.error("max_bytes", path, f"the workspace holds at most "
                          f"{_shown(self.max_bytes)} of file content, {_shown(used)} "
                          "of it in use, and this write needs more")

    def content_limit(self, path: str, old: int, append: bool, used: int
                      ) -> tuple[int, FsxQuotaError]:
        """(most bytes, the error past them) that a write may hand over to a file now
        ``old`` bytes long (appending, or replacing it) in a workspace holding ``used``.
        Replacing frees the old content first; a replacement no larger than the old file
        always fits, as do appends while there is room."""
        freed = 0 if append else old
        by_file = self.max_file_size - (old if append else 0)
        by_bytes = max(self.max_bytes - used, 0) + freed
        if by_file <= by_bytes:
            return max(by_file, 0), self.file_size_error(path)
        return by_bytes, self.bytes_error(path, used)

    def error(self, setting: str, path: str, what: str) -> FsxQuotaError:
        """The :class:`FsxQuotaError` for ``setting``: what went over, and how to raise it."""
        value = getattr(self, setting)
        code = {"max_file_size": errno.EFBIG, "max_path_length": errno.ENAMETOOLONG}.get(
            setting, errno.EDQUOT)
        raised = value * 2 if value < UNLIMITED // 2 else value
        size = setting in ("max_bytes", "max_file_size")
        flag = format_size(raised) if size else str(raised)
        shown = f'"{flag}"' if size else flag
        message = (f"{_STRERROR[code]}: {what} (c.Fsx.{setting}); {_ADVICE[setting]}, or "
                   f"raise the quota in the kernel's config: c.Fsx.{setting} = {shown} in "
                   f"tierkernel_config.py, or --Fsx.{setting}={flag}")
        exc = FsxQuotaError(code, message, path)
        exc.setting = setting
        return exc


#: What to do short of raising each quota.
_ADVICE = {
    "max_bytes": "delete what is not needed",
    "max_entries": "delete what is not needed",
    "max_file_size": "split the file",
    "max_depth": "nest folders less deeply",
    "max_path_length": "use shorter names",
}
_READ_AT_MOST = 1 << 24  # bytes per read when the store asks for "the rest"
_STRERROR = {errno.EDQUOT: "Disk quota exceeded", errno.EFBIG: "File too large",
             errno.ENAMETOOLONG: "File name too long"}


class CappedReader:
    """A stream read through to its end by a store, cut with the quota's error as soon as it
    yields more than ``limit`` bytes, so a store never takes (or spools) more than that."""

    def __init__(self, source: BinaryIO, limit: int, over: Exception) -> None:
        self._source = source
        self._left = limit
        self._over = over
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (the rest when negative); raises once past the limit."""
        if size == 0:
            return b""
        # Never ask for more than one byte past the limit: an endless source stops there.
        want = min(self._left + 1, _READ_AT_MOST if size < 0 else size)
        data = self._source.read(max(want, 1))
        self.count += len(data)
        self._left -= len(data)
        if self._left < 0:
            raise self._over
        return data
