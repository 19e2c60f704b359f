"""The sandbox container's ``/workspace`` kept in step with the kernel's fsx workspace.

Consistency model: sync at cell boundaries, the same for every fsx backend (memory, sqlite,
local). Before a cell, what changed in fsx since the last sync goes into the container
(``tar -x`` in the container; deletions with ``rm``); after the cell, if the agent reports that
anything under ``/workspace`` changed, the container's tree comes back (``tar -c``) and
:func:`tierkernel.fsx.sync.apply` brings fsx up to date before the cell's reply, keeping fsx's
version (and saving the container's beside it as ``NAME.sandbox-conflict``) where both changed.

Finding out costs no walk in the usual case: the host asks the store's change token (a host
folder's is an inotify event count), and the agent counts inotify events under /workspace
(``tierkernel/guest/tree_watch.py``); either side walks its tree only where it cannot watch.

Why not a bind mount for the ``local`` backend: the container's user (uid 65534) would need
write access to a host folder, its symlinks would be resolved by the host's tools, and
``memory``/``sqlite`` would still need this path; one mechanism keeps the guarantees the same
for all three, and the guest never learns where fsx keeps its files on the host.
"""

from __future__ import annotations

import base64
import io
import logging
import socket
import tempfile
import threading
from typing import IO, Any, TypeGuard

from tierkernel.backends.agent_session import AgentSession
from tierkernel.fsx import FsxConfigError, FsxFacade, sync
from tierkernel.fsx import current as current_workspace

log = logging.getLogger(__name__)

GUEST_PATH = "/workspace"
#: Remove each path given, unless its folder is reached through a link (or is gone) in the
#: container now: a deletion is never done through a link the cells made.
_DELETE = r"""
for p; do
    d=$(dirname -- "$p")
    [ "$(realpath -- "$d" 2>/dev/null)" = "$d" ] && rm -rf -- "$p"
done
exit 0
"""
#: Largest workspace copy (tar bytes) that goes through the agent's channel (see _by_agent).
AGENT_COPY_LIMIT = 2 << 20


class WorkspaceSync:
    """Per-container sync state: the manifest of what the container was last given."""

    def __init__(self, user: str) -> None:
        uid, _, gid = user.partition(":")
        self.owner = (int(uid or 0), int(gid or uid or 0))
        self.user = user
        self._container: str | None = None
        self._manifest: sync.Manifest | None = None
        #: fsx's change token when the container was last given the workspace.
        self._token: object | None = None
        # A warm start's first copy may still run when the first cell arrives.
        self._lock = threading.Lock()

    @staticmethod
    def workspace() -> FsxFacade | None:
        """The kernel's fsx workspace, or None outside a kernel (then /workspace is scratch)."""
        try:
            return current_workspace()
        except FsxConfigError:
            return None

    def may_have_changes(self, container_id: str) -> bool:
        """Whether :meth:`before_cell` may have anything to copy: quick (no walk of the
        workspace), so the common cell skips the copy and the thread it runs in. Always True
        for a workspace that cannot tell (a host folder) or a container not yet given it."""
        workspace = self.workspace()
        if workspace is None:
            return False
        if self._container != container_id or self._token is None:
            return True
        return workspace.engine.change_token() != self._token

    def before_cell(self, api: Any, container_id: str, agent: AgentSession | None = None
                    ) -> bool:
        """Copy what changed in fsx since the last sync into the container; True when
        anything was copied or deleted (the agent is then told to take /workspace as it is as
        its new baseline, so the copy is not reported back as the cell's change). Through
        ``agent``, the container's live agent, when given and the copy is small. Blocking."""
        with self._lock:
            return self._before_cell(api, container_id, agent)

    def _before_cell(self, api: Any, container_id: str, agent: AgentSession | None) -> bool:
        workspace = self.workspace()
        if workspace is None:
            return False
        changed = False
        base = self._manifest if self._container == container_id else None
        # Taken before the walk: a write during it makes the next cell look again.
        token = workspace.engine.change_token()
        packed = sync.pack(workspace, since=base, owner=self.owner)
        try:
            deleted = list(packed.deleted) if base is not None else []
            data = packed.archive.read()
            members = _has_members(data)
            if _by_agent(agent, len(data)) and (deleted or members):
                try:
                    _agent_unpack(agent, data if members else b"", deleted)
                    changed = True
                    deleted, members = [], False
                except OSError:  # the exec path below does it all again, from scratch
                    log.warning("copying the workspace through the agent failed; "
                                "using tar in the container", exc_info=True)
            if deleted:
                paths = [f"{GUEST_PATH}/{rel}" for rel in deleted]
                exec_id = api.exec_create(container_id, ["sh", "-c", _DELETE, "rm", *paths],
                                          user=self.user)["Id"]
                api.exec_start(exec_id)
                changed = True
            if members:
                self._untar(api, container_id, data)
                changed = True
        finally:
            packed.archive.close()
        self._container, self._manifest = container_id, packed.manifest
        self._token = token
        return changed

    def _untar(self, api: Any, container_id: str, data: bytes) -> None:
        """Extract ``data`` into /workspace as the cell's user. docker's ``put_archive`` is
        refused on a read-only root even for a tmpfs mount, so ``tar`` runs in the container
        and reads the archive from its stdin."""
        exec_id = api.exec_create(container_id, ["tar", "-x", "-m", "-C", GUEST_PATH, "-f", "-"],
                                  stdin=True, stdout=True, stderr=True, user=self.user)["Id"]
        raw = api.exec_start(exec_id, socket=True)
        sock: socket.socket = getattr(raw, "_sock", raw)
        try:
            sock.settimeout(120)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            output = bytearray()
            while chunk := sock.recv(65536):
                output += chunk
        finally:
            sock.close()
        code = api.exec_inspect(exec_id).get("ExitCode")
        if code:
            raise OSError(f"copying the workspace into the container failed (tar exit {code}): "
                          f"{_frames_text(bytes(output))[-500:]}")

    def after_cell(self, api: Any, container_id: str, changed: bool,
                   agent: AgentSession | None = None) -> list[str]:
        """Bring the container's changes into fsx when there are any; return the paths kept
        as ``NAME.sandbox-conflict`` (both sides changed them). Read through ``agent`` when
        given and the tree is small. Blocking."""
        with self._lock:
            return self._after_cell(api, container_id, changed, agent)

    def _after_cell(self, api: Any, container_id: str, changed: bool,
                    agent: AgentSession | None) -> list[str]:
        workspace = self.workspace()
        if workspace is None or not changed or self._container != container_id:
            return []
        archive = None
        if _by_agent(agent, 0):
            try:
                archive = _agent_pack(agent)
            except OSError:  # e.g. a tree too deep for tarfile: tar in an exec reads it
                log.warning("reading /workspace through the agent failed; using tar in the "
                            "container", exc_info=True)
        if archive is None:
            archive = self._tar_out(api, container_id)
        with archive:
            applied = sync.apply(workspace, archive, self._manifest or {}, top=None)
        self._manifest = applied.manifest
        return applied.conflicts

    def _tar_out(self, api: Any, container_id: str) -> IO[bytes]:
        """The container's /workspace as a tar (spooled). ``tar`` runs in the container:
        docker's ``get_archive`` reads the container's own layers and sees an empty folder
        where a tmpfs is mounted."""
        # --hard-dereference: each name of a hard-linked file as a file (fsx has no hard links)
        exec_id = api.exec_create(container_id, ["tar", "-c", "--hard-dereference", "-C",
                                                 GUEST_PATH, "."],
                                  stdout=True, stderr=True, user=self.user)["Id"]
        spool = tempfile.SpooledTemporaryFile(max_size=16 << 20)  # noqa: SIM115 - returned
        errors = bytearray()
        for out, err in api.exec_start(exec_id, stream=True, demux=True):
            if out:
                spool.write(out)
            if err and len(errors) < 4096:
                errors += err
        code = api.exec_inspect(exec_id).get("ExitCode")
        if code:
            spool.close()
            raise OSError(f"reading the container's /workspace failed (tar exit {code}): "
                          f"{errors.decode('utf-8', 'replace')[-500:]}")
        spool.seek(0)
        return spool


def _by_agent(agent: AgentSession | None, size: int) -> TypeGuard[AgentSession]:
    """Whether a copy of ``size`` bytes goes through the agent's channel: a request there
    takes a millisecond where a ``docker exec`` of tar takes 20-80 ms, but it travels as one
    base64 JSON line held in memory on both sides (in the container, within its memory
    limit), so only up to AGENT_COPY_LIMIT."""
    return agent is not None and agent.alive and size <= AGENT_COPY_LIMIT


def _agent_unpack(agent: AgentSession, data: bytes, deleted: list[str]) -> None:
    answer = agent.ask({"type": "unpack", "root": GUEST_PATH, "delete": deleted,
                        "data": base64.b64encode(data).decode("ascii")}, timeout=120)
    if answer.get("error"):
        raise OSError(f"copying the workspace into the container failed: {answer['error']}")


def _agent_pack(agent: AgentSession) -> IO[bytes] | None:
    """The container's /workspace as a tar read by its agent, or None when it is larger than
    AGENT_COPY_LIMIT (then tar in a docker exec reads it, streaming)."""
    answer = agent.ask({"type": "pack", "root": GUEST_PATH, "limit": AGENT_COPY_LIMIT},
                       timeout=120)
    if answer.get("error"):
        raise OSError(f"reading the container's /workspace failed: {answer['error']}")
    if answer.get("too_big"):
        return None
    return io.BytesIO(base64.b64decode(str(answer.get("data", ""))))


def _frames_text(data: bytes) -> str:
    """The payload of docker's multiplexed stream frames (8-byte headers), as text."""
    out = bytearray()
    while len(data) >= 8:
        size = int.from_bytes(data[4:8], "big")
        out += data[8:8 + size]
        data = data[8 + size:]
    return out.decode("utf-8", "replace")


def _has_members(data: bytes) -> bool:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.next() is not None
