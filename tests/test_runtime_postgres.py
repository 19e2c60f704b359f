"""db() on a real PostgreSQL server started for these tests (initdb + pg_ctl, password auth).

Without PostgreSQL installed these tests skip, except under $CI or
$TIERKERNEL_REQUIRE_POSTGRES=1 (scripts/test.sh sets it), where they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel_session import KernelSession
from tests.servers import PG_PASSWORD, postgres_server
from tests.test_runtime_broker import Guest


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture()
def pg(tmp_path: Path, pg_url: str) -> Iterator[Any]:
    made: list[Guest] = []

    def factory(db_max_result_bytes: Any = "8m", **options: Any) -> Guest:
        guest = Guest(tmp_path, options=options, db_url=pg_url,
                      db_max_result_bytes=db_max_result_bytes)
        made.append(guest)
        return guest

    first = factory()
    first.db("DROP TABLE IF EXISTS things")
    first.db("CREATE TABLE things (id serial PRIMARY KEY, ns text, type text, n numeric, "
             "at timestamptz DEFAULT '2024-01-02T03:04:05Z', u uuid, raw bytea)")
    yield factory
    for guest in made:
        guest.close()


def test_structured_queries_and_params(pg):
    db = pg().db
    inserted = db({"insert": {"into": "things", "values": [
        {"ns": "wiki", "type": "Article", "n": 1}, {"ns": "wiki", "type": "Article", "n": 5},
        {"ns": "wiki", "type": "Person", "n": 2}, {"ns": "blog", "type": "Article", "n": None},
    ]}})
    assert inserted.row_count == 4
    found = db({"select": {"from": "public.things", "columns": ["id", "n"],
                           "where": {"ns": "wiki", "type": "Article"},
                           "order_by": ["-n"], "limit": 10}})
    assert found.rows == [{"id": 2, "n": "5"}, {"id": 1, "n": "1"}]  # numeric as exact text
    assert found.columns == ["id", "n"] and found.row_count == 2
    assert db({"select": {"from": "things", "where": {"n": None}}}).rows[0]["ns"] == "blog"
    page = db({"select": {"from": "things", "columns": ["id"], "order_by": "id",
                          "offset": 2}})
    assert [r["id"] for r in page.rows] == [3, 4]
    assert db({"update": {"table": "things", "set": {"n": 7}, "where": {
        "type": {"in": ["Person"]}}}}).row_count == 1
    assert db("SELECT id FROM things WHERE ns = %s AND n > %s ORDER BY id", ["wiki", 1]
              ).rows == [{"id": 2}, {"id": 3}]
    assert db("SELECT count(*) AS c FROM things WHERE ns = %(ns)s", {"ns": "wiki"}
              ).rows == [{"c": 3}]
    typed = db("UPDATE things SET u = %s, raw = %s WHERE id = 1 RETURNING at, u, raw",
               ["12345678-1234-5678-1234-567812345678", "hi"])
    assert typed.rows == [{"at": "2024-01-02T03:04:05+00:00",
                           "u": "12345678-1234-5678-1234-567812345678", "raw": "aGk="}]
    assert db({"delete": {"from": "things", "where": {"ns": "blog"}}}).row_count == 1


def test_injection_attempts_change_nothing(pg):
    db = pg().db
    evil = "x'; DROP TABLE things; --"
    db({"insert": {"into": "things", "values": {"ns": evil, "type": "1' OR '1'='1"}}})
    assert db({"select": {"from": "things", "columns": ["ns"], "where": {"ns": evil}}}
              ).rows == [{"ns": evil}]
    assert db({"select": {"from": "things", "where": {"type": "x' OR '1'='1"}}}).rows == []
    assert db("SELECT ns FROM things WHERE type = %s", ["1' OR '1'='1"]).row_count == 1
    for query in (
        {"select": {"from": "things; DROP TABLE things"}},
        {"select": {"from": "things", "columns": ["ns FROM things; --"]}},
        {"select": {"from": "things", "where": {"ns = ns OR 1": 1}}},
        {"select": {"from": "things", "order_by": "id; DROP TABLE things"}},
        {"delete": {"from": "pg_catalog.pg_user --", "where": {}}},
    ):
        with pytest.raises(ValueError, match="not a valid name"):
            db(query)
    # Several statements in one call are refused by the server (one prepared statement).
    with pytest.raises(RuntimeError, match="multiple commands"):
        db("SELECT 1; DROP TABLE things")
    assert db("SELECT count(*) AS c FROM things").rows == [{"c": 1}]


def test_read_only_mode(pg):
    pg().db("INSERT INTO things (ns) VALUES ('kept')")
    reader = pg(**{"db-readonly": True})
    assert reader.db({"select": {"from": "things", "columns": ["ns"]}}).rows == [{"ns": "kept"}]
    for query in ("INSERT INTO things (ns) VALUES ('no')", "DROP TABLE things",
                  "CREATE TABLE sneaky (a int)",
                  {"delete": {"from": "things", "where": {}}}):
        with pytest.raises(PermissionError, match="read-only"):
            reader.db(query)
    # Lifting read-only from inside the call does not work either.
    with pytest.raises(RuntimeError):
        reader.db("SELECT set_config('transaction_read_only', 'off', true)")
    with pytest.raises(RuntimeError):
        reader.db("COMMIT; DELETE FROM things")
    assert reader.db("SELECT ns FROM things").rows == [{"ns": "kept"}]


def test_errors_are_clear_and_the_password_never_returned(pg):
    g = pg()
    with pytest.raises(RuntimeError, match='relation "nope" does not exist'):
        g.db("SELECT * FROM nope")
    assert g.db("SELECT 1 AS ok").rows == [{"ok": 1}]  # the connection recovered
    echoed = g.db("SELECT %s AS p", [PG_PASSWORD])
    assert echoed.rows == [{"p": "[secret]"}]
    assert all(PG_PASSWORD not in text for text in g.responses)


def test_a_native_cell_uses_postgres_when_configured(pg_url, tmp_path):
    session = KernelSession(env={**os.environ, "TIERKERNEL_DB_URL": pg_url,
                                 "TIERKERNEL_AUDIT_LOG": str(tmp_path / "audit.sqlite3")})
    try:
        out = session.run("r = db('SELECT version() AS v, %s::int + 1 AS n', [41])\n"
                          "print(r.rows[0]['v'].split()[0], r.rows[0]['n'], r.row_count)")
        assert out.stdout == "PostgreSQL 42 1\n", out.outputs
        denied = session.run("%%tier native --db-readonly\n"
                             "db({'insert': {'into': 'things', 'values': {'ns': 'x'}}})")
        assert denied.error["ename"] == "PermissionError"
        assert "read-only" in denied.error["evalue"]
    finally:
        session.close()


def test_isolated_session_state_reaches_neither_native_cells_nor_the_next_call(pg):
    """Issue 14, case 13: SET ROLE, search_path and temp tables of an isolated cell stay in
    that one call; native cells have a session of their own."""
    from tierkernel.runtime.broker import CallContext

    wasm = pg()
    native_context = CallContext("native-1", wasm.runtime.policy_for("native", True, {}))

    def native(sql: str) -> Any:
        answer = wasm.broker.handle({"helper": "db", "args": {"query": sql}}, native_context)
        assert answer["ok"], answer
        return answer["value"]["rows"]

    wasm.db("DROP ROLE IF EXISTS tk_other")
    wasm.db("CREATE ROLE tk_other NOLOGIN")
    assert native("SELECT current_user AS u") == [{"u": "tk"}]  # opens the native session
    wasm.db("SET ROLE tk_other")
    wasm.db("SET search_path TO pg_catalog")
    wasm.db("CREATE TEMP TABLE left_behind (a int)")
    wasm.db("SELECT pg_advisory_lock(42)")
    for rows in (native("SELECT current_user AS u, current_setting('search_path') AS p"),
                 wasm.db("SELECT current_user AS u, current_setting('search_path') AS p").rows):
        assert rows == [{"u": "tk", "p": '"$user", public'}]
    for where in ("native", "wasm"):
        query = "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'"
        counted = native(query) if where == "native" else wasm.db(query).rows
        assert counted == [{"n": 0}], where
        with pytest.raises(RuntimeError, match='relation "left_behind" does not exist'):
            wasm.db("SELECT * FROM left_behind")
    answer = wasm.broker.handle({"helper": "db", "args": {"query": "SELECT * FROM left_behind"}},
                                native_context)
    assert 'relation "left_behind" does not exist' in answer["error"]["message"]


def test_postgres_results_are_capped_while_streamed(pg):
    g = pg(db_max_result_bytes="64k")
    with pytest.raises(ValueError, match=r"larger than 65536 bytes as JSON.*after 2 rows") as big:
        g.db("SELECT repeat('x', 30000) AS s FROM generate_series(1, 300)")
    assert "c.Runtime.db_max_result_bytes" in str(big.value)
    with pytest.raises(ValueError, match="db_max_result_bytes"):
        g.db("SELECT repeat('x', 1000000) AS s FROM generate_series(1, 300)")
    # The statement was cancelled, the session is fine, and results under the cap pass whole.
    assert len(g.db("SELECT repeat('x', 30000) AS s FROM generate_series(1, 2)").rows) == 2
    empty = g.db("SELECT 1 AS a, 'b' AS b WHERE false")
    assert (empty.rows, empty.columns, empty.row_count) == ([], ["a", "b"], 0)
    assert g.db("INSERT INTO things (ns) VALUES ('a'), ('b')").row_count == 2
