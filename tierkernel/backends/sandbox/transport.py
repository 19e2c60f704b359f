"""An :class:`~tierkernel.backends.agent.session.AgentTransport` over a Docker exec socket.

The agent runs as one long-lived ``docker exec`` in the sandbox container: its stdin is the
request channel and its stdout the message channel, both carried by the exec's hijacked HTTP
connection. Without a TTY the engine multiplexes stdout and stderr on that connection in frames
of an 8-byte header (``>BxxxL``: stream 1 = stdout, 2 = stderr; payload length) and a payload.

There is no "exec kill" in the Docker API, so stops are done from inside the container (a short
``kill`` exec as the same uid), with the host as the fallback when the container no longer
accepts execs (a fork bomb has used up its pids): runc's exec processes are host processes, and
gVisor's are reached through ``runsc kill``.

:class:`SocketTransport` is the same agent talking over a unix socket of the host's instead of
the exec stream; its agent may also be no exec at all (a gVisor spare's, started by the
container's keeper: see ``MAIN_AGENT``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from tierkernel.backends.sandbox.channel import AGENT_EXIT_FILE, MAIN_AGENT
from tierkernel.errors import LineTooLong
from tierkernel.guest import protocol

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">BxxxL")

#: Kill the agent and everything else the cells left running in the container, except PID 1
#: (docker-init) and the container's keeper (``sleep infinity``, or a spare's keeper script,
#: whose exit would stop the container). The keeper is told by its pid, never by its command
#: line, which any process may imitate: it is the container's oldest process after PID 1 (its
#: start time, in /proc/PID/stat, is set by the kernel; the lower pid wins a tie, as the keeper
#: of a gVisor spare starts the first agent within the same clock tick). Runs as the cells'
#: uid, so it needs no capability; no subshell (they would be killed with the rest). $1 is the
#: agent's pid, or empty. Everything is stopped first, by one kill(-1) (every process this uid
#: may signal but this shell and PID 1, a fork in progress included): a process that forks a
#: successor and exits, over and over, always has a pid newer than the listing below; stopped,
#: it forks no more. The keeper is let go on once the rest are killed.
_KILL_TREE = r"""
[ -n "$1" ] && kill -KILL "$1" 2>/dev/null
kill -s STOP -- -1 2>/dev/null
keeper= oldest=
for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = 1 ] && continue
    read -r stat 2>/dev/null < "$d/stat" || continue
    set -- ${stat##*) }
    shift 19 2>/dev/null || continue
    if [ -z "$oldest" ] || [ "$1" -lt "$oldest" ]; then
        oldest=$1 keeper=$p
    elif [ "$1" -eq "$oldest" ] && [ "$p" -lt "$keeper" ]; then
        keeper=$p
    fi
done
for d in /proc/[0-9]*; do
    p=${d#/proc/}
    case "$p" in 1|$$|"$keeper") continue ;; esac
    kill -KILL "$p" 2>/dev/null
done
[ -n "$keeper" ] && kill -s CONT "$keeper" 2>/dev/null
exit 0
"""


class DockerExecTransport:
    """The agent as a ``docker exec`` process in a running container.

    ``api`` is a ``docker.APIClient``; ``cmd`` starts the agent. ``runtime`` picks the hard-kill
    path (``runc`` host pid, or ``runsc kill``). ``on_gone`` is called with the reason once the
    exec's stream ends, so the backend can tell a dead container from a dead agent.
    """

    def __init__(
        self,
        api: Any,
        container_id: str,
        cmd: list[str],
        *,
        user: str,
        environment: dict[str, str],
        workdir: str,
        runtime: str,
        detail: Callable[[int | None], str] | None = None,
    ) -> None:
        exec_id: str = api.exec_create(
            container_id, cmd, stdin=True, stdout=True, stderr=True, tty=False,
            user=user, environment=environment, workdir=workdir,
        )["Id"]
        raw = api.exec_start(exec_id, socket=True)
        # docker-py hands back socket.SocketIO over the unix socket; the real socket is inside.
        self._setup(api, container_id, exec_id, getattr(raw, "_sock", raw), user=user,
                    runtime=runtime, detail=detail)

    def _setup(self, api: Any, container_id: str, exec_id: str, sock: socket.socket, *,
               user: str, runtime: str, detail: Callable[[int | None], str] | None) -> None:
        self.api = api
        self.container_id = container_id
        self.user = user
        self.runtime = runtime
        self._detail = detail
        self.exec_id = exec_id
        self._sock = sock
        # The client's request timeout must not end a session that is merely idle.
        self._sock.settimeout(None)
        self._send_lock = threading.Lock()
        self._buf = bytearray()   # undecoded frame bytes
        self._out = bytearray()   # stdout payload not yet returned as a line
        self._stderr: deque[bytes] = deque(maxlen=16)
        self._closed = False
        #: The agent's pid inside the container, from its "ready" message.
        self.pid: int | None = None
        self._host_pid: int | None = None

    # -- the byte channel -----------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Write request bytes to the agent's stdin."""
        if self._closed:
            raise OSError("the sandbox agent's connection is closed")
        with self._send_lock:
            self._sock.sendall(data)

    def readline(self, limit: int) -> bytes:
        """The agent's next stdout line (frames demultiplexed); ``b""`` at the end. Raises
        :class:`LineTooLong` once more than ``limit`` bytes of one line are held (at most a
        read's worth past it)."""
        scanned = 0  # a long line (a workspace archive) is searched once, not per chunk
        while True:
            end = self._out.find(b"\n", scanned)
            if end != -1:
                line = bytes(self._out[: end + 1])
                del self._out[: end + 1]
                if self.pid is None and b'"ready"' in line:
                    self._note_ready(line)
                return line
            scanned = len(self._out)
            if scanned > limit:
                self._out.clear()  # never kept: the agent is killed for it
                raise LineTooLong(f"a message line longer than {limit} bytes")
            if not self._fill():
                return b""

    def _fill(self) -> bool:
        """Read at least one more frame's worth of bytes; False at the end of the stream."""
        while True:
            if len(self._buf) >= _HEADER.size:
                stream, length = _HEADER.unpack_from(self._buf)
                if len(self._buf) >= _HEADER.size + length:
                    payload = bytes(self._buf[_HEADER.size: _HEADER.size + length])
                    del self._buf[: _HEADER.size + length]
                    if stream == 1:
                        self._out += payload
                        return True
                    self._stderr.append(payload)
                    continue
            chunk = self._recv()
            if not chunk:
                return False
            self._buf += chunk

    def _recv(self) -> bytes:
        """The next bytes from the connection; ``b""`` (and closed) at its end."""
        try:
            chunk = self._sock.recv(1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            self._closed = True
        return chunk

    def _note_ready(self, line: bytes) -> None:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            msg = json.loads(line)
            if msg.get("type") == protocol.READY:
                self.pid = int(msg["pid"])

    # -- stopping -------------------------------------------------------------------------
    def interrupt(self) -> None:
        """SIGINT to the agent, from a short exec as its own uid (no capability needed).

        Runs in a thread: this is called from the kernel's signal handler and must not block.
        """
        pid = self.pid
        if pid is None or self._closed:
            return
        threading.Thread(target=self._exec_quietly, args=(["kill", "-INT", str(pid)], 10.0),
                         daemon=True, name="sandbox-interrupt").start()

    def kill(self) -> None:
        """Kill the agent and what its cells started; then close the connection. Idempotent."""
        if not self._closed and self.pid is not None:
            done = self._exec_quietly(["sh", "-c", _KILL_TREE, "kill-tree", str(self.pid)], 5.0)
            if not done:
                self._kill_from_host()
        self.close()

    def kill_guests(self) -> bool:
        """Kill every process in the container but PID 1 and its keeper (see _KILL_TREE):
        before a new agent starts in it, so that nothing an earlier agent's cells left
        running lives on beside the new one (or races it to the agent socket). False when the
        container would not run the kill in time (then it must not be reused)."""
        return self._exec_quietly(["sh", "-c", _KILL_TREE, "kill-tree", ""], 10.0)

    def _exec_quietly(self, cmd: list[str], timeout: float) -> bool:
        """Run ``cmd`` in the container as the agent's uid; True if it ran within ``timeout``."""
        return self._exec_output(cmd, timeout) is not None

    def _exec_output(self, cmd: list[str], timeout: float) -> bytes | None:
        """Run ``cmd`` in the container as the agent's uid; its output, or None if it did not
        run within ``timeout``.

        The engine call runs in a helper thread: under gVisor a wedged sandbox can leave an exec
        hanging for tens of seconds, and a stop must not wait for that.
        """
        outcome: list[bytes] = []

        def call() -> None:
            try:
                exec_id = self.api.exec_create(self.container_id, cmd, user=self.user)["Id"]
                outcome.append(self.api.exec_start(exec_id) or b"")
            except Exception:
                log.debug("exec %s in %s failed", cmd[0], self.container_id[:12], exc_info=True)

        worker = threading.Thread(target=call, daemon=True, name="sandbox-exec")
        worker.start()
        worker.join(timeout)
        return outcome[0] if outcome else None

    def _kill_from_host(self) -> None:
        """The container does not take execs: kill the agent from the host side."""
        try:
            if self.runtime == "runc":
                pid = self.api.exec_inspect(self.exec_id).get("Pid")
                if pid:
                    os.kill(int(pid), signal.SIGKILL)
            elif self.runtime == "runsc" and self.pid is not None:
                runsc = shutil.which("runsc") or "/usr/bin/runsc"
                for root in ("/var/run/docker/runtime-runsc/moby",
                             "/var/run/docker/runtime-runc/moby"):
                    if os.path.isdir(os.path.join(root, self.container_id)):
                        subprocess.run([runsc, "--root", root, "kill", f"--pid={self.pid}",
                                        self.container_id, "KILL"], timeout=10,
                                       capture_output=True, check=False)
                        break
        except Exception:
            log.debug("host-side kill of the sandbox agent failed", exc_info=True)

    def close(self) -> None:
        """Drop the connection (the agent, if still alive, sees EOF on stdin and exits)."""
        if self._closed and self._sock.fileno() == -1:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()

    # -- diagnosis ------------------------------------------------------------------------
    def exit_code(self) -> int | None:
        """The agent's exit status, or None while it runs (or if the engine cannot say).

        Asked once the agent's stream has ended, when the engine (or the keeper of a gVisor
        spare) may learn the status only a moment later: while it may still come, it is
        waited for, up to 2 s in all.
        """
        deadline = time.monotonic() + 2.0
        while True:
            if self.exec_id == MAIN_AGENT:
                code, final = self._main_agent_exit(max(0.1, deadline - time.monotonic()))
            else:
                code, final = self._exec_exit()
            if code is not None or final or time.monotonic() >= deadline:
                return code
            time.sleep(0.1)

    def _exec_exit(self) -> tuple[int | None, bool]:
        """(the agent exec's status, whether that is final: the engine has no such exec)"""
        try:
            info = self.api.exec_inspect(self.exec_id)
        except Exception:
            return None, True
        code = info.get("ExitCode")
        if info.get("Running") or code is None:
            return None, False
        return int(code), True

    def _main_agent_exit(self, within: float) -> tuple[int | None, bool]:
        """The status a gVisor spare's keeper wrote for the agent it started (there is no exec
        to inspect); final when the container takes no exec. The file is the guest's: only
        its first bytes are read, and a read that hangs (a FIFO there) is given up."""
        out = self._exec_output(["head", "-c", "16", AGENT_EXIT_FILE], within)
        if out is None:
            return None, True
        text = out.strip()
        return (int(text), True) if text.isdigit() else (None, False)

    def stderr_tail(self) -> str:
        """The last words the agent's process wrote on its original stderr."""
        return b"".join(self._stderr)[-400:].decode("utf-8", "replace").strip()

    def exit_detail(self) -> str:
        """Why the agent is gone, in words (the backend adds what it knows: OOM, a dead
        container)."""
        code = self.exit_code()
        if self._detail is not None:
            return self._detail(code)
        text = "it exited" if code is None else f"it exited with status {code}"
        tail = self.stderr_tail()
        return f"{text}; stderr: {tail}" if tail else text


class SocketTransport(DockerExecTransport):
    """The agent as a detached ``docker exec`` that talks over a unix socket of the host's.

    The socket lives in a per-container host folder mounted read-only into the container
    (``tierkernel.backends.sandbox.channel``), so requests and output go straight between the
    kernel and the agent instead of through the engine's exec stream (a round trip ≈10 µs
    instead of ≈90 µs under runc). The exec is still the agent's process for the engine: stops
    and exit codes work as for :class:`DockerExecTransport`. ``exec_id`` may also be
    ``MAIN_AGENT``: a gVisor spare's agent, started by the container's keeper, which leaves
    its exit status in ``AGENT_EXIT_FILE`` (hard kills there need only the agent's pid).
    ``sock`` is the accepted connection; the stream carries the agent's messages unframed.
    """

    def __init__(
        self,
        api: Any,
        container_id: str,
        exec_id: str,
        sock: socket.socket,
        *,
        user: str,
        runtime: str,
        detail: Callable[[int | None], str] | None = None,
    ) -> None:
        self._setup(api, container_id, exec_id, sock, user=user, runtime=runtime,
                    detail=detail)

    def _fill(self) -> bool:
        chunk = self._recv()
        self._out += chunk
        return bool(chunk)
