"""The execution audit log: every cell any tier ran (or refused), and every helper call it made.

One SQLite file (``c.Runtime.audit_log``) shared by all kernels of a user, in WAL mode so that
several kernels can write to it at once. Writing the log never breaks a cell: a failure is
logged and the kernel carries on.

A cell costs one commit, made when it ends: its start is held in memory, and its end writes
the whole row (with what the cell used) in one transaction, committed before the kernel sends
the cell's reply. The end of a native cell is held too (``finish(..., defer=True)``), and the
kernel commits it (:meth:`AuditLog.commit_ended`) during the pause ipykernel takes before
every native cell's reply, so the commit costs that cell no time. A cell still running
:data:`START_DELAY` after its start has its ``running`` row committed then, by a writer thread,
so a kernel that dies mid-cell still leaves a trace of it (only one that dies within that time
of the cell's start leaves none); readers of the log (``%executions``) commit what is held
first. So a client that has a cell's reply finds its record in the file, and a kernel that
crashes or is killed after a reply loses nothing of it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

#: The most characters one text field of an execution's record (code, error, logs as JSON)
#: holds. The runtime caps logs far below this (c.Runtime.log_max_bytes); this bound makes sure
#: no record is ever too large for SQLite to write, which would leave the cell "running".
MAX_FIELD_CHARS = 16 * 1024 * 1024
#: The most characters of a helper call's target and error kept in its audit row: both can
#: echo what the cell sent (a URL, a table name), and a row is written for every call.
MAX_CALL_TARGET_CHARS = 1000
MAX_CALL_ERROR_CHARS = 4000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    id              TEXT PRIMARY KEY,
    kernel_session  TEXT NOT NULL,
    cell_id         TEXT,
    execution_count INTEGER,
    tier            TEXT NOT NULL,
    code            TEXT NOT NULL,
    started         REAL NOT NULL,      -- Unix time
    duration_ms     REAL,
    status          TEXT NOT NULL,      -- running | ok | error | refused
    success         INTEGER,            -- 1 / 0; NULL while running
    error           TEXT,               -- 'Ename: message'
    logs            TEXT NOT NULL DEFAULT '[]'  -- JSON list of {level, message, time}
);
CREATE INDEX IF NOT EXISTS executions_started ON executions (started);
CREATE TABLE IF NOT EXISTS helper_calls (
    execution_id TEXT,                  -- NULL: called between cells (a native thread)
    helper       TEXT NOT NULL,         -- ai | api | db | console
    target       TEXT NOT NULL,         -- URL, table or SQL, model, log level
    allowed      INTEGER NOT NULL,      -- 0: refused by the policy
    ok           INTEGER NOT NULL,
    error        TEXT,
    started      REAL NOT NULL,
    duration_ms  REAL NOT NULL,
    size         INTEGER NOT NULL       -- bytes of JSON returned to the cell
);
CREATE INDEX IF NOT EXISTS helper_calls_execution ON helper_calls (execution_id);
-- What each cell used, measured on the host. A table of its own rather than new columns of
-- executions: older tierkernels read executions with SELECT * into a fixed shape, and they
-- may share this file with newer ones.
CREATE TABLE IF NOT EXISTS execution_usage (
    execution_id TEXT PRIMARY KEY,
    cpu_seconds  REAL,                  -- NULL: not measured
    peak_memory  INTEGER,               -- bytes
    processes    INTEGER                -- most tasks the cell's container held (sandbox)
) WITHOUT ROWID;                        -- one B-tree: the write costs less on the reply path
"""

_START = ("INSERT INTO executions (id, kernel_session, cell_id, execution_count, tier, code, "
          "started, status) VALUES (?, ?, ?, ?, ?, ?, ?, 'running')")
#: A cell whose start and end are committed together: one row with its outcome.
_WHOLE = ("INSERT INTO executions (id, kernel_session, cell_id, execution_count, tier, code, "
          "started, status, success, duration_ms, error, logs) "
          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_FINISH = ("UPDATE executions SET status = ?, success = ?, duration_ms = ?, error = ?, "
           "logs = ?, tier = COALESCE(?, tier) WHERE id = ?")
_USAGE = ("INSERT OR REPLACE INTO execution_usage (execution_id, cpu_seconds, peak_memory, "
          "processes) VALUES (?, ?, ?, ?)")
#: A cell still running this many seconds after its start (at most twice as many) has its
#: ``running`` row committed then.
START_DELAY = 0.05
#: Seconds after the last cell's start during which the writer looks for held starts every
#: START_DELAY by itself (a start does not wake it: woken, it would take the GIL from the
#: cell starting on the kernel's thread); past them it sleeps until the next start wakes it.
_ACTIVE = 5.0

#: What :func:`_execution` reads, in its order: an execution and what it used.
_SELECT = ("SELECT e.id, e.kernel_session, e.cell_id, e.execution_count, e.tier, e.code, "
           "e.started, e.duration_ms, e.status, e.success, e.error, e.logs, u.cpu_seconds, "
           "u.peak_memory, u.processes FROM executions e "
           "LEFT JOIN execution_usage u ON u.execution_id = e.id")


@dataclass(frozen=True)
class HelperCall:
    """One helper call as the audit log holds it."""

    helper: str
    target: str
    allowed: bool
    ok: bool
    error: str | None
    started: float
    duration_ms: float
    size: int


@dataclass(frozen=True)
class Execution:
    """One execution as the audit log holds it."""

    id: str
    kernel_session: str
    cell_id: str | None
    execution_count: int | None
    tier: str
    code: str
    started: float
    duration_ms: float | None
    status: str
    success: bool | None
    error: str | None
    logs: list[dict[str, Any]] = field(default_factory=list)
    calls: list[HelperCall] = field(default_factory=list)
    #: What the cell used, measured on the host (None: not measured, or an older record).
    cpu_seconds: float | None = None
    peak_memory: int | None = None
    processes: int | None = None


class _Start(NamedTuple):
    """A cell's start, held until it ends or its ``running`` row is due."""

    values: tuple[Any, ...]  # those of _START
    held: float  # time.monotonic() when it began to be held


class _Finish(NamedTuple):
    """A cell's end, as :meth:`AuditLog.finish` stores it."""

    execution_id: str
    status: str
    duration_ms: float
    error: str | None
    logs: str
    tier: str | None
    usage: tuple[float | None, int | None, int | None] | None


class AuditLog:
    """Writes and reads the audit log; safe to use from any thread.

    A cell's start is held until the cell ends (see the module); helper calls are written
    at once, by the thread that made the call.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path).expanduser()
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._warned = False
        #: Starts of cells not written yet, by execution id, oldest first.
        self._held: dict[str, _Start] = {}
        #: Taken while held starts are written, and by each cell's end: a cell's end is never
        #: written before its ``running`` row that the writer is writing.
        self._writing = threading.Lock()
        self._changed = threading.Condition(threading.Lock())
        self._writer: threading.Thread | None = None
        self._closing = False
        self._asleep = False
        self._last_start = 0.0
        #: Ends of cells held until :meth:`commit_ended` (``finish(..., defer=True)``).
        self._ended: list[_Finish] = []
        #: The process whose writer thread this is: a forked child has none, and writes each
        #: record at once.
        self._pid = os.getpid()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # A commit comes with every cell (the reply waits for it). With WAL, NORMAL does
            # not fsync each commit (0.04 ms a cell instead of ~0.5 ms here) and still loses
            # nothing when the kernel crashes or is killed; only an OS crash or a power cut
            # can drop the newest records.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        """Run one write now, on the calling thread."""
        self._run([(sql, params)])

    def _run(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Run ``statements`` in one transaction (one commit for all of them); when that
        fails, each on its own, so one bad record does not take the others with it."""
        try:
            with self._lock:
                db = self._db()
                if len(statements) == 1:
                    db.execute(*statements[0])
                    return
                try:
                    db.execute("BEGIN")
                    for statement, values in statements:
                        db.execute(statement, values)
                    db.execute("COMMIT")
                    return
                except (sqlite3.Error, ValueError):
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                for statement, values in statements:
                    try:
                        db.execute(statement, values)
                    except (sqlite3.Error, ValueError) as exc:
                        self._warn(exc)
        except (sqlite3.Error, OSError, ValueError) as exc:  # a record never fails the cell
            self._warn(exc)

    def _warn(self, exc: Exception) -> None:
        if not self._warned:  # once: a broken log must not flood the kernel's log
            log.warning("cannot write the audit log %s: %s", self.path, exc)
            self._warned = True

    # -- writing ----------------------------------------------------------------------------
    def start(self, execution_id: str, session: str, cell_id: str | None,
              execution_count: int | None, tier: str, code: str, started: float) -> None:
        """Record a cell that is starting (held: see the module)."""
        record = _Start((execution_id, session, cell_id, execution_count, tier, _cut(code),
                         started), time.monotonic())
        if self._pid == os.getpid():
            with self._changed:
                if not self._closing:
                    self._held[execution_id] = record
                    self._last_start = record.held
                    if self._writer is None:
                        self._writer = threading.Thread(target=self._write_running,
                                                        daemon=True, name="tierkernel-audit")
                        self._writer.start()
                        atexit.register(self.flush)  # an exit mid-cell still leaves its row
                    elif self._asleep:
                        self._changed.notify()
                    return
        self._write(_START, record.values)  # no writer here: closed, or a forked child

    def finish(self, execution_id: str, status: str, duration_ms: float,
               error: str | None, logs: list[dict[str, Any]], tier: str | None = None,
               usage: tuple[float | None, int | None, int | None] | None = None,
               defer: bool = False) -> None:
        """Complete a cell's record, in one transaction with its start when that is still
        held: ``status`` is ``ok``, ``error`` or ``refused``; ``usage`` is what the cell used
        as its tier measured it on the host: (CPU seconds, peak memory bytes, processes),
        each None when not measured. ``defer``: hold it until :meth:`commit_ended`."""
        record = _Finish(execution_id, status, duration_ms, _cut(error), _logs_json(logs),
                         tier, usage)
        if defer:
            with self._changed:
                self._ended.append(record)
            return
        with self._writing:
            self._run(self._statements([record]))

    def commit_ended(self) -> None:
        """Commit the ends held by ``finish(..., defer=True)``, in one transaction. Called by
        the kernel before it sends a cell's reply, and by :meth:`flush`."""
        if not self._ended:
            return
        with self._writing:
            with self._changed:
                ends, self._ended = self._ended, []
            if ends:
                self._run(self._statements(ends))

    def flush(self) -> None:
        """Commit everything held: the ends, and the ``running`` rows of the cells whose
        start is still held. Called by this log's readers, at close and at exit."""
        if self._pid != os.getpid():
            return  # a forked child: what is held is its parent's to write
        self.commit_ended()
        self._write_held(0.0)

    def _statements(self, ends: list[_Finish]) -> list[tuple[str, tuple[Any, ...]]]:
        """The writes that complete ``ends`` (with ``_writing`` held): one INSERT of the
        whole row for a cell whose start is still held, else an UPDATE of its row."""
        statements: list[tuple[str, tuple[Any, ...]]] = []
        for eid, status, duration_ms, error, logs, tier, usage in ends:
            with self._changed:
                start = self._held.pop(eid, None)
            success = int(status == "ok")
            if start is None:
                statements.append((_FINISH, (status, success, duration_ms, error, logs, tier,
                                             eid)))
            else:
                values = start.values
                statements.append((_WHOLE, (*values[:4], tier or values[4], *values[5:],
                                            status, success, duration_ms, error, logs)))
            if usage is not None and any(v is not None for v in usage):
                statements.append((_USAGE, (eid, *usage)))
        return statements

    def _write_held(self, older_than: float) -> None:
        """Write the held starts held for ``older_than`` seconds or more."""
        with self._writing:
            with self._changed:
                due = time.monotonic() - older_than
                ids = [eid for eid, start in self._held.items() if start.held <= due]
                starts = [self._held.pop(eid) for eid in ids]
            if starts:
                self._run([(_START, start.values) for start in starts])

    def _write_running(self) -> None:
        """The writer thread: write the ``running`` row of each cell still running
        :data:`START_DELAY` after its start, until the log closes."""
        while True:
            with self._changed:
                while not self._closing:
                    now = time.monotonic()
                    if self._held:
                        left = next(iter(self._held.values())).held + START_DELAY - now
                        if left <= 0:
                            break
                        self._changed.wait(left)
                    elif now - self._last_start < _ACTIVE:
                        self._changed.wait(START_DELAY)
                    else:
                        self._asleep = True
                        self._changed.wait()
                        self._asleep = False
                if self._closing:
                    return
            self._write_held(START_DELAY)

    def helper_call(self, execution_id: str | None, call: HelperCall) -> None:
        """Record one helper call."""
        self._write(
            "INSERT INTO helper_calls (execution_id, helper, target, allowed, ok, error, "
            "started, duration_ms, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (execution_id, _cut(call.helper, 100), _cut(call.target, MAX_CALL_TARGET_CHARS),
             int(call.allowed), int(call.ok), _cut(call.error, MAX_CALL_ERROR_CHARS),
             call.started, call.duration_ms, call.size))

    # -- reading ----------------------------------------------------------------------------
    def executions(self, session: str | None = None, tier: str | None = None,
                   failed: bool = False, limit: int = 20, offset: int = 0,
                   sessions: Collection[str] | None = None) -> list[Execution]:
        """The newest executions first (``offset`` of them skipped), filtered by kernel
        session (one, or any of ``sessions``), tier and failure."""
        where: list[str] = []
        params: list[Any] = []
        if session is not None:
            where.append("e.kernel_session = ?")
            params.append(session)
        if sessions is not None:
            # Within SQLite's limit on bound parameters: the newest (last given) are kept.
            chosen = list(sessions)[-1000:]
            where.append(f"e.kernel_session IN ({', '.join('?' * len(chosen)) or 'NULL'})")
            params.extend(chosen)
        if tier is not None:
            where.append("e.tier = ?")
            params.append(tier)
        if failed:
            where.append("e.status IN ('error', 'refused')")
        sql = (_SELECT + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY e.started DESC, e.rowid DESC LIMIT ? OFFSET ?")
        self.flush()
        with self._lock:
            rows = self._db().execute(sql, (*params, limit, offset)).fetchall()
        return [_execution(row) for row in rows]

    def execution(self, id_prefix: str) -> Execution:
        """One execution by id or unique id prefix, with its helper calls.

        Raises ``KeyError`` when no execution (or more than one) has that prefix.
        """
        self.flush()
        with self._lock:
            db = self._db()
            rows = db.execute(_SELECT + " WHERE e.id LIKE ? || '%' ESCAPE '\\' LIMIT 2",
                              (id_prefix.replace("%", "\\%").replace("_", "\\_"),)
                              ).fetchall()
            if len(rows) != 1:
                raise KeyError(id_prefix if not rows else f"{id_prefix} (ambiguous)")
            return _execution(rows[0], self._calls(db, rows[0][0]))

    def execution_by_count(self, session: str, count: int) -> Execution:
        """The execution of kernel session ``session`` that had execution count ``count`` (the
        cell shown as ``In [count]``), with its helper calls. Cells that do not advance the
        count (silent ones a frontend sends) share it with the next cell, which is the newest
        of them: that one is returned.

        Raises ``KeyError`` when the session has no execution with that count.
        """
        # No index serves this look-up: one more index would cost every cell's record on its
        # reply path, for a query a person types now and then.
        with self._lock:
            db = self._db()
            row = db.execute(_SELECT + " WHERE e.kernel_session = ? AND e.execution_count = ? "
                             "ORDER BY e.started DESC, e.rowid DESC LIMIT 1",
                             (session, count)).fetchone()
            if row is None:
                raise KeyError(count)
            return _execution(row, self._calls(db, row[0]))

    @staticmethod
    def _calls(db: sqlite3.Connection, execution_id: str) -> list[HelperCall]:
        """The helper calls of one execution, in the order they were made."""
        calls = db.execute(
            "SELECT helper, target, allowed, ok, error, started, duration_ms, size FROM "
            "helper_calls WHERE execution_id = ? ORDER BY started, rowid",
            (execution_id,)).fetchall()
        return [HelperCall(c[0], c[1], bool(c[2]), bool(c[3]), c[4], c[5], c[6], c[7])
                for c in calls]

    def close(self) -> None:
        """Write the held starts, stop the writer and close the file (the kernel shuts
        down)."""
        with self._changed:
            self._closing = True
            writer, self._writer = self._writer, None
            self._changed.notify_all()
        if writer is not None:
            atexit.unregister(self.flush)
            if writer is not threading.current_thread():
                writer.join()
        self.flush()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def folded_start(text: str, length: int = 200) -> str:
    """About the first ``length`` characters of ``text``, runs of whitespace folded to one
    space: what a helper call was aimed at, for the log. Made from the start of the text
    only, since splitting a guest's megabytes of short words would make millions of strings
    (a long run of whitespace just leaves less to show)."""
    return " ".join(text[:2 * length].split())[:length]


def _cut(text: str | None, limit: int = MAX_FIELD_CHARS) -> str | None:
    """``text``, cut to ``limit`` characters with a note, storable: a lone surrogate (JSON
    may carry one, SQLite cannot store it) is written as its escape, ``\\ud800``."""
    if text is None:
        return None
    if len(text) > limit:
        text = text[:limit] + f"... [cut: {len(text)} characters in all]"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _logs_json(logs: list[dict[str, Any]]) -> str:
    """``logs`` as JSON, the newest entries left out (with a note) past
    :data:`MAX_FIELD_CHARS`."""
    if not logs:  # most cells log nothing
        return "[]"
    text = json.dumps(logs)
    if len(text) <= MAX_FIELD_CHARS:
        return text
    kept, size = [], 1000  # room for the note
    for entry in logs:
        entry = {**entry, "message": _cut(str(entry.get("message", "")))}
        size += len(json.dumps(entry)) + 2
        if size > MAX_FIELD_CHARS:
            break
        kept.append(entry)
    kept.append({"level": "warn", "time": time.time(),
                 "message": f"{len(logs) - len(kept)} more log entries were not recorded: the "
                            f"logs are over {MAX_FIELD_CHARS} characters"})
    return json.dumps(kept)


def _execution(row: tuple[Any, ...], calls: list[HelperCall] | None = None) -> Execution:
    (eid, session, cell_id, count, tier, code, started, duration, status, success, error,
     logs, cpu, peak, processes) = row
    return Execution(eid, session, cell_id, count, tier, code, started, duration, status,
                     None if success is None else bool(success), error, json.loads(logs),
                     calls or [], cpu, peak, processes)


def now() -> float:
    """Unix time, as the log stores it."""
    return time.time()
