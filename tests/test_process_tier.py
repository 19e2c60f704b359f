"""The process tier: the guest agent in a child process, through the backend contract."""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import signal
import time

from tests.kernel_session import KernelSession

P = "%%tier process\n"


def test_state_persists_between_cells(kernel: KernelSession):
    kernel.run(P + "import math\ndef area(r):\n    return math.pi * r * r\ncount = 1")
    out = kernel.run(P + "count += 1\nround(area(2), 3), count")
    assert out.result["text/plain"] == "(12.566, 2)"


def test_runs_in_another_process_than_the_kernel(kernel: KernelSession):
    native = kernel.run("import os\nos.getpid()").result["text/plain"]
    child = kernel.run(P + "import os\nos.getpid()").result["text/plain"]
    assert native != child


def test_output_streams_while_the_cell_runs(kernel: KernelSession):
    out = kernel.run(P + "import time\nfor i in range(4):\n    print('line', i)\n"
                         "    time.sleep(0.3)")
    lines = [o for o in out.of_type("stream") if o.content["text"].startswith("line")]
    assert [o.content["text"] for o in lines] == [f"line {i}\n" for i in range(4)]
    gaps = [b.at - a.at for a, b in itertools.pairwise(lines)]
    # Each line arrives about when it was printed, not all at the end.
    assert all(0.15 < gap < 0.6 for gap in gaps), gaps


def test_partial_lines_stream_too(kernel: KernelSession):
    out = kernel.run(P + "import sys, time\nfor i in range(3):\n    print('.', end='')\n"
                         "    time.sleep(0.4)\nprint('done')")
    dots = [o for o in out.of_type("stream") if o.content["text"].startswith(".")]
    assert len(dots) >= 2, out.outputs
    assert dots[1].at - dots[0].at > 0.2  # each dot arrived on its own, not at the end
    assert out.stdout == "...done\n"


def test_rich_results_and_display(kernel: KernelSession):
    out = kernel.run(P + "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    data = out.result
    assert "<table" in data["text/html"] and "text/plain" in data
    shown = kernel.run(P + "class Md:\n    def _repr_markdown_(self):\n        return '**hi**'\n"
                           "display(Md(), Md())\nprint('after')")
    kinds = [o.msg_type for o in shown.outputs]
    assert kinds == ["display_data", "display_data", "stream"]
    assert shown.outputs[0].content["data"]["text/markdown"] == "**hi**"


def test_matplotlib_figures_arrive_as_png(kernel: KernelSession):
    out = kernel.run(P + "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')")
    pngs = [o.content["data"]["image/png"] for o in out.of_type("display_data")]
    assert len(pngs) == 1
    raw = base64.b64decode(pngs[0])
    assert raw.startswith(b"\x89PNG\r\n\x1a\n") and len(raw) > 1000
    shown = kernel.run(P + "plt.figure(); plt.bar([1, 2], [3, 4]); plt.show(); print('next')")
    assert [o.msg_type for o in shown.outputs][:2] == ["display_data", "stream"]
    assert "UserWarning" not in shown.stderr


def test_errors_show_the_users_traceback_and_keep_state(kernel: KernelSession):
    kernel.run(P + "kept = 'yes'")
    out = kernel.run(P + "def f():\n    return 1 / 0\n\nf()")
    assert out.status == "error" and out.reply["ename"] == "ZeroDivisionError"
    text = "\n".join(out.error["traceback"])
    assert 'line 5, in <module>' in text and "line 3, in f" in text
    assert "agent.py" not in text
    syntax = kernel.run(P + "x = (\n")
    assert syntax.error["ename"] == "SyntaxError"
    assert kernel.run(P + "kept").result["text/plain"] == "'yes'"


def test_shell_lines_and_fd_level_output(kernel: KernelSession):
    out = kernel.run(P + "!echo from-shell\nimport os\nos.write(1, b'raw fd\\n')\n"
                         "print('python')\n!echo err-line >&2")
    assert "from-shell\n" in out.stdout and "raw fd\n" in out.stdout and "python\n" in out.stdout
    assert "err-line" in out.stderr
    assert out.of_type("execute_result") == []


def test_stdin_is_empty_not_the_protocol(kernel: KernelSession):
    # A client that takes no input: stdin reads as empty (a client that does is asked, see
    # test_guest_stdin.py), and never as the agent's protocol.
    out = kernel.run(P + "import sys\nrepr(sys.stdin.read())", allow_stdin=False)
    assert out.result["text/plain"] == "\"''\""


def test_timeout_stops_the_cell_and_keeps_state(kernel: KernelSession):
    kernel.run(P + "survivor = 7")
    out = kernel.run("%%tier process --timeout 0.5\nimport time\ntime.sleep(10)")
    assert out.status == "error"
    assert out.error["ename"] == "TimeoutError"
    assert "0.5 s limit" in out.error["evalue"] and "--timeout" in out.error["evalue"]
    # The traceback still shows where the cell was.
    assert any("time.sleep(10)" in line for line in out.error["traceback"])
    assert kernel.run(P + "survivor").result["text/plain"] == "7"


def test_interrupt_keeps_state(kernel: KernelSession):
    kernel.run(P + "before_interrupt = 'kept'")
    start = time.monotonic()
    out = kernel.run(P + "import time\nwhile True:\n    time.sleep(0.05)", interrupt_after=0.8)
    assert time.monotonic() - start < 5
    assert out.error["ename"] == "KeyboardInterrupt"
    assert kernel.run(P + "before_interrupt").result["text/plain"] == "'kept'"


def test_cell_ignoring_interrupts_is_killed_and_user_told(fresh_kernel: KernelSession):
    fresh_kernel.run(P + "lost_var = 1")
    code = P + ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                "while True:\n    time.sleep(0.05)")
    start = time.monotonic()
    out = fresh_kernel.run(code, interrupt_after=0.5)
    assert time.monotonic() - start < 10  # grace period is 3 s
    assert out.error["ename"] == "KeyboardInterrupt"
    assert "variables are gone" in out.error["evalue"]
    assert "did not stop within 3 s of being interrupted" in out.error["evalue"]
    after = fresh_kernel.run(P + "'lost_var' in globals()")
    assert after.result["text/plain"] == "False"


def test_agent_death_is_reported_and_recovered(kernel: KernelSession):
    out = kernel.run(P + "import os\nos._exit(3)")
    assert out.error["ename"] == "TierSessionLost"
    assert "exited with status 3" in out.error["evalue"]
    assert "next process cell starts a fresh interpreter" in out.error["evalue"]
    crash = kernel.run(P + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert "killed by signal SIGKILL" in crash.error["evalue"]
    assert kernel.run(P + "'recovered'").result["text/plain"] == "'recovered'"


def test_output_cap(kernel: KernelSession):
    out = kernel.run(P + "import sys\nwhile True:\n    sys.stdout.write('x' * 65536 + '\\n')",
                     timeout=120)
    assert out.error["ename"] == "OutputLimitError"
    assert "16 MiB output limit" in out.error["evalue"]
    streamed = sum(len(o.content["text"]) for o in out.of_type("stream"))
    assert streamed <= 16 * 1024 * 1024
    assert kernel.run(P + "'fine'").result["text/plain"] == "'fine'"


def process_gone(pid: int, within: float = 10.0) -> bool:
    """Whether ``pid`` exits within ``within`` seconds (a zombie awaiting its reaper counts as
    gone: an orphan is reaped by whatever PID 1 the machine has)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_shutdown_stops_the_agent():
    session = KernelSession()
    try:
        pid = int(session.run(P + "import os\nos.getpid()").result["text/plain"])
    finally:
        session.close()
    assert process_gone(pid), f"agent {pid} still alive after kernel shutdown"


def test_agent_exits_when_kernel_is_killed():
    session = KernelSession()
    try:
        pid = int(session.run(P + "import os\nos.getpid()").result["text/plain"])
        kernel_pid = int(session.run("import os\nos.getpid()").result["text/plain"])
        os.kill(kernel_pid, signal.SIGKILL)
        assert process_gone(pid), f"agent {pid} outlived its SIGKILLed kernel"
    finally:
        session.kc.stop_channels()
        session.km.shutdown_kernel(now=True)


# A cell whose processes leave the agent's session: `setsid sleep` (a new session, by exec)
# and a double fork with os.setsid() (the grandchild of a session leader that exits, so an
# orphan; a fork, not an exec, so it even holds the agent's protocol pipes). It prints their
# pids once both have left the agent's session.
ESCAPE = P + """\
import os, subprocess, time
escaped = True
def session(pid):
    with open(f'/proc/{pid}/stat') as f:
        return int(f.read().rsplit(')', 1)[1].split()[3])
sleeper = subprocess.Popen(['setsid', 'sleep', '1000'])
r, w = os.pipe()
middle = os.fork()
if middle == 0:
    try:
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            time.sleep(1000)
    finally:
        os._exit(0)
os.close(w)
os.waitpid(middle, 0)
forked = int(os.read(r, 32))
for _ in range(500):
    if session(sleeper.pid) == sleeper.pid and session(forked) != session(os.getpid()):
        break
    time.sleep(0.01)
print('escaped', sleeper.pid, forked, flush=True)
"""


def escaped_pids(out_text: str) -> list[int]:
    """The two pids an ESCAPE cell printed."""
    line = next(line for line in out_text.splitlines() if line.startswith("escaped "))
    return [int(word) for word in line.split()[1:]]


def proc_state(pid: int) -> tuple[str, int] | None:
    """``pid``'s state letter and parent pid from /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def reaped(pid: int, within: float = 5.0) -> bool:
    """Whether ``pid`` is gone from /proc within ``within`` seconds: dead and reaped (a zombie
    is not gone: nobody waited for it)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc_state(pid) is None:
            return True
        time.sleep(0.05)
    return False


def zombies_of(parent: int) -> list[int]:
    """The unreaped dead children of ``parent``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            state = proc_state(int(name))
            if state is not None and state == ("Z", parent):
                found.append(int(name))
    return found


def kill_leftovers(pids: list[int]) -> None:
    """Whatever a failed test left running goes (it would otherwise sleep for 1000 s)."""
    for pid in pids:
        state = proc_state(pid)
        if state is not None and state[0] != "Z":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def escape(kernel: KernelSession) -> list[int]:
    """Run ESCAPE; the pids of its two processes, both running, in sessions of their own."""
    agent = int(kernel.run(P + "import os\nos.getpid()").result["text/plain"])
    out = kernel.run(ESCAPE)
    assert out.status == "ok", out.outputs
    pids = escaped_pids(out.stdout)
    for pid in pids:
        state = proc_state(pid)
        assert state is not None and state[0] in "SR", (pid, state)
        with open(f"/proc/{pid}/stat") as stat:
            sid = int(stat.read().rsplit(")", 1)[1].split()[3])
        with open(f"/proc/{agent}/stat") as stat:
            assert sid != int(stat.read().rsplit(")", 1)[1].split()[3])
    return pids


def test_a_lost_agent_takes_every_process_of_its_cells(fresh_kernel: KernelSession):
    kernel_pid = int(fresh_kernel.run("import os\nos.getpid()").result["text/plain"])
    pids = escape(fresh_kernel)
    try:
        lost = fresh_kernel.run(P + "import os\nos._exit(1)")
        assert lost.error["ename"] == "TierSessionLost"
        assert "exited with status 1" in lost.error["evalue"]
        for pid in pids:
            assert reaped(pid), f"{pid} {proc_state(pid)} outlived its lost interpreter"
        after = fresh_kernel.run(P + "'escaped' in globals()")
        assert after.result["text/plain"] == "False"
        assert zombies_of(kernel_pid) == []
    finally:
        kill_leftovers(pids)


def test_a_killed_agent_takes_every_process_of_its_cells(fresh_kernel: KernelSession):
    pids = escape(fresh_kernel)
    try:
        code = P + ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                    "while True:\n    time.sleep(0.05)")
        out = fresh_kernel.run(code, interrupt_after=0.5)
        assert out.error["ename"] == "KeyboardInterrupt"
        assert "did not stop within 3 s of being interrupted" in out.error["evalue"]
        for pid in pids:
            assert reaped(pid), f"{pid} {proc_state(pid)} outlived its killed interpreter"
        after = fresh_kernel.run(P + "'escaped' in globals()")
        assert after.result["text/plain"] == "False"
    finally:
        kill_leftovers(pids)


def test_shutdown_takes_every_process_of_the_cells():
    session = KernelSession()
    pids: list[int] = []
    try:
        pids = escape(session)
    finally:
        session.close()
    try:
        for pid in pids:
            assert reaped(pid), f"{pid} {proc_state(pid)} outlived the kernel's shutdown"
    finally:
        kill_leftovers(pids)


def test_a_killed_kernel_takes_every_process_of_the_cells():
    session = KernelSession()
    pids: list[int] = []
    try:
        pids = escape(session)
        kernel_pid = int(session.run("import os\nos.getpid()").result["text/plain"])
        os.kill(kernel_pid, signal.SIGKILL)
        for pid in pids:
            assert reaped(pid), f"{pid} {proc_state(pid)} outlived its SIGKILLed kernel"
    finally:
        kill_leftovers(pids)
        session.kc.stop_channels()
        session.km.shutdown_kernel(now=True)


def test_without_a_subreaper_the_agent_is_the_kernels_child(monkeypatch, caplog):
    """Where Linux's child subreaper is missing, the agent runs as before (the kernel's child,
    its process group killed with it), and the log says what that leaves out."""
    import asyncio

    from tierkernel.backends.process import backend as process

    monkeypatch.setattr(process, "subreaper_supported", lambda: False)
    backend = process.ProcessBackend()
    asyncio.run(backend.start())
    try:
        session = backend._session
        assert session is not None
        transport = session.transport
        assert isinstance(transport, process.ProcessTransport)
        assert transport.pid == transport.proc.pid  # no reaper in between
        assert "no child subreaper" in caplog.text
        with open(f"/proc/{transport.pid}/stat") as stat:
            assert stat.read().rsplit(")", 1)[1].split()[1] == str(os.getpid())
    finally:
        backend.shutdown()
    assert reaped(transport.pid)
