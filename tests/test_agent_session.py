"""The host side of the agent protocol, against a scripted agent: races a real agent hits rarely.

A real agent that ignores an interrupt is killed after the grace period; its end is then seen
by two threads at once (the reader, whose stream closes, and the one that killed it). The cell
must still end with exactly one error, the one that says why it was killed.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any

from tierkernel.backends.agent.session import AgentSession, line_limit_for
from tierkernel.backends.base import CellRequest
from tierkernel.errors import LineTooLong


class IgnoringAgent:
    """An agent that never answers a cell and ignores interrupts; kill() ends its stream."""

    def __init__(self) -> None:
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.lines.put(b'{"type": "ready", "pid": 1, "python": "3"}\n')
        self.killed = threading.Event()

    def send(self, data: bytes) -> None:
        pass

    def readline(self, limit: int) -> bytes:
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


# -- the channel's budgets (issue 14, cases 7, 9 and 10) ---------------------------------------

class ScriptedAgent:
    """An agent whose lines for each cell are made by ``script(cell_id)``; records what the host
    sends it. Ends each cell with "done" once the script's lines are out, unless told not to."""

    def __init__(self, script: Any, done: bool = True) -> None:
        self.lines: queue.Queue[Any] = queue.Queue()
        self.lines.put(b'{"type": "ready", "pid": 1, "python": "3"}\n')
        self.script = script
        self.done = done
        self.sent: list[dict[str, Any]] = []
        self.killed = threading.Event()
        self.interrupted = threading.Event()

    def send(self, data: bytes) -> None:
        for raw in data.splitlines():
            msg = json.loads(raw)
            self.sent.append(msg)
            if msg.get("type") == "execute":
                for line in self.script(msg["id"]):
                    self.lines.put(line if isinstance(line, (bytes, Exception))
                                   else (json.dumps(line) + "\n").encode())
                if self.done:
                    self.lines.put((json.dumps({"type": "done", "id": msg["id"],
                                                "success": True}) + "\n").encode())

    def readline(self, limit: int) -> bytes:
        line = self.lines.get()
        if isinstance(line, Exception):
            raise line
        return line

    def interrupt(self) -> None:
        self.interrupted.set()

    def kill(self) -> None:
        self.killed.set()
        self.lines.put(b"")

    def exit_detail(self) -> str:
        return "it was killed by signal SIGKILL"

    def answers(self) -> list[dict[str, Any]]:
        return [m["response"] for m in self.sent if m.get("type") == "helper_result"]


class Sink(SlowSink):
    """Records everything, at once."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        self.errors.append((ename, evalue))

    def stream(self, name: str, text: str) -> None:
        self.texts.append(text)


def _run(session: AgentSession, helpers: Any = None,
         timeout: float | None = 10) -> tuple[Any, Sink]:
    sink = Sink()
    request = CellRequest(code="x", body="x", tier="scripted", options={}, execution_count=1)
    return session.run(request, sink, timeout=timeout, helpers=helpers), sink


def _wait_for(predicate: Any, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_a_line_past_the_line_limit_kills_the_agent_and_fails_the_cell():
    agent = ScriptedAgent(lambda cid: [LineTooLong("a message line longer than 1024 bytes")],
                          done=False)
    session = AgentSession(agent, tier="scripted", line_limit=1024,
                           settings="c.ScriptedBackend")
    session.wait_ready(5)
    result, sink = _run(session)
    assert agent.killed.is_set()
    assert result.error.ename == "ChannelLimitError"
    assert "c.ScriptedBackend.line_limit" in result.error.evalue
    assert "variables are gone" in result.error.evalue
    assert len(sink.errors) == 1 and not session.alive


def test_error_messages_count_against_the_output_limit():
    error = {"type": "error", "ename": "E", "evalue": "e" * 1000, "traceback": ["t" * 1000]}
    agent = ScriptedAgent(lambda cid: [{**error, "id": cid}] * 200)
    session = AgentSession(agent, tier="scripted", output_limit=20_000,
                           settings="c.ScriptedBackend")
    session.wait_ready(5)
    result, sink = _run(session)
    assert agent.interrupted.is_set()
    assert result.error.ename == "OutputLimitError"
    assert "c.ScriptedBackend.output_limit" in result.error.evalue
    published = sum(len(evalue) for _, evalue in sink.errors)
    assert len(sink.errors) < 15 and published < 25_000, len(sink.errors)


def test_rich_output_is_counted_with_its_metadata():
    display = {"type": "display", "data": {"text/plain": "x"}, "metadata": {"m": "m" * 5000}}
    agent = ScriptedAgent(lambda cid: [{**display, "id": cid}] * 20)
    session = AgentSession(agent, tier="scripted", output_limit=20_000)
    session.wait_ready(5)
    result, _ = _run(session)
    assert result.error.ename == "OutputLimitError"


def test_a_flood_of_forged_messages_of_any_type_is_capped():
    forged = [{"type": "bogus"}, {"type": "procs", "count": 1, "last_pid": 1},
              {"type": "protocol_error", "detail": "x"}, {"type": "stream", "text": ""}]
    agent = ScriptedAgent(lambda cid: [{**forged[i % 4], "id": cid} for i in range(5000)]
                          + [{"type": "stream", "id": cid, "name": "stdout", "text": "late\n"}])
    session = AgentSession(agent, tier="scripted", message_limit=1000,
                           settings="c.ScriptedBackend")
    session.wait_ready(5)
    result, sink = _run(session)
    assert agent.interrupted.is_set()
    assert result.error.ename == "ChannelLimitError"
    assert "more than 1,000 messages" in result.error.evalue
    assert "c.ScriptedBackend.message_limit" in result.error.evalue
    assert "late\n" not in sink.texts  # nothing past the limit is forwarded


def test_messages_between_cells_past_the_limit_kill_the_agent():
    agent = ScriptedAgent(lambda cid: [])
    session = AgentSession(agent, tier="scripted", message_limit=100)
    session.wait_ready(5)
    for _ in range(150):
        agent.lines.put(b'{"type": "bogus"}\n')
    assert _wait_for(agent.killed.is_set)


def _console(cid: Any, seq: int, message: str) -> dict[str, Any]:
    return {"type": "helper", "id": cid, "seq": seq,
            "request": {"helper": "console", "args": {"level": "log", "message": message}}}


def test_raw_console_calls_count_against_the_output_limit():
    agent = ScriptedAgent(lambda cid: [_console(cid, i, "c" * 1000) for i in range(50)])
    logged: list[Any] = []
    session = AgentSession(agent, tier="scripted", output_limit=10_000)
    session.wait_ready(5)
    result, _ = _run(session, helpers=lambda r: logged.append(r) or {"ok": True, "value": None})
    assert result.error.ename == "OutputLimitError"
    assert len(logged) <= 10
    assert _wait_for(lambda: len(agent.answers()) == 50)
    refused = [a for a in agent.answers() if not a["ok"]]
    assert refused and "output limit" in refused[0]["error"]["message"]


def test_helper_calls_per_cell_are_capped():
    agent = ScriptedAgent(lambda cid: [_console(cid, i, "x") for i in range(8)])
    session = AgentSession(agent, tier="scripted", helper_limit=5, helper_concurrency=100,
                           settings="c.ScriptedBackend")
    session.wait_ready(5)
    calls: list[Any] = []
    _run(session, helpers=lambda r: calls.append(r) or {"ok": True, "value": None})
    assert _wait_for(lambda: len(agent.answers()) == 8)
    assert len(calls) == 5
    refused = [a["error"] for a in agent.answers() if not a["ok"]]
    assert len(refused) == 3 and refused[0]["type"] == "PermissionError"
    assert "more than 5 ai/api/db/console calls" in refused[0]["message"]
    assert "c.ScriptedBackend.helper_limit" in refused[0]["message"]


def test_concurrent_helper_calls_are_bounded_not_each_a_thread():
    release = threading.Event()
    running: list[int] = []
    peak = [0]
    lock = threading.Lock()

    def slow(request: Any) -> dict[str, Any]:
        with lock:
            running.append(1)
            peak[0] = max(peak[0], len(running))
        release.wait(5)
        with lock:
            running.pop()
        return {"ok": True, "value": None}

    agent = ScriptedAgent(lambda cid: [_console(cid, i, "x") for i in range(40)], done=False)
    session = AgentSession(agent, tier="scripted", helper_concurrency=3)
    session.wait_ready(5)
    threads_before = threading.active_count()
    worker = threading.Thread(target=_run, args=(session, slow), daemon=True)
    worker.start()
    assert _wait_for(lambda: len(agent.answers()) == 37)
    assert threading.active_count() - threads_before <= 3 + 2  # the calls, the cell, refusals
    refused = [a["error"] for a in agent.answers()]
    assert all("more than 3 ai/api/db/console calls of this cell at once" in e["message"]
               for e in refused)
    release.set()
    assert _wait_for(lambda: len(agent.answers()) == 40)
    assert peak[0] == 3
    agent.lines.put(b'{"type": "bogus"}\n')
    session.interrupt()
    agent.kill()
    worker.join(5)


class Route:
    """A cell's helper route that records calls and refusals (as base.HelperRoute audits)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.refused: list[tuple[Any, str]] = []

    def __call__(self, request: Any) -> dict[str, Any]:
        self.calls.append(request)
        return {"ok": True, "value": None}

    def refuse(self, request: Any, reason: str) -> dict[str, Any]:
        self.refused.append((request, reason))
        return {"ok": False, "error": {"type": "PermissionError", "message": reason}}


def test_a_helper_call_of_an_earlier_cell_is_refused_and_blamed_on_that_cell():
    cells: list[str] = []

    def script(cid: str) -> list[Any]:
        cells.append(cid)
        if len(cells) == 1:
            return []
        # During the second cell: a call tagged with the first cell (its background thread),
        # one with no cell at all, and the second cell's own.
        return [_console(cells[0], 1, "late"), _console(None, 2, "anon"),
                _console(cid, 3, "mine")]

    agent = ScriptedAgent(script)
    session = AgentSession(agent, tier="scripted")
    session.wait_ready(5)
    first, second = Route(), Route()
    _run(session, helpers=first)
    _run(session, helpers=second)
    assert _wait_for(lambda: len(agent.answers()) == 3)
    assert [c["args"]["message"] for c in second.calls] == ["mine"]
    assert [r[0]["args"]["message"] for r in first.refused] == ["late"]
    assert "background work of an earlier cell gets no helper access" in first.refused[0][1]
    by_seq = {m["seq"]: m["response"] for m in agent.sent if m.get("type") == "helper_result"}
    assert by_seq[3]["ok"] and not by_seq[1]["ok"] and not by_seq[2]["ok"]
    assert by_seq[2]["error"]["type"] == "PermissionError"


def test_the_line_limit_is_above_every_legitimate_message():
    assert line_limit_for(16 << 20) > 2 * (16 << 20)
    assert line_limit_for(1 << 20) >= 32 << 20


def test_a_deeply_nested_message_is_dropped_and_the_cell_still_ends():
    """json.loads raises RecursionError (not ValueError) on deep nesting: a forged line of
    brackets must not end the reader thread, which would leave the cell waiting forever."""
    agent = ScriptedAgent(lambda cid: [b"[" * 100_000 + b"\n", b'{"a": ' * 100_000 + b"\n",
                                       {"type": "stream", "id": cid, "name": "stdout",
                                        "text": "after\n"}])
    session = AgentSession(agent, tier="scripted")
    session.wait_ready(5)
    result, sink = _run(session, timeout=5)
    assert result.success, result.error
    assert sink.texts == ["after\n"]
    assert session.alive


def test_refused_calls_of_an_earlier_cell_are_audited_only_up_to_the_helper_limit():
    """Each refusal of an earlier cell's call is an audit row: a flood of them (forged, or a
    thread left behind in a loop) is counted like any helper call, and past the limit refused
    without writing anything, during a cell and between cells alike."""
    cells: list[str] = []

    def script(cid: str) -> list[Any]:
        cells.append(cid)
        if len(cells) == 1:
            return []
        return [_console(cells[0], i, "late") for i in range(300)]

    agent = ScriptedAgent(script)
    session = AgentSession(agent, tier="scripted", helper_limit=50)
    session.wait_ready(5)
    first, second = Route(), Route()
    _run(session, helpers=first)
    _run(session, helpers=second)
    # (Refusals waiting to be sent past 256 are dropped: not all 300 need be answered.)
    assert _wait_for(lambda: agent.lines.empty() and len(agent.answers()) >= 256)
    assert len(first.refused) == 50 and not second.calls
    assert all(not a["ok"] for a in agent.answers())
    for i in range(300):  # between cells: no cell runs, the same bound
        agent.lines.put((json.dumps(_console(cells[0], i, "idle")) + "\n").encode())
    assert _wait_for(lambda: sum(1 for m in agent.sent if m.get("type") == "helper") == 0
                     and agent.lines.empty())
    time.sleep(0.2)
    assert len(first.refused) <= 100


class UnreadAgent(ScriptedAgent):
    """An agent that never reads its answers: the host's writes of them block (a full pipe)."""

    def __init__(self, script: Any) -> None:
        super().__init__(script, done=False)
        self.unblock = threading.Event()
        self.blocked = 0

    def send(self, data: bytes) -> None:
        if b'"helper_result"' in data:
            self.blocked += 1
            self.unblock.wait(10)
            self.blocked -= 1
        super().send(data)


def test_answers_the_agent_never_reads_hold_their_helper_slot():
    """A cell that sends helper requests and never reads the answers: each answer waiting to be
    written holds a host thread (and the answer), so it still counts as a call running."""
    agent = UnreadAgent(lambda cid: [_console(cid, i, "x") for i in range(40)])
    session = AgentSession(agent, tier="scripted", helper_concurrency=3)
    session.wait_ready(5)
    threads_before = threading.active_count()
    worker = threading.Thread(target=_run, args=(session, lambda r: {"ok": True, "value": 1}),
                              daemon=True)
    worker.start()
    assert _wait_for(lambda: agent.lines.empty(), 5)
    time.sleep(0.5)
    assert threading.active_count() - threads_before <= 3 + 2, threading.active_count()
    agent.unblock.set()
    session.interrupt()
    agent.kill()
    worker.join(5)


def test_lines_of_no_cell_count_against_the_running_cells_output_limit():
    """Lines the host does not forward (no cell id, another cell's, answers nobody asked for)
    are still bytes the guest made the kernel read and decode: counted as the cell's output."""
    pad = "x" * 1000
    agent = ScriptedAgent(lambda cid: [{"type": "bogus", "pad": pad}, {"id": "other", "pad": pad},
                                       {"type": "packed", "seq": 99, "pad": pad}] * 20)
    session = AgentSession(agent, tier="scripted", output_limit=20_000,
                           settings="c.ScriptedBackend")
    session.wait_ready(5)
    result, _ = _run(session)
    assert result.error is not None and result.error.ename == "OutputLimitError"
    assert "c.ScriptedBackend.output_limit" in result.error.evalue


def test_unasked_bytes_between_cells_past_the_line_limit_kill_the_agent():
    """Between cells nothing legitimate talks unasked: past one line limit's worth of bytes
    (each line under it) the agent is killed, as past the message limit."""
    agent = ScriptedAgent(lambda cid: [])
    session = AgentSession(agent, tier="scripted", line_limit=10_000)
    session.wait_ready(5)
    _run(session)
    for _ in range(30):
        agent.lines.put(b'{"type": "bogus", "pad": "' + b"x" * 1000 + b'"}\n')
    assert _wait_for(agent.killed.is_set)
