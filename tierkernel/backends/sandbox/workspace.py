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
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeGuard

from tierkernel.backends.agent.session import AgentSession
from tierkernel.fsx import FsxConfigError, FsxFacade, sync
from tierkernel.fsx import current as current_workspace
from tierkernel.guest import protocol

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
#: Most paths one message names (the rest are counted).
_NAMED = 20
#: GNU tar's complaint about one member: "tar: ./big.bin: Cannot write: No space left ..."
_TAR_FAILURE = re.compile(r"^tar: (?:\./)?(.+?): Cannot [^:]+: (.+)$")


@dataclass(frozen=True)
class Room:
    """What the container's /workspace can hold, and what limits it, for the message."""

    bytes: int
    why: str


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:_NAMED])
    return shown + (f" and {len(paths) - _NAMED} more" if len(paths) > _NAMED else "")


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
        #: What the last copy into the container could not copy, for the user ("" if all).
        self.notice = ""
        #: fsx's entries of the files the last copy left out (their digests, kept).
        self._left: sync.Manifest = {}

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

    def before_cell(self, api: Any, container_id: str, agent: AgentSession | None = None,
                    room: Room | None = None) -> bool:
        """Copy what changed in fsx since the last sync into the container; True when
        anything was copied or deleted (the agent is then told to take /workspace as it is as
        its new baseline, so the copy is not reported back as the cell's change). Through
        ``agent``, the container's live agent, when given and the copy is small. Blocking.

        Never raises for the copy itself: files that do not fit in ``room``, cannot be read,
        or that tar in the container could not write are left out, and :attr:`notice` says
        which and why; the cell runs with what arrived. A failed copy is not tried again
        until fsx changes (the next cells do not wait for it)."""
        with self._lock:
            self.notice = ""
            return self._before_cell(api, container_id, agent, room)

    def _before_cell(self, api: Any, container_id: str, agent: AgentSession | None,
                     room: Room | None) -> bool:
        workspace = self.workspace()
        if workspace is None:
            return False
        changed = False
        base = self._manifest if self._container == container_id else None
        # Taken before the walk: a write during it makes the next cell look again.
        token = workspace.engine.change_token()
        packed = sync.pack(workspace, since=base, owner=self.owner,
                           room=room.bytes if room is not None else None, known=self._left)
        self._left = packed.left
        notes = self._missing_notes(packed.missing, room)
        manifest = packed.manifest
        try:
            deleted = list(packed.deleted) if base is not None else []
            size = packed.archive.seek(0, io.SEEK_END)
            packed.archive.seek(0)
            members = _has_members(packed.archive)
            if _by_agent(agent, size) and (deleted or members):
                try:
                    _agent_unpack(agent, packed.archive.read() if members else b"", deleted)
                    changed = True
                    deleted, members = [], False
                except OSError:  # the exec path below does it all again, from scratch
                    log.warning("copying the workspace through the agent failed; "
                                "using tar in the container", exc_info=True)
                    packed.archive.seek(0)
            if deleted:
                self._delete(api, container_id, deleted)
                changed = True
            if members:
                changed = True
                failed = self._untar(api, container_id, packed.archive)
                if failed:
                    self._delete(api, container_id, [rel for rel, _ in failed])
                    _leave_out(manifest, base, packed.deleted, [rel for rel, _ in failed])
                    notes += self._failed_notes(failed, room)
        except Exception as exc:
            log.warning("copying the workspace into the container failed", exc_info=True)
            sent = sorted(rel for rel, entry in packed.manifest.items()
                          if entry.kind == "file" and (base or {}).get(rel) != entry)
            notes.append(f"the workspace could not be copied into the container's "
                         f"{GUEST_PATH} ({exc}); these may be missing or older there: "
                         f"{_names(sent) or '(none)'}. The next copy is tried when the "
                         "workspace changes.")
            manifest = dict(base or {})  # what the container surely had; the rest conflicts
            changed = True
        finally:
            packed.archive.close()
        self._container, self._manifest = container_id, manifest
        self._token = token
        self.notice = "".join(f"tierkernel: {note}\n" for note in notes)
        return changed

    @staticmethod
    def _missing_notes(missing: list[tuple[str, str]], room: Room | None) -> list[str]:
        notes = []
        no_room = [rel for rel, why in missing if why == "room"]
        if no_room:
            limit = f"{room.bytes / 2**20:.0f} MiB" if room is not None else "its size"
            notes.append(f"not copied into the container's {GUEST_PATH}, which can hold "
                         f"{limit} ({room.why if room is not None else ''}): "
                         f"{_names(no_room)}. They stay in the workspace; cells in this "
                         "tier do not see them.")
        for rel, why in missing:
            if why != "room":
                notes.append(f"not copied into the container's {GUEST_PATH}: {rel} ({why})")
        return notes

    @staticmethod
    def _failed_notes(failed: list[tuple[str, str]], room: Room | None) -> list[str]:
        reasons: dict[str, list[str]] = {}
        for rel, why in failed:
            reasons.setdefault(why, []).append(rel)
        notes = []
        for why, paths in reasons.items():
            hint = f" ({room.why})" if room is not None and "No space" in why else ""
            notes.append(f"not copied into the container's {GUEST_PATH}: {_names(paths)}: "
                         f"{why}{hint}. They stay in the workspace.")
        return notes

    def _delete(self, api: Any, container_id: str, rels: list[str]) -> None:
        paths = [f"{GUEST_PATH}/{rel}" for rel in rels]
        exec_id = api.exec_create(container_id, ["sh", "-c", _DELETE, "rm", *paths],
                                  user=self.user)["Id"]
        api.exec_start(exec_id)

    def _untar(self, api: Any, container_id: str, archive: IO[bytes]) -> list[tuple[str, str]]:
        """Extract ``archive`` into /workspace as the cell's user (``tar`` in the container,
        see :func:`exec_with_stdin`); return the members tar could not write, with why."""
        # Up to 1 MiB of output: one line per failed member, enough to name many.
        code, text = exec_with_stdin(api, container_id,
                                     ["tar", "-x", "-m", "-C", GUEST_PATH, "-f", "-"],
                                     self.user, archive, keep=1 << 20)
        if not code:
            return []
        failed = []
        for line in text.splitlines():
            match = _TAR_FAILURE.match(line)
            if match:
                failed.append((match.group(1), match.group(2)))
        if not failed:
            raise OSError(f"copying the workspace into the container failed (tar exit {code}): "
                          f"{text[-500:]}")
        return failed

    def after_cell(self, api: Any, container_id: str, changed: bool,
                   agent: AgentSession | None = None, budget: sync.Budget | None = None,
                   stop: Callable[[], str | None] | None = None) -> sync.Applied | None:
        """Bring the container's changes into fsx when there are any (None when there were
        none to bring); conflicts are kept as ``NAME.sandbox-conflict``. Read through
        ``agent`` when given and the tree is small. Within ``budget``, and stopped when
        ``stop()`` names a reason: then (CopyBudgetError, CopyStopped) nothing is
        applied and the container keeps its files. Blocking."""
        with self._lock:
            return self._after_cell(api, container_id, changed, agent, budget, stop)

    def _after_cell(self, api: Any, container_id: str, changed: bool,
                    agent: AgentSession | None, budget: sync.Budget | None,
                    stop: Callable[[], str | None] | None) -> sync.Applied | None:
        workspace = self.workspace()
        if workspace is None or not changed or self._container != container_id:
            return None
        received = None
        if _by_agent(agent, 0):
            try:
                # The agent runs the cells' code, which may hold its answer back: it gets
                # at most the copy's time budget (the exec path below is stoppable).
                data = _agent_pack(agent, min(120.0, (budget or sync.Budget()).seconds))
            except OSError:  # e.g. a tree too deep for tarfile: tar in an exec reads it
                log.warning("reading /workspace through the agent failed; using tar in the "
                            "container", exc_info=True)
                data = None
            if data is not None:
                received = sync.receive(data, budget, stop)
        if received is None:
            received = self._tar_out(api, container_id, budget, stop)
        applied = sync.apply(workspace, received, self._manifest or {}, top=None)
        self._manifest = applied.manifest
        return applied

    def _tar_out(self, api: Any, container_id: str, budget: sync.Budget | None,
                 stop: Callable[[], str | None] | None) -> sync.Received:
        """The container's /workspace as a tar, received (counted, spooled) as it streams.
        ``tar`` runs in the container: docker's ``get_archive`` reads the container's own
        layers and sees an empty folder where a tmpfs is mounted. Over budget or stopped,
        the exec's connection is closed, which ends that tar."""
        # --hard-dereference: each name of a hard-linked file as a file (fsx has no hard links)
        exec_id = api.exec_create(container_id, ["tar", "-c", "--hard-dereference", "-C",
                                                 GUEST_PATH, "."],
                                  stdout=True, stderr=True, user=self.user)["Id"]
        raw = api.exec_start(exec_id, socket=True)
        sock: socket.socket = getattr(raw, "_sock", raw)
        errors = bytearray()
        try:
            received = sync.receive(_stdout_of(sock, errors), budget, stop)
        finally:
            sock.close()
        code = api.exec_inspect(exec_id).get("ExitCode")
        if code:
            received.close()
            raise OSError(f"reading the container's /workspace failed (tar exit {code}): "
                          f"{errors.decode('utf-8', 'replace')[-500:]}")
        return received


def _stdout_of(sock: socket.socket, errors: bytearray) -> Iterator[bytes]:
    """An exec's stdout from its multiplexed stream (8-byte frame headers), stderr kept in
    ``errors`` (its first 4 KiB). Yields b"" each second nothing arrives, so the reader can
    check its clock and its stop."""
    sock.settimeout(1.0)
    buffer = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            yield b""
            continue
        if not chunk:
            return
        buffer += chunk
        while len(buffer) >= 8:
            size = int.from_bytes(buffer[4:8], "big")
            if len(buffer) < 8 + size:
                break
            stream, payload = buffer[0], bytes(buffer[8:8 + size])
            del buffer[:8 + size]
            if stream == 1:
                yield payload
            elif len(errors) < 4096:
                errors += payload


def _leave_out(manifest: sync.Manifest, base: sync.Manifest | None, deleted: list[str],
               rels: list[str]) -> None:
    """Record that ``rels`` did not reach the container: it keeps the version ``base`` says
    (unless the copy deleted it first), or has none."""
    gone = set(deleted)
    for rel in rels:
        if base is not None and rel in base and rel not in gone:
            manifest[rel] = base[rel]
        else:
            manifest.pop(rel, None)


def _by_agent(agent: AgentSession | None, size: int) -> TypeGuard[AgentSession]:
    """Whether a copy of ``size`` bytes goes through the agent's channel: a request there
    takes a millisecond where a ``docker exec`` of tar takes 20-80 ms, but it travels as one
    base64 JSON line held in memory on both sides (in the container, within its memory
    limit), so only up to AGENT_COPY_LIMIT."""
    return agent is not None and agent.alive and size <= AGENT_COPY_LIMIT


def _agent_unpack(agent: AgentSession, data: bytes, deleted: list[str]) -> None:
    answer = agent.ask({"type": protocol.UNPACK, "root": GUEST_PATH, "delete": deleted,
                        "data": base64.b64encode(data).decode("ascii")}, timeout=120)
    if answer.get("error"):
        raise OSError(f"copying the workspace into the container failed: {answer['error']}")


def _agent_pack(agent: AgentSession, timeout: float = 120.0) -> bytes | None:
    """The container's /workspace as a tar read by its agent, or None when it is larger than
    AGENT_COPY_LIMIT (then tar in a docker exec reads it, streaming)."""
    answer = agent.ask({"type": protocol.PACK, "root": GUEST_PATH, "limit": AGENT_COPY_LIMIT},
                       timeout=timeout)
    if answer.get("error"):
        raise OSError(f"reading the container's /workspace failed: {answer['error']}")
    if answer.get("too_big"):
        return None
    data = str(answer.get("data", ""))
    if len(data) > 4 * (AGENT_COPY_LIMIT // 3 + 1):  # the agent said it keeps to the limit
        raise OSError("the agent's copy of /workspace is larger than it may be")
    return base64.b64decode(data)


def exec_with_stdin(api: Any, container_id: str, command: list[str], user: str,
                    stdin: IO[bytes], keep: int) -> tuple[int, str]:
    """Run ``command`` in the container as ``user`` with ``stdin`` (read to its end) as its
    standard input; return its exit code and about the first ``keep`` bytes of its stdout and
    stderr. docker's ``put_archive`` is refused on a read-only root even for a tmpfs mount, so
    a copy into the container is a ``tar`` run this way."""
    exec_id = api.exec_create(container_id, command, stdin=True, stdout=True, stderr=True,
                              user=user)["Id"]
    raw = api.exec_start(exec_id, socket=True)
    sock: socket.socket = getattr(raw, "_sock", raw)
    output = bytearray()
    try:
        sock.settimeout(120)
        while chunk := stdin.read(1 << 20):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            if len(output) < keep:
                output += chunk
    finally:
        sock.close()
    return int(api.exec_inspect(exec_id).get("ExitCode") or 0), _frames_text(bytes(output))


def _frames_text(data: bytes) -> str:
    """The payload of docker's multiplexed stream frames (8-byte headers), as text."""
    out = bytearray()
    while len(data) >= 8:
        size = int.from_bytes(data[4:8], "big")
        out += data[8:8 + size]
        data = data[8 + size:]
    return out.decode("utf-8", "replace")


def _has_members(archive: IO[bytes]) -> bool:
    """Whether the (rewound) tar has any member: its first block is not the end marker."""
    first = archive.read(512)
    archive.seek(0)
    return bool(first.strip(b"\0"))
