"""Issue 14, cases 7, 9 and 10: every channel from a guest agent to the kernel has a host-side
budget, and helper calls belong to the cell that made them.

Hostile cells in each agent tier (process, wasm, sandbox) write straight to their agent's
channel, past the guest's own helpers: an endless line, a flood of forged error messages and
of messages of any type, raw console calls, more helper calls than allowed, a thread left
behind that calls a helper under a later cell, processes left behind across an agent restart.
Each must end that cell only, with an error that names the limit, and the next cell works.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import sandbox_support
from tests.kernel_session import KernelSession
from tierkernel.backends.wasm import runtime as wasm_runtime

LIMITS = {"output_limit": "1m", "line_limit": "4m", "message_limit": "5000",
          "helper_limit": "200"}
BACKENDS = {"process": "ProcessBackend", "wasm": "WasmBackend", "sandbox": "SandboxBackend"}

#: How a hostile cell reaches its channel directly: emit(message), and raw_helper(request).
CHANNEL = {
    "agent": "import builtins, os, time\nA = builtins.__tierkernel_agent__\n"
             "def emit(m):\n    A.channel.send(m)\n"
             "def raw_helper(r):\n    return A.call_host(r)\n",
    "wasm": "import builtins, os, time\nfrom host import tools\n"
            "A = builtins.__tierkernel_agent__\n"
            "def emit(m):\n    tools.tk_emit(msg=m)\n"
            "def raw_helper(r):\n    return tools.tk_helper(request=r)\n",
}


def _tiers() -> list[str]:
    tiers = ["process"]
    if wasm_runtime.runtime_problem() is None and wasm_runtime.is_compiled():
        tiers.append("wasm")
    if sandbox_support.status()[0] or sandbox_support.required():
        tiers.append("sandbox")
    return tiers


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("channel-limits")


@pytest.fixture(scope="module", params=_tiers())
def tk(request: pytest.FixtureRequest, home: Path) -> Iterator[tuple[KernelSession, str]]:
    """A kernel with small channel limits on every agent tier, and the tier under test."""
    if request.param == "sandbox":
        sandbox_support.need_sandbox()
    options = [f"--{cls}.{name}={value}" for cls in BACKENDS.values()
               for name, value in LIMITS.items()]
    # The test's HTTP server is on loopback, which api() refuses unless allowed.
    options.append("--Runtime.api_allowed_networks=127.0.0.1/32")
    env = {**os.environ, "TIERKERNEL_AUDIT_LOG": str(home / "audit.sqlite3"),
           "TIERKERNEL_DB_PATH": str(home / "db.sqlite3")}
    session = KernelSession(extra_arguments=options, env=env)
    yield session, request.param
    session.close()


def _cell(tier: str, code: str, options: str = "") -> str:
    channel = CHANNEL["wasm" if tier == "wasm" else "agent"]
    return f"%%tier {tier}{options}\n{channel}{code}"


def _next_cell_works(session: KernelSession, tier: str) -> None:
    out = session.run(f"%%tier {tier}\n'next'")
    assert out.status == "ok", out.outputs
    assert out.result["text/plain"] == "'next'"


def _audit(home: Path, execution_id: str) -> list[tuple[str, int, int, str | None]]:
    with sqlite3.connect(home / "audit.sqlite3") as conn:
        return conn.execute("SELECT helper, allowed, ok, error FROM helper_calls WHERE "
                            "execution_id = ? ORDER BY rowid", (execution_id,)).fetchall()


def test_an_endless_line_ends_the_cell_and_never_grows_the_kernel(tk):
    """Case 7: a line with no end. The host holds at most the line limit of it (4 MiB here),
    then kills the agent, which is no longer to be trusted."""
    session, tier = tk
    if tier == "wasm":
        # The guest's channel is the runtime's tool protocol: one frame is at most 1 MiB (see
        # the next test), and a turn's frames at most the line limit, counted before they are
        # read: frames just under 1 MiB past it (requests for no helper: not output).
        code = ("for _ in range(8):\n    raw_helper({'helper': 'none', "
                "'pad': 'x' * 1000000})")
    else:
        code = ("chunk = b'x' * (1 << 20)\nfor _ in range(64):\n"
                "    os.write(A.channel._out.fileno(), chunk)\ntime.sleep(60)")
    out = session.run(_cell(tier, code, " --timeout 30"), timeout=90)
    assert out.status == "error"
    assert out.reply["ename"] == "ChannelLimitError", str(out.outputs)[-2000:]
    assert f"c.{BACKENDS[tier]}.line_limit" in out.reply["evalue"]
    if tier != "wasm":  # the runtime refused the frame unread: the session is intact
        assert "longer than 4 MiB" in out.reply["evalue"]
        assert "Its variables are gone" in out.reply["evalue"]
    _next_cell_works(session, tier)


def test_a_wasm_display_over_the_runtimes_message_cap_says_what_to_do(tk):
    """A wasm cell's rich output larger than the runtime's fixed 1 MiB cap on one message
    (a 3 MB PNG): the error says which cap, that no setting raises it, and what to do
    instead; it does not send the user to the line or message limits, which do not help."""
    session, tier = tk
    if tier != "wasm":
        pytest.skip("the runtime's per-message cap is the wasm tier's")
    out = session.run("%%tier wasm\nimport os\nclass P:\n    def _repr_png_(self):\n"
                      "        return b'\\x89PNG' + os.urandom(3 << 20)\nP()")
    assert out.reply["ename"] == "ChannelLimitError", str(out.outputs)[-2000:]
    assert "1 MiB" in out.reply["evalue"] and "fixed" in out.reply["evalue"]
    assert "sandbox tier" in out.reply["evalue"]
    assert "line_limit" not in out.reply["evalue"]
    _next_cell_works(session, tier)


def test_forged_error_messages_count_against_the_output_limit(tk):
    """Case 9: error messages are output like any other."""
    session, tier = tk
    code = ("for i in range(400):\n"
            "    emit({'type': 'error', 'id': A.cell_id, 'ename': 'Forged', "
            "'evalue': 'e' * 10000, 'traceback': []})\ntime.sleep(30)")
    out = session.run(_cell(tier, code, " --timeout 60"), timeout=90)
    assert out.reply["ename"] == "OutputLimitError", str(out.outputs)[-2000:]
    assert "1 MiB output limit" in out.reply["evalue"]
    forged = [o for o in out.of_type("error") if o.content["ename"] == "Forged"]
    assert len(forged) * 10_000 <= 1 << 20  # at most 1 MiB of 10 kB errors, not all 400
    _next_cell_works(session, tier)


def test_forged_lines_of_no_cell_count_against_the_output_limit(tk):
    """Case 9: lines the kernel reads but forwards nowhere (no cell id, answers nobody asked
    for) are counted as the cell's output: 2 MB of them pass the 1 MiB output limit."""
    session, tier = tk
    code = ("for i in range(100):\n"
            "    emit({'type': 'bogus', 'pad': 'p' * 10000})\n"
            "    emit({'type': 'packed', 'seq': 10**6, 'data': 'd' * 10000})\ntime.sleep(30)")
    out = session.run(_cell(tier, code, " --timeout 60"), timeout=90)
    assert out.reply["ename"] == "OutputLimitError", str(out.outputs)[-2000:]
    assert f"c.{BACKENDS[tier]}.output_limit" in out.reply["evalue"]
    _next_cell_works(session, tier)


def test_a_flood_of_forged_messages_of_any_type_is_capped(tk):
    """Case 9: messages of any type, unknown ones included, count against the cell's
    message limit (5,000 here)."""
    session, tier = tk
    code = ("kinds = ['bogus', 'procs', 'helper_result', 'stream']\n"
            "for i in range(20000):\n"
            "    emit({'type': kinds[i % 4], 'id': A.cell_id, 'name': 'stdout', 'text': ''})\n"
            "time.sleep(30)")
    out = session.run(_cell(tier, code, " --timeout 60"), timeout=120)
    assert out.error["ename"] == "ChannelLimitError", out.outputs
    assert f"c.{BACKENDS[tier]}.message_limit" in out.error["evalue"]
    _next_cell_works(session, tier)


def test_a_deeply_nested_message_does_not_stop_the_kernel_reading(tk):
    """Case 7: a forged line of 100,000 brackets (json.loads raises RecursionError on it) is
    dropped; the cell's later output and its end are still read."""
    session, tier = tk
    if tier == "wasm":
        pytest.skip("a wasm guest sends objects through the runtime's tools, not JSON lines")
    code = ("os.write(A.channel._out.fileno(), b'[' * 100000 + b'\\n')\n"
            "print('after')")
    out = session.run(_cell(tier, code, " --timeout 20"), timeout=60)
    assert out.status == "ok", str(out.outputs)[-2000:]
    assert out.stdout == "after\n"
    _next_cell_works(session, tier)


def test_raw_console_calls_count_against_the_output_limit(tk, home):
    """Case 9: console entries sent through the helper channel by hand (no print) are output
    too, and stop being recorded past the limit."""
    session, tier = tk
    code = ("for i in range(100):\n"
            "    raw_helper({'helper': 'console', 'args': {'level': 'log', "
            "'message': 'c' * 20000}})\ntime.sleep(30)")
    out = session.run(_cell(tier, code, " --timeout 60"), timeout=90)
    assert out.error["ename"] == "OutputLimitError", out.outputs
    recorded = [c for c in _audit(home, out.metadata["tierkernel"]["execution_id"])
                if c[0] == "console" and c[2]]
    assert 0 < len(recorded) <= 53  # 1 MiB of 20 kB entries, not all 100
    _next_cell_works(session, tier)


def test_helper_calls_past_the_limit_are_refused(tk):
    """Case 9: a cell's helper calls are capped (200 here), with an error naming the limit."""
    session, tier = tk
    out = session.run(f"%%tier {tier}\nfor i in range(250):\n    console.log(i)")
    assert out.error["ename"] == "PermissionError", out.outputs
    assert "more than 200 ai/api/db/console calls" in out.error["evalue"]
    assert f"c.{BACKENDS[tier]}.helper_limit" in out.error["evalue"]
    assert out.stdout.count("[LOG]") == 200
    _next_cell_works(session, tier)


def test_a_thread_left_by_a_cell_gets_no_helper_access_later(tk, home):
    """Case 10: a thread started by one cell calls console after that cell ended (between
    cells, then during the next cell, which allows api): refused both times, and the refusal
    made during the next cell is recorded under the cell that started the thread."""
    session, tier = tk
    if tier == "wasm":
        pytest.skip("a wasm guest has no threads: nothing of a cell runs after it ends")
    first = session.run(
        f"%%tier {tier}\nimport builtins, threading, time\n"
        "A = builtins.__tierkernel_agent__\nmine = A.cell_id\ngo = threading.Event()\n"
        "late = []\n"
        "def attempt(when):\n    try:\n        console.log(when)\n"
        "        late.append(when + ' ran')\n"
        "    except Exception as e:\n        late.append(f'{when} {type(e).__name__}: {e}')\n"
        "def later():\n    while A.cell_id == mine:\n        time.sleep(0.01)\n"
        "    attempt('between')\n    go.wait(30)\n    attempt('during')\n"
        "t = threading.Thread(target=later, daemon=True)\nt.start()")
    assert first.status == "ok", first.outputs
    time.sleep(1.0)  # the thread's first call is made between the cells (seen as such or not)
    second = session.run(f"%%tier {tier} --allow console,api --domains example.com\n"
                         "time.sleep(0.5)\ngo.set()\nt.join(30)\nlate")
    assert second.status == "ok", second.outputs
    late = eval(second.result["text/plain"])  # a list of str, as printed by repr
    assert len(late) == 2 and all("PermissionError" in entry for entry in late), late
    assert all("background work of an earlier cell gets no helper access" in entry
               for entry in late)
    assert _audit(home, second.metadata["tierkernel"]["execution_id"]) == []
    blamed = _audit(home, first.metadata["tierkernel"]["execution_id"])
    assert blamed and all(c[:3] == ("console", 0, 0) for c in blamed), blamed
    assert "background work of an earlier cell" in str(blamed[-1][3])


def test_refusals_of_an_earlier_cells_calls_are_recorded_only_up_to_the_helper_limit(tk, home):
    """Case 9: each call refused as an earlier cell's is an audit row of that cell; a flood of
    them is counted against the helper limit (200 here), past which nothing more is written."""
    session, tier = tk
    if tier == "wasm":
        pytest.skip("a wasm guest's helper calls are the running cell's: it cannot tag them")
    first = session.run(_cell(tier, "earlier = A.cell_id"))
    assert first.status == "ok", first.outputs
    flood = session.run(_cell(tier, "for i in range(1000):\n    emit({'type': 'helper', "
                              "'id': earlier, 'seq': None, 'request': {'helper': 'console', "
                              "'args': {'level': 'log', 'message': 'x'}}})\ntime.sleep(1)"))
    assert flood.status == "ok", flood.outputs
    blamed = _audit(home, first.metadata["tierkernel"]["execution_id"])
    assert 0 < len(blamed) <= 200, len(blamed)
    _next_cell_works(session, tier)


def test_processes_left_behind_do_not_outlive_an_agent_restart(tk):
    """Case 10: whatever a cell leaves running (a look-alike of the container's keeper
    included) is killed when the agent is restarted."""
    session, tier = tk
    if tier == "wasm":
        pytest.skip("a wasm guest has no processes")
    _leftovers_die_with_their_agent(session, f"%%tier {tier}\n")


def test_processes_left_behind_do_not_outlive_an_agent_restart_under_gvisor():
    """Case 10 under gVisor, whose container's keeper started the first agent itself."""
    sandbox_support.need_sandbox()
    if "runsc" not in sandbox_support.runtimes():
        pytest.skip(f"the engine has no runsc runtime (it has {sandbox_support.runtimes()})")
    session = KernelSession()
    try:
        _leftovers_die_with_their_agent(session, "%%tier sandbox --runtime runsc\n")
    finally:
        session.close()


def test_a_process_that_keeps_forking_does_not_outlive_an_agent_restart(tk):
    """Case 10: a process that forks a child and exits, over and over (a new pid each time,
    never the one the host saw a moment ago), is killed with its agent all the same."""
    session, tier = tk
    if tier == "wasm":
        pytest.skip("a wasm guest has no processes")
    head = f"%%tier {tier}\n"
    # (A fork refused by the pids limit, while the exited ones wait to be reaped, is retried.)
    churn = ("import os\nwhile True:\n    try:\n        if os.fork():\n            os._exit(0)\n"
             "    except OSError:\n        pass\n")
    # Named for this run only: a leftover of another run on the machine is not this one's.
    tag = f"tk-churn-{uuid.uuid4().hex}"
    # Eight of them, and sleepers for the host's listing to go through before it reaches them.
    # The sleepers first: once the churners run, exited ones waiting to be reaped can fill
    # the pids limit for a moment, and a sleeper's fork would be refused (seen in CI).
    started = session.run(f"{head}import subprocess, sys, time\n"
                          "sleepers = [subprocess.Popen(['sleep', '1000']) for _ in range(120)]\n"
                          "for _ in range(8):\n"
                          f"    subprocess.Popen([sys.executable, '-c', {churn!r}, {tag!r}])\n"
                          "time.sleep(0.5)")
    assert started.status == "ok", started.outputs
    lost = session.run(f"{head}import os\nos._exit(1)")
    assert lost.error["ename"] == "TierSessionLost", lost.outputs
    check = session.run(
        f"{head}import os, time\n"
        "def churning():\n    found = []\n    for p in os.listdir('/proc'):\n"
        "        try:\n            with open(f'/proc/{p}/cmdline', 'rb') as f:\n"
        f"                if {tag.encode()!r} in f.read():\n                    found.append(p)\n"
        "        except OSError:\n            pass\n    return found\n"
        "for _ in range(20):\n    if not churning():\n        break\n    time.sleep(0.1)\n"
        "churning()")
    assert check.status == "ok", check.outputs
    assert check.result["text/plain"] == "[]"
    _next_cell_works(session, tier)


def _leftovers_die_with_their_agent(session: KernelSession, head: str) -> None:
    started = session.run(
        f"{head}import subprocess, sys\n"
        "ps = [subprocess.Popen(['sleep', 'infinity']),\n"
        "      subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)', "
        "'tierkernel-keeper']),\n"
        "      subprocess.Popen(['sh', '-c', 'sleep 1000 & wait'])]\n"
        "[p.pid for p in ps]")
    assert started.status == "ok", started.outputs
    pids = started.result["text/plain"]
    lost = session.run(f"{head}import os\nos._exit(1)")
    assert lost.error["ename"] == "TierSessionLost", lost.outputs
    check = session.run(
        f"{head}import time\n"
        "def alive(pid):\n    try:\n        with open(f'/proc/{pid}/stat') as f:\n"
        "            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'\n"
        "    except OSError:\n        return False\n"
        f"for _ in range(50):\n    if not any(map(alive, {pids})):\n        break\n"
        f"    time.sleep(0.1)\n[alive(p) for p in {pids}]")
    assert check.status == "ok", check.outputs
    assert check.result["text/plain"] == "[False, False, False]"
    again = session.run(f"{head}'next'")
    assert again.result["text/plain"] == "'next'", again.outputs


def test_concurrent_helper_calls_are_bounded(tk, port):
    """Case 9: forged helper requests sent at once get at most helper_concurrency (4) host
    threads; the rest are refused at once, not queued and not each a thread."""
    session, tier = tk
    if tier == "wasm":
        pytest.skip("a wasm guest calls the host tool synchronously: one call at a time")
    code = (f"req = {{'helper': 'api', 'args': {{'url': 'http://127.0.0.1:{port}/slow'}}}}\n"
            "for i in range(20):\n"
            "    emit({'type': 'helper', 'id': A.cell_id, 'seq': 10_000 + i, 'request': req})\n"
            "import json\nanswers = []\n"
            "while len(answers) < 20:\n"
            "    msg = json.loads(A.requests.readline())\n"
            "    if msg.get('type') == 'helper_result' and msg['seq'] >= 10_000:\n"
            "        answers.append(msg['response'])\n"
            "[a['ok'] or a['error']['message'] for a in answers]")
    out = session.run(_cell(tier, code, " --allow api --domains 127.0.0.1 --timeout 60"),
                      timeout=90)
    assert out.status == "ok", out.outputs
    answers = eval(out.result["text/plain"])  # a list of True and str, as printed by repr
    assert answers.count(True) == 4, answers
    refused = [a for a in answers if a is not True]
    assert len(refused) == 16
    assert all("more than 4 ai/api/db/console calls of this cell at once" in a
               and f"c.{BACKENDS[tier]}.helper_concurrency" in a for a in refused)
    assert answers[:16] == refused  # refused at once, before any slow call was answered
