"""``input()``/``getpass()`` in the process, wasm and sandbox tiers go through Jupyter's stdin
channel as in a native cell, and tracebacks show the user's frames only.

A real kernel and a client that allows stdin answer the kernel's ``input_request`` on the
stdin channel (``KernelSession.run(on_input=...)``), as JupyterLab does.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kernel_session import KernelSession
from tests.tier_support import need_tier
from tierkernel.backends.agent.session import AgentSession
from tierkernel.backends.base import CellRequest

NO_STDIN = "raw_input was called, but this frontend does not support input requests."
TIERS = ["process", "wasm", "sandbox"]


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelSession]:
    """One kernel for every tier (sandbox cells under runc, the default runtime)."""
    session = KernelSession()
    yield session
    session.close()


@pytest.fixture(params=TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    need_tier(request.param)
    return str(request.param)


def cell(tier: str, code: str, options: str = "") -> str:
    return f"%%tier {tier}{options}\n{code}"


def plain(traceback: list[str]) -> str:
    """A traceback as the user reads it (IPython's colours removed)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(traceback))


# -- input() and getpass() ------------------------------------------------------------------
def test_input_returns_what_the_user_typed(kernel: KernelSession, tier: str):
    out = kernel.run(cell(tier, "print('before')\nname = input('Your name: ')\n"
                                "print('hello', name)\nname"), on_input=lambda asked: "Ada")
    assert out.status == "ok", out.outputs
    assert out.inputs == [{"prompt": "Your name: ", "password": False}]
    assert out.stdout == "before\nhello Ada\n"
    assert out.result["text/plain"] == "'Ada'"


def test_getpass_asks_with_password_true(kernel: KernelSession, tier: str):
    out = kernel.run(cell(tier, "import getpass\nfrom getpass import getpass as gp\n"
                                "getpass.getpass('Token: '), gp()"),
                     on_input=lambda asked: "s3cret" if asked["prompt"] else "two")
    assert out.status == "ok", out.outputs
    assert out.inputs == [{"prompt": "Token: ", "password": True},
                          {"prompt": "", "password": True}]
    assert out.result["text/plain"] == "('s3cret', 'two')"


def test_sys_stdin_readline_asks_for_a_line(kernel: KernelSession, tier: str):
    out = kernel.run(cell(tier, "import sys\nsys.stdin.readline()"),
                     on_input=lambda asked: "a line")
    assert out.status == "ok", out.outputs
    assert out.inputs == [{"prompt": "", "password": False}]
    assert out.result["text/plain"] == "'a line\\n'"


def test_reading_sys_stdin_to_its_end_stops_at_an_empty_answer(kernel: KernelSession,
                                                               tier: str):
    answers = iter(["3 4", "5", ""])
    out = kernel.run(cell(tier, "import sys\nlines = [line.split() for line in sys.stdin]\n"
                                "lines, sys.stdin.read()"),
                     on_input=lambda asked: next(answers, ""))
    assert out.status == "ok", out.outputs
    assert len(out.inputs) == 4
    assert out.result["text/plain"] == "([['3', '4'], ['5']], '')"
    # Without a client that takes input, stdin is empty, as in a native cell.
    quiet = kernel.run(cell(tier, "import sys\nsys.stdin.readline(), sys.stdin.read()"),
                       allow_stdin=False)
    assert quiet.result["text/plain"] == "('', '')"


def test_a_client_without_stdin_gets_ipykernels_error(kernel: KernelSession, tier: str):
    out = kernel.run(cell(tier, "input('Your name: ')"), allow_stdin=False)
    assert out.status == "error"
    assert out.error["ename"] == "StdinNotImplementedError"
    assert out.error["evalue"] == NO_STDIN
    assert out.error["traceback"][-1] == f"StdinNotImplementedError: {NO_STDIN}"
    assert out.inputs == []
    # The same error as native's, whose class it is in IPython.
    native = kernel.run("%%tier native\ninput('x')", allow_stdin=False)
    assert native.error["ename"] == out.error["ename"]


def test_a_huge_prompt_is_cut_at_the_limit(kernel: KernelSession, tier: str):
    out = kernel.run(cell(tier, "input('A' * 5_000_000)"), on_input=lambda asked: "ok")
    assert out.status == "ok", out.outputs
    [asked] = out.inputs
    assert len(asked["prompt"]) < 16_384 + 200
    assert asked["prompt"].startswith("A" * 16_384)
    assert asked["prompt"].rstrip().endswith("input_prompt_limit]")
    settings = {"process": "ProcessBackend", "wasm": "WasmBackend", "sandbox": "SandboxBackend"}
    assert f"c.{settings[tier]}.input_prompt_limit" in asked["prompt"]


def test_an_answer_past_the_limit_is_an_error_not_a_cut(kernel: KernelSession, tier: str):
    out = kernel.run(cell(tier, "kept = 1\ns = input('paste: ')"),
                     on_input=lambda asked: "x" * ((1 << 20) + 1))
    assert out.status == "error"
    assert out.error["ename"] == "ValueError"
    assert "input_reply_limit" in out.error["evalue"]
    assert "1,048,577 characters" in out.error["evalue"]
    after = kernel.run(cell(tier, "kept"))
    assert after.result["text/plain"] == "1"


def test_an_interrupt_while_waiting_ends_the_cell_and_keeps_the_state(kernel: KernelSession,
                                                                      tier: str):
    kernel.run(cell(tier, "state = 41"))

    def press_stop(asked: dict[str, Any]) -> None:
        kernel.km.interrupt_kernel()  # the user clicks stop instead of answering

    out = kernel.run(cell(tier, "state += 1\ninput('never answered: ')"), on_input=press_stop,
                     timeout=30)
    assert out.status == "error"
    assert out.error["ename"] == "KeyboardInterrupt"
    assert out.error["evalue"] == "Interrupted by user"
    assert "input('never answered: ')" in plain(out.error["traceback"])
    # The same interpreter goes on, and no stray interrupt reaches the next cells.
    for _ in range(2):
        after = kernel.run(cell(tier, "import time\ntime.sleep(0.5)\nstate"))
        assert after.status == "ok", after.outputs
        assert after.result["text/plain"] == "42"
    answered = kernel.run(cell(tier, "input('again: ')"), on_input=lambda asked: "yes")
    assert answered.result["text/plain"] == "'yes'"


def test_a_late_answer_to_a_stopped_input_is_not_the_next_ones(kernel: KernelSession,
                                                                tier: str):
    def press_stop(asked: dict[str, Any]) -> None:
        kernel.km.interrupt_kernel()

    stopped = kernel.run(cell(tier, "input('first: ')"), on_input=press_stop)
    assert stopped.error["ename"] == "KeyboardInterrupt"
    given_up = kernel.last_input_request

    def answer_both(asked: dict[str, Any]) -> str:
        # The user's answer to the first prompt arrives only now, after the second was asked.
        late = kernel.kc.session.msg("input_reply", {"value": "late"}, parent=given_up)
        kernel.kc.stdin_channel.send(late)
        time.sleep(0.3)
        return "fresh"

    out = kernel.run(cell(tier, "input('second: ')"), on_input=answer_both)
    assert out.status == "ok", out.outputs
    assert out.result["text/plain"] == "'fresh'"


def test_time_spent_waiting_for_the_user_is_not_the_cells(kernel: KernelSession, tier: str):
    def slow_user(asked: dict[str, Any]) -> str:
        time.sleep(2.5)
        return "late"

    out = kernel.run(cell(tier, "input('take your time: ')", " --timeout 2"),
                     on_input=slow_user)
    assert out.status == "ok", out.outputs
    assert out.result["text/plain"] == "'late'"
    # The cell's own time still counts.
    over = kernel.run(cell(tier, "import time\ninput('x')\ntime.sleep(5)", " --timeout 2"),
                      on_input=lambda asked: "x")
    assert over.status == "error"
    assert over.error["ename"] == "TimeoutError"


@pytest.mark.parametrize("guest", ["process", "sandbox"])
def test_one_input_at_a_time_per_cell_and_none_for_other_cells(kernel: KernelSession,
                                                               guest: str):
    need_tier(guest)
    # A cell that writes protocol lines itself: the second request while the first waits is
    # refused by the host at once, and one tagged with another cell's id is never asked.
    code = (
        "import json\n"
        "a = __tierkernel_agent__\n"
        "def ask(seq, cell):\n"
        "    a.channel.send({'type': 'input_request', 'id': cell, 'seq': seq,\n"
        "                    'prompt': f'p{seq}', 'password': False})\n"
        "with a._host_lock:\n"
        "    ask(-1, a.cell_id)\n"
        "    ask(-2, a.cell_id)\n"
        "    ask(-3, 'an-earlier-cell')\n"
        "    replies = {}\n"
        "    while len(replies) < 3:\n"
        "        msg = json.loads(a.requests.readline())\n"
        "        if msg.get('type') == 'input_reply':\n"
        "            replies[msg['seq']] = msg.get('value') or msg['error']['message']\n"
        "sorted(replies.items())"
    )
    out = kernel.run(cell(guest, code), on_input=lambda asked: "answer")
    assert out.status == "ok", out.outputs
    assert out.inputs == [{"prompt": "p-1", "password": False}]
    result = out.result["text/plain"]
    assert "(-1, 'answer')" in result
    assert "already waiting for the user in this cell; one input at a time" in result
    assert "input() can only be called while its cell runs" in result


@pytest.mark.parametrize("guest", ["process", "sandbox"])
def test_a_thread_left_by_an_earlier_cell_cannot_ask(kernel: KernelSession, guest: str):
    need_tier(guest)
    kernel.run(cell(guest, "import threading\ngo = threading.Event()\nseen = []\n"
                           "def late():\n    go.wait()\n    try:\n        input('sneaky: ')\n"
                           "    except Exception as exc:\n        seen.append(repr(exc))\n"
                           "t = threading.Thread(target=late)\nt.start()"))
    out = kernel.run(cell(guest, "go.set()\nt.join(10)\nseen"), on_input=lambda asked: "no")
    assert out.status == "ok", out.outputs
    assert out.inputs == []
    assert "can only be called while its cell runs" in out.result["text/plain"]


def test_the_wasm_tool_refuses_another_cells_request(kernel: KernelSession):
    need_tier("wasm")
    out = kernel.run(cell("wasm", "__tierkernel_agent__.channel.tools.tk_input(request={\n"
                                  "    'id': 'an-earlier-cell', 'prompt': 'p', "
                                  "'password': False})"),
                     on_input=lambda asked: "no")
    assert out.status == "ok", out.outputs
    assert out.inputs == []
    assert "can only be called while its cell runs" in out.result["text/plain"]


# -- tracebacks show the user's frames only ---------------------------------------------------
OWN_FILES = ("agent.py", "helpers.py", "native.py", "<tierkernel", "wasm_agent", "<string>")


def frames_outside_the_cell(shown: str) -> list[str]:
    """The files of the frames a traceback shows that are not the cell's: Python's format
    (``File "name", line N``, the guests') and IPython's (``File /path:N``, native's)."""
    files = re.findall(r'File "([^"]+)", line \d+', shown)
    files += re.findall(r"File (\S+?):\d+", shown)
    return [name for name in files if not name.startswith("<cell In[")]


@pytest.mark.parametrize("where", ["native", *TIERS])
def test_a_helper_error_shows_the_users_line_and_the_error(kernel: KernelSession, where: str):
    if where != "native":
        need_tier(where)
    out = kernel.run(cell(where, "def fetch():\n    return api('http://example.invalid/x')\n"
                                 "fetch()"))
    assert out.status == "error"
    shown = plain(out.error["traceback"])
    assert out.error["ename"] in ("PermissionError", "ConnectionError"), shown
    assert "return api('http://example.invalid/x')" in shown
    assert "fetch()" in shown
    for own in OWN_FILES:
        assert own not in shown, shown
    assert frames_outside_the_cell(shown) == [], shown
    assert shown.rstrip().endswith(out.error["evalue"])


@pytest.mark.parametrize("where", ["native", "process", "sandbox"])
def test_a_timeout_shows_the_users_line_and_the_limit(kernel: KernelSession, where: str):
    if where != "native":
        need_tier(where)
    out = kernel.run(cell(where, "import time\ndef wait():\n    time.sleep(10)\nwait()",
                          " --timeout 1"))
    assert out.status == "error"
    shown = plain(out.error["traceback"])
    assert "time.sleep(10)" in shown
    assert "wait()" in shown
    for own in OWN_FILES:
        assert own not in shown, shown
    assert frames_outside_the_cell(shown) == [], shown
    assert "--timeout SECONDS" in shown.splitlines()[-1]


def test_the_clients_end_of_input_is_eof(kernel: KernelSession, tier: str):
    # ipykernel reads an answer of "\x04" as EOF; so do the other tiers.
    out = kernel.run(cell(tier, "try:\n    input('x')\nexcept EOFError:\n    print('eof')"),
                     on_input=lambda asked: "\x04")
    assert out.status == "ok", out.outputs
    assert out.stdout == "eof\n"


# -- the host side, against a scripted agent --------------------------------------------------
class ScriptedAgent:
    """An agent transport whose lines the test writes; records what the session sends."""

    def __init__(self) -> None:
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.lines.put(b'{"type": "ready", "pid": 1, "python": "3"}\n')
        self.sent: queue.Queue[dict[str, Any]] = queue.Queue()

    def send(self, data: bytes) -> None:
        for line in data.splitlines():
            self.sent.put(json.loads(line))

    def readline(self, limit: int) -> bytes:
        return self.lines.get()

    def interrupt(self) -> None:
        pass

    def kill(self) -> None:
        self.lines.put(b"")

    def exit_detail(self) -> str:
        return "gone"

    def say(self, msg: dict[str, Any]) -> None:
        self.lines.put((json.dumps(msg) + "\n").encode())

    def replies(self, kind: str, wait: float = 0.5) -> list[dict[str, Any]]:
        found, deadline = [], time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                msg = self.sent.get(timeout=0.05)
            except queue.Empty:
                continue
            if msg.get("type") == kind:
                found.append(msg)
        return found


class AskingSink:
    """A sink whose user answers after ``delay`` seconds, counting the questions."""

    def __init__(self, delay: float = 0.0) -> None:
        self.asked: list[str] = []
        self.delay = delay

    def input(self, prompt: str, password: bool, cancel: threading.Event) -> str:
        self.asked.append(prompt)
        cancel.wait(self.delay)
        return "typed"

    def stream(self, name: str, text: str) -> None:
        pass

    def display(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        pass

    def result(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        pass

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        pass

    def clear_output(self, wait: bool = False) -> None:
        pass


def _start_cell(session: AgentSession, sink: AskingSink) -> tuple[threading.Thread, str]:
    request = CellRequest(code="x", body="x", tier="scripted", options={}, execution_count=1)
    runner = threading.Thread(target=session.run, args=(request, sink, None))
    runner.start()
    deadline = time.monotonic() + 5
    while session._cell is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session._cell is not None
    return runner, session._cell.id


def test_input_requests_outside_the_running_cell_ask_nobody():
    agent = ScriptedAgent()
    session = AgentSession(agent, tier="scripted")
    session.wait_ready(5)
    agent.say({"type": "input_request", "id": "old", "seq": 1, "prompt": "p",
               "password": False})
    assert agent.replies("input_reply") == []  # between cells: no answer, nobody waits
    sink = AskingSink()
    runner, cell_id = _start_cell(session, sink)
    agent.say({"type": "input_request", "id": "old", "seq": 2, "prompt": "p",
               "password": False})
    [refused] = agent.replies("input_reply")
    agent.say({"type": "done", "id": cell_id, "success": True})
    runner.join(5)
    assert sink.asked == []
    assert refused["seq"] == 2
    assert "only be called while its cell runs" in refused["error"]["message"]


def test_a_flood_of_input_requests_asks_the_user_once():
    agent = ScriptedAgent()
    session = AgentSession(agent, tier="scripted")
    session.wait_ready(5)
    sink = AskingSink(delay=1.0)
    runner, cell_id = _start_cell(session, sink)
    for seq in range(1000):
        agent.say({"type": "input_request", "id": cell_id, "seq": seq, "prompt": "p",
                   "password": False})
    replies = agent.replies("input_reply", wait=2.0)
    agent.say({"type": "done", "id": cell_id, "success": True})
    runner.join(5)
    assert sink.asked == ["p"]
    answered = [r for r in replies if "value" in r]
    assert [r["seq"] for r in answered] == [0]
    refused = [r for r in replies if "error" in r]
    # Refusals go out from one thread, at most 256 waiting: never a thread or a reply each.
    assert 0 < len(refused) <= 999
    assert all("one input at a time" in r["error"]["message"] for r in refused)
