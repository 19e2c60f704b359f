"""The ``process`` tier: cells run by the guest agent in a separate Python process on the host.

This is crash isolation, not a security boundary: a segfault, ``os._exit`` or a runaway loop
takes down the child, never the kernel, but the child has the kernel user's full rights. It runs
the same agent as the sandbox tiers, so the tests exercise that agent with no engine needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

from traitlets import Float, Unicode

from tierkernel.backends.agent_session import AgentSession, ChannelLimits, LineTooLong
from tierkernel.backends.base import Availability, Backend, CellRequest, ExecResult, OutputSink
from tierkernel.backends.config_traits import ByteSize
from tierkernel.backends.usage import ProcessUsage

AGENT_PATH = Path(__file__).resolve().parent.parent / "guest" / "agent.py"


class ProcessTransport:
    """The agent as a child process in its own session, talking over its stdin/stdout pipes.

    Its own session keeps the SIGINT that the notebook's stop button sends to the kernel's
    process group away from it: the agent is interrupted only through :meth:`interrupt`.
    """

    def __init__(self, python: str, cwd: str | None = None) -> None:
        # Kept for the life of the agent: its last words explain a crash (closed by GC).
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        env = dict(os.environ)
        env.pop("JPY_PARENT_PID", None)
        self.proc = subprocess.Popen(
            [python, str(AGENT_PATH)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise OSError("the agent's stdin is closed") from exc

    def readline(self, limit: int) -> bytes:
        assert self.proc.stdout is not None
        # At most limit + 1 bytes are ever held: a line that long with no end is refused.
        line = self.proc.stdout.readline(limit + 1)
        if len(line) > limit and not line.endswith(b"\n"):
            raise LineTooLong(f"a message line longer than {limit} bytes")
        return line

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        # The whole process group, so a cell's `!sleep 100 &` dies with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def exit_detail(self) -> str:
        try:  # the pipe closes a moment before the child can be reaped
            code: int | None = self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            status = "it is still running"
        elif code < 0:
            status = f"it was killed by signal {signal.Signals(-code).name}"
        else:
            status = f"it exited with status {code}"
        self._stderr.seek(0)
        tail = self._stderr.read()[-400:].decode("utf-8", "replace").strip()
        return f"{status}; stderr: {tail}" if tail else status


class ProcessBackend(ChannelLimits, Backend):
    """Runs cells in a persistent child Python process (the guest agent)."""

    isolation = "separate host process: crash isolation only, not a security boundary"
    #: --allow/--domains/--db-readonly set the runtime helpers' policy for the cell.
    accepted_options = frozenset({"timeout", "allow", "domains", "db-readonly"})

    python = Unicode(
        sys.executable, help="The Python interpreter that runs the agent."
    ).tag(config=True)
    interrupt_grace = Float(
        3.0, help="Seconds a cell may take to honour an interrupt before its process is killed."
    ).tag(config=True)
    output_limit = ByteSize(
        16 * 1024 * 1024, help="Output one cell may produce before it is stopped (16m, or bytes)."
    ).tag(config=True)
    start_timeout = Float(30.0, help="Seconds to wait for the agent to start.").tag(config=True)

    _session: AgentSession | None = None

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
            # A restart: whatever the lost agent's cells left running (its process group)
            # goes with it, so nothing of theirs outlives it into the new agent's time.
            await asyncio.to_thread(self._session.close)
        self._session = await asyncio.to_thread(self._spawn)

    def _spawn(self) -> AgentSession:
        transport = ProcessTransport(self.python, cwd=os.getcwd())
        session = AgentSession(
            transport,
            tier=self.name,
            grace=self.interrupt_grace,
            output_limit=self.output_limit,
            limit_hint=f"raise it with '%%tier {self.name} --timeout SECONDS' or "
            "c.ProcessBackend.timeout",
            **self.channel_limits(self.output_limit),
        )
        session.wait_ready(self.start_timeout)
        session.install_helpers()
        # Each cell's CPU time and peak memory, read from the agent's /proc entries.
        session.usage_probe = ProcessUsage(transport.proc.pid)
        return session

    async def execute(self, request: CellRequest, sink: OutputSink) -> ExecResult:
        """Run the cell in the agent; the kernel's loop waits for it without blocking."""
        session = self._session
        if session is None:
            raise RuntimeError("the process tier was not started (the kernel calls start())")
        return await session.run_async(request, sink, request.options.get("timeout"),
                                       self.helper_gateway())

    def interrupt(self) -> None:
        """SIGINT to the agent; it is killed if the cell ignores it for ``interrupt_grace``."""
        if self._session is not None:
            self._session.interrupt()

    def shutdown(self) -> None:
        """Stop the agent process."""
        session, self._session = self._session, None
        if session is not None:
            session.close()

    def describe_limits(self) -> str:
        """Timeout and output cap, for ``%tier``."""
        return f"{super().describe_limits()}, output={self.output_limit / 2**20:g}MiB"
