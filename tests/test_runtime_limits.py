"""Issue 14, the runtime helpers' part, through a real kernel in every tier it applies to: a
hostile cell cannot grow the kernel through db() results or console logs, cannot reach the
host's network or the metadata service through api(), cannot route a request with its own Host
header, gets no cookie another tier's cell got, and cannot reach db()'s file through a file://
workspace."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import sandbox_support
from tests.kernel_session import KernelSession
from tierkernel.backends.wasm import runtime as wasm_runtime

MiB = 1024 * 1024


def _isolated_tiers() -> list[str]:
    tiers = []
    if wasm_runtime.runtime_problem() is None and wasm_runtime.is_compiled():
        tiers.append("wasm")
    if sandbox_support.status()[0] or sandbox_support.required():
        tiers.append("sandbox")
    return tiers


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runtime-limits")


@pytest.fixture(scope="module")
def session(home: Path) -> Iterator[KernelSession]:
    """One kernel for every tier here, with small log caps, the test server's network allowed
    for native cells only, and its own audit log and database."""
    config = home / "config"
    config.mkdir()
    (config / "tierkernel_config.py").write_text(
        "c.Runtime.log_max_entries = 200\n"
        "c.Runtime.log_max_bytes = '64k'\n"
        "c.Runtime.native_api_allowed_networks = ['127.0.0.1/32']\n")
    db = home / "db.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE big (b BLOB)")
        conn.execute("INSERT INTO big SELECT zeroblob(1000000) FROM "
                     "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                     "WHERE i < 300) SELECT i FROM n)")
    kernel = KernelSession(env={**os.environ, "JUPYTER_CONFIG_DIR": str(config),
                                "TIERKERNEL_AUDIT_LOG": str(home / "audit.sqlite3"),
                                "TIERKERNEL_DB_PATH": str(db)})
    yield kernel
    kernel.close()


def _kernel_pid(session: KernelSession) -> int:
    return int(session.km.provisioner.process.pid)  # type: ignore[union-attr]


def _memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _record(home: Path, execution_id: str) -> sqlite3.Row:
    with sqlite3.connect(home / "audit.sqlite3") as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM executions WHERE id = ?", (execution_id,)).fetchone()
    assert row is not None, execution_id
    return row  # type: ignore[no-any-return]


@pytest.mark.parametrize("tier", _isolated_tiers())
def test_hostile_db_results_are_refused_and_the_kernel_stays_small(session, tier):
    """Case 3: huge values and many rows are refused with the setting named, and the
    kernel's peak memory hardly moves (it reached 2.4 GB before)."""
    if tier == "sandbox":
        sandbox_support.need_sandbox()
    warm = session.run(f"%%tier {tier} --db-readonly\ndb('SELECT 1 AS x').rows")
    assert warm.result["text/plain"] == "[{'x': 1}]", warm.outputs
    pid = _kernel_pid(session)
    # Reset the kernel's peak RSS (VmHWM) to its current RSS, so the peak measured below is
    # this test's; the kernel runs as this user, so its clear_refs is ours to write.
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = _memory_kib(pid, "VmRSS")
    for sql in ("SELECT zeroblob(200000000) AS b FROM (SELECT 1 UNION ALL SELECT 2 "
                "UNION ALL SELECT 3)", "SELECT b FROM big",
                # A row as wide as it is long: 100 values of 8 MB, each within the limit.
                "SELECT " + ", ".join(f"zeroblob(8000000) AS c{i}" for i in range(100))):
        out = session.run(f"%%tier {tier} --db-readonly\ndb({sql!r})")
        assert out.error["ename"] == "ValueError", out.outputs
        assert "c.Runtime.db_max_result_bytes" in out.error["evalue"]
        assert "8388608" in out.error["evalue"]
    grown = _memory_kib(pid, "VmHWM") - before
    assert grown < 150 * 1024, f"the kernel's peak RSS grew by {grown} KiB"
    fine = session.run(f"%%tier {tier} --db-readonly\nlen(db('SELECT b FROM big LIMIT 2')"
                       ".rows)")
    assert fine.result["text/plain"] == "2"


@pytest.mark.parametrize("tier", ["native", *_isolated_tiers()])
def test_a_console_flood_leaves_a_finished_record_with_capped_logs(session, home, tier):
    """Case 9: 100k console calls (3000 through the isolated tiers' channels, a round trip of
    a millisecond or more each: fifteen times the cap is enough to show it); the record is
    finished, not left running, and its logs hold the cap and one note."""
    if tier == "sandbox":
        sandbox_support.need_sandbox()
    calls = 100_000 if tier == "native" else 3000
    code = (f"%%tier {tier} --timeout 200\nimport contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    for i in range({calls}):\n"
            "        console.log('entry', i, 'x' * 100)\n"
            "print('done')")
    out = session.run(code, timeout=240)
    assert out.stdout == "done\n", out.outputs
    row = _record(home, out.metadata["tierkernel"]["execution_id"])
    assert (row["status"], row["success"]) == ("ok", 1)
    import json

    logs = json.loads(row["logs"])
    console = [e for e in logs if e["message"].startswith("entry ")]
    assert 0 < len(console) <= 200
    notes = [e for e in logs if "further console entries were dropped" in e["message"]]
    assert len(notes) == 1 and notes[0]["message"].startswith(f"{calls - len(console)} ")
    assert len(row["logs"]) < 128 * 1024


@pytest.mark.parametrize("tier", _isolated_tiers())
def test_api_cannot_reach_the_metadata_service_or_set_host(session, tier, port):
    """Case 11: with any domain allowed, the metadata address, the host's loopback (not
    allowed for isolated cells here) and a redirect to them are refused; Host is refused."""
    if tier == "sandbox":
        sandbox_support.need_sandbox()
    line = f"%%tier {tier} --allow api --domains '*'\n"
    for url in ("http://169.254.169.254/latest/meta-data/", f"http://127.0.0.1:{port}/json",
                f"http://localhost:{port}/json"):
        out = session.run(line + f"api({url!r}, timeout=3)")
        assert out.error["ename"] == "PermissionError", out.outputs
        assert "c.Runtime.api_allowed_networks" in out.error["evalue"]
    native_redirect = session.run(
        f"api('http://127.0.0.1:{port}/redirect-to?u=http://169.254.169.254/', timeout=3)")
    assert native_redirect.error["ename"] == "PermissionError"
    assert "the cloud metadata service" in native_redirect.error["evalue"]
    host = session.run(f"%%tier {tier} --allow api --domains example.org\n"
                       "api('https://example.org/', headers={'Host': 'internal.example.org'})")
    assert host.error["ename"] == "PermissionError"
    assert "may not set the Host header" in host.error["evalue"]


def test_cookies_a_native_cell_got_are_not_sent_for_a_wasm_cell(tmp_path, port):
    """Case 11: no shared cookie jar between trust levels (nor between cells)."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "tierkernel_config.py").write_text(
        "c.Runtime.native_api_allowed_networks = ['127.0.0.1/32']\n"
        "c.Runtime.api_allowed_networks = ['127.0.0.1/32']\n")
    kernel = KernelSession(env={**os.environ, "JUPYTER_CONFIG_DIR": str(config)})
    try:
        got = kernel.run(f"api('http://127.0.0.1:{port}/set-cookie?v=native-secret')\n"
                         f"api('http://127.0.0.1:{port}/headers').body.get('cookie')")
        assert got.result["text/plain"] == "'tk=native-secret'", got.outputs
        tiers = [t for t in _isolated_tiers() if t == "wasm"] or ["process"]
        for tier in tiers:
            sent = kernel.run(f"%%tier {tier} --allow api --domains 127.0.0.1\n"
                              f"print(api('http://127.0.0.1:{port}/headers').body)")
            assert sent.stdout.startswith("{'host': '127.0.0.1:"), sent.outputs
            assert "cookie" not in sent.stdout
    finally:
        kernel.close()


def test_a_database_inside_the_file_workspace_is_refused(tmp_path):
    """Case 12, the db file: a db() file a file:// workspace contains is refused at first
    use, naming both paths, and nothing is created there."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    inside = workspace / ".tierkernel" / "db.sqlite3"
    kernel = KernelSession(env={**os.environ, "TIERKERNEL_FSX_URL": workspace.as_uri(),
                                "TIERKERNEL_DB_PATH": str(inside),
                                "TIERKERNEL_AUDIT_LOG": str(tmp_path / "audit.sqlite3")})
    try:
        tiers = ["native", *[t for t in _isolated_tiers() if t == "wasm"]]
        for tier in tiers:
            out = kernel.run(f"%%tier {tier}\ndb('CREATE TABLE t (a)')")
            assert out.error["ename"] == "PermissionError", out.outputs
            assert str(inside) in out.error["evalue"]
            assert str(workspace) in out.error["evalue"]
            assert "c.Runtime.db_path" in out.error["evalue"]
        assert not inside.parent.exists()
    finally:
        kernel.close()
