"""What each cell used, measured on the host: CPU seconds and peak memory in every tier (and
processes in the sandbox), in the execute_reply's metadata and in ``%executions``; an
out-of-memory error says how far the cell's memory got."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import sandbox_support
from tests.kernel_session import KernelSession, Outcome
from tierkernel.backends.wasm import runtime as wasm_runtime
from tierkernel.runtime.audit import AuditLog

TIERS = ["native", "process", "wasm", "sandbox", "sandbox --runtime runsc"]
MiB = 1 << 20

#: Half a second of CPU time, by the tier's own CPU clock.
SPIN = ("import time\nstarted = time.process_time()\n"
        "while time.process_time() - started < 0.5:\n    pass")
#: The wasm guest has no CPU clock (its process_time is not the guest's CPU time), so it
#: spins by work: ≈0.8 s of CPU on the machines we measured (its loops run ≈3x slower
#: than native ones), whatever the machine's load.
WASM_SPIN = "n = 0\nfor i in range(2_500_000):\n    n += i"
#: About 150 MB, every page written (bytearray zero-fills), then freed.
ALLOCATE = "block = bytearray(150 << 20)\ndel block"


def _need(tier: str) -> None:
    if tier.startswith("wasm") and (wasm_runtime.runtime_problem() is not None
                                    or not wasm_runtime.is_compiled()):
        pytest.skip("the wasm runtime is not installed or not compiled: run 'tierkernel warm'")
    if tier.startswith("sandbox"):
        sandbox_support.need_sandbox()
        if "runsc" in tier and "runsc" not in sandbox_support.runtimes():
            pytest.skip("runsc is not registered with the engine")


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelSession]:
    session = KernelSession()
    yield session
    session.close()


def _usage(out: Outcome) -> dict[str, object]:
    assert out.status == "ok", out.outputs
    return dict(out.metadata["tierkernel"])


@pytest.mark.parametrize("tier", TIERS)
def test_reply_metadata_carries_cpu_and_peak_memory(kernel: KernelSession, tier: str) -> None:
    _need(tier)
    head = f"%%tier {tier}\n"
    kernel.run(head + "pass", timeout=120)  # the tier is up: its start is not the cell's
    spun = _usage(kernel.run(head + (WASM_SPIN if tier == "wasm" else SPIN), timeout=60))
    assert isinstance(spun["cpu_seconds"], float), spun
    assert 0.3 <= spun["cpu_seconds"] < 30, spun
    grew = _usage(kernel.run(head + ALLOCATE, timeout=60))
    assert isinstance(grew["peak_memory_bytes"], int), grew
    assert 100 * MiB < grew["peak_memory_bytes"] < 4096 * MiB, grew
    quiet = _usage(kernel.run(head + "x = 1", timeout=60))
    assert quiet["cpu_seconds"] < spun["cpu_seconds"], (quiet, spun)
    if not tier.startswith("wasm"):  # the peaks restart with each cell (wasm memory never
        # shrinks: its size is the session's high-water mark)
        assert quiet["peak_memory_bytes"] < grew["peak_memory_bytes"], (quiet, grew)
    if tier == "sandbox":  # runc: the host's pids cgroup counts the container's tasks
        forked = _usage(kernel.run(head + "import subprocess\n"
                                          "procs = [subprocess.Popen(['sleep', '0.5']) "
                                          "for _ in range(20)]\n"
                                          "for p in procs: p.wait()", timeout=60))
        assert isinstance(forked["processes"], int) and forked["processes"] >= 20, forked


def test_executions_shows_what_each_cell_used(kernel: KernelSession) -> None:
    out = kernel.run("%%tier process\n" + SPIN + "\n" + ALLOCATE, timeout=60)
    ident = out.metadata["tierkernel"]["execution_id"]
    table = kernel.run("%executions --tier process --limit 1")
    text = table.of_type("display_data")[0].content["data"]["text/plain"]
    row = text.splitlines()[1]
    assert row.startswith(ident), text
    cpu = re.search(r" (\d+) ms +(\d+\.\d) MiB ", row)
    assert cpu is not None, row
    assert int(cpu.group(1)) >= 300 and float(cpu.group(2)) > 100, row
    full = kernel.run(f"%executions {ident}").of_type("display_data")[0].content["data"]
    assert re.search(r"cpu: +\d+ ms\n", full["text/plain"]), full
    assert re.search(r"peak memory: +\d+\.\d MiB\n", full["text/plain"]), full


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_a_sandbox_out_of_memory_error_names_the_peak(kernel: KernelSession,
                                                       runtime: str) -> None:
    _need(f"sandbox --runtime {runtime}")
    out = kernel.run(f"%%tier sandbox --memory 96m --runtime {runtime}\n"
                     "blocks = []\nwhile True:\n    blocks.append(bytearray(8 << 20))",
                     timeout=120)
    assert out.status == "error"
    evalue = out.error["evalue"]
    assert "out of memory" in evalue and "96m memory limit" in evalue, evalue
    # Under runc the cgroup's peak is read; under gVisor the OOM takes the whole sandbox
    # and its cgroup with it, and the engine's OOM report says the limit was reached.
    assert re.search(r"its memory reached (9\d|1\d\d)\.\d MiB|its memory reached the "
                     r"limit", evalue), evalue
    assert "--memory" in evalue  # how to raise it
    # One tier's failure leaves it usable, with the usual limit again.
    assert kernel.run("%%tier sandbox\nprint('fine')", timeout=120).stdout == "fine\n"


def test_a_wasm_memory_error_names_the_peak_and_the_limit(kernel: KernelSession) -> None:
    _need("wasm")
    out = kernel.run("%%tier wasm --memory 64m\n"
                     "blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 20))",
                     timeout=120)
    assert out.status == "error" and out.error["ename"] == "MemoryError", out.outputs
    evalue = out.error["evalue"]
    assert re.search(r"memory reached (\d+)\.\d MiB of its 64\.0 MiB limit", evalue), evalue
    reached = float(re.search(r"reached (\d+\.\d) MiB", evalue).group(1))  # type: ignore[union-attr]
    assert reached > 48, evalue  # it grew until the limit stopped it
    assert "c.WasmBackend.memory" in evalue


def test_an_older_audit_log_stays_readable_both_ways(tmp_path: Path) -> None:
    """A log file made before usage was recorded: its rows read as unmeasured, new rows get
    their usage, and the executions table keeps the shape older tierkernels read with
    SELECT * (kernels of several versions may share the file)."""
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript("""
            CREATE TABLE executions (
                id TEXT PRIMARY KEY, kernel_session TEXT NOT NULL, cell_id TEXT,
                execution_count INTEGER, tier TEXT NOT NULL, code TEXT NOT NULL,
                started REAL NOT NULL, duration_ms REAL, status TEXT NOT NULL,
                success INTEGER, error TEXT, logs TEXT NOT NULL DEFAULT '[]');
            INSERT INTO executions VALUES ('old1', 's', NULL, 1, 'wasm', 'print(1)', 1.0, 2.0,
                                           'ok', 1, NULL, '[]');
        """)
    log = AuditLog(str(path))
    try:
        (old,) = log.executions()
        assert (old.id, old.tier, old.cpu_seconds, old.peak_memory, old.processes) == (
            "old1", "wasm", None, None, None)
        log.start("new1", "s", None, 2, "sandbox", "pass", 3.0)
        log.finish("new1", "ok", 5.0, None, [], usage=(0.25, 7 * MiB, 4))
        new = log.execution("new1")
        assert (new.status, new.cpu_seconds, new.peak_memory, new.processes) == (
            "ok", 0.25, 7 * MiB, 4)
        assert [e.id for e in log.executions(session="s", tier="sandbox")] == ["new1"]
    finally:
        log.close()
    with sqlite3.connect(path) as conn:  # what an older kernel reads
        rows = conn.execute("SELECT * FROM executions ORDER BY started").fetchall()
    assert [len(row) for row in rows] == [12, 12]
    assert rows[1][0] == "new1" and rows[1][8] == "ok"
