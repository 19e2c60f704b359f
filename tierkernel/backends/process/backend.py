"""The ``process`` tier: cells run by the guest agent in a separate Python process on the host.

This is crash isolation, not a security boundary: a segfault, ``os._exit`` or a runaway loop
takes down the child, never the kernel, but the child has the kernel user's full rights. It runs
the same agent as the sandbox tiers, so the tests exercise that agent with no engine needed.

When the interpreter ends (lost, killed after an ignored interrupt, restarted, or the kernel
shuts down or dies), every process its cells started ends with it, on Linux even those that
left its session (see :class:`ProcessTransport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO

from traitlets import Unicode

from tierkernel.backends.agent.base import AGENT_PATH, WorkspaceCopyBackend
from tierkernel.backends.agent.notebook_folder import NotebookFolder, guest_config
from tierkernel.backends.agent.session import AgentSession
from tierkernel.backends.base import (
    Availability,
    CellRequest,
    ExecError,
    ExecResult,
    OutputSink,
)
from tierkernel.backends.options import HELPER_POLICY, TIMEOUT, VALUE_OPTIONS
from tierkernel.backends.process.workspace import WORKSPACE_ENV, HostFolderSync
from tierkernel.backends.usage import ProcessUsage
from tierkernel.errors import AgentStartError, LineTooLong

REAPER_PATH = AGENT_PATH.with_name("reaper.py")

log = logging.getLogger(__name__)


def subreaper_supported() -> bool:
    """Whether this host has Linux's child subreaper, which the process tier's reaper needs."""
    return sys.platform.startswith("linux")


class ProcessTransport:
    """The agent as a child process in its own session, talking over its stdin/stdout pipes.

    Its own session keeps the SIGINT that the notebook's stop button sends to the kernel's
    process group away from it: the agent is interrupted only through :meth:`interrupt`.

    On Linux the agent runs under ``guest/reaper.py``, the subreaper of its process tree: when
    the agent ends, is killed, or the kernel goes, the reaper stops and kills every process
    the agent's cells left (``setsid``, a double fork: all end up its children), then exits.
    The agent's pipes are the kernel's own, inherited through the reaper, which only watches:
    nothing it does is on a cell's way. Elsewhere the agent is the kernel's own child, and
    only its process group is killed with it.
    """

    def __init__(self, python: str, cwd: str | None = None, start_timeout: float = 30.0,
                 env_extra: dict[str, str] | None = None) -> None:
        # Kept for the life of the agent: its last words explain a crash (closed by GC).
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        env = dict(os.environ, **(env_extra or {}))
        env.pop("JPY_PARENT_PID", None)
        #: Whether the agent runs under guest/reaper.py (``self.proc``; else it is the agent).
        self._reaper = subreaper_supported()
        #: The reaper's status pipe, its unread part, and what it said (see guest/reaper.py).
        self._status_fd: int | None = None
        self._status = b""
        self._status_lock = threading.Lock()
        self._exit_code: int | None = None
        #: The agent's pid: interrupts go to it, and its CPU time and memory are measured.
        self.pid = 0
        if self._reaper:
            self._start_reaped(python, cwd, env, start_timeout)
            return
        log.warning("the process tier has no child subreaper on %s: processes a cell starts "
                    "in a session or process group of their own outlive its interpreter",
                    sys.platform)
        self.proc = subprocess.Popen(
            [python, str(AGENT_PATH)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin: IO[bytes] = self.proc.stdin
        self._stdout: IO[bytes] = self.proc.stdout

    def _start_reaped(self, python: str, cwd: str | None, env: dict[str, str],
                      start_timeout: float) -> None:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        status_r, status_w = os.pipe()
        try:
            # -I -S: the reaper needs only the standard library, and starts sooner without
            # site-packages; the agent it starts gets the environment unchanged.
            self.proc = subprocess.Popen(
                [python, "-I", "-S", str(REAPER_PATH), str(in_r), str(out_w), "--",
                 python, str(AGENT_PATH)],
                # Its stdin is the control pipe: the reaper ends the agent's tree when it
                # closes (the kernel closed it, or ended).
                stdin=subprocess.PIPE,
                stdout=status_w,
                stderr=self._stderr,
                cwd=cwd,
                env=env,
                pass_fds=(in_r, out_w),
                start_new_session=True,
            )
        except BaseException:
            for fd in (in_w, out_r, status_r):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, status_w):
                os.close(fd)
        self._stdin = open(in_w, "wb")  # noqa: SIM115 (closed by kill)
        self._stdout = open(out_r, "rb")  # noqa: SIM115
        os.set_blocking(status_r, False)
        # Closed with this object (never explicitly: kill() may run in two threads at once,
        # and a number closed twice could by then be another file's).
        self._status_file = open(status_r, "rb", buffering=0)  # noqa: SIM115
        self._status_fd = status_r
        if not self._wait_status(lambda: self.pid != 0, start_timeout):
            self.kill()
            raise AgentStartError(
                f"the process tier's reaper did not start its interpreter within "
                f"{start_timeout:g} s: {self.exit_detail()}")

    def _read_status(self) -> bool:
        """Read what the reaper has said; False once it has nothing more to say."""
        fd = self._status_fd
        if fd is None:
            return False
        # One reader at a time: the reader thread (exit_detail) and the kernel's (interrupt)
        # may both look, and a line read in two halves must be joined in order.
        with self._status_lock:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:
                return False
            self._status += data
            *lines, self._status = self._status.split(b"\n")
            for line in lines:
                self._on_status(line.split())
        return True

    def _on_status(self, words: list[bytes]) -> None:
        with contextlib.suppress(ValueError, IndexError):
            # The first of each only: the agent's pid is not to be changed under the kernel's
            # interrupts (they are sent to it).
            if words[0] == b"agent" and self.pid == 0 and int(words[1]) > 0:
                self.pid = int(words[1])
                if words[2] != b"1":
                    log.warning("the process tier's reaper is not the subreaper of the agent's "
                                "processes (see its stderr): a cell's processes outside the "
                                "agent's process group outlive it")
            elif words[0] == b"exit" and self._exit_code is None:
                self._exit_code = int(words[1])

    def _wait_status(self, done: Callable[[], bool], timeout: float) -> bool:
        """Read the reaper's status lines until ``done()`` or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or self._status_fd is None:
                return False
            readable, _, _ = select.select([self._status_fd], [], [], left)
            if readable and not self._read_status():
                return done()  # the reaper is gone: it will say no more
        return True

    def send(self, data: bytes) -> None:
        try:
            self._stdin.write(data)
            self._stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise OSError("the agent's stdin is closed") from exc

    def readline(self, limit: int) -> bytes:
        # At most limit + 1 bytes are ever held: a line that long with no end is refused.
        line = self._stdout.readline(limit + 1)
        if len(line) > limit and not line.endswith(b"\n"):
            raise LineTooLong(f"a message line longer than {limit} bytes")
        return line

    def _agent_running(self) -> bool:
        if self._reaper:
            # Under the reaper, the agent's pid is free for reuse once it said "exit".
            self._read_status()
            if self._exit_code is not None:
                return False
        return self.proc.poll() is None

    def interrupt(self) -> None:
        if self.pid > 0 and self._agent_running():
            os.kill(self.pid, signal.SIGINT)

    def kill(self) -> None:
        if not self._reaper:
            # The whole process group, so a cell's `!sleep 100 &` dies with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        else:
            # The reaper stops and kills the agent and everything under it, then exits.
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGTERM)  # a no-op once it has been waited for
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                log.warning("the process tier's reaper did not end its processes within 5 s; "
                            "killing it and the agent's process group")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
            while self._read_status():  # its last words: the agent's exit code
                if self.proc.returncode is None:
                    break  # still running: only what it said so far
            if self._exit_code is None and self.pid > 0:
                # The reaper ended before the agent (a cell killed it, or it was killed just
                # now): the agent's process group at least goes, as where there is no reaper.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
        for pipe in (self._stdin, self._stdout):
            with contextlib.suppress(OSError):
                pipe.close()

    def exit_detail(self) -> str:
        if not self._reaper:
            try:  # the pipe closes a moment before the child can be reaped
                code: int | None = self.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                code = None
        else:
            self._wait_status(lambda: self._exit_code is not None, 1.0)
            code = self._exit_code
            # The reaper exits once the agent's processes are gone: waited for here, so that
            # it is not left a zombie of the kernel until the next process cell.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(1.0)
        if code is None and self._reaper and self.proc.returncode is not None:
            status = "its exit status is unknown: its reaper process ended first"
        elif code is None:
            status = "it is still running"
        elif code < 0:
            status = f"it was killed by signal {signal.Signals(-code).name}"
        else:
            status = f"it exited with status {code}"
        self._stderr.seek(0)
        tail = self._stderr.read()[-400:].decode("utf-8", "replace").strip()
        return f"{status}; stderr: {tail}" if tail else status


class ProcessBackend(WorkspaceCopyBackend):
    """Runs cells in a persistent child Python process (the guest agent)."""

    isolation = "separate host process: crash isolation only, not a security boundary"
    #: --allow/--domains/--db-readonly set the runtime helpers' policy for the cell.
    magic_options = (TIMEOUT, *HELPER_POLICY, *VALUE_OPTIONS)

    python = Unicode(
        sys.executable, help="The Python interpreter that runs the agent."
    ).tag(config=True)
    _session: AgentSession | None = None
    _files: HostFolderSync | None = None

    def availability(self) -> Availability:
        """Available when the configured interpreter exists."""
        if not os.access(self.python, os.X_OK):
            return Availability.no(
                f"interpreter {self.python!r} is not executable; set c.ProcessBackend.python"
            )
        return Availability.yes()

    async def start(self) -> None:
        """Start the agent unless one is already running."""
        if self._session is not None and self._session.alive:
            return
        if self._session is not None:
            # A restart: whatever the lost agent's cells left running (its reaper's whole
            # tree; its process group where there is no reaper) goes with it, so nothing of
            # theirs outlives it into the new agent's time.
            await asyncio.to_thread(self._session.close)
        self._session = await asyncio.to_thread(self._spawn)

    def _folder(self) -> HostFolderSync:
        if self._files is None:
            self._files = HostFolderSync()
        return self._files

    def _spawn(self) -> AgentSession:
        # The agent works in the kernel's workspace folder (see workspace.py), which
        # holds the workspace before its first cell.
        files = self._folder()
        notice = files.before_cell()
        if notice:
            log.warning("%s", notice.strip())
        transport = ProcessTransport(self.python, cwd=str(files.folder),
                                     start_timeout=self.start_timeout,
                                     env_extra={WORKSPACE_ENV: str(files.folder)})
        session = self.open_session(transport)
        session.wait_ready(self.start_timeout)
        session.install_helpers()
        # Not a boundary: the notebook's folder is read in place, whatever it holds.
        notebook = NotebookFolder(parent=self).folder()
        session.install_files(guest_config(str(files.folder), notebook, "", isolated=False,
                                           alias="/workspace"))
        files.watch_agent(transport.pid)
        # Each cell's CPU time and peak memory, read from the agent's /proc entries.
        session.usage_probe = ProcessUsage(transport.pid)
        return session

    async def execute(self, request: CellRequest, sink: OutputSink) -> ExecResult:
        """Run the cell in the agent; the kernel's loop waits for it without blocking."""
        session = self._session
        if session is None:
            raise RuntimeError("the process tier was not started (the kernel calls start())")
        option = request.options.get("timeout")
        started, timeout = time.monotonic(), float(option) if option else None
        files = self._folder()
        # The workspace folder and fsx in step (the common cell: both unchanged, no thread).
        if not files.idle():
            await asyncio.to_thread(self._copy_in, sink, started, timeout)
        result = await session.run_async(request, sink, option, self.helper_gateway())
        error = None
        if not files.idle():
            error = await asyncio.to_thread(self._copy_back, sink, started, timeout)
        if error is not None:
            if result.success:
                sink.error(error.ename, error.evalue, error.traceback)
                result = dataclasses.replace(result, success=False, error=error)
            else:  # one error a cell
                sink.stream("stderr", f"tierkernel: {error.evalue}\n")
        return result

    def _copy_in(self, sink: OutputSink, started: float, timeout: float | None) -> None:
        files = self._folder()
        # Changed since the last cell (a process a cell left running): into fsx first, as
        # the copy in takes the folder as its new baseline.
        if files.changed():
            early = self._copy_back(sink, started, timeout)
            if early is not None:
                sink.stream("stderr", f"tierkernel: {early.evalue}\n")
        notice = files.before_cell()
        if notice:
            sink.stream("stderr", notice)

    def _copy_back(self, sink: OutputSink, started: float, timeout: float | None
                   ) -> ExecError | None:
        """Bring the cell's changes in the workspace folder into fsx (see
        :meth:`copy_back`); over its budget, the error for the cell (nothing was copied: the
        folder keeps the files, copied with its next change)."""
        files = self._folder()
        return self.copy_back(
            files.after_cell, sink, started, timeout, source="the workspace folder",
            kept=f"the folder ({files.folder}) still has the files, and they are copied with "
            "its next change", version="cell's")

    def _query_session(self) -> AgentSession | None:
        """The running agent, for completion and inspection (None: none running)."""
        session = self._session
        return session if session is not None and session.alive else None

    def interrupt(self) -> None:
        """SIGINT to the agent; it is killed if the cell ignores it for ``interrupt_grace``.
        A copy of the workspace folder back into fsx in progress ends too."""
        self.stop_copy()
        if self._session is not None:
            self._session.interrupt()

    def shutdown(self) -> None:
        """Stop the agent process."""
        session, self._session = self._session, None
        if session is not None:
            session.close()
        files, self._files = self._files, None
        if files is not None:
            files.close()
