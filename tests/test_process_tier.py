"""The process tier: the guest agent in a child process, through the backend contract."""

from __future__ import annotations

import base64
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
    out = kernel.run(P + "import sys\nrepr(sys.stdin.read())")
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
