"""The runtime helpers through the broker, as any guest sees them: JSON in, JSON out.

Every test goes through ``tierkernel.guest.helpers`` with a ``call`` that makes the same JSON
round trip a tier's channel makes, against real servers on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

from tests.servers import OPENAI_KEY
from tierkernel.backends.options import parse_allow, parse_domains
from tierkernel.errors import TierUsageError
from tierkernel.guest.helpers import make_helpers
from tierkernel.runtime.audit import AuditLog
from tierkernel.runtime.broker import Broker, CallContext
from tierkernel.runtime.policy import Runtime, host_matches

MiB = 1024 * 1024


class Guest:
    """A broker, and the helpers a cell of ``tier`` with magic-line ``options`` would get."""

    def __init__(self, tmp: Path, tier: str = "wasm", trusted: bool = False,
                 options: dict[str, Any] | None = None, **config: Any) -> None:
        c = Config()
        c.Runtime.db_path = str(tmp / "db.sqlite3")
        c.Runtime.audit_log = str(tmp / "audit.sqlite3")
        c.Runtime.api_max_response_bytes = MiB
        # The test servers run on 127.0.0.1, which api() refuses unless allowed explicitly.
        c.Runtime.api_allowed_networks = ["127.0.0.1/32"]
        c.Runtime.native_api_allowed_networks = ["127.0.0.1/32"]
        for key, value in config.items():
            setattr(c.Runtime, key, value)
        self.runtime = Runtime(config=c)
        self.audit = AuditLog(self.runtime.audit_log)
        self.broker = Broker(self.runtime, self.audit)
        self.context = CallContext("exec-1", self.runtime.policy_for(tier, trusted,
                                                                     options or {}))
        self.requests: list[str] = []
        self.responses: list[str] = []
        helpers = make_helpers(self.call)
        self.ai, self.api, self.db, self.console = (helpers["ai"], helpers["api"],
                                                    helpers["db"], helpers["console"])

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        text = json.dumps(request)
        self.requests.append(text)
        answer = self.broker.handle_json(text, self.context)
        self.responses.append(answer)
        return json.loads(answer)  # type: ignore[no-any-return]

    def calls(self) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.runtime.audit_log) as conn:
            return conn.execute("SELECT execution_id, helper, target, allowed, ok, error, size "
                                "FROM helper_calls ORDER BY rowid").fetchall()

    def close(self) -> None:
        self.broker.close()
        self.audit.close()


@pytest.fixture()
def make(tmp_path: Path) -> Iterator[Any]:
    made: list[Guest] = []

    def factory(**kwargs: Any) -> Guest:
        guest = Guest(tmp_path, **kwargs)
        made.append(guest)
        return guest

    yield factory
    for guest in made:
        guest.close()


# -- policy --------------------------------------------------------------------------------
def test_magic_line_policy_options_parse_and_reject_bad_values():
    assert parse_allow("api, db") == {"api", "db"}
    assert parse_allow("none") == frozenset()
    with pytest.raises(TierUsageError, match="ai, api, db, console"):
        parse_allow("api,shell")
    assert parse_domains("API.github.com,*.example.org") == ("api.github.com", "*.example.org")
    for bad in ("exa mple.org", "http://x.org", "*.*.org", ""):
        with pytest.raises(TierUsageError, match="--domains"):
            parse_domains(bad)


def test_domain_patterns():
    assert host_matches("api.github.com", "api.github.com")
    assert not host_matches("evil-api.github.com", "api.github.com")
    assert host_matches("a.b.example.org", "*.example.org")
    assert not host_matches("example.org", "*.example.org")
    assert not host_matches("badexample.org", "*.example.org")
    assert host_matches("anything.test", "*")


def test_tier_defaults_and_cell_narrowing():
    rt = Runtime()
    native = rt.policy_for("native", True, {})
    assert native.helpers == {"ai", "api", "db", "console"} and native.domains == ("*",)
    wasm = rt.policy_for("wasm", False, {})
    assert wasm.helpers == {"console", "db"} and wasm.domains == () and not wasm.db_readonly
    narrowed = rt.policy_for("native", True, {"allow": frozenset({"db"}), "db-readonly": True})
    assert narrowed.helpers == {"db"} and narrowed.db_readonly
    rt.domain_ceiling = ["*.example.org"]
    capped = rt.policy_for("wasm", False, {"domains": ("a.example.org", "evil.com", "*")})
    assert capped.domains == ("a.example.org",)


def test_the_helper_ceiling_caps_every_cell_whatever_it_allows():
    rt = Runtime(helper_ceiling=["console"])
    assert rt.policy_for("native", True, {}).helpers == {"console"}
    asked = rt.policy_for("wasm", False, {"allow": frozenset({"api", "console"})})
    assert asked.helpers == {"console"}
    with pytest.raises(PermissionError, match=r"api\(\) is not allowed in this kernel.*"
                       "c.Runtime.helper_ceiling"):
        asked.check_helper("api")
    # Without the ceiling, the refusal says which --allow would grant it.
    with pytest.raises(PermissionError, match="--allow"):
        Runtime().policy_for("wasm", False, {}).check_helper("api")
    with pytest.raises(ValueError, match="unknown helper"):
        Runtime(helper_ceiling=["shell"])


# -- api -----------------------------------------------------------------------------------
def test_api_json_and_text_responses(make, port):
    g = make(options={"allow": frozenset({"api"}), "domains": ("127.0.0.1",)})
    r = g.api(f"http://127.0.0.1:{port}/json?q=1")
    assert (r.status, r.ok, r.body) == (200, True, {"name": "tierkernel", "stars": 3})
    assert r.headers["x-test"] == "yes" and r["body"]["stars"] == 3
    t = g.api(f"http://127.0.0.1:{port}/text")
    assert t.body == "plain words\n" and t.headers["content-type"].startswith("text/plain")
    missing = g.api(f"http://127.0.0.1:{port}/status/404")
    assert (missing.status, missing.ok, missing.body) == (404, False, {"error": "as asked"})
    with pytest.raises(RuntimeError, match="answered 404"):
        missing.raise_for_status()
    posted = g.api(f"http://127.0.0.1:{port}/echo", method="POST", json={"a": [1, 2]})
    assert json.loads(posted.body["body"]) == {"a": [1, 2]}
    form = g.api(f"http://127.0.0.1:{port}/echo", method="post", data={"k": "v w"})
    assert form.body["body"] == "k=v+w"
    assert form.body["type"] == "application/x-www-form-urlencoded"


def test_api_is_refused_unless_allowed_with_the_way_to_allow_it(make, port):
    default = make()  # a wasm cell with no options: console and db only
    with pytest.raises(PermissionError) as denied:
        default.api(f"http://127.0.0.1:{port}/json")
    assert "%%tier wasm --allow api" in str(denied.value)
    no_domain = make(options={"allow": frozenset({"api"})})
    with pytest.raises(PermissionError) as refused:
        no_domain.api(f"http://127.0.0.1:{port}/json")
    assert "'127.0.0.1'" in str(refused.value) and "--domains 127.0.0.1" in str(refused.value)
    calls = no_domain.calls()
    assert calls[-1][:5] == ("exec-1", "api", f"GET http://127.0.0.1:{port}/json", 0, 0)


def test_redirects_are_followed_only_to_allowed_hosts(make, port):
    g = make(options={"allow": frozenset({"api"}), "domains": ("127.0.0.1",)})
    inside = g.api(f"http://127.0.0.1:{port}/redirect-in")
    assert inside.body["name"] == "tierkernel" and inside.url.endswith("/json")
    with pytest.raises(PermissionError, match="redirected to http://localhost:") as out:
        g.api(f"http://127.0.0.1:{port}/redirect-out")
    assert "'localhost'" in str(out.value)
    both = make(options={"allow": frozenset({"api"}), "domains": ("127.0.0.1", "localhost")})
    assert both.api(f"http://127.0.0.1:{port}/redirect-out").url == (
        f"http://localhost:{port}/json")


def test_api_time_and_size_caps(make, port):
    g = make(options={"allow": frozenset({"api"}), "domains": ("127.0.0.1",)})
    with pytest.raises(TimeoutError, match="longer than 1 s"):
        g.api(f"http://127.0.0.1:{port}/slow", timeout=1)
    for path in ("/huge", "/huge-chunked"):
        with pytest.raises(ValueError, match="api_max_response_bytes"):
            g.api(f"http://127.0.0.1:{port}{path}")
    assert g.api(f"http://127.0.0.1:{port}/json").ok  # the client is still usable


def test_api_bad_input_is_a_clear_error(make):
    g = make(tier="native", trusted=True)
    with pytest.raises(ValueError, match="only fetches http"):
        g.api("ftp://127.0.0.1/x")
    with pytest.raises(ValueError, match="method must be one of"):
        g.api("http://127.0.0.1/", method="BREW")
    with pytest.raises(TypeError, match="JSON values"):
        g.api("http://127.0.0.1/", json={"when": object()})
    with pytest.raises(ConnectionError):
        g.api("http://127.0.0.1:1/")  # nothing listens on port 1


# -- db on SQLite --------------------------------------------------------------------------
def test_db_sql_with_params_and_the_structured_form(make, tmp_path):
    db = make().db
    db("CREATE TABLE things (id INTEGER PRIMARY KEY, ns TEXT, type TEXT, n REAL)")
    inserted = db({"insert": {"into": "things", "values": [
        {"ns": "wiki", "type": "Article", "n": 1}, {"ns": "wiki", "type": "Article", "n": 5},
        {"ns": "wiki", "type": "Person", "n": 2}, {"ns": "blog", "type": "Article", "n": None},
    ]}})
    assert inserted.row_count == 4 and inserted.rows == []
    found = db({"select": {"from": "things", "where": {"ns": "wiki", "type": "Article"},
                           "columns": ["id", "n"], "order_by": "-n", "limit": 10}})
    assert found.columns == ["id", "n"] and found.rows == [{"id": 2, "n": 5.0},
                                                           {"id": 1, "n": 1.0}]
    assert found.row_count == 2
    assert db({"select": {"from": "things", "where": {"n": None}}}).rows[0]["ns"] == "blog"
    assert [r["id"] for r in db({"select": {"from": "things", "where": {
        "type": ["Person", "Nope"]}}}).rows] == [3]
    page = db({"select": {"from": "things", "where": {"n": {">=": 1}}, "order_by": ["n"],
                          "limit": 1, "offset": 1}})
    assert [r["id"] for r in page.rows] == [3]
    assert db({"update": {"table": "things", "set": {"n": 9}, "where": {"id": 1}}}).row_count == 1
    assert db("SELECT n FROM things WHERE id = ?", [1]).rows == [{"n": 9.0}]
    assert db("SELECT id FROM things WHERE ns = :ns AND n > :n", {"ns": "wiki", "n": 4}
              ).row_count == 2
    assert db({"delete": {"from": "things", "where": {"ns": "blog"}}}).row_count == 1
    assert db({"select": {"from": "things"}}).row_count == 3
    assert (tmp_path / "db.sqlite3").exists()


def test_db_values_are_always_bound_and_identifiers_checked(make):
    db = make().db
    db("CREATE TABLE t (a TEXT, b TEXT)")
    evil = "x'); DROP TABLE t; --"
    db({"insert": {"into": "t", "values": {"a": evil, "b": "1 OR 1=1"}}})
    assert db({"select": {"from": "t", "where": {"a": evil}}}).rows == [{"a": evil,
                                                                        "b": "1 OR 1=1"}]
    assert db({"select": {"from": "t", "where": {"b": "1' OR '1'='1"}}}).rows == []
    assert db("SELECT a FROM t WHERE b = ?", ["1 OR 1=1"]).row_count == 1
    for query in (
        {"select": {"from": "t; DROP TABLE t"}},
        {"select": {"from": "t", "columns": ["a FROM t; --"]}},
        {"select": {"from": "t", "where": {"a = a OR 1": 1}}},
        {"select": {"from": "t", "order_by": "-a; DROP TABLE t"}},
        {"select": {"from": "t", "where": {"a": {"; DROP": 1}}}},
        {"insert": {"into": "t", "values": {"a) VALUES (1); DROP TABLE t; --": 1}}},
        {"update": {"table": "t", "set": {"a = 'x', b": 1}, "where": {}}},
        {"select": {"from": "t", "limit": "1; DROP TABLE t"}},
    ):
        with pytest.raises(ValueError, match="db\\(\\)"):
            db(query)
    with pytest.raises(ValueError, match="one statement"):
        db("SELECT 1; DROP TABLE t")
    assert db("SELECT count(*) AS n FROM t").rows == [{"n": 1}]  # still there


def test_db_structured_form_errors_say_what_it_takes(make):
    db = make().db
    with pytest.raises(ValueError, match=r"'where'.*every row"):
        db({"delete": {"from": "t"}})
    with pytest.raises(ValueError, match="unknown \\['form'\\]"):
        db({"select": {"form": "t", "from": "t"}})
    with pytest.raises(ValueError, match="one of"):
        db({"drop": {"table": "t"}})


def test_db_readonly_and_no_other_files(make, tmp_path):
    writer = make().db
    writer("CREATE TABLE t (a INTEGER)")
    writer("INSERT INTO t VALUES (1)")
    reader = make(options={"db-readonly": True})
    assert reader.db("SELECT a FROM t").rows == [{"a": 1}]
    for sql in ("INSERT INTO t VALUES (2)", "DROP TABLE t", "PRAGMA query_only = OFF"):
        with pytest.raises(PermissionError):
            reader.db(sql)
    outside = tmp_path / "outside.db"
    for sql in (f"ATTACH DATABASE '{outside}' AS o", f"VACUUM INTO '{outside}'"):
        with pytest.raises(PermissionError, match="not allowed"):
            writer(sql)
    assert not outside.exists()
    assert writer("SELECT count(*) AS n FROM t").rows == [{"n": 1}]
    refused = [c for c in reader.calls() if c[3] == 0]  # recorded as refused by the policy
    assert [c[2] for c in refused][:2] == ["INSERT INTO t VALUES (2)", "DROP TABLE t"]


def test_db_caps_rows(make):
    g = make(db_max_rows=5)
    g.db("CREATE TABLE t (a)")
    g.db({"insert": {"into": "t", "values": [{"a": i} for i in range(6)]}})
    assert g.db({"select": {"from": "t", "limit": 5}}).row_count == 5
    with pytest.raises(ValueError, match="more than 5 rows"):
        g.db("SELECT * FROM t")


# -- ai ------------------------------------------------------------------------------------
def test_ai_chat_and_embeddings(make, ai_url):
    g = make(options={"allow": frozenset({"ai"})}, ai_base_url=ai_url, ai_api_key=OPENAI_KEY)
    chat = g.ai("tiny", {"messages": [{"role": "user", "content": "hello"}],
                         "temperature": 0.2})
    assert chat.response == "echo from tiny: hello (t=0.2)"
    assert chat.raw["choices"][0]["finish_reason"] == "stop"
    assert g.ai("tiny", "plain").response == "echo from tiny: plain"
    one = g.ai("emb", {"text": "four"})
    assert one.embedding == [4.0, 0.5, 0] and one.model == "emb"
    many = g.ai("emb", {"text": ["a", "bb"]})
    assert many.embeddings == [[1.0, 0.5, 0], [2.0, 0.5, 1]]
    with pytest.raises(RuntimeError, match="404: model 'missing-model' not found"):
        g.ai("missing-model", "x")
    with pytest.raises(ValueError, match="messages"):
        g.ai("tiny", {"prompt": "x"})


def test_ai_unconfigured_denied_and_key_never_returned(make, ai_url):
    with pytest.raises(RuntimeError, match=r"c\.Runtime\.ai_base_url") as unconfigured:
        make(tier="native", trusted=True, ai_base_url="").ai("m", "hi")
    assert "TIERKERNEL_AI_BASE_URL" in str(unconfigured.value)
    with pytest.raises(PermissionError, match="--allow ai"):
        make(ai_base_url=ai_url, ai_api_key=OPENAI_KEY).ai("m", "hi")
    # A server that echoes the key it was sent in its error: the cell sees it scrubbed.
    wrong = make(tier="native", trusted=True, ai_base_url=ai_url,
                 ai_api_key="sk-wrong-key-do-not-leak")
    with pytest.raises(RuntimeError, match="401") as leaked:
        wrong.ai("m", "hi")
    assert "sk-wrong-key-do-not-leak" not in str(leaked.value)
    assert "[secret]" in str(leaked.value)
    assert all("sk-wrong-key" not in text for text in wrong.responses)


# -- console, the protocol, the guest module -----------------------------------------------
def test_console_records_levels_in_the_context(make, capsys):
    g = make()
    g.console.log("one", 2)
    g.console.warn("careful")
    g.console.error("bad", sep="-")
    out = capsys.readouterr()
    assert out.out == "[LOG] one 2\n" and out.err == "[WARN] careful\n[ERROR] bad\n"
    assert [(e.level, e.message) for e in g.context.logs] == [
        ("log", "one 2"), ("warn", "careful"), ("error", "bad")]
    denied = make(options={"allow": frozenset({"db"})})
    with pytest.raises(PermissionError, match="console"):
        denied.console.info("x")


def test_the_json_protocol_shapes(make):
    g = make()
    ok = json.loads(g.broker.handle_json(json.dumps(
        {"helper": "db", "args": {"query": "SELECT 1 AS x"}}), g.context))
    assert ok == {"ok": True, "value": {"rows": [{"x": 1}], "row_count": 1, "columns": ["x"]}}
    denied = g.broker.handle({"helper": "api", "args": {"url": "http://x.org"}}, g.context)
    assert denied["ok"] is False and denied["error"]["type"] == "PermissionError"
    assert g.broker.handle({"helper": "rm", "args": {}}, g.context)["error"] == {
        "type": "ValueError", "message": "unknown helper 'rm'; helpers are ai, api, db, console"}
    assert json.loads(g.broker.handle_json("{not json", g.context))["error"]["type"] == (
        "ValueError")
    assert g.broker.handle({"helper": "db", "args": {"sql": "x"}}, g.context)["error"][
        "message"] == "db() missing required argument(s): query"


def test_guest_helpers_need_only_the_standard_library(tmp_path):
    """helpers.py runs where nothing but the standard library exists (-S: no site-packages),
    beside the protocol module every guest agent loads first (as tierkernel_protocol)."""
    guest = Path(__file__).resolve().parent.parent / "tierkernel" / "guest"
    script = (
        "import importlib.util, sys\n"
        "def load(name, path):\n"
        "    spec = importlib.util.spec_from_file_location(name, path)\n"
        "    m = importlib.util.module_from_spec(spec); sys.modules[name] = m\n"
        "    spec.loader.exec_module(m); return m\n"
        f"load('tierkernel_protocol', {str(guest / 'protocol.py')!r})\n"
        f"m = load('h', {str(guest / 'helpers.py')!r})\n"
        "h = m.make_helpers(lambda r: {'ok': False, 'error': {'type': 'TimeoutError', "
        "'message': 'slow host'}})\n"
        "try:\n    h['db']('select 1')\nexcept TimeoutError as e:\n    print('raised', e)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in "
        "('tierkernel', 'httpx', 'IPython', 'traitlets')))\n"
    )
    done = subprocess.run([sys.executable, "-S", "-I", "-c", script], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "raised slow host\n[]\n"


# -- helper result bytes, logs, the database file (issue 14) ------------------------------
def test_db_result_bytes_are_capped_while_fetching(make):
    g = make(db_max_result_bytes="64k")
    g.db("CREATE TABLE blobs (b BLOB)")
    g.db("INSERT INTO blobs VALUES (zeroblob(20000)), (zeroblob(20000)), (zeroblob(20000))")
    # One value too large is refused before SQLite makes it, whatever its size.
    for sql in ("SELECT zeroblob(200000000) AS b", "SELECT randomblob(2e8) AS b",
                "SELECT group_concat(hex(b)) AS h FROM blobs"):
        with pytest.raises(ValueError, match=r"c\.Runtime\.db_max_result_bytes") as big:
            g.db(sql)
        assert "65536" in str(big.value)
    # Rows under it add up: refused at the row that goes over, with what to do.
    with pytest.raises(ValueError, match=r"larger than 65536 bytes as JSON.*after 2 rows") as many:
        g.db("SELECT b FROM blobs")
    assert "LIMIT" in str(many.value)
    assert len(g.db("SELECT b FROM blobs LIMIT 1").rows[0]["b"]) == 26668  # base64
    assert g.db("SELECT length(b) AS n FROM blobs").rows == [{"n": 20000}] * 3
    # The count is the JSON the cell gets: a result just under the cap passes whole.
    fits = g.db("SELECT b FROM blobs LIMIT 2")
    assert len(json.dumps(fits.rows)) < 65536


def test_api_and_ai_results_have_their_own_caps(make, port, ai_url):
    g = make(options={"allow": frozenset({"api", "ai"}), "domains": ("127.0.0.1",)},
             ai_base_url=ai_url, ai_api_key=OPENAI_KEY, ai_max_response_bytes=1024)
    with pytest.raises(ValueError, match=r"ai\(\).*c\.Runtime\.ai_max_response_bytes"):
        g.ai("tiny", "x" * 2000)
    assert g.ai("tiny", "short").response == "echo from tiny: short"
    with pytest.raises(ValueError, match=r"api\(\).*c\.Runtime\.api_max_response_bytes"):
        g.api(f"http://127.0.0.1:{port}/huge")
    # Under the byte cap, but JSON that would cost the host ~30x its size to decode.
    with pytest.raises(ValueError, match=r"would take about \d+ MiB to decode on the host.*"
                                         r"c\.Runtime\.api_max_response_bytes"):
        g.api(f"http://127.0.0.1:{port}/dicts")


def test_console_logs_are_capped_and_say_so(make):
    g = make(log_max_entries=50, log_max_bytes="4k")
    for i in range(20_000):
        g.broker.handle({"helper": "console", "args": {"level": "log", "message": f"n{i}"}},
                        g.context)
    from tierkernel.runtime.broker import note_dropped

    note_dropped(g.context)
    assert len(g.context.logs) == 51
    assert g.context.logs[-1].message.startswith("19950 further console entries were dropped")
    assert "c.Runtime.log_max_entries" in g.context.logs[-1].message
    big = make(log_max_bytes="4k")
    for _ in range(10):
        big.broker.handle({"helper": "console", "args": {"level": "log", "message": "y" * 1000}},
                          big.context)
    note_dropped(big.context)
    assert [e.message[:1] for e in big.context.logs] == ["y", "y", "y", "y", "6"]


def test_an_audit_record_is_written_whatever_its_size(tmp_path):
    audit = AuditLog(str(tmp_path / "audit.sqlite3"))
    audit.start("big", "s", None, 1, "native", "x = 1", 0.0)
    logs = [{"level": "log", "message": "z" * 10_000, "time": 0.0}] * 5_000  # 50 MB of JSON
    audit.finish("big", "error", 1.0, "E: " + "w" * 50_000_000, logs)
    record = audit.execution("big")
    assert record.status == "error" and record.error is not None
    assert record.error.endswith("characters in all]")
    assert "more log entries were not recorded" in record.logs[-1]["message"]
    audit.close()


def test_the_default_database_file_is_outside_the_notebook_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("TIERKERNEL_DB_PATH", raising=False)
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    path = Path(Runtime().db_path)
    assert path.parent == tmp_path / "data" / "tierkernel" / "db"
    assert path.name.startswith(tmp_path.name[:40]) and path.suffix == ".sqlite3"
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    assert Path(Runtime().db_path) != path  # each folder keeps its own data


def test_a_database_file_inside_the_file_workspace_is_refused(make, tmp_path):
    g = make(db_path=str(tmp_path / "ws" / ".tierkernel" / "db.sqlite3"))
    g.broker.workspace = lambda: tmp_path / "ws"
    with pytest.raises(PermissionError) as refused:
        g.db("SELECT 1")
    text = str(refused.value)
    assert str(tmp_path / "ws" / ".tierkernel" / "db.sqlite3") in text
    assert f"workspace {tmp_path / 'ws'}" in text and "c.Runtime.db_path" in text
    assert not (tmp_path / "ws").exists()  # nothing was created there
    outside = make()
    outside.broker.workspace = lambda: tmp_path / "ws"
    assert outside.db("SELECT 1 AS x").rows == [{"x": 1}]


def test_a_huge_query_text_costs_the_host_no_more_than_its_size(make):
    """The audit target is the start of the query, whitespace folded: made from that start
    only, not by splitting the whole text into words (a 3 MB query of short words made a
    list of a million strings, ~20 times its size, twice per call)."""
    import tracemalloc

    g = make(options={"allow": frozenset({"db", "api"}), "domains": ("*",)})
    query = "ab " * 1_000_000
    tracemalloc.start()
    try:
        answer = g.broker.call("db", {"query": query}, g.context)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not answer["ok"] and "syntax error" in answer["error"]["message"]
    assert peak < 2 * len(query), f"{peak} bytes for a {len(query)}-byte query"
    assert g.calls()[-1][2] == ("ab " * 67)[:200].strip()


def test_a_wide_sqlite_row_is_refused_before_it_is_made(make):
    """SQLite makes every value of a row before handing over the first, and Python copies them
    all: 40 columns of 1 MB each under a 1 MiB result limit held 40 MB (100 columns of 8 MB,
    1.5 GB). The length limit of one value shrinks with the row's width, so that a row takes
    at most 4 times the result limit; narrow and wide rows of small values still work."""
    import tracemalloc

    g = make(options={"allow": frozenset({"db"})}, db_max_result_bytes="1m")
    wide = ", ".join(f"zeroblob(1000000) AS c{i}" for i in range(40))
    tracemalloc.start()
    try:
        answer = g.broker.call("db", {"query": f"SELECT {wide}"}, g.context)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not answer["ok"] and answer["error"]["type"] == "ValueError"
    message = answer["error"]["message"]
    assert "larger than 104857 bytes" in message and "of 40 columns" in message
    assert "c.Runtime.db_max_result_bytes" in message
    assert peak < 8 * MiB, f"peak {peak} bytes"
    assert len(g.db("SELECT zeroblob(700000) AS b").rows[0]["b"]) > 900_000
    small = ", ".join(f"{i} AS c{i}" for i in range(500))
    assert g.db(f"SELECT {small}").rows[0]["c499"] == 499
    with pytest.raises(ValueError, match="larger than 1048576 bytes, the most one db"):
        g.db("SELECT zeroblob(2000000)")


def test_a_relative_db_path_names_one_file_whatever_the_working_directory(tmp_path,
                                                                          monkeypatch):
    """A relative c.Runtime.db_path is resolved once, when db() opens it (where the check
    that it lies outside the file:// workspace is made): a native cell's os.chdir() later
    neither moves db() to another file nor into the workspace."""
    first, later = tmp_path / "first", tmp_path / "later"
    first.mkdir()
    later.mkdir()
    monkeypatch.chdir(first)
    g = Guest(tmp_path, db_path="data/db.sqlite3")
    try:
        g.db("CREATE TABLE t (a)")
        monkeypatch.chdir(later)
        g.db("INSERT INTO t VALUES (1)")
        assert g.db("SELECT a FROM t").rows == [{"a": 1}]
        assert not (later / "data").exists()
    finally:
        g.close()


def test_a_hostile_call_writes_a_small_audit_row(make):
    """The audit row of a helper call keeps the start of its target and error: a cell sending
    megabyte URLs or table names (echoed by the refusals) grew the audit log by twice their
    size per call, without bound."""
    g = make(options={"allow": frozenset({"api", "db"}), "domains": ("example.org",)})
    huge = "x" * 1_000_000
    for _ in range(10):
        refused = g.broker.call("api", {"url": f"http://a.test/{huge[:60000]}"}, g.context)
        assert refused["error"]["type"] == "PermissionError"
        unparsed = g.broker.call("api", {"url": f"http://a.test/{huge}?q={huge}"}, g.context)
        assert unparsed["error"]["type"] == "ValueError"
        bad = g.broker.call("db", {"query": {"select": {"from": huge}}}, g.context)
        assert bad["error"]["message"].startswith("db(): no such table: xxx")
    g.audit.close()
    rows = g.calls()
    assert len(rows) == 30
    assert all(len(row[2]) <= 1100 and len(row[5] or "") <= 4100 for row in rows)
    assert rows[0][2].startswith("GET http://a.test/xxx") and rows[0][5].startswith("api() ")
    assert Path(g.runtime.audit_log).stat().st_size < 2 * MiB


def test_a_request_nested_too_deep_to_decode_is_a_clear_error(make):
    g = make()
    deep = '{"helper": "db", "args": {"query": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    answer = json.loads(g.broker.handle_json(deep, g.context))
    assert answer["error"]["type"] == "ValueError"
    assert "nested too deeply" in answer["error"]["message"]


@pytest.mark.parametrize("request_text", [
    '{"helper": "db", "args": {"query": "SELECT 1 -- \\ud800"}}',
    '{"helper": "\\ud800", "args": {}}',
    '{"helper": "api", "args": {"url": "http://a\\ud800.test/"}}',
])
def test_a_lone_surrogate_is_answered_and_audited(make, request_text):
    """JSON may carry a lone surrogate (\\ud800), which SQLite cannot store: the audit write
    raised UnicodeEncodeError out of the broker (no answer to the guest, no audit row)."""
    g = make(options={"allow": frozenset({"api", "db"}), "domains": ("*",)})
    answer = json.loads(g.broker.handle_json(request_text, g.context))
    assert answer["ok"] is False and answer["error"]["type"] == "ValueError", answer
    [row] = g.calls()
    assert "\\ud800" in (row[2] or "") + (row[5] or "")
