"""``db(query, params)``: the kernel's database, SQLite by default, PostgreSQL when configured.

A query is either SQL with bound parameters (the database's own placeholder style: ``?`` and
``:name`` for SQLite, ``%s`` and ``%(name)s`` for PostgreSQL) or the structured form of the
code-exec spec, compiled here into SQL in which every value is a bound parameter and every
identifier has been checked against :data:`IDENTIFIER`::

    {"select": {"from": "things", "columns": ["id", "name"],
                "where": {"ns": "wiki", "n": {">": 3}, "tag": ["a", "b"]},
                "order_by": ["-n", "id"], "limit": 10, "offset": 0}}
    {"insert": {"into": "things", "values": {"ns": "wiki"}}}       # or a list of rows
    {"update": {"table": "things", "set": {"n": 4}, "where": {"id": 1}}}
    {"delete": {"from": "things", "where": {"id": 1}}}

One call is one statement in its own transaction, committed when it succeeds. The result is
``{"rows": [{column: value, ...}, ...], "row_count": int, "columns": [names]}``; ``row_count``
is the number of rows returned, or for a statement that returns none, the number it changed.
Rows come back as JSON values (dates as ISO 8601 text, decimals and UUIDs as text, bytes as
base64), so every tier sees exactly the same result.

Rows are fetched one at a time and turned into JSON as they arrive, counted against
:class:`ResultLimits` (rows, and bytes of the JSON the cell gets): a result over a limit is
refused before it is held in memory, whatever the statement asks for.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tierkernel.runtime.audit import folded_start

log = logging.getLogger(__name__)

#: A table or column name the structured form accepts: a plain SQL identifier, optionally
#: qualified by a schema (``public.things``).
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")

_OPERATORS = {"=": "=", "==": "=", "!=": "<>", "<>": "<>", "<": "<", "<=": "<=", ">": ">",
              ">=": ">=", "like": "LIKE", "in": "IN", "not_in": "NOT IN"}
_KEYS = {
    "select": ({"from"}, {"columns", "where", "order_by", "limit", "offset"}),
    "insert": ({"into", "values"}, set()),
    "update": ({"table", "set", "where"}, set()),
    "delete": ({"from", "where"}, set()),
}


@dataclass(frozen=True)
class DbOutcome:
    """A finished db() call: the JSON-able value for the cell, and what the audit records."""

    value: dict[str, Any]
    target: str


@dataclass(frozen=True)
class ResultLimits:
    """What one db() result may hold (``c.Runtime.db_max_rows``, ``db_max_result_bytes``)."""

    max_rows: int
    max_bytes: int


class Database(Protocol):
    """A database db() can run statements on."""

    placeholder: str

    def run(self, sql: str, params: Any, readonly: bool, limits: ResultLimits,
            timeout: float) -> tuple[list[str], list[dict[str, Any]], int]:
        """Run one statement; return column names, the rows as JSON records (see
        :class:`RowCollector`) and the row count."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


# -- the structured form ---------------------------------------------------------------------
def ident(name: Any, what: str) -> str:
    """``name`` if it is a safe identifier, else ``ValueError`` naming ``what`` it was."""
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name):
        raise ValueError(f"db(): {what} {name!r} is not a valid name (letters, digits and _, "
                         "not starting with a digit, optionally schema.name); use SQL with "
                         "bound parameters for anything else")
    return name


def _where(where: Any, ph: str, params: list[Any]) -> str:
    if not isinstance(where, Mapping):
        raise ValueError(f"db(): 'where' must be a dict of column to value, got {where!r}")
    clauses = []
    for column, cond in where.items():
        col = ident(column, "where column")
        if isinstance(cond, Mapping):
            if len(cond) != 1:
                raise ValueError(f"db(): where[{column!r}] must hold one operator, e.g. "
                                 "{'>': 3}")
            [(op_name, value)] = cond.items()
            op = _OPERATORS.get(str(op_name).lower())
            if op is None:
                raise ValueError(f"db(): unknown operator {op_name!r} in where[{column!r}]; "
                                 f"operators: {', '.join(_OPERATORS)}")
        else:
            op, value = ("IN" if isinstance(cond, list) else "="), cond
        if op in ("IN", "NOT IN"):
            if not isinstance(value, list) or not value:
                raise ValueError(f"db(): where[{column!r}] with {op} needs a non-empty list")
            params.extend(value)
            clauses.append(f"{col} {op} ({', '.join([ph] * len(value))})")
        elif value is None and op in ("=", "<>"):
            clauses.append(f"{col} IS {'NOT ' if op == '<>' else ''}NULL")
        else:
            params.append(value)
            clauses.append(f"{col} {op} {ph}")
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"db(): {what} must be a non-negative integer, got {value!r}")
    return value


def compile_structured(query: Mapping[str, Any], ph: str) -> tuple[str, list[Any], str]:
    """Compile the structured form into ``(sql, params, verb)`` with placeholder ``ph``."""
    if len(query) != 1 or next(iter(query)) not in _KEYS:
        raise ValueError(f"db(): a structured query is one of {{'select': ...}}, "
                         f"{{'insert': ...}}, {{'update': ...}}, {{'delete': ...}}; got keys "
                         f"{sorted(map(str, query))}")
    [(verb, spec)] = query.items()
    if not isinstance(spec, Mapping):
        raise ValueError(f"db(): {verb!r} must map to a dict, got {spec!r}")
    required, optional = _KEYS[verb]
    missing = required - set(spec)
    unknown = set(spec) - required - optional
    if missing or unknown:
        parts = ([f"missing {sorted(missing)}"] if missing else []) + (
            [f"unknown {sorted(map(str, unknown))}"] if unknown else [])
        hint = " (update and delete need 'where'; {} means every row)" if (
            "where" in missing) else ""
        raise ValueError(f"db(): {verb} {'; '.join(parts)}; it takes "
                         f"{sorted(required | optional)}{hint}")
    params: list[Any] = []
    if verb == "select":
        table = ident(spec["from"], "table")
        columns = spec.get("columns") or ["*"]
        if not isinstance(columns, list):
            raise ValueError("db(): 'columns' must be a list of column names")
        cols = ", ".join(c if c == "*" else ident(c, "column") for c in columns)
        sql = f"SELECT {cols} FROM {table}" + _where(spec.get("where", {}), ph, params)
        order = spec.get("order_by")
        if order is not None:
            keys = [order] if isinstance(order, str) else order
            if not isinstance(keys, list) or not keys:
                raise ValueError("db(): 'order_by' is a column name or a list of them "
                                 "('-name' for descending)")
            sql += " ORDER BY " + ", ".join(
                f"{ident(k[1:], 'order_by column')} DESC" if isinstance(k, str) and
                k.startswith("-") else ident(k, "order_by column") for k in keys)
        if "limit" in spec:
            params.append(_count(spec["limit"], "limit"))
            sql += f" LIMIT {ph}"
        if "offset" in spec:
            if "limit" not in spec:
                sql += " LIMIT -1" if ph == "?" else " LIMIT ALL"
            params.append(_count(spec["offset"], "offset"))
            sql += f" OFFSET {ph}"
        return sql, params, verb
    if verb == "insert":
        table = ident(spec["into"], "table")
        rows = spec["values"]
        rows = [rows] if isinstance(rows, Mapping) else rows
        if not isinstance(rows, list) or not rows or not all(isinstance(r, Mapping)
                                                             for r in rows):
            raise ValueError("db(): insert 'values' must be a dict or a non-empty list of dicts")
        names = list(rows[0])
        if not names or any(list(r) != names for r in rows):
            raise ValueError("db(): every inserted row must have the same, non-empty columns "
                             "in the same order")
        cols = ", ".join(ident(n, "column") for n in names)
        groups = []
        for row in rows:
            params.extend(row[n] for n in names)
            groups.append("(" + ", ".join([ph] * len(names)) + ")")
        return f"INSERT INTO {table} ({cols}) VALUES {', '.join(groups)}", params, verb
    if verb == "update":
        table = ident(spec["table"], "table")
        changes = spec["set"]
        if not isinstance(changes, Mapping) or not changes:
            raise ValueError("db(): update 'set' must be a non-empty dict of column to value")
        sets = []
        for column, value in changes.items():
            sets.append(f"{ident(column, 'column')} = {ph}")
            params.append(value)
        sql = f"UPDATE {table} SET {', '.join(sets)}"
        return sql + _where(spec["where"], ph, params), params, verb
    table = ident(spec["from"], "table")
    return f"DELETE FROM {table}" + _where(spec["where"], ph, params), params, verb


# -- values ----------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """A database value as JSON: the same in every tier."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def _least_json_size(value: Any) -> int:
    """A lower bound of the JSON size of ``value``, known before converting it (which for a
    large string or blob would itself take memory)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return 4 * -(-len(value) // 3) + 2  # base64, quoted
    if isinstance(value, str):
        return len(value) + 2
    return 0


class RowCollector:
    """Rows turned into JSON records as they are fetched, counted against the limits.

    The byte count is the size of the JSON the cell gets (``json.dumps`` of the whole result,
    keys and separators included), so the limit means the same in every tier. ``add`` raises
    ``ValueError`` naming the limit and what to do as soon as a row would go over it: at most
    one row more than the limit allows is ever held.
    """

    def __init__(self, columns: Sequence[str], limits: ResultLimits) -> None:
        self.columns = list(columns)
        self.limits = limits
        self.records: list[dict[str, Any]] = []
        # '"name": ' for each column, and the envelope {"rows": [], "row_count": N,
        # "columns": [...]} with room for the count's digits.
        self._keys = [len(json.dumps(c)) + 2 for c in self.columns]
        self.size = len(json.dumps({"rows": [], "row_count": 10 ** 12,
                                    "columns": self.columns}))

    def add(self, row: Iterable[Any]) -> None:
        """Convert and count one row; raise ``ValueError`` past a limit."""
        if len(self.records) >= self.limits.max_rows:
            raise ValueError(
                f"db(): the query returned more than {self.limits.max_rows} rows; add a LIMIT "
                "(or 'limit' in the structured form), or raise c.Runtime.db_max_rows")
        size = self.size + 4  # {} and the ", " between rows
        record: dict[str, Any] = {}
        for column, key, value in zip(self.columns, self._keys, row, strict=False):
            size += key + 2  # the ", " between fields
            if size + _least_json_size(value) > self.limits.max_bytes:
                self._too_big()
            converted = jsonable(value)
            size += len(json.dumps(converted))
            if size > self.limits.max_bytes:
                self._too_big()
            record[column] = converted
        self.size = size
        self.records.append(record)

    def _too_big(self) -> None:
        raise ValueError(
            f"db(): the result is larger than {self.limits.max_bytes} bytes as JSON, the limit "
            f"(c.Runtime.db_max_result_bytes), after {len(self.records)} rows; ask for less: "
            "fewer rows (a LIMIT, or 'limit' in the structured form), fewer or smaller columns "
            "(length(x) rather than x), or raise c.Runtime.db_max_result_bytes")


# -- SQLite ----------------------------------------------------------------------------------
# PRAGMAs a cell may use: schema introspection and harmless settings. Others (journal_mode,
# temp_store_directory, ...) could touch files or settings beyond the cell's data.
_SAFE_PRAGMAS = frozenset({
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
    "foreign_key_list", "foreign_keys", "foreign_key_check", "user_version", "collation_list",
    "integrity_check", "quick_check",
})


def _authorizer(action: int, arg1: str | None, arg2: str | None, dbname: str | None,
                source: str | None) -> int:
    # ATTACH (also what VACUUM INTO does first) would let a cell open or create any file the
    # kernel user can write: db() is the kernel's one database, nothing else.
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() not in _SAFE_PRAGMAS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class SQLiteDatabase:
    """The embedded database: one SQLite file, a fresh connection per call.

    A connection per call costs well under a millisecond, makes calls from any thread safe and
    leaves no session state (temp tables, PRAGMAs) from one call to the next; read-only calls
    open the file with ``mode=ro``, which no statement can lift (unlike ``PRAGMA query_only``,
    which a statement could turn off). SQLite's own length limit is set to the result limit,
    so no statement can make or read one value (``zeroblob(1e9)``, ``group_concat`` of a
    table) larger than a result may be.
    """

    placeholder = "?"

    def __init__(self, path: str) -> None:
        # Resolved once: the file checked to lie outside the workspace is the file used, even
        # after a native cell changes the working directory.
        self.path = Path(path).expanduser().resolve()

    def _connect(self, readonly: bool, timeout: float) -> sqlite3.Connection:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            sqlite3.connect(self.path).close()  # an empty database, so mode=ro can open it
        uri = self.path.as_uri() + ("?mode=ro" if readonly else "?mode=rw")
        conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None,
                               check_same_thread=False)
        conn.set_authorizer(_authorizer)
        return conn

    def run(self, sql: str, params: Any, readonly: bool, limits: ResultLimits,
            timeout: float) -> tuple[list[str], list[dict[str, Any]], int]:
        """Run one statement (SQLite refuses several in one call)."""
        conn = self._connect(readonly, timeout)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limits.max_bytes)
        deadline = time.monotonic() + timeout
        # Called every N virtual-machine steps: a non-zero answer aborts the statement.
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        width = 1
        try:
            width = _result_width(conn, sql, params)
            value_cap = _value_cap(limits.max_bytes, width)
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, value_cap)
            cur = conn.execute(sql, params if params is not None else ())
            columns = [d[0] for d in cur.description or ()]
            if not cur.description:
                return columns, [], max(cur.rowcount, 0)
            rows = RowCollector(columns, limits)
            for row in cur:
                rows.add(row)
            return columns, rows.records, len(rows.records)
        except sqlite3.ProgrammingError as exc:
            raise ValueError(f"db(): {exc}") from None
        except sqlite3.Error as exc:
            text = str(exc)
            if text == "string or blob too big":
                cap = _value_cap(limits.max_bytes, width)
                why = ("the most one db() result may hold" if cap == limits.max_bytes else
                       f"the most one of the {width} values of a row may hold: a row of "
                       f"{width} columns may take at most {_ROW_FACTOR} times "
                       f"{limits.max_bytes} bytes")
                raise ValueError(
                    f"db(): this statement makes or reads a value larger than {cap} bytes, "
                    f"{why} (c.Runtime.db_max_result_bytes); select smaller values (length(x) "
                    "rather than x) or fewer columns, or raise c.Runtime.db_max_result_bytes"
                    ) from None
            if text == "interrupted":
                raise TimeoutError(f"db(): the statement ran longer than {timeout:g} s "
                                   "(c.Runtime.db_timeout)") from None
            if "readonly" in text.replace("-", "").replace(" ", ""):
                raise PermissionError(f"db(): {text}: db() is read-only in this cell "
                                      "(--db-readonly or c.Runtime.db_readonly)") from None
            if text in ("not authorized", "authorization denied"):
                raise PermissionError("db(): that statement is not allowed (ATTACH, "
                                      "VACUUM INTO and PRAGMAs other than schema queries are "
                                      "refused: db() works on the kernel's database only)"
                                      ) from None
            raise RuntimeError(f"db(): {text}") from None
        finally:
            conn.close()

    def close(self) -> None:
        """Nothing is held between calls."""


#: How many times the result limit one SQLite row may take in all. SQLite makes every value
#: of a row before the first is handed over (and Python copies them all), so the length limit
#: of one value times the number of columns is what one row can cost the host: with up to
#: 2000 columns, ``SELECT zeroblob(8e6), zeroblob(8e6), ...`` took 1.5 GB at 100 columns.
_ROW_FACTOR = 4


def _value_cap(max_bytes: int, width: int) -> int:
    """SQLite's length limit for a statement returning ``width`` columns: the result limit,
    lowered so that the row as a whole stays within :data:`_ROW_FACTOR` times it."""
    return max(1, min(max_bytes, _ROW_FACTOR * max_bytes // max(width, 1)))


def _result_width(conn: sqlite3.Connection, sql: str, params: Any) -> int:
    """How many columns ``sql`` returns, read from its program (``EXPLAIN``, which prepares the
    statement without running it): the widest ``ResultRow``. A statement EXPLAIN cannot take
    (an ``EXPLAIN`` itself) counts as SQLite's widest possible row, which only lowers the
    length limit; a statement that fails to prepare reports its own error when it runs."""
    try:
        cur = conn.execute("EXPLAIN " + sql, params if params is not None else ())
    except sqlite3.Error:
        if sql.lstrip().upper().startswith("EXPLAIN"):
            return conn.getlimit(sqlite3.SQLITE_LIMIT_COLUMN)
        return 1
    try:
        # Rows of (addr, opcode, p1, p2, ...): ResultRow's p2 is how many columns it returns.
        return max((int(row[3]) for row in cur if row[1] == "ResultRow"), default=1)
    finally:
        cur.close()


# -- PostgreSQL ------------------------------------------------------------------------------
class PostgresDatabase:
    """A PostgreSQL server through psycopg 3: one session, kept, reopened when lost.

    The broker keeps two, one for native cells and one for the isolated tiers, so nothing a
    sandboxed cell does to its session (``SET ROLE``, ``search_path``, temp tables, prepared
    statements, advisory locks) reaches a native cell; with ``isolated`` the session is also
    reset (``DISCARD ALL``) after every call, so nothing reaches the next isolated call either.

    Every statement goes through the extended protocol, which takes one statement at a time,
    so ``SELECT 1; COMMIT; DELETE ...`` cannot smuggle a second statement past ``SET
    TRANSACTION READ ONLY``; rows are streamed one at a time (single-row mode), so a result
    over the limits is cancelled on the server rather than read. A single row is read whole:
    PostgreSQL itself caps a value at 1 GB.
    """

    placeholder = "%s"

    def __init__(self, url: str, isolated: bool = False) -> None:
        self.url = url
        self.isolated = isolated
        self._conn: Any = None
        self._lock = threading.Lock()

    def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                # autocommit: each call opens its own transaction block (so DISCARD ALL, which
                # may not run inside one, can follow it).
                # No prepared statements kept by psycopg: DISCARD ALL deallocates them on the
                # server behind its back.
                self._conn = psycopg.connect(self.url, connect_timeout=10, autocommit=True,
                                             prepare_threshold=None)
            except psycopg.Error as exc:
                raise ConnectionError(f"db(): cannot connect to PostgreSQL (c.Runtime.db_url "
                                      f"/ $TIERKERNEL_DB_URL): {exc}") from None
        return self._conn

    def run(self, sql: str, params: Any, readonly: bool, limits: ResultLimits,
            timeout: float) -> tuple[list[str], list[dict[str, Any]], int]:
        """Run one statement in a transaction of its own."""
        import psycopg
        from psycopg import errors

        with self._lock:
            conn = self._connection()
            try:
                described = self._describe(conn, sql, params)
                with conn.transaction(), conn.cursor() as cur:
                    if readonly:
                        cur.execute("SET TRANSACTION READ ONLY")
                    # An integer, so formatting it in is safe (SET takes no parameters).
                    cur.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}")
                    if described == []:  # returns no rows: nothing to stream, keep its count
                        # binary=True only forces the extended protocol (one statement; an
                        # unnamed one, which DISCARD ALL cannot leave psycopg believing in);
                        # a command has no values to format.
                        cur.execute(sql, params, binary=True)
                        return [], [], max(cur.rowcount, 0)
                    rows: RowCollector | None = None
                    try:
                        for row in cur.stream(sql, params):
                            if rows is None:
                                rows = RowCollector([d.name for d in cur.description or ()],
                                                    limits)
                            rows.add(row)
                    except psycopg.ProgrammingError as exc:
                        # Only when the description failed and the statement turned out to be
                        # a command: it ran, its count is unknown.
                        if "didn't produce a result" not in str(exc):
                            raise
                        return [], [], 0
                    if rows is None:
                        return list(described or ()), [], 0
                    return rows.columns, rows.records, len(rows.records)
            except psycopg.Error as exc:
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                if isinstance(exc, errors.ReadOnlySqlTransaction):
                    raise PermissionError(f"db(): {message}: db() is read-only in this cell "
                                          "(--db-readonly or c.Runtime.db_readonly)") from None
                if isinstance(exc, errors.QueryCanceled):
                    raise TimeoutError(f"db(): the statement ran longer than {timeout:g} s "
                                       "(c.Runtime.db_timeout)") from None
                if isinstance(exc, psycopg.OperationalError):
                    raise ConnectionError(f"db(): {message}") from None
                if isinstance(exc, psycopg.ProgrammingError) and not isinstance(
                        exc, psycopg.errors.DatabaseError):
                    raise ValueError(f"db(): {message}") from None
                raise RuntimeError(f"db(): {message}") from None
            finally:
                if self.isolated:
                    self._reset(conn)

    @staticmethod
    def _describe(conn: Any, sql: str, params: Any) -> list[str] | None:
        """The names of the columns ``sql`` returns ([] for a statement that returns no rows),
        learned by preparing it without running it; None when that fails (the statement then
        runs as one that returns rows, and its own error, if any, is the one reported).

        Run before the call's transaction opens: a statement that fails to prepare inside a
        transaction would abort it.
        """
        import psycopg

        try:
            text = psycopg.ClientCursor(conn).mogrify(sql, params)
            conn.pgconn.prepare(b"", text.encode(conn.info.encoding))
            result = conn.pgconn.describe_prepared(b"")
            if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
                return None
            return [(result.fname(i) or b"").decode(conn.info.encoding)
                    for i in range(result.nfields)]
        except (psycopg.Error, UnicodeError, LookupError, TypeError, ValueError):
            return None

    def _reset(self, conn: Any) -> None:
        """Forget everything the call did to the session; a session that cannot be reset is
        closed (the next call opens a fresh one)."""
        import psycopg

        try:
            if not conn.closed:
                conn.execute("DISCARD ALL")
        except psycopg.Error as exc:
            log.warning("db(): resetting the isolated PostgreSQL session failed (%s); it is "
                        "closed and the next call opens a new one", exc)
            conn.close()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def execute(database: Database, query: Any, params: Any, readonly: bool, limits: ResultLimits,
            timeout: float) -> DbOutcome:
    """Run a db() call: SQL with ``params``, or the structured form (which takes none)."""
    if isinstance(query, Mapping):
        if params is not None:
            raise ValueError("db(): the structured form carries its values itself; "
                             "params= is only for SQL")
        sql, bound, verb = compile_structured(query, database.placeholder)
        target = f"{verb} " + _target_table(query)
        args: Any = bound
    elif isinstance(query, str):
        if not query.strip():
            raise ValueError("db(): the query is empty")
        if params is not None and not isinstance(params, (list, tuple, Mapping)):
            raise TypeError("db(): params must be a list (for ? / %s placeholders) or a dict "
                            "(for :name / %(name)s)")
        sql, args = query, (list(params) if isinstance(params, (list, tuple)) else params)
        target = folded_start(sql)
    else:
        raise TypeError(f"db() takes SQL text or a structured query dict, got "
                        f"{type(query).__name__}")
    columns, records, count = database.run(sql, args, readonly, limits, timeout)
    value = {"rows": records, "row_count": count, "columns": columns}
    return DbOutcome(value, target)


def _target_table(query: Mapping[str, Any]) -> str:
    [(verb, spec)] = query.items()
    key = {"select": "from", "insert": "into", "update": "table", "delete": "from"}[verb]
    return str(spec[key])


def open_database(url: str, path: str, isolated: bool = False,
                  workspace: Path | None = None) -> Database:
    """PostgreSQL when ``url`` is set (a session reset after every call when ``isolated``),
    else the SQLite file at ``path``, which must not lie inside ``workspace`` (the kernel's
    ``file://`` workspace folder, where cells could edit it directly)."""
    if url:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("c.Runtime.db_url must be a postgresql:// URL "
                             f"(got one starting {url.split(':')[0]!r}:)")
        return PostgresDatabase(url, isolated=isolated)
    if workspace is not None:
        check_outside(Path(path), workspace)
    return SQLiteDatabase(path)


def check_outside(path: Path, workspace: Path) -> None:
    """Raise ``PermissionError`` when the database file ``path`` lies inside ``workspace``."""
    where = path.expanduser().resolve()
    root = workspace.expanduser().resolve()
    if where == root or root in where.parents:
        raise PermissionError(
            f"db(): the database file {where} is inside the kernel's fsx workspace {root} "
            "(file://), where cells of every tier could edit it directly instead of through "
            "db(); db() refuses to use it. Set c.Runtime.db_path (or $TIERKERNEL_DB_PATH) to a "
            "file outside the workspace, or leave it unset for the default in Jupyter's data "
            "dir")

