"""The notebook's folder in a sandbox container: a read-only copy at ``/notebook``.

The container's root is read-only and the engine may be remote or gVisor, so the folder is not
bind-mounted: what :meth:`NotebookFolder.scan` takes (within its caps, see
``notebook_folder``) is copied into a tmpfs at ``/notebook`` when the container starts, by
``tar`` running as root in the container, so the files belong to root there and the cells'
user (uid 65534) can read them but not change them (a teaching folder of a few MB: tens of
milliseconds). After that the host hears the folder's changes through inotify
(:class:`FolderWatch`, no walk) and copies it again before the next cell only when what the
copy takes changed.
"""

from __future__ import annotations

import logging
import os
import tarfile
import tempfile
from typing import Any

from tierkernel.backends.agent.notebook_folder import GUEST_PATH, NotebookFolder, Scan, open_regular
from tierkernel.backends.sandbox.workspace import exec_with_stdin
from tierkernel.guest.tree_watch import TreeWatch

log = logging.getLogger(__name__)

#: What a tmpfs holds besides the content: a page for each file and folder, and some slack.
_PAGE = 4096


def tmpfs_options(folder: NotebookFolder) -> str:
    """The ``/notebook`` tmpfs: owned by root, not writable by the cells' user, large
    enough for the caps (counted in the container's memory only as far as it is filled)."""
    size = folder.max_bytes + (folder.max_files + 256) * _PAGE + (1 << 20)
    return f"rw,nosuid,nodev,noexec,size={size},mode=0755"


def _archive(top: str, scan: Scan) -> Any:
    """A tar of what ``scan`` took, members owned by root and not writable by others. Files
    that cannot be read now are left out and noted in ``scan.left_out``."""
    archive = tempfile.SpooledTemporaryFile(max_size=16 << 20)  # noqa: SIM115 - returned
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in scan.folders:
            info = tarfile.TarInfo(rel)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for rel, size in scan.files:
            try:
                with open_regular(os.path.join(top, rel)) as f:
                    if f is None:
                        scan.left_out[rel] = "no longer a regular file"
                        continue
                    info = tarfile.TarInfo(rel)
                    info.size, info.mode = size, 0o444
                    info.mtime = os.fstat(f.fileno()).st_mtime
                    tar.addfile(info, _Exactly(f, size))
            except OSError as exc:
                scan.left_out[rel] = f"could not be read: {exc.strerror}"
    archive.seek(0)
    return archive


class _Exactly:
    """``size`` bytes of ``f``: a file that changed since the scan still fills its member
    (cut, or padded with zero bytes), so the archive stays well-formed and bounded."""

    def __init__(self, f: Any, size: int) -> None:
        self._f, self._left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n) if n else b""
        data += b"\0" * (n - len(data))
        self._left -= n
        return data


#: Empty /notebook (a copy again: what left the folder leaves the container too), then untar.
_REPLACE = f'find {GUEST_PATH} -mindepth 1 -delete && exec tar -x --no-same-owner -m -C ' \
           f'{GUEST_PATH} -f -'


class FolderWatch:
    """Whether the notebook's folder changed since it was last copied: an inotify count on
    the host (``tierkernel/guest/tree_watch.py``), read without a walk before each cell. A
    folder that cannot be watched whole (too many folders, a network filesystem) is not
    copied again: its copy stays as the container started with it."""

    def __init__(self) -> None:
        self._fd = -1
        self._watch: TreeWatch | None = None
        self._version: int | None = None
        self.top = ""

    def start(self, top: str) -> None:
        """Watch ``top`` (from now on; a watch of another folder ends)."""
        if top == self.top and self._watch is not None:
            return
        self.close()
        self.top = top
        try:
            self._fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        watch = TreeWatch(self._fd, top, maps=list)
        if watch.why is not None:
            log.info("the notebook's folder %s is not watched (%s): the sandbox keeps the "
                     "copy its container started with", top, watch.why)
            self.close()
            return
        self._watch = watch

    def mark(self) -> None:
        """Take the folder as it is now as copied (before the copy reads it: a change during
        the copy makes the next cell copy again)."""
        self._version = self._watch.version(maps=False) if self._watch is not None else None

    def changed(self) -> bool:
        """Whether the folder changed since :meth:`mark` (quick: no walk)."""
        if self._watch is None or self._version is None:
            return False
        return self._watch.version(maps=False) not in (None, self._version)

    def close(self) -> None:
        """Stop watching."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._version = None


def copy_in(api: Any, container_id: str, folder: NotebookFolder) -> tuple[Scan, str]:
    """Copy the notebook's folder into the container's ``/notebook`` (replacing what an
    earlier copy put there); return the scan (with what was left out) and a notice for the
    user ("" when everything arrived). Blocking; raises OSError when the copy failed."""
    top = folder.folder()
    scan = folder.scan()
    with _archive(top, scan) as archive:
        code, text = exec_with_stdin(api, container_id, ["sh", "-c", _REPLACE], "0:0",
                                     archive, keep=4096)
    if code:
        raise OSError(f"tar exit {code}: {text.strip()[-300:]}")
    return scan, folder.summary(scan, f"the sandbox's {GUEST_PATH}")
