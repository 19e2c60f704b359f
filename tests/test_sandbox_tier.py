"""The sandbox tier: cells in a hardened Docker container, through the kernel, as a user sees them.

The main cases run once per runtime: runc, and runsc (gVisor) where the engine has it. Tests
that need the engine fail in CI when it is missing (see tests/sandbox_support.py).
"""

from __future__ import annotations

import base64
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests import sandbox_support as sb
from tests.kernel_session import KernelSession

S = "%%tier sandbox\n"


@pytest.fixture(scope="module", params=["runc", "runsc"])
def sk(request: pytest.FixtureRequest) -> Iterator[KernelSession]:
    """A kernel whose sandbox cells run under the parametrized runtime."""
    sb.need_sandbox()
    runtime = request.param
    if runtime not in sb.runtimes():
        pytest.skip(f"the engine has no {runtime} runtime (it has {sb.runtimes()}); "
                    "scripts/engine.sh registers runsc when it can install it")
    session = KernelSession()
    try:
        if runtime != "runc":
            # Session option: every sandbox cell of this kernel runs under gVisor.
            out = session.run(f"%tier sandbox --runtime {runtime}")
            assert out.status == "ok", out.outputs
            assert session.run("%tier native").status == "ok"  # only the option stays
        yield session
    finally:
        session.close()


@pytest.fixture(scope="module")
def engine() -> None:
    sb.need_sandbox()


def runtime_of(kernel: KernelSession) -> str:
    """The runtime the kernel's sandbox cells run under (gVisor reports its own kernel)."""
    dmesg = kernel.run(S + "import subprocess\n"
                           "subprocess.run(['dmesg'], capture_output=True, text=True).stdout")
    return "runsc" if "gVisor" in dmesg.result["text/plain"] else "runc"


# -- the main cases, per runtime ----------------------------------------------------------
def test_state_persists_in_one_container(sk: KernelSession):
    sk.run(S + "import os\ncounter = 1\ndef bump():\n    global counter\n    counter += 1")
    out = sk.run(S + "bump()\ncounter, os.getuid(), os.getcwd(), open('/etc/hostname').read()")
    assert out.status == "ok", out.outputs
    assert out.result["text/plain"] == "(2, 65534, '/workspace', 'sandbox\\n')"
    assert out.metadata["tierkernel"]["tier"] == "sandbox"
    # Not the kernel's process, nor a host process: another pid namespace.
    native_pid = int(sk.run("%%tier native\nimport os\nos.getpid()").result["text/plain"])
    inside_pid = int(sk.run(S + "os.getpid()").result["text/plain"])
    assert inside_pid != native_pid and inside_pid < 1000


def test_output_streams_while_the_cell_runs(sk: KernelSession):
    out = sk.run(S + "import time\nfor i in range(4):\n    print('line', i)\n    time.sleep(0.4)")
    lines = [o for o in out.of_type("stream") if o.content["text"].startswith("line")]
    assert [o.content["text"] for o in lines] == [f"line {i}\n" for i in range(4)]
    gaps = [b.at - a.at for a, b in itertools.pairwise(lines)]
    # Each line arrives about when it was printed (loose: the machine is shared and busy).
    assert all(0.15 < gap < 1.5 for gap in gaps), gaps
    assert lines[-1].at - lines[0].at > 0.8


def test_rich_output_dataframe_figure_display(sk: KernelSession):
    frame = sk.run(S + "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    assert "<table" in frame.result["text/html"] and "text/plain" in frame.result
    fig = sk.run(S + "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')")
    pngs = [o.content["data"]["image/png"] for o in fig.of_type("display_data")]
    assert len(pngs) == 1, fig.outputs
    raw = base64.b64decode(pngs[0])
    assert raw.startswith(b"\x89PNG\r\n\x1a\n") and len(raw) > 1000
    assert "Matplotlib" not in fig.stderr  # the prebuilt font cache, a writable config dir
    shown = sk.run(S + "class Md:\n    def _repr_markdown_(self):\n        return '**hi**'\n"
                       "display(Md())\nprint('after')")
    assert [o.msg_type for o in shown.outputs] == ["display_data", "stream"]
    assert shown.outputs[0].content["data"]["text/markdown"] == "**hi**"


def test_shell_lines_run_in_the_container(sk: KernelSession):
    out = sk.run(S + "!id -u\n!hostname\n!pwd")
    assert out.status == "ok", out.outputs
    assert out.stdout.split() == ["65534", "sandbox", "/workspace"]


def test_errors_show_the_users_traceback(sk: KernelSession):
    out = sk.run(S + "def f():\n    return 1 / 0\n\nf()")
    assert out.reply["ename"] == "ZeroDivisionError"
    text = "\n".join(out.error["traceback"])
    assert "line 5, in <module>" in text and "line 3, in f" in text and "agent" not in text


def test_interrupt_keeps_state(sk: KernelSession):
    sk.run(S + "kept = 'yes'")
    out = sk.run(S + "import time\nwhile True:\n    time.sleep(0.05)", interrupt_after=1.0)
    assert out.error["ename"] == "KeyboardInterrupt"
    assert sk.run(S + "kept").result["text/plain"] == "'yes'"


def test_timeout_keeps_state(sk: KernelSession):
    sk.run(S + "survivor = 7")
    out = sk.run("%%tier sandbox --timeout 1\nimport time\ntime.sleep(20)")
    assert out.error["ename"] == "TimeoutError"
    assert "1 s limit" in out.error["evalue"] and "--timeout" in out.error["evalue"]
    assert sk.run(S + "survivor").result["text/plain"] == "7"


def test_cell_ignoring_interrupt_is_killed_and_user_told(sk: KernelSession):
    sk.run(S + "lost_var = 1\nopen('/workspace/kept.txt', 'w').write('file')")
    sk.run(S + "pass")  # a cell that changes nothing comes before the one that is killed
    code = S + ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                "open('written_before_the_kill.txt', 'w').write('not lost')\n"
                "while True:\n    time.sleep(0.05)")
    start = time.monotonic()
    out = sk.run(code, interrupt_after=0.5, timeout=60)
    assert time.monotonic() - start < 30  # grace is 3 s
    assert out.error["ename"] == "KeyboardInterrupt"
    assert "variables are gone" in out.error["evalue"]
    after = sk.run(S + "'lost_var' in globals(), open('/workspace/kept.txt').read()")
    # A fresh interpreter in the same container: variables gone, files kept.
    assert after.result["text/plain"] == "(False, 'file')"
    # And what the killed cell wrote reaches fsx with the next cell, as any cell's writes.
    copied = sk.run("fs.read_file('/written_before_the_kill.txt')")
    assert copied.result["text/plain"] == "'not lost'", copied.outputs


def test_out_of_memory_names_the_limit(sk: KernelSession):
    out = sk.run(S + "hog = b'x' * (900 * 2**20)", timeout=120)
    assert out.status == "error"
    assert "512m memory limit" in out.error["evalue"], out.error
    assert "--memory" in out.error["evalue"]
    assert sk.run(S + "'alive'").result["text/plain"] == "'alive'"
    assert sk.run("%%tier native\n'kernel fine'").result["text/plain"] == "'kernel fine'"


def test_fork_bomb_is_contained(sk: KernelSession):
    out = sk.run(S + "import os\nwhile True:\n    os.fork()", timeout=120)
    assert out.status == "error"
    evalue = out.error["evalue"]
    if runtime_of(sk) == "runc":
        assert "256 processes (pids limit)" in evalue, out.error
    else:
        # Under gVisor, 60-odd copies of an interpreter with numpy loaded touch their
        # copy-on-write pages faster than they meet ulimit nproc: the memory limit ends it.
        assert "ulimit nproc" in evalue or "512m memory limit" in evalue, out.error
    assert sk.run(S + "!echo fine").stdout == "fine\n"
    assert sk.run("%%tier native\n'kernel fine'").result["text/plain"] == "'kernel fine'"


BOMB = """import os, time
while True:
    try:
        if os.fork() == 0:
            time.sleep(1)
            os._exit(0)
    except OSError:
        time.sleep(0.01)
"""


def test_fork_bomb_left_in_the_background_is_found_and_the_container_replaced(
        sk: KernelSession):
    sk.run(S + "before_bomb = 1")
    # The cell ends at once; the process behind it keeps the process limit full, retrying
    # each refused fork (a shell bomb may also die out by itself once its forks fail).
    out = sk.run(S + "import subprocess, sys, time\n"
                     f"subprocess.Popen([sys.executable, '-c', {BOMB!r}], "
                     "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                     "time.sleep(2)", timeout=120)
    assert out.status == "error", out.outputs
    assert out.error["ename"] == "ProcessLimitError", out.error
    limit = "256 processes (pids limit)" if runtime_of(sk) == "runc" else "ulimit nproc"
    assert limit in out.error["evalue"] and "container was removed" in out.error["evalue"]
    # A new container: the bomb is gone with the old one, and so are the variables.
    assert sk.run(S + "!echo fine").stdout == "fine\n"
    assert sk.run(S + "'before_bomb' in globals()").result["text/plain"] == "False"


# Fills the process limit, lets every process end at once, and fills it again: the count
# dips to nothing for a moment in every round, like a bomb whose processes die in a burst.
PULSE = """import os, time
while True:
    kids = []
    try:
        while True:
            pid = os.fork()
            if pid == 0:
                time.sleep(0.5)
                os._exit(0)
            kids.append(pid)
    except OSError:
        pass
    for pid in kids:
        os.waitpid(pid, 0)
    time.sleep(0.1)
"""


@pytest.fixture(params=["runc", "runsc"])
def own_kernel(request: pytest.FixtureRequest) -> Iterator[KernelSession]:
    """A kernel of its own, for a test that may leave its container full of processes when
    it fails (the module's kernel would pass that on to every later test)."""
    sb.need_sandbox()
    if request.param not in sb.runtimes():
        pytest.skip(f"the engine has no {request.param} runtime (it has {sb.runtimes()})")
    session = KernelSession(extra_arguments=[f"--SandboxBackend.runtime={request.param}"])
    try:
        yield session
    finally:
        session.close()


def test_a_bomb_that_dips_for_a_moment_is_not_taken_for_one_that_died(
        own_kernel: KernelSession):
    sk = own_kernel
    sk.run(S + "before_pulse = 1")
    # The cell forks until the pulse has the limit full; its processes come back at once.
    # Its children live a moment, so the cell keeps forking while the pulse fills the limit:
    # with one child at a time, the pulse could take every free slot first, round after
    # round (a fork costs 20 ms in gVisor), and the cell would run into its time limit
    # instead. They are all reaped before the cell ends: zombies would keep the count high.
    out = sk.run(S + "import os, subprocess, sys, time\n"
                     f"subprocess.Popen([sys.executable, '-c', {PULSE!r}], "
                     "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                     "kids = set()\n"
                     "try:\n"
                     "    while True:\n"
                     "        pid = os.fork()\n"
                     "        if pid == 0:\n"
                     "            time.sleep(0.2)\n"
                     "            os._exit(0)\n"
                     "        kids.add(pid)\n"
                     "        while done := os.waitpid(-1, os.WNOHANG)[0]:\n"
                     "            kids.discard(done)\n"
                     "finally:\n"
                     "    for pid in kids:\n"
                     "        os.waitpid(pid, 0)", timeout=120)
    assert out.status == "error", out.outputs
    assert out.error["ename"] == "ProcessLimitError", out.error
    assert "container was removed" in out.error["evalue"]
    assert sk.run(S + "'before_pulse' in globals()").result["text/plain"] == "False"
    assert sk.run(S + "!echo fine").stdout == "fine\n"


def test_a_pool_of_background_workers_is_not_taken_for_a_bomb(sk: KernelSession):
    # 36 long-lived processes: over half of gVisor's ulimit nproc (64), but steady.
    out = sk.run(S + "import subprocess\nworkers = [subprocess.Popen(['sleep', '60']) "
                     "for _ in range(36)]\nlen(workers)", timeout=60)
    assert out.status == "ok", out.outputs
    assert sk.run(S + "len(workers)").result["text/plain"] == "36"  # same container, state kept
    assert sk.run(S + "for w in workers: w.kill(); w.wait()").status == "ok"


def test_output_flood_stops_at_the_limit(sk: KernelSession):
    sk.run(S + "flood_state = 3")
    # 1 GiB of output, in 64 KiB writes.
    out = sk.run(S + "import sys\nfor _ in range(16384):\n    sys.stdout.write('x' * 65535 + "
                     "'\\n')", timeout=180)
    assert out.error["ename"] == "OutputLimitError"
    assert "16 MiB output limit" in out.error["evalue"]
    assert sum(len(o.content["text"]) for o in out.of_type("stream")) <= 16 * 2**20
    assert sk.run(S + "flood_state").result["text/plain"] == "3"


def test_network_is_denied(sk: KernelSession):
    # A server on the host's loopback: the container's loopback is its own, so it is not there.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        out = sk.run(S + f"""import os, socket
print(sorted(name for _, name in socket.if_nameindex()))
try:
    socket.create_connection(('127.0.0.1', {port}), timeout=3)
    print('host loopback reached')
except OSError as exc:
    print('loopback refused', type(exc).__name__)
try:
    socket.getaddrinfo('deb.debian.org', 80)
    print('dns works')
except OSError as exc:
    print('dns failed')
""")
    finally:
        server.close()
    lines = out.stdout.splitlines()
    assert lines[0] == "['lo']", out.outputs
    assert lines[1].startswith("loopback refused") and lines[2] == "dns failed"


def test_host_files_are_invisible(sk: KernelSession, tmp_path):
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host only")
    out = sk.run(S + f"""import os
print(os.path.exists({str(secret)!r}), os.path.exists({str(tmp_path)!r}))
try:
    open('/etc/shadow').read()
except PermissionError:
    print('shadow denied')
print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit())[0])
print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])
""")
    lines = out.stdout.splitlines()
    assert lines[0] == "False False", out.outputs
    assert lines[1] == "shadow denied"
    assert lines[2] == "1"  # its own pid namespace
    assert int(lines[3], 16) == 0  # no capabilities


def test_root_is_read_only_tmp_and_workspace_writable(sk: KernelSession):
    out = sk.run(S + """import os
for path in ('/etc/evil', '/usr/evil', '/evil', '/tmp/ok', '/workspace/ok'):
    try:
        with open(path, 'w') as f:
            f.write('x')
        print(path, 'written')
    except OSError as exc:
        print(path, 'refused', exc.errno in (13, 30))
""")
    assert out.stdout.splitlines() == [
        "/etc/evil refused True", "/usr/evil refused True", "/evil refused True",
        "/tmp/ok written", "/workspace/ok written"]


# -- options, lifecycle, availability (runc) ----------------------------------------------
@pytest.fixture(scope="module")
def kernel(engine: None) -> Iterator[KernelSession]:
    session = KernelSession()
    yield session
    session.close()


def test_memory_and_cpus_options_apply_and_keep_state(kernel: KernelSession):
    kernel.run(S + "kept_across_update = 5")
    out = kernel.run("%%tier sandbox --memory 1g --cpus 0.5\n"
                     "open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip(), "
                     "open('/sys/fs/cgroup/cpu/cpu.cfs_quota_us').read().strip(), "
                     "kept_across_update")
    assert out.result["text/plain"] == "('1073741824', '50000', 5)"
    back = kernel.run(S + "open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip()")
    assert back.result["text/plain"] == f"'{512 * 2**20}'"


def test_bad_options_are_clear_errors(kernel: KernelSession):
    out = kernel.run("%%tier sandbox --runtime no-such-runtime\n1")
    assert out.status == "error"
    assert "runtime 'no-such-runtime' is not registered" in out.error["evalue"]
    bad = kernel.run("%%tier sandbox --memory lots\n1")
    assert bad.error["ename"] == "TierUsageError" and "--memory" in bad.error["evalue"]
    assert kernel.run(S + "'still fine'").result["text/plain"] == "'still fine'"


def test_runtime_change_recreates_the_container_and_says_so(kernel: KernelSession):
    if "runsc" not in sb.runtimes():
        pytest.skip("the engine has no runsc runtime")
    kernel.run(S + "before_switch = 1")
    out = kernel.run("%%tier sandbox --runtime runsc\n'before_switch' in globals()")
    assert "started a new container" in out.stderr and "gone" in out.stderr
    assert out.result["text/plain"] == "False"
    kernel.run(S + "1")  # back to runc for the other tests


def test_tier_table_shows_the_sandbox(kernel: KernelSession):
    out = kernel.run("%tier")
    text = out.of_type("display_data")[0].content["data"]["text/plain"]
    row = next(line for line in text.splitlines() if line.strip().startswith("sandbox"))
    assert " yes " in row and "memory=512m" in row and "runtime=runc" in row


def kernel_pid(session: KernelSession) -> int:
    return int(session.run("import os\nos.getpid()").result["text/plain"])


def test_warm_start_shutdown_and_restart_remove_containers(engine: None):
    session = KernelSession()
    try:
        pid = kernel_pid(session)
        # Warm start: the container comes up with no sandbox cell run yet.
        assert sb.wait_for(lambda: len(sb.containers_of(pid)) == 1, 60), "no warm container"
        warm = sb.containers_of(pid)
        assert session.run(S + "1").status == "ok"
        assert sb.containers_of(pid) == warm  # the first cell used the warm container
        session.km.restart_kernel(now=False)
        session.kc.wait_for_ready(timeout=60)
        assert sb.wait_for(lambda: warm[0] not in sb.all_sandbox_containers(), 30)
        pid = kernel_pid(session)
        assert session.run(S + "2").status == "ok"
        assert len(sb.containers_of(pid)) == 1
    finally:
        session.close()
    assert sb.wait_for(lambda: sb.containers_of(pid) == [], 30)


def test_orphans_of_a_killed_kernel_are_reaped(engine: None):
    victim = KernelSession()
    try:
        pid = kernel_pid(victim)
        assert victim.run(S + "1").status == "ok"
        orphans = sb.containers_of(pid)
        assert len(orphans) == 1
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        assert sb.containers_of(pid) == orphans  # nobody cleaned up after a SIGKILL...
    finally:
        victim.kc.stop_channels()
        victim.km.shutdown_kernel(now=True)
    successor = KernelSession()
    try:
        # ...until the next kernel starts (its warm start reaps first).
        assert sb.wait_for(lambda: sb.containers_of(pid) == [], 60), sb.containers_of(pid)
    finally:
        successor.close()


def test_memory_setting_takes_a_size_as_the_magic_line_does(engine: None):
    session = KernelSession(extra_arguments=["--SandboxBackend.memory=384m"])
    try:
        out = session.run(S + "open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read()")
        assert out.result["text/plain"] == repr(f"{384 * 2**20}\n"), out.error
        table = session.run("%tier").of_type("display_data")[0].content["data"]["text/plain"]
        row = next(line for line in table.splitlines() if line.strip().startswith("sandbox"))
        assert "memory=384m" in row, row
    finally:
        session.close()


def test_a_bad_memory_setting_is_reported_and_other_tiers_work():
    session = KernelSession(extra_arguments=["--SandboxBackend.memory=lots"])
    try:
        table = session.run("%tier").of_type("display_data")[0].content["data"]["text/plain"]
        row = next(line for line in table.splitlines() if line.strip().startswith("sandbox"))
        assert "c.SandboxBackend.memory expects a size such as 512m" in row, row
        assert "'lots'" in row
        out = session.run(S + "1")
        assert out.error["ename"] == "TierUnavailableError"
        assert "c.SandboxBackend.memory expects a size" in out.error["evalue"]
        assert session.run("'native fine'").result["text/plain"] == "'native fine'"
    finally:
        session.close()


def test_unavailable_engine_is_reported_precisely():
    dead = "unix:///tmp/tierkernel-no-engine.sock"
    session = KernelSession(env={**os.environ, "DOCKER_HOST": dead})
    try:
        table = session.run("%tier").of_type("display_data")[0].content["data"]["text/plain"]
        row = next(line for line in table.splitlines() if line.strip().startswith("sandbox"))
        assert " no " in row and f"docker engine not reachable at {dead}" in row
        out = session.run(S + "1")
        assert out.error["ename"] == "TierUnavailableError"
        assert f"docker engine not reachable at {dead}" in out.error["evalue"]
        assert "scripts/engine.sh" in out.error["evalue"]
        assert session.run("%%tier process\n'other tiers fine'").status == "ok"
    finally:
        session.close()


def test_image_build_is_a_noop_when_the_recipe_is_unchanged(engine: None):
    cli = os.path.join(os.path.dirname(sys.executable), "tierkernel")
    done = subprocess.run([cli, "image", "build"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout and "debootstrap" not in done.stdout
