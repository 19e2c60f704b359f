"""The runtime helpers and the audit log as a notebook user sees them, through a real kernel."""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel_session import KernelSession
from tests.servers import OPENAI_KEY


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runtime-kernel")


@pytest.fixture(scope="module")
def rk(home: Path, ai_url: str) -> Iterator[KernelSession]:
    """A kernel with an ai endpoint, a 1 MiB api cap, and its own audit log and database."""
    config = home / "config"
    config.mkdir()
    (config / "tierkernel_config.py").write_text(
        "c.Runtime.api_max_response_bytes = 1024 * 1024\n"
        # The test server runs on 127.0.0.1: api() reaches it only when allowed explicitly.
        "c.Runtime.native_api_allowed_networks = ['127.0.0.1/32']\n"
        "c.Runtime.api_allowed_networks = ['127.0.0.1/32']\n")
    session = KernelSession(env={
        **os.environ, "JUPYTER_CONFIG_DIR": str(config),
        "TIERKERNEL_AUDIT_LOG": str(home / "audit.sqlite3"),
        "TIERKERNEL_DB_PATH": str(home / "db.sqlite3"),
        "TIERKERNEL_AI_BASE_URL": ai_url, "TIERKERNEL_AI_API_KEY": OPENAI_KEY,
    })
    yield session
    session.close()


def _plain(outcome) -> str:  # type: ignore[no-untyped-def]
    shown = outcome.of_type("display_data")
    assert len(shown) == 1, outcome.outputs
    return str(shown[0].content["data"]["text/plain"])


def _record(home: Path, execution_id: str) -> sqlite3.Row:
    with sqlite3.connect(home / "audit.sqlite3") as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM executions WHERE id = ?", (execution_id,)).fetchone()
    assert row is not None, execution_id
    return row  # type: ignore[no-any-return]


def test_native_cells_have_the_helpers(rk: KernelSession, port: int):
    out = rk.run(f"r = api('http://127.0.0.1:{port}/json')\n"
                 "print(r.status, r.ok, r.body['name'], type(api).__name__)")
    assert out.stdout == "200 True tierkernel function\n"
    out = rk.run("db('CREATE TABLE IF NOT EXISTS notes (body TEXT)')\n"
                 "db({'insert': {'into': 'notes', 'values': {'body': 'hi'}}})\n"
                 "db({'select': {'from': 'notes'}}).rows")
    assert out.result["text/plain"] == "[{'body': 'hi'}]"
    out = rk.run("ai('tiny', {'messages': [{'role': 'user', 'content': 'hey'}]}).response")
    assert out.result["text/plain"] == "'echo from tiny: hey'"


def test_console_levels_are_visible_and_logged(rk: KernelSession, home: Path):
    out = rk.run("console.log('starting', 1)\nconsole.info('status:', 'ok')\n"
                 "console.warn('low disk')\nconsole.error('failed:', 42)")
    assert out.stdout == "[LOG] starting 1\n[INFO] status: ok\n"
    assert out.stderr == "[WARN] low disk\n[ERROR] failed: 42\n"
    row = _record(home, out.metadata["tierkernel"]["execution_id"])
    logs = re.findall(r'"level": "(\w+)", "message": "([^"]*)"', row["logs"])
    assert logs == [("log", "starting 1"), ("info", "status: ok"), ("warn", "low disk"),
                    ("error", "failed: 42")]
    shown = _plain(rk.run(f"%executions {row['id']}"))
    assert "[WARN] low disk" in shown and "console.error('failed:', 42)" in shown


def test_the_magic_line_narrows_the_policy(rk: KernelSession, port: int):
    out = rk.run(f"%%tier native --allow api --domains 127.0.0.1\n"
                 f"api('http://127.0.0.1:{port}/redirect-out')")
    assert out.error["ename"] == "PermissionError"
    assert "redirected to http://localhost:" in out.error["evalue"]
    assert "--domains 127.0.0.1,localhost" in out.error["evalue"]
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(out.error["traceback"]))
    assert "api('http://127.0.0.1:" in traceback  # the user's line
    assert "helpers.py" not in traceback  # and none of the helper plumbing
    assert "skipping hidden" not in traceback
    denied = rk.run("%%tier native --allow db\nai('tiny', 'hello')")
    assert denied.error["ename"] == "PermissionError"
    assert "--allow ai,db" in denied.error["evalue"]
    huge = rk.run(f"api('http://127.0.0.1:{port}/huge')")
    assert huge.error["ename"] == "ValueError" and "1048576-byte limit" in huge.error["evalue"]
    bad = rk.run("%%tier native --allow shell\n1")
    assert bad.error["ename"] == "TierUsageError" and "--allow expects" in bad.error["evalue"]
    # The next cell without options has the native defaults again.
    assert rk.run(f"api('http://localhost:{port}/json').status").result["text/plain"] == "200"


def test_the_audit_log_records_every_tier(rk: KernelSession, home: Path):
    cells = [
        ("native-ok", "x_audit = 1\nconsole.info('native says hi')"),
        ("native-err", "1 / 0"),
        ("process-ok", "%%tier process --allow api,db\nprint('in a child')"),
        ("process-err", "%%tier process\nraise KeyError('lost')"),
        ("refused", "%%tier nosuch\nprint('never')"),
    ]
    ids = {}
    for cell_id, code in cells:
        out = rk.run(code, cell_id=cell_id)
        ids[cell_id] = out.metadata["tierkernel"]["execution_id"]
    assert len(set(ids.values())) == len(cells)
    rows = {cell: _record(home, eid) for cell, eid in ids.items()}
    expect = {
        "native-ok": ("native", "ok", 1, None),
        "native-err": ("native", "error", 0, "ZeroDivisionError: division by zero"),
        "process-ok": ("process", "ok", 1, None),
        "process-err": ("process", "error", 0, "KeyError: 'lost'"),
        "refused": ("nosuch", "refused", 0, "TierUsageError: unknown tier 'nosuch'"),
    }
    for cell, (tier, status, success, error) in expect.items():
        row = rows[cell]
        assert (row["tier"], row["status"], row["success"]) == (tier, status, success), cell
        assert row["cell_id"] == cell and row["code"] == dict(cells)[cell]
        assert (row["error"] or "").startswith(error or ""), (cell, row["error"])
        assert row["duration_ms"] >= 0 and row["started"] > 0
    assert '"native says hi"' in rows["native-ok"]["logs"]
    sessions = {row["kernel_session"] for row in rows.values()}
    assert len(sessions) == 1 and sessions != {""}


def test_helper_calls_are_audited(rk: KernelSession, home: Path, port: int):
    out = rk.run(f"%%tier native --allow api,console --domains 127.0.0.1\n"
                 f"api('http://127.0.0.1:{port}/text')\nconsole.log('x')\n"
                 "try:\n    db('SELECT 1')\nexcept PermissionError as e:\n    print('refused')")
    assert out.stdout == "[LOG] x\nrefused\n"
    with sqlite3.connect(home / "audit.sqlite3") as conn:
        calls = conn.execute("SELECT helper, target, allowed, ok, size FROM helper_calls "
                             "WHERE execution_id = ? ORDER BY rowid",
                             (out.metadata["tierkernel"]["execution_id"],)).fetchall()
    assert calls[0][:4] == ("api", f"GET http://127.0.0.1:{port}/text", 1, 1)
    assert calls[0][4] > len("plain words")
    assert calls[1][:4] == ("console", "log", 1, 1)
    assert calls[2][:4] == ("db", "SELECT 1", 0, 0)


def test_cells_over_the_size_cap_are_refused_before_running(rk: KernelSession, home: Path):
    code = "size_marker = 'ran'\n" + "#" * (100 * 1024)
    out = rk.run(code)
    assert out.status == "error" and [o.msg_type for o in out.outputs] == ["error"]
    assert out.error["ename"] == "CellTooLargeError"
    assert "over the 100 KB limit" in out.error["evalue"]
    assert "c.Runtime.code_size_limit" in out.error["evalue"]
    row = _record(home, out.metadata["tierkernel"]["execution_id"])
    assert row["status"] == "refused" and row["code"] == code
    assert rk.run("'size_marker' in dir()").result["text/plain"] == "False"
    assert rk.run("%%tier process\n1 + 1").result["text/plain"] == "2"  # the kernel is fine


def test_executions_magic(rk: KernelSession):
    for n in range(3):
        rk.run(f"%%tier process\nraise ValueError('for the table {n}')")
    table = rk.run("%executions --tier process --failed --limit 3")
    text = _plain(table)
    lines = text.splitlines()
    assert lines[0].split() == ["id", "#", "started", "tier", "status", "duration", "cpu",
                                "peak", "memory", "code"]
    assert len(lines) == 5  # header, 3 rows, footer
    # The code column shows the cell's code, not the %%tier line the tier column repeats.
    assert lines[1].endswith(" raise ValueError('for the table 2')"), lines[1]
    assert all(" process " in line and " error " in line for line in lines[1:4])
    # What each cell used, as the host measured it (the agent process's CPU time and RSS).
    assert all(re.search(r" \d+ ms +\d+\.\d MiB ", line) for line in lines[1:4]), lines
    assert "tier process, failed or refused only" in lines[-1]
    html = table.of_type("display_data")[0].content["data"]["text/html"]
    assert html.count("<tr>") == 4 and "&#x27;for the table&#x27;" not in html
    newest = lines[1].split()[0]
    full = _plain(rk.run(f"%executions {newest[:8]}"))
    assert f"id:              {newest}" in full
    assert "    raise ValueError('for the table 2')" in full
    assert "error:           ValueError: for the table 2" in full
    assert re.search(r"cpu: +\d+ ms\n", full) and re.search(r"peak memory: +\d+\.\d MiB", full)
    # By execution count: %executions N is the cell In [N] of this kernel.
    counted = rk.run("%%tier process\n'the counted cell'")
    n = counted.reply["execution_count"]
    assert re.search(rf"^\w+ +{n} ", _plain(rk.run("%executions --limit 2")).splitlines()[2])
    by_count = _plain(rk.run(f"%executions {n}"))
    assert f"execution count: {n}\n" in by_count and "    'the counted cell'" in by_count
    assert f"id:              {counted.metadata['tierkernel']['execution_id']}" in by_count
    everything = _plain(rk.run("%executions --all --limit 2"))
    assert "all kernels" in everything
    for line, message in (("%executions nosuchid", "no single execution"),
                          ("%executions 99999", "no cell In [99999] in this kernel"),
                          ("%executions --limit zero", "positive integer"),
                          ("%executions --bogus", "usage: %executions")):
        out = rk.run(line)
        assert out.reply["ename"] == "UsageError" and message in out.stderr
