"""Routing: which tier runs a cell, what a bad %%tier line says, reply metadata, interrupts."""

from __future__ import annotations

import os
import re
import time

from tests.kernel_session import KernelSession


def test_cells_without_magic_run_natively_with_ipython_semantics(kernel: KernelSession):
    out = kernel.run("value_native = 21\nvalue_native * 2")
    assert out.status == "ok"
    assert out.result["text/plain"] == "42"
    assert out.metadata["tierkernel"]["tier"] == "native"
    assert out.metadata["tierkernel"]["success"] is True
    assert out.metadata["tierkernel"]["duration_ms"] >= 0
    # IPython's own machinery: Out[] history and the `_` variable.
    follow = kernel.run("_ + 1")
    assert follow.result["text/plain"] == "43"


def test_native_magic_keeps_line_numbers_and_ipython_features(kernel: KernelSession):
    out = kernel.run("%%tier native\nx_line = 1\nraise RuntimeError('boom')")
    assert out.status == "error"
    assert out.error["ename"] == "RuntimeError"
    # The traceback points at line 3 of the cell, as the user counts it.
    plain = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(out.error["traceback"]))
    assert "line 3" in plain and "----> 3 raise RuntimeError('boom')" in plain
    timed = kernel.run("%%tier native\n%%time\nsum(range(10))")
    assert timed.status == "ok"
    assert "Wall time" in timed.stdout


def test_execution_count_advances_across_tiers(kernel: KernelSession):
    first = kernel.run("1").reply["execution_count"]
    second = kernel.run("%%tier process\n2").reply["execution_count"]
    third = kernel.run("3").reply["execution_count"]
    assert second == first + 1
    assert third == second + 1
    process_result = kernel.run("%%tier process\n40 + 2")
    assert process_result.of_type("execute_result")[0].content["execution_count"] == (
        process_result.reply["execution_count"])


def test_unknown_tier_is_one_clear_error_and_runs_nothing(kernel: KernelSession):
    kernel.run("marker_unknown = 'untouched'")
    out = kernel.run("%%tier nosuch\nmarker_unknown = 'ran'")
    assert out.status == "error"
    assert [o.msg_type for o in out.outputs] == ["error"]
    assert out.error["ename"] == "TierUsageError"
    assert "unknown tier 'nosuch'" in out.error["evalue"]
    assert "native" in out.error["evalue"] and "process" in out.error["evalue"]
    assert out.metadata["tierkernel"] == {"tier": "nosuch", "duration_ms":
                                          out.metadata["tierkernel"]["duration_ms"],
                                          "success": False,
                                          "execution_id": out.metadata["tierkernel"][
                                              "execution_id"]}
    assert kernel.run("marker_unknown").result["text/plain"] == "'untouched'"


def test_bad_options_name_the_problem(kernel: KernelSession):
    cases = {
        "%%tier process --timeout abc\n1": "--timeout expects a positive number",
        "%%tier process --timeout -3\n1": "--timeout expects a positive number",
        "%%tier process --timeout\n1": "--timeout needs a value",
        "%%tier process --frobnicate 1\n1": "unknown option --frobnicate",
        "%%tier process --timeout 1 --timeout 2\n1": "given twice",
        "%%tier process stray\n1": "unexpected 'stray'",
        "%%tier\n1": "usage: %%tier NAME",
        "%%tier process --timeout '1\n1": "cannot read the %%tier line",
    }
    for code, expected in cases.items():
        out = kernel.run(code)
        assert out.status == "error", code
        assert [o.msg_type for o in out.outputs] == ["error"], code
        assert out.error["ename"] == "TierUsageError", code
        assert expected in out.error["evalue"], (code, out.error["evalue"])
    # The kernel is still healthy.
    assert kernel.run("%%tier process\n'alive'").result["text/plain"] == "'alive'"


def test_options_are_parsed_in_every_spelling(kernel: KernelSession):
    for line in ("--timeout 5", "--timeout=5", "--timeout 5s", "--timeout 0.1m",
                 "--timeout 5000ms", "--timeout 5  # a comment"):
        out = kernel.run(f"%%tier process {line}\n'ok'")
        assert out.status == "ok", (line, out.outputs)


def test_tier_table_lists_every_tier(kernel: KernelSession):
    out = kernel.run("%tier")
    assert out.status == "ok"
    shown = out.of_type("display_data")[0].content["data"]
    text, html = shown["text/plain"], shown["text/html"]
    for needle in ("native", "process", "yes", "timeout=30s", "crash isolation", "* native"):
        assert needle in text, needle
    assert "<table>" in html and "process" in html
    assert out.metadata["tierkernel"]["tier"] == "native"


def test_default_switching(fresh_kernel: KernelSession):
    out = fresh_kernel.run("%tier process")
    assert "Default tier is now 'process'" in out.stdout
    pid_cell = fresh_kernel.run("import os\nos.getpid()")
    assert pid_cell.metadata["tierkernel"]["tier"] == "process"
    native_pid = fresh_kernel.run("%%tier native\nimport os\nos.getpid()")
    assert native_pid.metadata["tierkernel"]["tier"] == "native"
    assert pid_cell.result["text/plain"] != native_pid.result["text/plain"]
    # %tier lines always run natively, so the way back works from any default.
    table = fresh_kernel.run("%tier")
    assert "* process" in table.of_type("display_data")[0].content["data"]["text/plain"]
    back = fresh_kernel.run("%tier native")
    assert "Default tier is now 'native'" in back.stdout
    assert fresh_kernel.run("1").metadata["tierkernel"]["tier"] == "native"
    bad = fresh_kernel.run("%tier nosuch")
    # IPython shows a magic's UsageError on stderr, with an error reply.
    assert bad.status == "error" and bad.reply["ename"] == "UsageError"
    assert "unknown tier 'nosuch'; valid tiers: native, process" in bad.stderr


def test_session_options_from_tier_line(fresh_kernel: KernelSession):
    fresh_kernel.run("%tier process --timeout 0.5")
    out = fresh_kernel.run("import time\ntime.sleep(3)")
    assert out.status == "error"
    assert out.error["ename"] == "TimeoutError"
    assert "0.5 s limit" in out.error["evalue"]
    # The cell's own option beats the session's.
    assert fresh_kernel.run("%%tier process --timeout 10\ntime.sleep(0.8); 'slept'").status == "ok"


def test_configured_default_tier_from_env(tmp_path):
    session = KernelSession(env={"TIERKERNEL_DEFAULT_TIER": "process",
                                 "PATH": os.environ["PATH"]})
    try:
        assert session.run("1").metadata["tierkernel"]["tier"] == "process"
    finally:
        session.close()


def test_unknown_configured_default_falls_back_with_notice(tmp_path):
    session = KernelSession(env={"TIERKERNEL_DEFAULT_TIER": "nosuch",
                                 "PATH": os.environ["PATH"]})
    try:
        out = session.run("%%tier process\n1")
        assert "default tier 'nosuch' is not registered" in out.stderr
        assert session.run("2").metadata["tierkernel"]["tier"] == "native"
    finally:
        session.close()


def test_interrupt_long_native_cell(kernel: KernelSession):
    start = time.monotonic()
    out = kernel.run("import time\nfor _ in range(600): time.sleep(0.1)", interrupt_after=1.0)
    assert time.monotonic() - start < 10
    assert out.status == "error"
    assert out.error["ename"] == "KeyboardInterrupt"
    assert kernel.run("'still here'").result["text/plain"] == "'still here'"


def test_native_timeout(kernel: KernelSession):
    out = kernel.run("%%tier native --timeout 0.5\nimport time\ntime.sleep(30)")
    assert out.status == "error"
    assert out.error["ename"] == "CellTimeoutError"
    assert "0.5 s limit" in out.error["evalue"]
    # A quick cell with a timeout is not disturbed later by its watchdog.
    assert kernel.run("%%tier native --timeout 0.3\n'quick'").status == "ok"
    time.sleep(0.5)
    assert kernel.run("'after'").result["text/plain"] == "'after'"


def test_native_timeout_stops_blocking_calls(kernel: KernelSession):
    """The timeout delivers what the stop button does (SIGINT to the kernel's main thread), so
    a sleep or a read that never returns is cut off at the deadline, not after it ends."""
    start = time.monotonic()
    out = kernel.run("%%tier native --timeout 1\nimport time\ntime.sleep(30)")
    assert time.monotonic() - start < 15
    assert out.status == "error" and out.error["ename"] == "CellTimeoutError"
    assert "1 s limit" in out.error["evalue"]
    # A server on 127.0.0.1 that accepts and never answers: recv() blocks in C.
    start = time.monotonic()
    out = kernel.run(
        "%%tier native --timeout 1\nimport socket\n"
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "client = socket.create_connection(server.getsockname())\n"
        "try:\n    client.recv(10)\nfinally:\n    client.close(); server.close()")
    assert time.monotonic() - start < 15
    assert out.status == "error" and out.error["ename"] == "CellTimeoutError"
    # A timer due just as a cell ends never reaches the next cell.
    for _ in range(5):
        out = kernel.run("%%tier native --timeout 0.05\nimport time\n"
                         "t = time.monotonic()\nwhile time.monotonic() - t < 0.045: pass")
        assert out.status in ("ok", "error")
        after = kernel.run("import time; time.sleep(0.2); 'next'")
        assert after.status == "ok", after.outputs
        assert after.result["text/plain"] == "'next'"


def test_native_timeout_is_not_swallowed_by_the_cell_s_error_handling(kernel: KernelSession):
    """Code that retries on errors (``except Exception``, ``except socket.timeout``, which is
    ``TimeoutError``, as urllib3 and many clients do) must not turn the timeout into one more
    retry: the cell still ends at its limit with CellTimeoutError."""
    for handler in ("Exception", "OSError", "socket.timeout", "TimeoutError"):
        out = kernel.run(
            "%%tier native --timeout 0.5\nimport socket, time\n"
            "started = time.monotonic()\n"
            "while time.monotonic() - started < 4:\n"
            f"    try:\n        time.sleep(0.2)\n    except {handler}:\n        pass\n"
            "print('ran to its end')")
        assert out.status == "error", (handler, out.stdout)
        assert out.error["ename"] == "CellTimeoutError"
        assert "ran to its end" not in out.stdout
    # A cell that catches even that once (a bare except) is interrupted again a moment later.
    out = kernel.run(
        "%%tier native --timeout 0.5\nimport time\n"
        "try:\n    time.sleep(4)\nexcept BaseException:\n    print('caught')\n"
        "time.sleep(4)\nprint('ran to its end')")
    assert out.status == "error" and out.error["ename"] == "CellTimeoutError"
    assert "caught" in out.stdout and "ran to its end" not in out.stdout
    assert kernel.run("import time; time.sleep(1.2); 'next'").result["text/plain"] == "'next'"


def test_a_native_timeout_due_after_the_cell_s_code_ended_is_not_raised(kernel: KernelSession):
    """The deadline passing while IPython finishes the cell (here in a slow post_run_cell hook,
    as extensions register) is not the cell's: the reply comes, ok, with no timeout error."""
    kernel.run("import time\ndef _slow_hook(*args):\n    time.sleep(1.2)\n"
               "get_ipython().events.register('post_run_cell', _slow_hook)")
    try:
        out = kernel.run("%%tier native --timeout 0.3\n'quick'", timeout=30)
        assert out.status == "ok", out.outputs
        assert out.result["text/plain"] == "'quick'"
        assert not out.of_type("error") and "CellTimeoutError" not in out.stdout, out.outputs
    finally:
        kernel.run("get_ipython().events.unregister('post_run_cell', _slow_hook)")
    assert kernel.run("'next'").result["text/plain"] == "'next'"


def test_a_native_cell_that_ignores_its_timeout_is_told_so(kernel: KernelSession):
    """A trusted native cell can take SIGINT for itself (SIG_IGN, its own handler), and so
    run past its limit, as it can ignore the stop button; the user is told it did."""
    for handler in ("signal.SIG_IGN", "lambda *args: None"):
        out = kernel.run("%%tier native --timeout 0.3\nimport signal, time\n"
                         f"signal.signal(signal.SIGINT, {handler})\ntime.sleep(1)\n"
                         "print('ended')", timeout=30)
        assert "ended" in out.stdout, out.outputs
        assert "ran past its 0.3 s limit" in out.stderr, out.outputs
        assert "SIGINT" in out.stderr, out.outputs
    # The kernel's own handler is back: the stop button works on the next cell.
    out = kernel.run("import time\ntime.sleep(20)", interrupt_after=1.0)
    assert out.status == "error" and out.error["ename"] == "KeyboardInterrupt"


def test_an_async_native_cell_over_its_timeout_says_which_limit(kernel: KernelSession):
    """A cell awaiting at top level runs on the kernel's event loop, where ipykernel turns
    SIGINT into cancelling the cell (CancelledError): the user is told it was the limit."""
    out = kernel.run("%%tier native --timeout 0.5\nimport asyncio\nawait asyncio.sleep(30)\n"
                     "print('slept')", timeout=60)
    assert out.status == "error" and "slept" not in out.stdout, out.outputs
    assert "0.5 s limit" in out.stderr and "--timeout" in out.stderr, out.outputs
    assert kernel.run("'next'").result["text/plain"] == "'next'"


def test_silent_cells_publish_nothing(kernel: KernelSession):
    out = kernel.run("%%tier process\nprint('hidden')\n1", silent=True)
    assert out.status == "ok"
    assert out.outputs == []


def test_history_records_tier_cells(kernel: KernelSession):
    kernel.run("%%tier process\nhistory_marker = 1")
    msg_id = kernel.kc.history(hist_access_type="tail", n=3, raw=True, output=False)
    reply = kernel.kc.get_shell_msg(timeout=10)
    assert reply["parent_header"]["msg_id"] == msg_id
    sources = [entry[2] for entry in reply["content"]["history"]]
    assert "%%tier process\nhistory_marker = 1" in sources


def test_default_tier_and_limits_from_a_jupyter_config_file(tmp_path):
    config_dir = tmp_path / "jupyter-config"
    config_dir.mkdir()
    (config_dir / "tierkernel_config.py").write_text(
        "c.TierKernel.default_tier = 'process'\nc.ProcessBackend.timeout = 0.5\n")

    session = KernelSession(env={**os.environ, "JUPYTER_CONFIG_DIR": str(config_dir)})
    try:
        out = session.run("import time\ntime.sleep(3)")
        assert out.metadata["tierkernel"]["tier"] == "process"
        assert out.error["ename"] == "TimeoutError" and "0.5 s limit" in out.error["evalue"]
        table = session.run("%tier").of_type("display_data")[0].content["data"]["text/plain"]
        assert "* process" in table and "timeout=0.5s" in table
    finally:
        session.close()


def test_a_kernel_limited_to_some_tiers_refuses_the_others_and_their_lines():
    # What tierkernel serve starts its sessions with: a cell's own %%tier line, or a %tier
    # line (which runs in the kernel's own IPython), cannot reach a tier left out.
    kernel = KernelSession(extra_arguments=["--TierKernel.allowed_tiers=process",
                                            "--TierKernel.default_tier=process"])
    try:
        assert kernel.run("import os\nos.getpid()").metadata["tierkernel"]["tier"] == "process"
        for code in ("%%tier native\n1", "%tier native", "%tier\nimport os",
                     "%%tier sandbox\n1"):
            out = kernel.run(code)
            assert out.status == "error", code
            assert out.error["ename"] == "TierUnavailableError", out.error
            assert "is not allowed in this kernel" in out.error["evalue"]
        assert kernel.run("21 * 2").result["text/plain"] == "42"  # still in process
    finally:
        kernel.close()


def test_fixed_options_cannot_be_set_by_a_cell_or_a_tier_line():
    kernel = KernelSession(extra_arguments=["--TierKernel.fixed_options=memory",
                                            "--TierKernel.fixed_options=cpus"])
    try:
        for code in ("%%tier wasm --memory 4g\n1", "%%tier sandbox --cpus 8 --memory 1g\n1"):
            out = kernel.run(code)
            assert out.status == "error", code
            assert out.error["ename"] == "TierUsageError", out.error
            assert "cannot be set in this kernel" in out.error["evalue"], out.error
        assert "--cpus, --memory cannot" in kernel.run(
            "%%tier sandbox --cpus 8 --memory 1g\n1").error["evalue"]
        # The %tier line magic says so as IPython's magics say a usage error.
        line = kernel.run("%tier wasm --memory 4g")
        assert line.reply["status"] == "error" and line.reply["ename"] == "UsageError"
        assert "--memory cannot be set in this kernel" in line.stderr
        # Refused: the default tier did not change.
        assert kernel.run("1").metadata["tierkernel"]["tier"] == "native"
    finally:
        kernel.close()
