"""Workspace quotas where more than one writer shares a workspace, and the totals they use.

The contract suite (tierkernel/testing/fsx.py) holds every backend to each quota; here: another
process's writes count (sqlite, local), a workspace made before the totals were kept, and
the totals each backend keeps stay those of a full walk, whatever the writes were.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tierkernel.fsx import Fsx, FsxQuotaError
from tierkernel.fsx.store import Store

OTHER = textwrap.dedent("""
    import sys
    from tierkernel.fsx import Fsx

    fs = Fsx(url=sys.argv[1]).facade()
    if sys.argv[2] == "write":
        fs.write_file(sys.argv[3], b"o" * int(sys.argv[4]))
    else:
        fs.unlink(sys.argv[3])
    fs.close()
""")


def _other_process(url: str, *args: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                         env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", OTHER, url, *args], check=True, env=env, timeout=60)


def _refused(code: int = errno.EDQUOT):
    return pytest.raises(FsxQuotaError, check=lambda e: e.errno == code)


def test_sqlite_counts_what_another_process_writes(tmp_path):
    url = f"sqlite://{tmp_path}/ws.db"
    fs = Fsx(url=url, max_bytes=1000, max_entries=3).facade()
    try:
        fs.write_file("/mine", b"m" * 100)  # opened, and its totals read, before the other
        _other_process(url, "write", "/theirs", "800")
        with _refused():
            fs.write_file("/more", b"x" * 101)
        fs.write_file("/more", b"x" * 100)
        with _refused():  # three entries now, two of them this process's
            fs.mkdir("/d")
        _other_process(url, "unlink", "/theirs")
        fs.write_file("/more", b"x" * 900)
        fs.mkdir("/d")
    finally:
        fs.close()


def test_sqlite_workspace_made_before_the_totals_is_counted_once_opened(tmp_path):
    db = tmp_path / "ws.db"
    old = Fsx(url=f"sqlite://{db}").facade()
    old.mkdir("/d")
    old.write_file("/d/a", b"a" * 300)
    old.write_file("/b", b"b" * 200)
    old.symlink("b", "/link")
    old.close()
    # As a workspace written by a tierkernel that kept no totals.
    with sqlite3.connect(db) as conn:
        for trigger in ("usage_on_insert", "usage_on_delete", "usage_on_resize"):
            conn.execute(f"DROP TRIGGER {trigger}")
        conn.execute("DROP TABLE usage")
    fs = Fsx(url=f"sqlite://{db}", max_bytes=600).facade()
    try:
        assert fs.engine.store.tally() == (4, 500)
        with _refused():
            fs.write_file("/c", b"c" * 101)
        fs.write_file("/c", b"c" * 100)
    finally:
        fs.close()


@pytest.mark.timeout(60)
def test_local_counts_what_another_program_writes_within_moments(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    fs = Fsx(url=root.as_uri(), max_bytes=1000).facade()
    try:
        fs.write_file("/mine", b"m" * 100)  # the folder is walked for its totals now
        (root / "theirs").write_bytes(b"t" * 800)  # not through fsx at all
        time.sleep(1.2)  # the totals are walked again once a second old (a small folder)
        with _refused():
            fs.write_file("/more", b"x" * 101)
        (root / "theirs").unlink()
        time.sleep(1.2)
        fs.write_file("/more", b"x" * 900)
    finally:
        fs.close()


def test_totals_follow_every_kind_of_write(each_backend):
    """What a backend keeps is what a walk finds, after writes of every kind (the local store
    re-walks only once its totals are a second old: this runs well within that)."""
    fs = each_backend
    store = fs.engine.store
    fs.write_file("/a", b"a" * 10)  # memory/sqlite keep totals always; local from now
    fs.mkdir("/d/e/f", recursive=True)
    fs.write_file("/d/e/f/g", b"g" * 1000)
    fs.append_file("/d/e/f/g", b"+" * 24)
    fs.append_file("/new-by-append", b"n" * 5)
    fs.write_file("/a", b"A" * 3)
    fs.truncate("/a", 50)
    fs.truncate("/d/e/f/g", 7)
    fs.copy_file("/d/e/f/g", "/copy")
    fs.copy_file("/a", "/copy")
    fs.symlink("d/e", "/link")
    fs.rename("/copy", "/a")
    fs.mkdir("/empty")
    fs.rename("/d/e", "/empty")  # replaces an empty folder
    fs.write_file("/z", b"z")
    fs.unlink("/z")
    fs.unlink("/link")
    with fs.open("/stream", "wb") as handle:
        handle.write(b"s" * 4000)
    fs.rmdir("/empty/f", recursive=True)
    assert store.tally() == Store.tally(store)
    assert store.tally() == (5, 50 + 5 + 4000)


@pytest.mark.timeout(60)
def test_local_counts_files_named_like_its_own_temporary_files(tmp_path):
    """The local store writes through temporary files named ``.fsx-tmp-...`` and leaves them
    out of listings; a user's files of that name are still content on disk: the totals (and
    the walk behind them) count them, so naming files so does not get around a quota."""
    root = tmp_path / "root"
    root.mkdir()
    fs = Fsx(url=root.as_uri(), max_bytes=1000, max_path_length=40).facade()
    try:
        for i in range(6):
            fs.write_file(f"/.fsx-tmp-{i:016x}", b"x" * 150)
        time.sleep(1.2)  # the totals are walked again
        with _refused():
            fs.write_file(f"/.fsx-tmp-{6:016x}", b"x" * 150)
        assert sum(p.stat().st_size for p in root.iterdir()) == 900
        # The deepest, longest path of a tree that a rename moves counts those names too.
        fs.mkdir("/d/.fsx-tmp-" + "n" * 20, recursive=True)
        with _refused(errno.ENAMETOOLONG):
            fs.rename("/d", "/ddddddddddd")
    finally:
        fs.close()
