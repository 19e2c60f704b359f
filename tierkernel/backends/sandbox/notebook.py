"""The notebook's folder in a sandbox container: a read-only copy at ``/notebook``.

The container's root is read-only and the engine may be remote or gVisor, so the folder is not
bind-mounted: what :meth:`NotebookFolder.scan` takes (within its caps, see
``notebook_folder``) is copied into a tmpfs at ``/notebook`` when the container starts, by
``tar`` running as root in the container, so the files belong to root there and the cells'
user (uid 65534) can read them but not change them (a teaching folder of a few MB: tens of
milliseconds). After that the host hears the folder's changes through inotify
(:class:`FolderWatch`, no walk) and copies it again before the next cell only when what the
copy takes changed. :class:`NotebookCopy` does all this for the kernel's container, and sets up
each new agent's view of the files.
"""

from __future__ import annotations

import logging
import os
import tarfile
import tempfile
import threading
from typing import Any

from tierkernel.backends.agent.notebook_folder import (
    GUEST_PATH,
    NotebookFolder,
    Scan,
    guest_config,
    open_regular,
)
from tierkernel.backends.agent.session import AgentSession
from tierkernel.backends.sandbox.workspace import GUEST_PATH as WORKSPACE
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


class NotebookCopy:
    """The notebook's folder in the kernel's container, and each agent's view of the files.

    Once per container the folder is copied into ``/notebook`` (and again before a cell when
    what the copy takes changed); once per agent its files are set up (``fsx://``, the
    read-only fall-back to ``/notebook``, the missing-file hint). Safe to call from the warm
    start's thread and the cells' at once.
    """

    def __init__(self) -> None:
        #: The agent whose files are set up, the container whose /notebook holds the copy,
        #: and what that copy took.
        self._agent: AgentSession | None = None
        self._copied: str | None = None
        self._scan: Scan | None = None
        self._watch = FolderWatch()
        self._lock = threading.Lock()

    def due(self, agent: AgentSession) -> bool:
        """Whether :meth:`set_up` has work to do before the next cell of ``agent`` (a new
        agent, or the folder changed). Quick: no walk."""
        return self._agent is not agent or self._watch.changed()

    def set_up(self, api: Any, container_id: str, agent: AgentSession,
               folder: NotebookFolder) -> str:
        """Copy ``folder`` into the container when it has no copy yet or the copy is stale,
        then set up ``agent``'s files; return a notice for the user ("" if none). Blocking."""
        with self._lock:
            again = self._watch.changed()
            if self._agent is agent and not again:
                return ""
            refused, view, notice = folder.refusal(), GUEST_PATH, ""
            if again and self._copied == container_id and self._scan:
                self._watch.mark()  # before the look: a change meanwhile is heard
                if folder.scan().stamps == self._scan.stamps:
                    # Only what no copy takes changed (the notebook saved, a hidden file).
                    again = False
                    if self._agent is agent:
                        return ""
            if not refused and (self._copied != container_id or again):
                self._watch.start(folder.folder())
                self._watch.mark()
                scan: Scan | None
                try:
                    scan, notice = copy_in(api, container_id, folder)
                except Exception as exc:
                    log.warning("copying the notebook's folder into %s failed",
                                container_id[:12], exc_info=True)
                    notice = (f"tierkernel: the notebook's folder could not be copied into "
                              f"the sandbox's {GUEST_PATH} ({exc}); its cells read the "
                              "workspace only.")
                    view, scan = "", None
                self._copied = container_id if view else None
                self._scan = scan
            agent.install_files(guest_config(
                WORKSPACE, view if self._copied == container_id else "", refused,
                self._scan, ""))
            self._agent = agent
            return notice

    def close(self) -> None:
        """Stop watching the folder."""
        with self._lock:
            self._watch.close()
