"""Workspace paths: '/'-separated, rooted at the workspace ('/' is the workspace itself).

Relative paths are taken from the root (a workspace has no current directory), a leading
``fsx://`` is accepted, and names are checked here so every backend refuses the same ones.
``.`` and ``..`` are kept as components: they are resolved together with symlinks by the engine,
because ``link/..`` is the parent of the link's target, not the directory holding the link.
"""

from __future__ import annotations

import errno

from tierkernel.fsx.errors import escapes_root, fs_error

PROTOCOL = "fsx"
NAME_MAX = 255  # bytes of UTF-8 in one component, as on Linux
PATH_MAX = 4096


def components(path: str) -> list[str]:
    """The non-empty components of ``path`` ('.' and '..' kept), after checking it is usable."""
    if not isinstance(path, str):
        raise TypeError(f"an fsx path must be a str, not {type(path).__name__}")
    if path.startswith(f"{PROTOCOL}://"):
        path = path[len(PROTOCOL) + 3:]
    if "\0" in path:
        raise fs_error(errno.EINVAL, path, detail="Invalid argument: the path contains NUL")
    if len(path.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise fs_error(errno.ENAMETOOLONG, path)
    parts = [part for part in path.split("/") if part]
    for part in parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise fs_error(errno.ENAMETOOLONG, path)
    return parts


def join(parts: list[str]) -> str:
    """The absolute workspace path of resolved components."""
    return "/" + "/".join(parts)


def parent(path: str) -> str:
    """The parent of a normalized absolute path ('/' for the root and its children)."""
    head = path.rsplit("/", 1)[0]
    return head or "/"


def basename(path: str) -> str:
    """The last component of a normalized absolute path ('' for the root)."""
    return path.rsplit("/", 1)[1]


def child(directory: str, name: str) -> str:
    """``name`` inside the normalized absolute path ``directory``."""
    return f"/{name}" if directory == "/" else f"{directory}/{name}"


def is_within(path: str, ancestor: str) -> bool:
    """Whether normalized ``path`` is ``ancestor`` or below it."""
    return ancestor == "/" or path == ancestor or path.startswith(ancestor + "/")


def lexical(path: str) -> str:
    """A normalized absolute path, with '.' and '..' applied lexically (no symlinks involved).

    For callers that name a path, not resolve one (fsspec's listing names, sync manifests).
    ``..`` above the root is refused rather than clamped, so a path that tries to climb out
    fails loudly.
    """
    out: list[str] = []
    for part in components(path):
        if part == ".":
            continue
        if part == "..":
            if not out:
                raise escapes_root(path)
            out.pop()
            continue
        out.append(part)
    return join(out)
