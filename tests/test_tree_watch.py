"""The inotify watch that spares the sandbox tier a walk of its workspace around each cell.

What must hold: every kind of write anywhere in the tree moves the count (including in folders
made or moved in after the watch began), reads move nothing, and where the watch cannot be
trusted it says so (None) instead of answering.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tierkernel.guest import tree_watch
from tierkernel.guest.tree_watch import TreeWatch


@pytest.fixture()
def tree(tmp_path: Path) -> Iterator[tuple[Path, TreeWatch]]:
    root = tmp_path / "ws"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "deep.txt").write_text("deep")
    (root / "top.txt").write_text("top")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    watch = TreeWatch(fd, str(root))
    assert watch.why is None and watch.version() is not None
    yield root, watch
    watch.close()
    os.close(fd)


def moves(watch: TreeWatch, change: Callable[[], object]) -> bool:
    before = watch.version()
    change()
    after = watch.version()
    assert before is not None and after is not None
    return after != before


def test_reads_and_listings_move_nothing(tree):
    root, watch = tree
    first = watch.version()
    (root / "a" / "b" / "deep.txt").read_text()
    list(os.walk(root))
    os.stat(root / "top.txt")
    assert watch.version() == first


@pytest.mark.parametrize("change", [
    "rewrite same size", "append", "new file deep", "delete", "chmod", "touch", "rename",
    "symlink",
])
def test_every_kind_of_write_moves_the_count(tree, change):
    root, watch = tree
    deep = root / "a" / "b" / "deep.txt"
    act = {
        "rewrite same size": lambda: deep.write_text("DEEP"),
        "append": lambda: deep.open("a").write("more"),
        "new file deep": lambda: (root / "a" / "b" / "new.txt").write_text("n"),
        "delete": deep.unlink,
        "chmod": lambda: deep.chmod(0o600),
        "touch": lambda: os.utime(deep, (1, 1)),
        "rename": lambda: deep.rename(root / "a" / "moved.txt"),
        "symlink": lambda: (root / "a" / "link").symlink_to("/etc"),
    }[change]
    assert moves(watch, act)


def test_folders_made_or_moved_in_later_are_watched_too(tree, tmp_path):
    root, watch = tree
    assert moves(watch, lambda: (root / "fresh" / "x").mkdir(parents=True))
    assert moves(watch, lambda: (root / "fresh" / "x" / "f.txt").write_text("1"))
    outside = tmp_path / "outside"
    (outside / "inner").mkdir(parents=True)
    assert moves(watch, lambda: outside.rename(root / "came_in"))
    assert moves(watch, lambda: (root / "came_in" / "inner" / "g.txt").write_text("2"))
    # A folder moved within the tree keeps being heard under its new name.
    assert moves(watch, lambda: (root / "a").rename(root / "renamed"))
    assert moves(watch, lambda: (root / "renamed" / "b" / "deep.txt").write_text("xyzw"))


def test_folders_moved_out_are_no_longer_heard(tree, tmp_path):
    root, watch = tree
    assert moves(watch, lambda: (root / "a").rename(tmp_path / "gone"))
    assert not moves(watch, lambda: (tmp_path / "gone" / "b" / "deep.txt").write_text("x"))


def test_a_symlink_to_a_folder_outside_is_not_followed(tree, tmp_path):
    root, watch = tree
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert moves(watch, lambda: (root / "ln").symlink_to(outside))
    assert not moves(watch, lambda: (outside / "f.txt").write_text("not ours"))


def test_a_lost_queue_is_recovered_by_looking_again(tree):
    root, watch = tree
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    first = watch.version()
    rescans = []
    rescan = watch._rescan
    watch._rescan = lambda: rescans.append(1) or rescan()  # type: ignore[method-assign]
    for i in range(limit + 100):  # more distinct events than the kernel queues: an overflow
        os.close(os.open(root / f"f{i}", os.O_CREAT | os.O_WRONLY))
    after = watch.version()
    assert after is not None and first is not None and after > first
    assert rescans, "the overflow was not noticed"
    assert moves(watch, lambda: (root / "a" / "b" / "deep.txt").write_text("still"))


def test_it_declines_what_it_cannot_hear(tmp_path, monkeypatch):
    root = tmp_path / "ws"
    (root / "one" / "two").mkdir(parents=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        small = TreeWatch(fd, str(root), max_dirs=2)
        assert small.version() is None and small.why == "the folder could not be watched whole"
        real = tree_watch._mounts()
        monkeypatch.setattr(tree_watch, "_mounts", lambda: [*real, (str(tmp_path), "nfs4")])
        remote = TreeWatch(fd, str(root))
        assert remote.version() is None
        assert remote.why is not None and "nfs4 filesystem" in remote.why
        monkeypatch.setattr(tree_watch, "_mounts", lambda: [*real, (str(root / "one"), "cifs")])
        inside = TreeWatch(fd, str(root))
        assert inside.version() is None
        assert inside.why is not None and "one inside it is a cifs filesystem" in inside.why
    finally:
        os.close(fd)


def test_mount_points_with_spaces_are_read_back(monkeypatch, tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("36 35 98:0 / /mnt/my\\040disk rw,noatime master:1 - ext4 /dev/x rw\n"
                    "37 35 98:0 / /srv/share rw - nfs4 host:/share rw\n")
    real_open = open
    monkeypatch.setattr(tree_watch, "open", lambda *a, **k: real_open(info, *a[1:], **k),
                        raising=False)
    assert tree_watch._mounts() == [("/mnt/my disk", "ext4"), ("/srv/share", "nfs4")]


def test_a_descriptor_closed_under_it_is_neither_trusted_nor_closed(tree, tmp_path):
    # A cell in the sandbox runs in the agent's process and may close any descriptor.
    _, watch = tree
    os.close(watch._fd)
    other = tmp_path / "other.txt"
    other.write_text("someone else's")
    reused = os.open(other, os.O_RDONLY)
    try:
        assert reused == watch._fd  # the lowest free number: the watch's old one
        assert watch.version() is None and watch.why == "its descriptor was closed"
        assert os.pread(reused, 100, 0) == b"someone else's"  # still open
    finally:
        os.close(reused)


def test_a_file_mapped_for_writing_counts_as_changing_while_it_is_mapped(tree):
    # Writes through a shared map are not heard by inotify (nor reliably seen in mtime).
    root, watch = tree
    path = root / "a" / "b" / "deep.txt"
    with path.open("r+b") as f:
        reader = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        shared = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE)
    try:
        first = watch.version()
        assert watch.version() != first  # mapped for writing: never "unchanged"
        shared[0:1] = b"D"
        assert watch.version() != first
    finally:
        shared.close()
    try:
        settled = watch.version()
        assert watch.version() == settled  # a read-only map writes nothing
    finally:
        reader.close()


def test_the_maps_it_reads_are_the_caller_s_choice(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "data.bin").write_bytes(b"\0" * 4096)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    child = subprocess.Popen(
        [sys.executable, "-c", "import mmap, sys, time\n"
         f"f = open({str(root / 'data.bin')!r}, 'r+b')\n"
         "m = mmap.mmap(f.fileno(), 0)\nprint('mapped', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "mapped\n"
        theirs = [f"/proc/{child.pid}/maps"]
        mine, everyone = TreeWatch(fd, str(root)), TreeWatch(fd, str(root), maps=lambda: theirs)
        assert mine.version() == mine.version()  # not this process's map
        assert everyone.version() != everyone.version()
        assert everyone.version(maps=False) == everyone.version(maps=False)
        told = TreeWatch(fd, str(root), maps=list, mapped=lambda: True)  # the caller knows
        assert told.version() != told.version()
        child.kill()
        child.wait()
        settled = everyone.version()
        assert everyone.version() == settled
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
        os.close(fd)
