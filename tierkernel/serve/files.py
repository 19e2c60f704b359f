"""A session's workspace (its fsx) as the API's file routes reach it: list, read in chunks,
write or append. The server opens the same store the session's kernel uses, held to the same
quotas (``c.Fsx.*``), so a file uploaded here is there for the next cell and a file a cell
wrote can be downloaded."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from typing import Any

from tierkernel.errors import ApiError, FsxQuotaError
from tierkernel.fsx.config import open_url
from tierkernel.fsx.facade import FsxFacade
from tierkernel.fsx.quota import Quota

#: Bytes read from the workspace at a time while a download is sent.
CHUNK = 1 << 20
#: Most entries one listing answers with.
MAX_ENTRIES = 10_000


def workspace(url: str, quota: Quota) -> FsxFacade:
    """The workspace at ``url`` (opened on first use), held to ``quota``."""
    return FsxFacade(lambda: open_url(url, quota), url=url)


def _mapped(path: str, exc: OSError) -> ApiError:
    """An fsx error as the API says it: what is wrong with ``path`` and what to do."""
    if isinstance(exc, FileNotFoundError):
        return ApiError(404, "no_such_file", f"no file or folder {path!r} in the session's "
                        "workspace (GET /sessions/{id}/files lists it)")
    if isinstance(exc, IsADirectoryError):
        return ApiError(400, "is_a_folder", f"{path!r} is a folder; list it with "
                        f"GET /sessions/{{id}}/files?path={path}")
    if isinstance(exc, NotADirectoryError):
        return ApiError(400, "not_a_folder", f"{path!r} is not a folder: {exc.strerror}")
    if isinstance(exc, FsxQuotaError):
        return ApiError(413, "quota_exceeded", str(exc))
    return ApiError(400, "file_error", f"{path!r}: {exc.strerror or exc}")


def listing(ws: FsxFacade, path: str) -> list[dict[str, Any]]:
    """The entries of folder ``path``: name, kind (file, dir, symlink) and size."""
    try:
        entries = ws.readdir(path, with_types=True)
    except OSError as exc:
        raise _mapped(path, exc) from None
    found = []
    for entry in entries[:MAX_ENTRIES]:
        full = path.rstrip("/") + "/" + entry.name
        try:
            info = ws.lstat(full)
            size = info.st_size if stat.S_ISREG(info.st_mode) else None
        except OSError:
            size = None
        found.append({"name": entry.name, "kind": entry.kind, "size": size})
    return found


def size_of(ws: FsxFacade, path: str) -> int:
    """The size of file ``path``; ApiError when it is not a file."""
    try:
        info = ws.stat(path)
    except OSError as exc:
        raise _mapped(path, exc) from None
    if stat.S_ISDIR(info.st_mode):
        raise _mapped(path, IsADirectoryError(path))
    return info.st_size


def chunks(ws: FsxFacade, path: str) -> Iterator[bytes]:
    """File ``path``'s bytes, ``CHUNK`` at a time (a large file is never held whole)."""
    try:
        handle = ws.open(path, "rb")
    except OSError as exc:
        raise _mapped(path, exc) from None
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def head(ws: FsxFacade, path: str, limit: int) -> bytes:
    """At most ``limit`` bytes from the start of file ``path``."""
    try:
        with ws.open(path, "rb") as handle:
            data: bytes = handle.read(limit)
    except OSError as exc:
        raise _mapped(path, exc) from None
    return data


def write(ws: FsxFacade, path: str, data: bytes, append: bool) -> None:
    """Write (or append) ``data`` to file ``path``, making its folders."""
    parent = path.rsplit("/", 1)[0]
    try:
        if parent:
            ws.mkdir(parent, recursive=True)
        if append:
            ws.append_file(path, data)
        else:
            ws.write_file(path, data)
    except OSError as exc:
        raise _mapped(path, exc) from None
