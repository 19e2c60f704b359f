"""The ``sqlite:///path/ws.db`` backend: a whole workspace in one SQLite database file.

Why it is safe to kill: every fsx operation is one transaction (``BEGIN IMMEDIATE`` ...
``COMMIT``) in WAL mode, so a SIGKILL leaves each operation either fully applied or not at all
(no torn files), and an operation that returned has committed. ``synchronous=FULL`` (the
default) also keeps committed operations through a power cut; ``?synchronous=normal`` in the URL
trades that (not a process crash: SQLite's WAL survives those either way) for speed.

Why two processes can share it: SQLite's locking. Writers take the write lock at the start of
the transaction (IMMEDIATE, so a reader never has to upgrade and deadlock), and wait up to
``busy_timeout`` for each other.

Quotas: the engine reads the workspace's totals before each write. They are kept in the row
of ``usage``, which triggers on ``nodes`` update inside the very statement that adds, removes or
resizes a node, so the row is exact in every transaction, whichever process (or tierkernel
version) wrote, and reading it costs one lookup instead of a scan of every node.

Large files: content is split into 1 MiB chunks (rows of ``chunks``) so a 100 MB file is never
one giant value in memory or in one row. A file's chunks belong to a *blob* id; an overwrite
writes a new blob and deletes the old one in the same transaction, so an open reader either
sees its old version whole or fails with ESTALE, never a mix of two versions.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from tierkernel.errors import FsxConfigError
from tierkernel.fsx.errors import fs_error
from tierkernel.fsx.nodes import DEFAULT_MODE, Kind, Node
from tierkernel.fsx.paths import basename, parent
from tierkernel.fsx.store import Reader, Store, process_owner

CHUNK = 1 << 20
SCHEMA_VERSION = "1"
_NODE_COLUMNS = "kind, perm, uid, gid, size, atime_ns, mtime_ns, ctime_ns, birth_ns, target"
# Everything strictly below `p` sorts in ["p/", "p0"): '/' is 0x2F and '0' is 0x30 in UTF-8,
# so a range on the primary key finds a subtree without LIKE (whose wildcards names may hold).
_SUBTREE = "(path = :p OR (path >= :p || '/' AND path < :p || '0'))"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    path TEXT PRIMARY KEY,
    parent TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('file', 'dir', 'symlink')),
    perm INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL,
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    birth_ns INTEGER NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    blob INTEGER
);
CREATE INDEX IF NOT EXISTS nodes_by_parent ON nodes (parent);
CREATE TABLE IF NOT EXISTS blobs (id INTEGER PRIMARY KEY AUTOINCREMENT);
CREATE TABLE IF NOT EXISTS chunks (
    blob INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (blob, idx)
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
"""
# Each is one statement (a trigger's body holds semicolons, so they are not split like the
# schema). `entries` counts the root too; tally() leaves it out.
_TRIGGERS = [
    """CREATE TRIGGER IF NOT EXISTS usage_on_insert AFTER INSERT ON nodes BEGIN
        UPDATE usage SET entries = entries + 1,
            bytes = bytes + CASE WHEN new.kind = 'file' THEN new.size ELSE 0 END;
    END""",
    """CREATE TRIGGER IF NOT EXISTS usage_on_delete AFTER DELETE ON nodes BEGIN
        UPDATE usage SET entries = entries - 1,
            bytes = bytes - CASE WHEN old.kind = 'file' THEN old.size ELSE 0 END;
    END""",
    """CREATE TRIGGER IF NOT EXISTS usage_on_resize AFTER UPDATE OF size ON nodes
        WHEN new.kind = 'file' AND new.size != old.size BEGIN
        UPDATE usage SET bytes = bytes + new.size - old.size;
    END""",
]

_SYNC_MODES = {"full": "FULL", "normal": "NORMAL", "extra": "EXTRA"}


def _node(row: Any) -> Node:
    return Node(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9])


class SqliteReader(Reader):
    """Reads one blob's chunks on demand; ESTALE if the blob was replaced meanwhile."""

    def __init__(self, store: SqliteStore, path: str, blob: int, size: int) -> None:
        self._store, self._path, self._blob, self.size = store, path, blob, size

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes from the chunks that cover [offset, offset + length)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // CHUNK, (end - 1) // CHUNK
        rows = self._store.query(
            "SELECT idx, data FROM chunks WHERE blob = ? AND idx BETWEEN ? AND ? ORDER BY idx",
            (self._blob, first, last))
        if [row[0] for row in rows] != list(range(first, last + 1)):
            raise fs_error(errno.ESTALE, self._path, detail="Stale file handle: the file was "
                           "replaced or removed while it was being read; open it again")
        data = b"".join(row[1] for row in rows)
        start = offset - first * CHUNK
        return data[start:start + (end - offset)]


class SqliteStore(Store):
    """A workspace in one SQLite file (see the module docstring for the guarantees)."""

    backend = "sqlite"

    def __init__(self, path: str | Path, url: str = "", synchronous: str = "full",
                 busy_timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.url = url or f"sqlite://{self.path}"
        mode = _SYNC_MODES.get(synchronous.lower())
        if mode is None:
            raise FsxConfigError(f"sqlite synchronous={synchronous!r} is not one of "
                                 f"{', '.join(_SYNC_MODES)}")
        if not self.path.parent.is_dir():
            raise FsxConfigError(f"cannot open the sqlite workspace {str(self.path)!r}: its "
                                 "directory does not exist")
        self._lock = threading.RLock()
        self._depth = 0
        self._writing = False
        # isolation_level=None: this class issues BEGIN/COMMIT itself, one per operation.
        # check_same_thread=False: the lock above serialises threads (kernel + wasm provider).
        self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout,
                                     isolation_level=None, check_same_thread=False)
        self._wal(busy_timeout)
        self._conn.execute(f"PRAGMA synchronous={mode}")
        self._conn.execute("PRAGMA foreign_keys=OFF")
        with self.transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            for trigger in _TRIGGERS:
                self._conn.execute(trigger)
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise FsxConfigError(f"{self.path} holds an fsx workspace of schema {row[0]}; "
                                     f"this tierkernel reads schema {SCHEMA_VERSION}")
            if self._conn.execute("SELECT 1 FROM nodes WHERE path = '/'").fetchone() is None:
                now = time.time_ns()
                uid, gid = process_owner()
                self._conn.execute(
                    f"INSERT INTO nodes (path, parent, name, {_NODE_COLUMNS}) "
                    "VALUES ('/', '', '', 'dir', ?, ?, ?, 0, ?, ?, ?, ?, '')",
                    (DEFAULT_MODE["dir"], uid, gid, now, now, now, now))
            # A workspace made before the totals were kept: counted once, here, inside the
            # transaction that holds the write lock, so no write of another process is missed.
            if self._conn.execute("SELECT 1 FROM usage WHERE id = 0").fetchone() is None:
                self._conn.execute(
                    "INSERT INTO usage (id, entries, bytes) SELECT 0, count(*), "
                    "coalesce(sum(CASE WHEN kind = 'file' THEN size ELSE 0 END), 0) FROM nodes")

    def _wal(self, within: float) -> None:
        """Switch the file to WAL. Two processes opening a new workspace at once can make this
        fail with "database is locked" at once: switching takes an exclusive lock, and SQLite
        does not wait for it here as it does for other statements. So retry for a while."""
        deadline = time.monotonic() + within
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    # -- transactions ---------------------------------------------------------------------
    @contextmanager
    def _begin(self, write: bool) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                # IMMEDIATE takes the write lock now, so check-then-act in the engine cannot
                # race another process; DEFERRED reads see one snapshot.
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                self._writing = write
            elif write and not self._writing:
                raise RuntimeError("fsx: a write inside a read snapshot would risk a deadlock")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._conn.execute("ROLLBACK")
                raise
            self._depth -= 1
            if self._depth == 0:
                self._conn.execute("COMMIT")

    def transaction(self) -> AbstractContextManager[None]:
        """One write transaction (re-entrant): all or nothing, committed on exit."""
        return self._begin(True)

    def snapshot(self) -> AbstractContextManager[None]:
        """One read transaction: a consistent view while it lasts."""
        return self._begin(False)

    def external_version(self) -> object | None:
        """SQLite's ``data_version``: it changes when another connection (another kernel)
        commits to the file."""
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def query(self, sql: str, params: Any = ()) -> list[Any]:
        """Run one statement under the lock and return its rows."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _exec(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, params)

    # -- nodes ----------------------------------------------------------------------------
    def lookup(self, path: str) -> Node | None:
        """The node at ``path``."""
        rows = self.query(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE path = ?", (path,))
        return _node(rows[0]) if rows else None

    def children(self, path: str) -> list[tuple[str, Node]]:
        """The entries of directory ``path``."""
        rows = self.query(f"SELECT name, {_NODE_COLUMNS} FROM nodes WHERE parent = ?", (path,))
        return [(row[0], _node(row[1:])) for row in rows]

    def create(self, path: str, kind: Kind, perm: int, target: str = "") -> None:
        """Insert a node (a file gets an empty blob)."""
        now = time.time_ns()
        uid, gid = process_owner()
        size = len(target.encode("utf-8", "surrogateescape")) if kind == "symlink" else 0
        with self.transaction():
            blob = self._new_blob() if kind == "file" else None
            self._exec(
                f"INSERT INTO nodes (path, parent, name, {_NODE_COLUMNS}, blob) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (path, parent(path), basename(path), kind, perm, uid, gid, size, now, now, now,
                 now, target, blob))

    def _new_blob(self) -> int:
        cursor = self._exec("INSERT INTO blobs DEFAULT VALUES")
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def _drop_blob(self, blob: int | None) -> None:
        if blob is not None:
            self._exec("DELETE FROM chunks WHERE blob = ?", (blob,))
            self._exec("DELETE FROM blobs WHERE id = ?", (blob,))

    def _blob_of(self, path: str) -> tuple[int, int]:
        rows = self.query("SELECT blob, size FROM nodes WHERE path = ?", (path,))
        return int(rows[0][0]), int(rows[0][1])

    def open_reader(self, path: str) -> Reader:
        """A reader of the file's current blob."""
        blob, size = self._blob_of(path)
        return SqliteReader(self, path, blob, size)

    def _write_chunks(self, blob: int, first_index: int, head: bytes, source: BinaryIO) -> int:
        """Store ``head`` + the rest of ``source`` as full chunks from ``first_index``;
        returns the number of bytes stored."""
        index, total, pending = first_index, 0, head
        while True:
            need = CHUNK - len(pending)
            more = source.read(need) if need > 0 else b""
            while more and len(pending) + len(more) < CHUNK:
                pending += more
                more = source.read(CHUNK - len(pending))
            pending += more
            if not pending:
                return total
            self._exec("INSERT INTO chunks (blob, idx, data) VALUES (?, ?, ?)",
                       (blob, index, pending))
            total += len(pending)
            index += 1
            if len(pending) < CHUNK:
                return total
            pending = b""

    def put(self, path: str, source: BinaryIO, append: bool) -> None:
        """Replace the file's blob (or extend it) in one transaction."""
        with self.transaction():
            if self.lookup(path) is None:
                self.create(path, "file", DEFAULT_MODE["file"])
            old, size = self._blob_of(path)
            if append:
                # Keep chunks full except the last: re-write the partial last chunk with the
                # new bytes after it.
                last = size // CHUNK
                head = b""
                if size % CHUNK:
                    head = self.query("SELECT data FROM chunks WHERE blob = ? AND idx = ?",
                                      (old, last))[0][0]
                    self._exec("DELETE FROM chunks WHERE blob = ? AND idx = ?", (old, last))
                written = self._write_chunks(old, last, head, source)
                new_size, blob = last * CHUNK + written, old
            else:
                blob = self._new_blob()
                new_size = self._write_chunks(blob, 0, b"", source)
                self._drop_blob(old)
            now = time.time_ns()
            self._exec("UPDATE nodes SET blob = ?, size = ?, mtime_ns = ?, ctime_ns = ? "
                       "WHERE path = ?", (blob, new_size, now, now, path))

    def truncate(self, path: str, length: int) -> None:
        """Cut or zero-extend the blob in place."""
        with self.transaction():
            blob, size = self._blob_of(path)
            if length < size:
                keep = length // CHUNK
                self._exec("DELETE FROM chunks WHERE blob = ? AND idx > ?", (blob, keep))
                if length % CHUNK:
                    self._exec("UPDATE chunks SET data = substr(data, 1, ?) "
                               "WHERE blob = ? AND idx = ?", (length % CHUNK, blob, keep))
                else:
                    self._exec("DELETE FROM chunks WHERE blob = ? AND idx = ?", (blob, keep))
            elif length > size:
                zeros = _Zeros(length - size)
                last = size // CHUNK
                head = b""
                if size % CHUNK:
                    head = self.query("SELECT data FROM chunks WHERE blob = ? AND idx = ?",
                                      (blob, last))[0][0]
                    self._exec("DELETE FROM chunks WHERE blob = ? AND idx = ?", (blob, last))
                self._write_chunks(blob, last, head, zeros)  # type: ignore[arg-type]
            now = time.time_ns()
            self._exec("UPDATE nodes SET size = ?, mtime_ns = ?, ctime_ns = ? WHERE path = ?",
                       (length, now, now, path))

    def copy(self, src: str, dst: str) -> None:
        """A new blob for ``dst`` with ``src``'s chunks, copied inside SQLite."""
        with self.transaction():
            source_blob, size = self._blob_of(src)
            perm = self.query("SELECT perm FROM nodes WHERE path = ?", (src,))[0][0]
            if self.lookup(dst) is None:
                self.create(dst, "file", perm)
            old, _ = self._blob_of(dst)
            blob = self._new_blob()
            self._exec("INSERT INTO chunks (blob, idx, data) "
                       "SELECT ?, idx, data FROM chunks WHERE blob = ?", (blob, source_blob))
            self._drop_blob(old)
            now = time.time_ns()
            self._exec("UPDATE nodes SET blob = ?, size = ?, perm = ?, mtime_ns = ?, "
                       "ctime_ns = ? WHERE path = ?", (blob, size, perm, now, now, dst))

    def set_meta(self, path: str, *, perm: int | None = None, uid: int | None = None,
                 gid: int | None = None, atime_ns: int | None = None,
                 mtime_ns: int | None = None) -> None:
        """Update the given columns; ctime becomes now."""
        self._exec(
            "UPDATE nodes SET perm = coalesce(?, perm), uid = coalesce(?, uid), "
            "gid = coalesce(?, gid), atime_ns = coalesce(?, atime_ns), "
            "mtime_ns = coalesce(?, mtime_ns), ctime_ns = ? WHERE path = ?",
            (perm, uid, gid, atime_ns, mtime_ns, time.time_ns(), path))

    def remove(self, path: str) -> None:
        """Delete one node and its blob."""
        with self.transaction():
            rows = self.query("SELECT blob FROM nodes WHERE path = ?", (path,))
            self._exec("DELETE FROM nodes WHERE path = ?", (path,))
            if rows:
                self._drop_blob(rows[0][0])

    def remove_tree(self, path: str) -> None:
        """Delete a subtree and its blobs."""
        with self.transaction():
            params = {"p": path}
            self._exec("DELETE FROM chunks WHERE blob IN (SELECT blob FROM nodes WHERE "
                       f"{_SUBTREE} AND blob IS NOT NULL)", params)
            self._exec("DELETE FROM blobs WHERE id IN (SELECT blob FROM nodes WHERE "
                       f"{_SUBTREE} AND blob IS NOT NULL)", params)
            self._exec(f"DELETE FROM nodes WHERE {_SUBTREE}", params)

    def rename(self, src: str, dst: str) -> None:
        """Re-key the subtree: only node rows change, no content is copied."""
        with self.transaction():
            existing = self.lookup(dst)
            if existing is not None:
                self.remove_tree(dst) if existing.kind == "dir" else self.remove(dst)
            params = {"p": src, "d": dst, "n": len(src), "dp": parent(dst),
                      "dn": basename(dst), "now": time.time_ns()}
            self._exec(
                "UPDATE nodes SET "
                "parent = CASE WHEN path = :p THEN :dp ELSE :d || substr(parent, :n + 1) END, "
                "name = CASE WHEN path = :p THEN :dn ELSE name END, "
                "ctime_ns = CASE WHEN path = :p THEN :now ELSE ctime_ns END, "
                f"path = :d || substr(path, :n + 1) WHERE {_SUBTREE}", params)

    def tally(self) -> tuple[int, int]:
        """The ``usage`` row the triggers keep: one lookup."""
        entries, size = self.query("SELECT entries, bytes FROM usage WHERE id = 0")[0]
        return int(entries) - 1, int(size)

    def extent(self, path: str) -> tuple[int, int]:
        """Counted by SQL over the subtree's range of the primary key."""
        row = self.query(
            "SELECT max(length(path) - length(replace(path, '/', ''))), "
            f"max(length(CAST(path AS BLOB))) FROM nodes WHERE {_SUBTREE}", {"p": path})[0]
        return int(row[0] or 0), int(row[1] or 0)

    def usage(self) -> tuple[int, int]:
        """Counted by SQL, not by walking."""
        row = self.query("SELECT count(*), coalesce(sum(size), 0) FROM nodes "
                         "WHERE kind = 'file'")[0]
        return int(row[0]), int(row[1])

    def close(self) -> None:
        """Close the connection (SQLite checkpoints the WAL when the last one closes)."""
        with self._lock:
            self._conn.close()


class _Zeros:
    """A stream of ``n`` zero bytes, for extending a file without holding it in memory."""

    def __init__(self, n: int) -> None:
        self._left = n

    def read(self, size: int = -1) -> bytes:
        take = self._left if size < 0 else min(size, self._left)
        self._left -= take
        return b"\0" * take
