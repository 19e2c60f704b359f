"""The host side of the agent protocol, against a scripted agent: races a real agent hits rarely.

A real agent that ignores an interrupt is killed after the grace period; its end is then seen
by two threads at once (the reader, whose stream closes, and the one that killed it). The cell
must still end with exactly one error, the one that says why it was killed.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from tierkernel.backends.agent_session import AgentSession
from tierkernel.backends.base import CellRequest


class IgnoringAgent:
    """An agent that never answers a cell and ignores interrupts; kill() ends its stream."""

    def __init__(self) -> None:
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.lines.put(b'{"type": "ready", "pid": 1, "python": "3"}\n')
        self.killed = threading.Event()

    def send(self, data: bytes) -> None:
        pass

    def readline(self) -> bytes:
        return self.lines.get()

    def interrupt(self) -> None:
        pass  # ignored, as by a cell that set SIGINT to SIG_IGN

    def kill(self) -> None:
        self.killed.set()
        self.lines.put(b"")  # the stream ends: the reader thread sees the agent gone

    def exit_detail(self) -> str:
        return "it was killed by signal SIGKILL"


class SlowSink:
    """Records errors, slowly: publishing takes long enough for the other thread to arrive."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        time.sleep(0.2)
        self.errors.append((ename, evalue))

    def stream(self, name: str, text: str) -> None:
        pass

    def display(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        pass

    def result(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        pass

    def clear_output(self, wait: bool = False) -> None:
        pass


def test_an_agent_killed_for_ignoring_an_interrupt_fails_its_cell_once():
    agent = IgnoringAgent()
    session = AgentSession(agent, tier="scripted", grace=0.2)
    session.wait_ready(5)
    sink = SlowSink()
    request = CellRequest(code="while True: pass", body="while True: pass", tier="scripted",
                          options={}, execution_count=1)
    threading.Timer(0.1, session.interrupt).start()
    result = session.run(request, sink, timeout=None)
    assert agent.killed.is_set()
    time.sleep(0.5)  # a second error, if one were coming, would be published by now
    assert len(sink.errors) == 1, sink.errors
    ename, evalue = sink.errors[0]
    assert ename == "KeyboardInterrupt"
    assert "did not stop within 0.2 s of being interrupted, so it was killed" in evalue
    assert "Its variables are gone" in evalue
    assert not result.success and result.error is not None
    assert result.error.evalue == evalue
