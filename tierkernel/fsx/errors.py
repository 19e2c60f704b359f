"""fsx errors: the builtin OSError subclasses, with errno and the path, as a real filesystem.

``OSError(errno, strerror, filename)`` already picks the PEP 3151 subclass for the errno
(ENOENT gives FileNotFoundError, EEXIST FileExistsError, ...), so callers catch what they
would catch for ``open()`` or ``os.rename()`` and can still test ``exc.errno``.
"""

from __future__ import annotations

import errno
import os


def fs_error(code: int, path: str, path2: str | None = None, detail: str = "") -> OSError:
    """The OSError (subclass) for ``code`` on ``path`` (and ``path2`` for two-path calls).

    ``detail`` replaces the generic ``os.strerror`` text when the generic text would not tell
    the user what was wrong (for example "escapes the workspace root").
    """
    message = detail or os.strerror(code)
    if path2 is None:
        return OSError(code, message, path)
    return OSError(code, message, path, None, path2)


def not_found(path: str) -> OSError:
    """FileNotFoundError (ENOENT) for ``path``."""
    return fs_error(errno.ENOENT, path)


def escapes_root(path: str) -> OSError:
    """PermissionError (EACCES): ``path`` climbs above the workspace root."""
    return fs_error(errno.EACCES, path, detail="Permission denied: the path escapes the "
                    "workspace root (fsx paths are rooted at '/', which is the workspace)")
