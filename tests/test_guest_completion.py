"""Tab completion and inspection (Shift-Tab, ``obj?``) of cells that run outside the kernel.

A cell that runs in ``process``, ``wasm`` or ``sandbox`` (by its ``%%tier`` line or the
default set with ``%tier NAME``) completes from that tier's namespace, not the kernel's; the
guest's answer is capped on the host, a late one is dropped, and the tier's next cell is never
affected. Through a real kernel, per tier; the session's side against a scripted agent.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kernel_session import KernelSession
from tests.test_agent_session import ScriptedAgent, _run
from tests.tier_support import need_tier
from tierkernel.backends.agent.session import AgentSession
from tierkernel.kernel.completion import guest_request

#: Generous, so that a loaded machine's first answer (IPython made in the guest) is not lost;
#: the "answers at once" cases are measured against it.
TIMEOUT = 10.0


@pytest.fixture(scope="module", params=["process", "wasm", "sandbox", "sandbox-runsc"])
def tk(request: pytest.FixtureRequest) -> Iterator[tuple[KernelSession, str]]:
    """A kernel and the tier its completions are tested in (that tier started by a cell);
    ``sandbox-runsc``: the sandbox tier under gVisor."""
    tier, _, runtime = request.param.partition("-")
    need_tier(f"{tier} --runtime {runtime}" if runtime else tier)
    args = [f"--TierKernel.completion_timeout={TIMEOUT}"]
    if runtime:
        args.append(f"--SandboxBackend.runtime={runtime}")
    session = KernelSession(extra_arguments=args)
    try:
        out = session.run(f"%%tier {tier}\nonly_here_xyz = 41\n"
                          "class Thing:\n    only_attr_qq = 1\nthing = Thing()\n"
                          "def guest_fn(a, b=2):\n    '''Guest docstring 123.'''\n    return a\n")
        assert out.status == "ok", out.outputs
        assert session.run("native_only_abc = 1").status == "ok"
        yield session, tier
    finally:
        session.close()


def complete(kernel: KernelSession, code: str, cursor: int | None = None) -> dict[str, Any]:
    reply = kernel.kc.complete(code, cursor, reply=True, timeout=3 * TIMEOUT)
    content: dict[str, Any] = reply["content"]
    assert content["status"] == "ok", content
    return content


def applied(code: str, reply: dict[str, Any], cursor: int | None = None) -> set[str]:
    """The cell's text once each match is taken (what the user would see)."""
    end = len(code) if cursor is None else cursor
    assert reply["cursor_end"] <= end or reply["matches"] == []
    return {code[:reply["cursor_start"]] + m + code[reply["cursor_end"]:]
            for m in reply["matches"]}


def inspect(kernel: KernelSession, code: str, cursor: int | None = None) -> dict[str, Any]:
    reply = kernel.kc.inspect(code, cursor, reply=True, timeout=3 * TIMEOUT)
    content: dict[str, Any] = reply["content"]
    assert content["status"] == "ok", content
    return content


# -- through a kernel, per tier --------------------------------------------------------------
def test_a_name_of_the_tier_completes_and_a_native_one_does_not(tk: tuple[KernelSession, str]):
    kernel, tier = tk
    code = f"%%tier {tier}\nonly_h"
    assert f"%%tier {tier}\nonly_here_xyz" in applied(code, complete(kernel, code))
    code = f"%%tier {tier}\nnative_only_a"
    assert complete(kernel, code)["matches"] == []
    assert complete(kernel, "%%tier nosuch\nnative_only_a")["matches"] == []
    # The kernel's own cells keep the kernel's own names.
    assert complete(kernel, "native_only_a")["matches"] == ["native_only_abc"]
    assert complete(kernel, "only_here_x")["matches"] == []


def test_attributes_of_a_tier_object_complete(tk: tuple[KernelSession, str]):
    kernel, tier = tk
    code = f"%%tier {tier}\nx = thing.only_at"
    assert f"%%tier {tier}\nx = thing.only_attr_qq" in applied(code, complete(kernel, code))
    # The cursor in the middle of a cell: the rest of the cell is kept.
    code = f"%%tier {tier}\nx = thing.only_at\nprint(x)\n"
    cursor = code.index("only_at") + len("only_at")
    assert (f"%%tier {tier}\nx = thing.only_attr_qq\nprint(x)\n"
            in applied(code, complete(kernel, code, cursor), cursor))


def test_inspection_shows_the_docstring_of_a_tier_function(tk: tuple[KernelSession, str]):
    kernel, tier = tk
    for code, cursor in ((f"%%tier {tier}\nguest_fn", None),
                         (f"%%tier {tier}\ny = guest_fn(1, ", None),
                         (f"%%tier {tier}\nguest_fn(3)", len(f"%%tier {tier}\nguest_f"))):
        reply = inspect(kernel, code, cursor)
        assert reply["found"] is True, (code, reply)
        assert "Guest docstring 123." in reply["data"]["text/plain"]
    assert inspect(kernel, "guest_fn")["found"] is False  # not a name of the kernel's
    assert inspect(kernel, f"%%tier {tier}\nno_such_name_here")["found"] is False


def test_the_default_tier_completes_from_its_namespace(tk: tuple[KernelSession, str]):
    kernel, tier = tk
    assert kernel.run(f"%tier {tier}").status == "ok"
    try:
        assert "only_here_xyz" in applied("only_h", complete(kernel, "only_h"))
        assert complete(kernel, "native_only_a")["matches"] == []
        assert "Guest docstring 123." in inspect(kernel, "guest_fn")["data"]["text/plain"]
        # A cell marked native still completes from the kernel.
        code = "%%tier native\nnative_only_a"
        assert "%%tier native\nnative_only_abc" in applied(code, complete(kernel, code))
    finally:
        assert kernel.run("%tier native").status == "ok"


def test_the_tier_line_itself_completes_as_before(tk: tuple[KernelSession, str]):
    kernel, tier = tk
    code = f"%%tier {tier}\nonly_h"
    # The cursor on the magic line: IPython's magic names, as in any cell.
    assert "%%time" in complete(kernel, code, 4)["matches"]
    assert complete(kernel, code, 4) == complete(kernel, "%%ti", 4)


def test_a_hostile_answer_is_capped_and_the_next_cell_works(tk: tuple[KernelSession, str]):
    kernel, tier = tk
    t = f"%%tier {tier}\n"
    agent = "__tierkernel_agent__"
    try:
        # A million matches (about 9 MB): over the reply cap, dropped unread: no matches.
        out = kernel.run(t + f"{agent}.answer_query = lambda msg: {{'type': 'completed', "
                         "'seq': msg['seq'], 'cursor_start': 0, 'cursor_end': 0, "
                         "'matches': ['m%d' % i for i in range(10**6)]}")
        assert out.status == "ok", out.outputs
        assert complete(kernel, t + "only_h")["matches"] == []
        assert kernel.run(t + "only_here_xyz + 1").result["text/plain"] == "42"
        # 60,000 short ones fit the byte cap: only the first 1000 (completion_limit) are kept.
        kernel.run(t + f"{agent}.answer_query = lambda msg: {{'type': 'completed', "
                   "'seq': msg['seq'], 'cursor_start': 0, 'cursor_end': 0, "
                   "'matches': ['m%d' % i for i in range(60000)]}")
        matches = complete(kernel, t + "only_h")["matches"]
        assert matches == [f"m{i}" for i in range(1000)]
        # Megabytes of help: dropped, not found; and junk is no answer either.
        kernel.run(t + f"{agent}.answer_query = lambda msg: {{'type': 'inspected', "
                   "'seq': msg['seq'], 'found': True, 'data': {'text/plain': 'x' * (5 << 20)}}")
        assert inspect(kernel, t + "guest_fn")["found"] is False
        assert kernel.run(t + "only_here_xyz + 1").result["text/plain"] == "42"
        kernel.run(t + f"{agent}.answer_query = lambda msg: {{'type': 'completed', "
                   "'seq': msg['seq'], 'cursor_start': -5, 'cursor_end': 10**9, "
                   "'matches': 'not a list'}")
        assert complete(kernel, t + "only_h")["matches"] == []
        # An answer that raises: the agent lives on.
        kernel.run(t + f"{agent}.answer_query = lambda msg: 1 / 0")
        assert complete(kernel, t + "only_h")["matches"] == []
        assert kernel.run(t + "only_here_xyz + 1").result["text/plain"] == "42"
    finally:
        kernel.run(t + f"del {agent}.answer_query")
    assert "only_here_xyz" in str(complete(kernel, t + "only_h")["matches"])


def test_an_object_with_a_huge_dir_still_completes(tk: tuple[KernelSession, str]):
    """60,000 attribute names (1.6 MB of matches, over the host's 1 MiB reply cap): the guest
    sends the first ones only, so the user gets matches rather than none."""
    kernel, tier = tk
    t = f"%%tier {tier}\n"
    out = kernel.run(t + "class Big:\n    def __dir__(self):\n"
                     "        return ['a_rather_long_attribute_%d' % i for i in range(60000)]\n"
                     "big = Big()")
    assert out.status == "ok", out.outputs
    matches = complete(kernel, t + "big.a")["matches"]
    assert 0 < len(matches) <= 1000
    assert all("a_rather_long_attribute_" in m for m in matches)


def test_completing_changes_nothing_the_next_cell_sees(tk: tuple[KernelSession, str]):
    """Answering (with IPython, where the tier has it) leaves the cell's namespace, display()
    and exit() as they were."""
    kernel, tier = tk
    t = f"%%tier {tier}\n"
    # Every cell adds its own _N/_iN history names (as IPython does): those are left out.
    names = t + "import re\nsorted(n for n in globals() if not re.fullmatch(r'_i?\\d+', n))"
    before = kernel.run(names).result["text/plain"]
    assert "only_here_xyz" in str(complete(kernel, t + "only_h")["matches"])
    assert inspect(kernel, t + "guest_fn")["found"] is True
    assert kernel.run(names).result["text/plain"] == before
    out = kernel.run(t + "class H:\n    def _repr_html_(self): return '<b>h</b>'\n"
                     "display(H())")
    assert [o.content["data"].get("text/html") for o in out.of_type("display_data")] \
        == ["<b>h</b>"]


def test_completion_while_a_tier_cell_runs_keeps_the_cell_intact(
        tk: tuple[KernelSession, str]):
    kernel, tier = tk
    t = f"%%tier {tier}\n"
    msg_id = kernel.kc.execute(t + "import time\ntime.sleep(1.5)\nprint('slept')")
    reply = complete(kernel, t + "only_h")
    assert reply["matches"] in ([], ["only_here_xyz"])  # asked after the cell, or not at all
    while True:
        msg = kernel.kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            assert msg["content"]["text"] == "slept\n"
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    assert kernel.run(t + "only_here_xyz").result["text/plain"] == "41"


@pytest.mark.parametrize("tier", ["process", "wasm", "sandbox"])
def test_a_tier_not_started_answers_nothing_at_once_and_a_late_answer_is_dropped(tier: str):
    need_tier(tier)
    timeout = 3.0
    kernel = KernelSession(extra_arguments=[
        f"--TierKernel.completion_timeout={timeout}", "--WasmBackend.warm_start=False",
        "--SandboxBackend.warm_start=False"])
    t = f"%%tier {tier}\n"
    agent = "__tierkernel_agent__"
    try:
        started = time.monotonic()
        assert complete(kernel, t + "zi")["matches"] == []
        assert inspect(kernel, t + "zip")["found"] is False
        # Without waiting for the tier: the answer came well before the timeout.
        assert time.monotonic() - started < timeout / 2
        out = kernel.run(t + "'only_here_xyz' in globals()")
        assert out.result["text/plain"] == "False"  # the first cell of a fresh interpreter
        assert _eventually(lambda: "zip" in complete(kernel, t + "zi")["matches"])

        # A completer slower than the timeout: no answer; its late answer is dropped, and
        # the next cell's output is its own.
        kernel.run(t + "import time as _t\n_orig = type(" + agent + ").answer_query\n"
                   f"{agent}.answer_query = lambda msg: (_t.sleep({timeout + 1}), "
                   f"_orig({agent}, msg))[1]\nonly_here_xyz = 41")
        assert complete(kernel, t + "only_h")["matches"] == []
        out = kernel.run(t + "print('own output'); only_here_xyz")
        assert out.status == "ok", out.outputs
        assert out.stdout == "own output\n"
        assert out.result["text/plain"] == "41"
        kernel.run(t + f"del {agent}.answer_query")
        assert complete(kernel, t + "only_h")["matches"][-1:] in (["only_here_xyz"],
                                                                  [".only_here_xyz"])
    finally:
        kernel.close()


def _eventually(predicate: Any, within: float = 60.0) -> bool:
    """Whether ``predicate`` holds within ``within`` s (a user pressing Tab again while the
    tier's interpreter makes its completer the first time)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# -- the cell window and the session's side ----------------------------------------------------
class _Router:
    def __init__(self, default: str = "native") -> None:
        from tierkernel.backends.native import NativeBackend
        from tierkernel.backends.process.backend import ProcessBackend

        native, process = NativeBackend(), ProcessBackend()
        native.name, process.name = "native", "process"
        self.backends = {"native": native, "process": process}
        self.default = default


def test_the_tier_line_is_taken_off_and_the_cursor_moved():
    router: Any = _Router()
    code = "\n%%tier process --timeout 5\nx = 1\nab"
    request = guest_request(router, code, len(code))
    assert request is not None and request.backend is not None
    assert request.backend.name == "process"
    assert request.code == "x = 1\nab" and request.cursor == len("x = 1\nab")
    assert code[request.offset:] == request.code
    assert guest_request(router, code, 5) is None  # on the magic line
    assert guest_request(router, "ab", 2) is None  # native
    assert guest_request(router, "%%tier native\nab", 16) is None
    assert guest_request(router, "%tier process\nab", 16) is None  # a control cell
    assert guest_request(router, "%%tier 'process\nab", 17) is None  # unreadable line
    request = guest_request(router, "%%tier nosuch\nab", 16)  # no such tier: nobody asked
    assert request is not None and request.backend is None
    router.default = "process"
    request = guest_request(router, "ab", None)
    assert request is not None and (request.code, request.cursor, request.offset) == ("ab", 2, 0)


def test_a_huge_cell_sends_only_a_window_around_the_cursor():
    router: Any = _Router("process")
    code = ("y = 2\n" * 100_000) + "x = only_h" + ("\nz = 3" * 100_000)
    cursor = code.index("only_h") + 6
    request = guest_request(router, code, cursor)
    assert request is not None
    assert len(request.code) < 10_000
    assert request.code.endswith("x = only_h") and request.code.startswith("y = 2\n")
    assert code[request.offset:request.offset + request.cursor] .endswith("x = only_h")


class _QueryAgent(ScriptedAgent):
    """A scripted agent that answers queries with ``answer(msg)`` lines after ``delay`` s."""

    def __init__(self, answer: Any, delay: float = 0.0) -> None:
        super().__init__(lambda cell_id: [{"type": "stream", "id": cell_id, "name": "stdout",
                                           "text": "cell\n"}])
        self.answer = answer
        self.delay = delay
        self.pending: queue.Queue[Any] = queue.Queue()

    def send(self, data: bytes) -> None:
        for raw in data.splitlines():
            msg = json.loads(raw)
            if msg.get("type") in ("complete", "inspect"):
                self.sent.append(msg)
                lines = self.answer(msg)
                if self.delay:
                    threading.Timer(self.delay, lambda ls=lines: [self.lines.put(x)
                                                                  for x in ls]).start()
                else:
                    for line in lines:
                        self.lines.put(line)
            else:
                super().send(raw + b"\n")


def _answer(msg: dict[str, Any], matches: Any) -> bytes:
    return (json.dumps({"type": "completed", "seq": msg["seq"], "matches": matches,
                        "cursor_start": 0, "cursor_end": 2}) + "\n").encode()


def test_a_late_answer_is_dropped_and_the_next_query_and_cell_are_their_own():
    agent = _QueryAgent(lambda msg: [_answer(msg, [f"late{msg['seq']}"])], delay=0.5)
    session = AgentSession(agent, tier="scripted")
    session.wait_ready(5)
    assert session.query({"type": "complete", "code": "ab", "cursor_pos": 2}, "completed",
                         0.1) is None
    # Still busy with the first: the second is not even sent.
    assert session.query({"type": "complete"}, "completed", 0.1) is None
    assert len(agent.sent) == 1
    time.sleep(0.8)  # the late answer came: it matched no waiting query
    agent.delay = 0.0
    answer = session.query({"type": "complete"}, "completed", 2)
    assert answer is not None and answer["matches"] == [f"late{answer['seq']}"]
    result, sink = _run(session)
    assert result.success and sink.texts == ["cell\n"] and sink.errors == []


def test_an_answer_past_the_reply_cap_is_not_decoded_and_the_agent_lives():
    agent = _QueryAgent(lambda msg: [_answer(msg, ["x" * 1000] * 3000)])
    session = AgentSession(agent, tier="scripted", query_reply_limit=1 << 20)
    session.wait_ready(5)
    assert session.query({"type": "complete"}, "completed", 2) is None
    assert session.alive and not agent.killed.is_set()
    agent.answer = lambda msg: [_answer(msg, ["ab"])]
    answer = session.query({"type": "complete"}, "completed", 2)
    assert answer is not None and answer["matches"] == ["ab"]


def test_answers_of_the_wrong_kind_or_seq_are_not_taken():
    agent = _QueryAgent(lambda msg: [
        (json.dumps({"type": "inspected", "seq": msg["seq"], "found": True}) + "\n").encode(),
        _answer({"seq": msg["seq"] + 7}, ["forged"]),
        _answer(msg, ["real"])])
    session = AgentSession(agent, tier="scripted")
    session.wait_ready(5)
    answer = session.query({"type": "complete"}, "completed", 2)
    assert answer is not None and answer["matches"] == ["real"]


def test_a_guest_answer_is_checked_field_by_field():
    from tierkernel.backends.agent.queries import completion_from, inspection_from

    good = {"matches": ["ab", 3, "", "x" * 5000, "abc", "abd"], "cursor_start": 0,
            "cursor_end": 2, "metadata": {"huge": "y" * 100}}
    answer = completion_from(good, 2, limit=2)
    assert answer is not None
    assert (answer.matches, answer.cursor_start, answer.cursor_end, answer.metadata) \
        == (["ab", "abc"], 0, 2, {})
    for bad in ({**good, "cursor_end": 3}, {**good, "cursor_start": -1},
                {**good, "cursor_start": True}, {**good, "matches": "ab"}, {}):
        assert completion_from(bad, 2, limit=10) is None
    found = inspection_from({"found": True, "data": {"text/plain": "doc", "text/html": 5,
                                                     "nomime": "x", "text/x": ["a"]}})
    assert found is not None and found.data == {"text/plain": "doc"}
    for bad in ({"found": "yes", "data": {"text/plain": "doc"}}, {"found": True, "data": []},
                {"found": True, "data": {"text/html": 1}}, None):
        assert inspection_from(bad) is None
