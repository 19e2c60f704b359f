"""The sandbox agent's direct channel: a unix socket in a per-container folder of the host's.

Each sandbox container gets a folder of its own on the host, mounted **read-only** at
:data:`GUEST_DIR`. The kernel creates the listening socket :data:`SOCKET_NAME` in it and the
agent connects to it (``tierkernel.guest.agent.connect_host``), so cells and their output go
straight between kernel and agent, not through the Docker engine's exec stream. The container
cannot create, replace or fill anything in the folder: only the host writes there, and the
host never follows a name in it that the guest could have made.

Layout (``base_dir()``, mode 0700, so no other user of the host can reach a socket)::

    <base>/<container name>/          0711: the guest may pass through it, not list it
        agent.sock                    the kernel's listening socket (0666: uid 65534 connects)
        wake                          a FIFO the kernel writes to once agent.sock is there: a
                                      spare's agent sleeps on it (0606: uid 65534 reads; runc)
        exec-id                       the agent's docker exec, for exit codes and hard kills
                                      (MAIN_AGENT: the container's main command started it)
        claim                         a spare container's claimer: "pid start" (spares.py)

Needs a local engine (a remote one cannot mount this host's folders) and, under gVisor, runsc
registered with ``--host-uds=open`` (scripts/engine.sh does that); otherwise the tier falls
back to the exec stream. The wake FIFO is used under runc only (see :func:`wake_usable`);
under gVisor a waiting agent looks for the socket every 25 ms instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tierkernel.errors import ChannelError

GUEST_DIR = "/run/tierkernel"
SOCKET_NAME = "agent.sock"
EXEC_ID_NAME = "exec-id"
#: The exec id recorded for an agent that is no exec: a gVisor spare's main command starts it
#: (see spares.AGENT_KEEPER), and AGENT_EXIT_FILE in the container holds its status.
MAIN_AGENT = "main"
AGENT_EXIT_FILE = "/tmp/.tierkernel-agent-exit"
WAKE_NAME = "wake"


def channel_usable(engine: str, runtime: str, runtime_info: dict[str, Any]) -> bool:
    """Whether a container of ``runtime`` on the engine at ``engine`` can reach a host socket.

    ``runtime_info`` is the runtime's entry of the engine's ``info()["Runtimes"]``.
    """
    if not engine.startswith("unix://"):
        return False  # a remote engine mounts its own host's folders, not ours
    if runtime == "runc":
        return True
    args = [str(arg) for arg in runtime_info.get("runtimeArgs") or []]
    return any(arg in ("--host-uds=open", "--host-uds=all", "--fsgofer-host-uds")
               for arg in args)


def wake_usable(runtime: str) -> bool:
    """Whether an agent under ``runtime`` can sleep on a host FIFO (see :func:`make_wake`).

    Only under runc: gVisor (``--host-fifo=open``) opens a host FIFO in its gofer process and
    blocks there until a writer comes, and a gofer stuck that way makes removing the container
    take 10 s and leaks the gofer.
    """
    return runtime == "runc"


def base_dir() -> Path:
    """The folder holding every container folder of this user, created 0700 if missing.

    ``$XDG_RUNTIME_DIR/tierkernel-sandbox`` where that is set (a per-user tmpfs), else
    ``/tmp/tierkernel-<uid>/sandbox``. A folder that another user owns, or a link, is refused:
    it could be a trap set in the shared /tmp.
    """
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime_dir and os.path.isdir(runtime_dir):
        top = Path(runtime_dir) / "tierkernel-sandbox"
        parts = [top]
    else:
        top = Path("/tmp") / f"tierkernel-{os.getuid()}"
        parts = [top, top / "sandbox"]
    for part in parts:
        with contextlib.suppress(FileExistsError):
            part.mkdir(mode=0o700)
        info = part.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise ChannelError(f"{part} is not a folder of this user's; remove it and retry")
        if info.st_mode & 0o077:
            part.chmod(0o700)
    return parts[-1]


def new_folder(name: str) -> Path:
    """Create the folder for container ``name`` (empty, 0711) and return it."""
    folder = base_dir() / name
    folder.mkdir(mode=0o711)
    folder.chmod(0o711)  # mkdir's mode is cut by the umask
    return folder


def remove_folder(folder: Path | None) -> None:
    """Remove a container's folder; never raises."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def make_wake(folder: Path) -> None:
    """Create the wake FIFO in ``folder`` (before the container's agent looks for it)."""
    path = folder / WAKE_NAME
    os.mkfifo(path, 0o606)
    path.chmod(0o606)  # the guest (another uid) opens it for reading


def wake(folder: Path) -> bool:
    """Wake an agent sleeping on ``folder``'s FIFO; False when none sleeps there (it polls,
    or is gone). Never blocks: the FIFO is opened non-blocking and never followed as a link."""
    try:
        fd = os.open(folder / WAKE_NAME, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        os.write(fd, b"\n")
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def mount(folder: Path) -> dict[str, dict[str, str]]:
    """The ``volumes`` argument that mounts ``folder`` read-only at :data:`GUEST_DIR`."""
    return {str(folder): {"bind": GUEST_DIR, "mode": "ro"}}


def write_exec_id(folder: Path, exec_id: str) -> None:
    """Record the agent's exec (a kernel claiming the container needs it)."""
    tmp = folder / f".{EXEC_ID_NAME}.tmp"
    tmp.write_text(exec_id)
    tmp.replace(folder / EXEC_ID_NAME)


def read_exec_id(folder: Path) -> str:
    """The agent's exec id written by :func:`write_exec_id` ("" if none)."""
    try:
        return (folder / EXEC_ID_NAME).read_text().strip()
    except OSError:
        return ""


class Listener:
    """The kernel's end of one agent connection: bind, then :meth:`accept` once."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / SOCKET_NAME
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # an earlier agent's socket (the agent is being restarted)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(str(self.path))
            self.path.chmod(0o666)  # connecting takes write permission; uid 65534 connects
            self._sock.listen(1)
        except OSError:
            self._sock.close()
            raise

    def accept(self, timeout: float, alive: Callable[[], str | None]) -> socket.socket:
        """The agent's connection, within ``timeout`` seconds.

        ``alive`` is asked every 0.25 s and returns why the agent cannot connect any more
        (it exited), or None while it may still: then waiting ends at once with that reason.
        """
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChannelError(f"the agent did not connect within {timeout:g} s")
                self._sock.settimeout(min(0.25, left))
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    gone = alive()
                    if gone:
                        raise ChannelError(gone) from None
                    continue
                conn.settimeout(None)
                return conn
        finally:
            self.close()

    def close(self) -> None:
        """Stop listening (an accepted connection stays open); the socket file is removed."""
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
