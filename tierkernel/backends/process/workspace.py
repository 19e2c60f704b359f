"""The ``process`` tier's workspace: a host folder of the kernel's own, kept in step with fsx.

The process agent runs in this folder (its working directory), so relative paths, ``open``,
pandas and ``fsx://`` URLs work on the same files as in the other tiers. It is kept in step with
the fsx workspace at cell boundaries exactly as the sandbox's ``/workspace`` is
(``tierkernel/fsx/sync.py``): before a cell what changed in fsx is extracted into it; after a
cell that changed it (an inotify count, ``tierkernel/guest/tree_watch.py``; a walk where that
cannot tell), its tar is received within a :class:`~tierkernel.fsx.sync.Budget` and applied to
fsx, with the same conflict rule (fsx's version kept, the cell's saved beside it as
``NAME.sandbox-conflict``). One mechanism for every fsx backend (memory, sqlite, file), so the
workspace's quotas hold whichever tier writes.

A host process without root cannot have a ``/workspace`` of its own (that needs a mount
namespace), so absolute paths are this folder's: ``os.getcwd()`` and
``$TIERKERNEL_WORKSPACE`` name it. The tier is not a security boundary: its cells may write
anywhere the kernel's user may; only what is in this folder is the workspace.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from tierkernel.fsx import FsxConfigError, FsxFacade, sync
from tierkernel.fsx import current as current_workspace
from tierkernel.guest.agent import tree_signature, unpack_workspace
from tierkernel.guest.tree_watch import TreeWatch

log = logging.getLogger(__name__)

#: Names the workspace folder to the process tier's cells (absolute paths, subprocesses).
WORKSPACE_ENV = "TIERKERNEL_WORKSPACE"
#: Most paths one notice names.
_NAMED = 20
#: The folders' names in the temporary folder: PREFIX, the kernel's pid, "-", random.
PREFIX = "tierkernel-process-workspace-"


def reap_leftovers() -> list[str]:
    """Remove the folders of kernels of this user that are gone (killed: no shutdown removed
    them); return their paths. The workspace has what their cells wrote (copied back after
    each cell)."""
    removed: list[str] = []
    top = tempfile.gettempdir()
    try:
        names = os.listdir(top)
    except OSError:
        return removed
    for name in names:
        pid_text, _, rest = name.removeprefix(PREFIX).partition("-")
        if not name.startswith(PREFIX) or not pid_text.isdigit() or not rest:
            continue
        path = os.path.join(top, name)
        try:
            if os.lstat(path).st_uid != os.getuid() or not os.path.isdir(path):
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except OSError:
            continue  # alive (another user's: EPERM), or gone meanwhile
    return removed


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:_NAMED])
    return shown + (f" and {len(paths) - _NAMED} more" if len(paths) > _NAMED else "")


class HostFolderSync:
    """The folder and what it was last given (see the module docstring). Blocking methods;
    one cell at a time (a lock guards the state)."""

    def __init__(self) -> None:
        reap_leftovers()
        self.folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        os.chmod(self.folder, 0o700)
        self._manifest: sync.Manifest | None = None
        self._token: object | None = None
        self._left: sync.Manifest = {}
        self._lock = threading.Lock()
        self._fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._watch: TreeWatch | None = None
        self._maps: list[str] = []
        self._mark: tuple[str, int] | None = None
        #: Why the kernel's workspace could not be opened ("" while it could), and whether
        #: the user was told.
        self.problem = ""
        self._told = False

    def workspace(self) -> FsxFacade | None:
        """The kernel's fsx workspace; None outside a kernel, or when it cannot be opened (a
        refused ``file://`` folder: :attr:`problem` says why): the folder is then scratch,
        and the tier's cells still run."""
        if self.problem:
            return None
        try:
            workspace = current_workspace()
        except FsxConfigError:
            return None
        try:
            workspace.fs  # noqa: B018 - opening it is the point: a refusal is said here
        except (FsxConfigError, OSError) as exc:
            self.problem = str(exc)
            return None
        return workspace

    def watch_agent(self, pid: int) -> None:
        """Count writes through shared memory maps of the agent ``pid`` as changes."""
        self._maps = [f"/proc/{pid}/maps"]

    def _state(self) -> tuple[str, int]:
        if self._watch is None:
            watch = TreeWatch(self._fd, str(self.folder), maps=lambda: self._maps)
            self._watch = watch if watch.why is None else None
            if self._watch is None:
                log.info("the process tier's workspace folder is walked around each cell: "
                         "%s", watch.why)
        if self._watch is not None:
            version = self._watch.version()
            if version is not None:
                return ("events", version)
        return ("walk", tree_signature(str(self.folder)))

    def idle(self) -> bool:
        """Whether neither side changed since the last copy, known without a walk (an
        inotify count and fsx's change token): then a cell needs no copy, nor the thread it
        would run in. False when it cannot tell quickly (a copy under way, no watch)."""
        workspace = self.workspace()
        if workspace is None:
            return True
        if self._watch is None or self._mark is None or not self._lock.acquire(blocking=False):
            return False
        try:
            version = self._watch.version()
            return (version is not None and ("events", version) == self._mark
                    and workspace.engine.change_token() == self._token)
        finally:
            self._lock.release()

    def changed(self) -> bool:
        """Whether the folder changed since fsx was last brought into it or it into fsx."""
        if self.workspace() is None:
            return False
        with self._lock:
            return self._mark is None or self._state() != self._mark

    def before_cell(self) -> str:
        """Bring what changed in fsx since the last copy into the folder; returns a notice
        for the user ("" if everything arrived)."""
        workspace = self.workspace()
        if workspace is None:
            if self.problem and not self._told:
                self._told = True
                return (f"tierkernel: the process tier's folder is not the workspace, which "
                        f"cannot be opened: {self.problem}\n")
            return ""
        with self._lock:
            token = workspace.engine.change_token()
            if self._token is not None and token == self._token and self._mark is not None:
                return ""
            base = self._manifest
            packed = sync.pack(workspace, since=base, owner=(os.getuid(), os.getgid()),
                               known=self._left)
            try:
                self._left = packed.left
                deleted = list(packed.deleted) if base is not None else []
                unpack_workspace(str(self.folder), packed.archive, deleted)
            finally:
                packed.archive.close()
            self._manifest, self._token = packed.manifest, token
            self._mark = self._state()
        if packed.missing:
            return ("tierkernel: not copied into the process tier's workspace folder: "
                    + _names([f"{rel} ({why})" for rel, why in packed.missing]) + "\n")
        return ""

    def after_cell(self, budget: sync.Budget,
                   stop: Callable[[], str | None] | None = None) -> sync.Applied | None:
        """Bring the folder's changes into fsx (None when there were none): within
        ``budget``, stopped when ``stop()`` names a reason (then CopyBudgetError or
        CopyStopped, and nothing is applied: the folder keeps its files and they are
        copied with its next change)."""
        workspace = self.workspace()
        if workspace is None:
            return None
        with self._lock:
            if self._mark is not None and self._state() == self._mark:
                return None
            mark = self._state()
            received = sync.receive(self._tar(), budget, stop)
            applied = sync.apply(workspace, received, self._manifest or {}, top=None)
            self._manifest = applied.manifest
            self._mark = mark
            return applied

    def _tar(self) -> Iterator[bytes]:
        """The folder as ``tar -c`` makes it, as it streams (each name of a hard-linked file
        a file: fsx has no hard links). Closed early, the tar is killed."""
        tar = shutil.which("tar", path="/usr/bin:/bin")
        if tar is None:
            raise OSError("the process tier's workspace needs GNU tar in /usr/bin or /bin")
        with tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen([tar, "-c", "--hard-dereference", "-C", str(self.folder),
                                     "."], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=errors, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
            assert proc.stdout is not None
            try:
                while chunk := proc.stdout.read(1 << 16):
                    yield chunk
            finally:
                proc.stdout.close()
                if proc.poll() is None:
                    proc.kill()
                code = proc.wait()
            # 1: a file changed while it was read (a background writer): the tar is whole.
            if code not in (0, 1, -9):
                errors.seek(0)
                detail = errors.read()[-400:].decode("utf-8", "replace").strip()
                raise OSError(f"reading the process tier's workspace folder failed (tar "
                              f"exit {code}): {detail}")

    def close(self) -> None:
        """Remove the folder (the workspace keeps what was copied back)."""
        with self._lock:
            if self._watch is not None:
                self._watch.close()
                self._watch = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            shutil.rmtree(self.folder, ignore_errors=True)
