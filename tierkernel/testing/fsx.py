"""The fsx contract suite: every operation and every error of a workspace, for any store.

Each fsx store (memory, sqlite, local, and any third-party :class:`tierkernel.fsx.store.Store`)
must behave exactly like the others: the same content, the same errno for each failure, the
same quotas. :class:`FsxContract` holds those tests, as fsspec ships its abstract suite in
``fsspec/tests/abstract/``; a store's test module subclasses it, says how to open a fresh
workspace on that store, and pytest runs every test against it::

    # test_mystore.py, in the third-party store's own tests
    from tierkernel.fsx import Fsx, FsxFacade, FsxFileSystem
    from tierkernel.testing.fsx import FsxContract

    from mystore import MyStore


    class TestMyStore(FsxContract):
        backend_name = "mystore"  # what MyStore.backend says (shown by %fsx info)

        def make(self, tmp_path, **settings):
            quota = Fsx(**settings).quota()  # settings: Fsx quota traits, e.g. max_bytes="3m"
            return FsxFacade(FsxFileSystem(MyStore(tmp_path / "ws"), quota))

tierkernel's own stores run the same suite (``tests/fsx/test_backends.py``). This module
needs pytest, a test dependency: it is never imported by the kernel. For pytest's detailed
assertion messages in these tests, call ``pytest.register_assert_rewrite("tierkernel.testing")``
in your ``conftest.py`` before importing it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest

from tierkernel.fsx import DirEntry, FsxFacade

__all__ = ["FsxContract"]

LARGE = 65 * 1024 * 1024 + 12345  # over 64 MB, and not a multiple of any chunk size

#: What the ``limited`` fixture gives a test: opens the store's workspace with the quotas
#: given as keyword arguments (``max_bytes=1000``).
Opener = Callable[..., FsxFacade]


def expect(code: int, exc_type: type[OSError] = OSError) -> pytest.RaisesExc[OSError]:
    """pytest.raises for an OSError of this errno (and class)."""
    return pytest.raises(exc_type, check=lambda e: e.errno == code)


class _Pattern:
    """A deterministic stream of ``size`` bytes in which every MiB differs from the others, so
    chunks stored, read or copied out of order would not hash equal."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.offset = 0
        self._index = -1
        self._block = b""

    def _block_at(self, index: int) -> bytes:
        if index != self._index:
            self._index = index
            self._block = hashlib.sha256(b"fsx %d" % index).digest() * (1 << 15)  # 1 MiB
        return self._block

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        out = bytearray()
        while len(out) < n:
            index, start = divmod(self.offset, 1 << 20)
            piece = self._block_at(index)[start:start + n - len(out)]
            out += piece
            self.offset += len(piece)
        self.left -= n
        return bytes(out)


def _stream(source: _Pattern | _Endless) -> BinaryIO:
    """``source`` as the facade's stream argument: it only ever calls ``read(n)``."""
    return cast(BinaryIO, source)


def pattern_digest(size: int) -> str:
    """The SHA-256 of :class:`_Pattern`'s ``size`` bytes."""
    h = hashlib.sha256()
    src = _Pattern(size)
    while chunk := src.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


class FsxContract:
    """The tests every fsx store passes. Not collected itself (its name does not start with
    ``Test``); a subclass named ``Test...`` sets :attr:`backend_name` and defines
    :meth:`make`."""

    #: The store's name as ``FsxFacade.info()["backend"]`` reports it.
    backend_name: str = ""

    def make(self, tmp_path: Path, **settings: Any) -> FsxFacade:
        """A facade over a fresh, empty workspace on the store under test, held to the
        ``Fsx`` quota traits given in ``settings`` (``max_bytes``, ``max_entries``,
        ``max_file_size``, ``max_depth``, ``max_path_length``; none given: the defaults).
        ``tmp_path`` is the test's own temporary folder. Called by the fixtures below, once
        or more per test; the facades are closed after the test."""
        raise NotImplementedError(f"{type(self).__name__} must define make()")

    @pytest.fixture
    def fs(self, tmp_path: Path) -> Iterator[FsxFacade]:
        """A fresh workspace on the store under test, with the default quotas."""
        facade = self.make(tmp_path)
        yield facade
        facade.close()

    # -- content --------------------------------------------------------------------------
    def test_write_then_read_text_and_bytes(self, fs: FsxFacade) -> None:
        fs.write_file("/notes.txt", "héllo wörld\n")
        assert fs.read_file("/notes.txt") == "héllo wörld\n"
        assert fs.read_file("notes.txt", encoding=None) == "héllo wörld\n".encode()
        fs.write_file("/latin.txt", "é", encoding="latin-1")
        assert fs.read_file("/latin.txt", encoding=None) == b"\xe9"
        fs.write_file("/raw.bin", bytes(range(256)))
        assert fs.read_file("/raw.bin", encoding=None) == bytes(range(256))

    def test_overwrite_replaces_whole_content(self, fs: FsxFacade) -> None:
        fs.write_file("/f", "a long first version")
        fs.write_file("/f", "short")
        assert fs.read_file("/f") == "short"
        assert fs.stat("/f").st_size == 5

    def test_empty_file(self, fs: FsxFacade) -> None:
        fs.write_file("/empty", b"")
        assert fs.read_file("/empty", encoding=None) == b""
        st = fs.stat("/empty")
        assert st.st_size == 0 and st.is_file()
        with fs.open("/empty", "rb") as f:
            assert f.read() == b""

    def test_append_creates_then_extends(self, fs: FsxFacade) -> None:
        fs.append_file("/log", "one\n")
        fs.append_file("/log", b"two\n")
        assert fs.read_file("/log") == "one\ntwo\n"

    def test_write_and_read_errors(self, fs: FsxFacade) -> None:
        fs.mkdir("/d")
        fs.write_file("/file", "x")
        with expect(errno.ENOENT, FileNotFoundError) as info:
            fs.read_file("/missing")
        assert info.value.filename == "/missing"
        with expect(errno.EISDIR, IsADirectoryError):
            fs.read_file("/d")
        with expect(errno.EISDIR, IsADirectoryError):
            fs.write_file("/d", "x")
        with expect(errno.EISDIR, IsADirectoryError):
            fs.write_file("/", "x")
        with expect(errno.ENOENT, FileNotFoundError):
            fs.write_file("/no/such/dir/f", "x")
        with expect(errno.ENOTDIR, NotADirectoryError):
            fs.write_file("/file/child", "x")
        with expect(errno.ENOTDIR, NotADirectoryError):
            fs.read_file("/file/")
        with expect(errno.EEXIST, FileExistsError):
            fs.write_file("/file", "y", exclusive=True)
        assert fs.read_file("/file") == "x"
        with pytest.raises(TypeError, match="must be str, bytes"):
            fs.write_file("/t", 42)  # type: ignore[arg-type]  # on purpose
        with expect(errno.EINVAL):
            fs.read_file("/bad\0name")

    def test_open_file_objects(self, fs: FsxFacade) -> None:
        with fs.open("/o.txt", "w") as f:
            f.write("line 1\n")
            f.write("line 2\n")
        # committed whole on close
        with fs.open("/o.txt") as f:
            assert f.readlines() == ["line 1\n", "line 2\n"]
        with fs.open("/o.txt", "a") as f:
            f.write("line 3\n")
        assert fs.read_file("/o.txt").count("\n") == 3
        with expect(errno.EEXIST, FileExistsError):
            fs.open("/o.txt", "x")
        with expect(errno.ENOENT, FileNotFoundError):
            fs.open("/nodir/o.txt", "w")

    def test_truncate(self, fs: FsxFacade) -> None:
        fs.write_file("/t", b"0123456789")
        fs.truncate("/t", 4)
        assert fs.read_file("/t", encoding=None) == b"0123"
        fs.truncate("/t", 6)
        assert fs.read_file("/t", encoding=None) == b"0123\0\0"
        fs.truncate("/t")
        assert fs.stat("/t").st_size == 0
        with expect(errno.EINVAL):
            fs.truncate("/t", -1)
        fs.mkdir("/dir")
        with expect(errno.EISDIR, IsADirectoryError):
            fs.truncate("/dir", 0)
        with expect(errno.ENOENT, FileNotFoundError):
            fs.truncate("/nope", 0)

    # -- directories ----------------------------------------------------------------------
    def test_mkdir(self, fs: FsxFacade) -> None:
        fs.mkdir("/a")
        assert fs.stat("/a").is_dir()
        with expect(errno.EEXIST, FileExistsError):
            fs.mkdir("/a")
        with expect(errno.ENOENT, FileNotFoundError):
            fs.mkdir("/x/y/z")
        fs.mkdir("/x/y/z", recursive=True)
        fs.mkdir("/x/y/z", recursive=True)  # like mkdir -p: no error
        assert fs.readdir("/x/y") == ["z"]
        fs.write_file("/plain", "x")
        with expect(errno.EEXIST, FileExistsError):
            fs.mkdir("/plain", recursive=True)
        with expect(errno.ENOTDIR, NotADirectoryError):
            fs.mkdir("/plain/sub", recursive=True)
        with expect(errno.ENOTDIR, NotADirectoryError):
            fs.mkdir("/plain/sub")
        with expect(errno.EEXIST, FileExistsError):
            fs.mkdir("/")

    def test_rmdir(self, fs: FsxFacade) -> None:
        fs.mkdir("/d/e", recursive=True)
        fs.write_file("/d/e/f", "x")
        with expect(errno.ENOTEMPTY):
            fs.rmdir("/d")
        assert fs.exists("/d/e/f")
        fs.rmdir("/d", recursive=True)
        assert not fs.exists("/d")
        fs.mkdir("/empty")
        fs.rmdir("/empty")
        assert fs.readdir("/") == []
        with expect(errno.ENOENT, FileNotFoundError):
            fs.rmdir("/empty")
        fs.write_file("/f", "x")
        with expect(errno.ENOTDIR, NotADirectoryError):
            fs.rmdir("/f")
        with expect(errno.EBUSY):
            fs.rmdir("/", recursive=True)

    def test_recursive_rmdir_removes_links_not_their_targets(self, fs: FsxFacade) -> None:
        fs.mkdir("/keep")
        fs.write_file("/keep/precious", "data")
        fs.mkdir("/tree")
        fs.symlink("/keep", "/tree/link-to-keep")
        fs.symlink("../keep/precious", "/tree/link-to-file")
        fs.rmdir("/tree", recursive=True)
        assert fs.read_file("/keep/precious") == "data"
        fs.symlink("/keep", "/l")
        with expect(errno.ENOTDIR, NotADirectoryError):
            fs.rmdir("/l", recursive=True)  # a link to a directory is not a directory
        assert fs.read_file("/l/precious") == "data"

    def test_readdir_names_and_types(self, fs: FsxFacade) -> None:
        fs.mkdir("/d")
        fs.write_file("/d/b.txt", "b")
        fs.write_file("/d/a.txt", "a")
        fs.mkdir("/d/sub")
        fs.symlink("a.txt", "/d/link")
        assert fs.readdir("/d") == ["a.txt", "b.txt", "link", "sub"]
        entries = fs.readdir("/d", with_types=True)
        assert entries == [DirEntry("a.txt", "file"), DirEntry("b.txt", "file"),
                           DirEntry("link", "symlink"), DirEntry("sub", "dir")]
        assert [e.is_file() for e in entries] == [True, True, False, False]
        assert [e.is_dir() for e in entries] == [False, False, False, True]
        assert [e.is_symlink() for e in entries] == [False, False, True, False]
        fs.symlink("/d", "/dlink")
        assert fs.readdir("/dlink") == fs.readdir("/d")
        assert fs.readdir() == ["d", "dlink"]
        with expect(errno.ENOTDIR, NotADirectoryError):
            fs.readdir("/d/a.txt")
        with expect(errno.ENOENT, FileNotFoundError):
            fs.readdir("/nope")

    def test_deep_tree(self, fs: FsxFacade) -> None:
        parts = [f"level{i}" for i in range(60)]
        deep = "/" + "/".join(parts)
        fs.mkdir(deep, recursive=True)
        fs.write_file(deep + "/leaf.txt", "bottom")
        assert fs.read_file(deep + "/leaf.txt") == "bottom"
        assert fs.realpath(deep + "/../" + parts[-1] + "/leaf.txt") == deep + "/leaf.txt"
        fs.rename("/level0", "/moved")
        assert fs.read_file("/moved/" + "/".join(parts[1:]) + "/leaf.txt") == "bottom"
        fs.rmdir("/moved", recursive=True)
        assert fs.readdir("/") == []

    def test_unicode_names(self, fs: FsxFacade) -> None:
        names = ["données", "日本語 ✓.txt", "emoji-🐍", "spaces and 'quotes'", "ümlaut%20"]
        fs.mkdir("/données")
        for name in names[1:]:
            fs.write_file(f"/données/{name}", name)
        assert fs.readdir("/données") == sorted(names[1:])
        for name in names[1:]:
            assert fs.read_file(f"/données/{name}") == name
        fs.rename("/données/日本語 ✓.txt", "/données/名前.txt")
        assert "名前.txt" in fs.readdir("/données")
        with expect(errno.ENAMETOOLONG):
            fs.write_file("/" + "é" * 200, "x")  # 400 bytes of UTF-8 > NAME_MAX

    # -- metadata -------------------------------------------------------------------------
    def test_stat_and_lstat(self, fs: FsxFacade) -> None:
        before = time.time_ns() - 2_000_000_000
        fs.write_file("/f", "12345")
        st = fs.stat("/f")
        assert st.is_file() and not st.is_dir() and not st.is_symlink()
        assert stat.S_ISREG(st.st_mode)
        assert st.st_size == 5
        assert st.st_mtime_ns >= before
        assert st.st_mtime == pytest.approx(st.st_mtime_ns / 1e9)
        fs.symlink("f", "/l")
        assert fs.stat("/l").is_file() and fs.stat("/l").st_size == 5
        assert fs.lstat("/l").is_symlink()
        assert fs.lstat("/f").is_file()
        assert fs.stat("/").is_dir()
        with expect(errno.ENOENT, FileNotFoundError):
            fs.stat("/missing")
        fs.symlink("nowhere", "/dangling")
        with expect(errno.ENOENT, FileNotFoundError):
            fs.stat("/dangling")
        assert fs.lstat("/dangling").is_symlink()

    def test_chmod(self, fs: FsxFacade) -> None:
        fs.write_file("/f", "x")
        fs.chmod("/f", 0o600)
        assert stat.S_IMODE(fs.stat("/f").st_mode) == 0o600
        fs.chmod("/f", 0o755)
        assert stat.S_IMODE(fs.stat("/f").st_mode) == 0o755
        assert stat.S_ISREG(fs.stat("/f").st_mode)
        fs.mkdir("/d")
        fs.chmod("/d", 0o700)
        assert stat.S_IMODE(fs.stat("/d").st_mode) == 0o700
        with expect(errno.EINVAL):
            fs.chmod("/f", 0o70000)
        with expect(errno.ENOENT, FileNotFoundError):
            fs.chmod("/missing", 0o644)

    def test_chown(self, fs: FsxFacade) -> None:
        fs.write_file("/f", "x")
        uid, gid = os.getuid(), os.getgid()
        fs.chown("/f", uid, gid)
        st = fs.stat("/f")
        assert (st.st_uid, st.st_gid) == (uid, gid)
        fs.chown("/f", -1, -1)
        assert (fs.stat("/f").st_uid, fs.stat("/f").st_gid) == (uid, gid)
        with expect(errno.EINVAL):
            fs.chown("/f", -2, 0)
        with expect(errno.ENOENT, FileNotFoundError):
            fs.chown("/missing", uid, gid)

    def test_utimes(self, fs: FsxFacade) -> None:
        fs.write_file("/f", "x")
        fs.utimes("/f", 1_000_000_000, 1_500_000_000)
        st = fs.stat("/f")
        assert st.st_atime_ns == 1_000_000_000 * 10**9
        assert st.st_mtime_ns == 1_500_000_000 * 10**9
        when = datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
        fs.utimes("/f", when, when)
        assert fs.stat("/f").st_mtime == when.timestamp()
        fs.utimes("/f", 1.5, 2.25)
        assert fs.stat("/f").st_mtime_ns == 2_250_000_000
        with pytest.raises(TypeError, match="mtime must be seconds"):
            fs.utimes("/f", 1, "yesterday")  # type: ignore[arg-type]
        with expect(errno.ENOENT, FileNotFoundError):
            fs.utimes("/missing", 1, 1)

    # -- names ----------------------------------------------------------------------------
    def test_unlink(self, fs: FsxFacade) -> None:
        fs.write_file("/f", "x")
        fs.unlink("/f")
        assert not fs.exists("/f")
        with expect(errno.ENOENT, FileNotFoundError):
            fs.unlink("/f")
        fs.mkdir("/d")
        with expect(errno.EISDIR, IsADirectoryError):
            fs.unlink("/d")
        fs.write_file("/target", "keep")
        fs.symlink("target", "/link")
        fs.unlink("/link")
        assert fs.read_file("/target") == "keep"

    def test_rename(self, fs: FsxFacade) -> None:
        fs.write_file("/a", "A")
        fs.rename("/a", "/b")
        assert not fs.exists("/a") and fs.read_file("/b") == "A"
        fs.write_file("/c", "C")
        fs.rename("/b", "/c")  # over an existing file: replaced
        assert fs.read_file("/c") == "A" and not fs.exists("/b")
        fs.mkdir("/src/inner", recursive=True)
        fs.write_file("/src/inner/f", "deep")
        fs.mkdir("/empty")
        fs.rename("/src", "/empty")  # a directory over an empty directory
        assert fs.read_file("/empty/inner/f") == "deep"
        fs.mkdir("/full")
        fs.write_file("/full/x", "x")
        with expect(errno.ENOTEMPTY):
            fs.rename("/empty", "/full")
        with expect(errno.EISDIR, IsADirectoryError):
            fs.rename("/c", "/full")
        with expect(errno.ENOTDIR, NotADirectoryError):
            fs.rename("/full", "/c")
        with expect(errno.EINVAL):
            fs.rename("/empty", "/empty/inner/inside")
        with expect(errno.ENOENT, FileNotFoundError):
            fs.rename("/missing", "/x")
        with expect(errno.ENOENT, FileNotFoundError):
            fs.rename("/c", "/no/such/dir")
        fs.rename("/c", "/c")  # same path: nothing happens
        assert fs.read_file("/c") == "A"
        assert fs.read_file("/full/x") == "x"

    def test_rename_symlink_moves_the_link(self, fs: FsxFacade) -> None:
        fs.write_file("/t", "target")
        fs.symlink("/t", "/l1")
        fs.rename("/l1", "/l2")
        assert fs.readlink("/l2") == "/t"
        assert fs.read_file("/t") == "target"

    def test_copy_file(self, fs: FsxFacade) -> None:
        fs.write_file("/src", "original")
        fs.chmod("/src", 0o640)
        fs.copy_file("/src", "/dst")
        assert fs.read_file("/dst") == "original"
        assert stat.S_IMODE(fs.stat("/dst").st_mode) == 0o640
        fs.write_file("/dst", "changed")
        assert fs.read_file("/src") == "original"
        fs.copy_file("/src", "/dst")
        assert fs.read_file("/dst") == "original"
        with expect(errno.EEXIST, FileExistsError):
            fs.copy_file("/src", "/dst", exclusive=True)
        fs.mkdir("/d")
        with expect(errno.EISDIR, IsADirectoryError):
            fs.copy_file("/d", "/x")
        with expect(errno.EISDIR, IsADirectoryError):
            fs.copy_file("/src", "/d")
        with expect(errno.ENOENT, FileNotFoundError):
            fs.copy_file("/missing", "/x")

    def test_exists_and_realpath(self, fs: FsxFacade) -> None:
        fs.mkdir("/a/b", recursive=True)
        fs.write_file("/a/b/f", "x")
        fs.symlink("a/b", "/short")
        assert fs.exists("/a/b/f") and fs.exists("short/f") and fs.exists("/")
        assert not fs.exists("/a/missing")
        assert not fs.exists("/a/b/f/under-a-file")
        assert fs.realpath("/short/f") == "/a/b/f"
        assert fs.realpath("/a/./b/../b/f") == "/a/b/f"
        assert fs.realpath("short/..") == "/a"  # '..' after a link: the target's parent
        assert fs.realpath("/") == "/"
        with expect(errno.ENOENT, FileNotFoundError):
            fs.realpath("/a/missing")

    def test_symlink_and_readlink(self, fs: FsxFacade) -> None:
        fs.mkdir("/dir")
        fs.write_file("/dir/f", "via link")
        fs.symlink("dir/f", "/rel")
        fs.symlink("/dir/f", "/abs")
        fs.symlink("does/not/exist", "/dangling")
        assert fs.readlink("/rel") == "dir/f"
        assert fs.readlink("/abs") == "/dir/f"
        assert fs.read_file("/rel") == fs.read_file("/abs") == "via link"
        fs.write_file("/abs", "written through")
        assert fs.read_file("/dir/f") == "written through"
        assert not fs.exists("/dangling")
        fs.write_file("/dangling2-target", "t")
        with expect(errno.EEXIST, FileExistsError):
            fs.symlink("x", "/rel")
        with expect(errno.EINVAL):
            fs.readlink("/dir/f")
        with expect(errno.ENOENT, FileNotFoundError):
            fs.readlink("/missing")
        with expect(errno.EINVAL):
            fs.symlink("", "/empty-target")

    def test_symlink_loops_are_eloop(self, fs: FsxFacade) -> None:
        fs.symlink("b", "/a")
        fs.symlink("a", "/b")
        fs.symlink("self", "/self")
        for path in ("/a", "/self", "/a/child"):
            with expect(errno.ELOOP):
                fs.read_file(path)
        with expect(errno.ELOOP):
            fs.stat("/a")
        with expect(errno.ELOOP):
            fs.write_file("/self", "x")
        with expect(errno.ELOOP):
            fs.realpath("/b")
        assert fs.lstat("/a").is_symlink()  # the link itself is fine
        assert not fs.exists("/a")
        # A long but finite chain still resolves.
        fs.write_file("/end", "reached")
        previous = "end"
        for i in range(30):
            fs.symlink(previous, f"/chain{i}")
            previous = f"chain{i}"
        assert fs.read_file(f"/{previous}") == "reached"

    def test_nothing_climbs_above_the_root(self, fs: FsxFacade) -> None:
        fs.write_file("/inside", "x")
        fs.mkdir("/a")
        for path in ("/../inside", "../../etc/passwd", "/a/../../b"):
            with expect(errno.EACCES, PermissionError):
                fs.read_file(path)
        fs.symlink("../../../etc/passwd", "/escape")
        with expect(errno.EACCES, PermissionError):
            fs.read_file("/escape")
        # absolute targets start at the workspace root, never the host's
        fs.symlink("/inside", "/abs")
        assert fs.read_file("/abs") == "x"
        fs.symlink("/etc/passwd", "/host-path")
        with expect(errno.ENOENT, FileNotFoundError):
            fs.read_file("/host-path")

    # -- large files and concurrency ------------------------------------------------------
    def test_file_over_64_mb(self, fs: FsxFacade) -> None:
        fs.write_file("/big.bin", _stream(_Pattern(LARGE)))
        assert fs.stat("/big.bin").st_size == LARGE
        digest = hashlib.sha256()
        with fs.open("/big.bin", "rb") as f:
            while chunk := f.read(7 << 20):
                digest.update(chunk)
        assert digest.hexdigest() == pattern_digest(LARGE)
        # a range across an internal chunk boundary
        expected = _Pattern(LARGE).read((1 << 20) + 100)[-200:]
        assert fs.fs.cat_file("/big.bin", (1 << 20) - 100, (1 << 20) + 100) == expected
        fs.append_file("/big.bin", b"tail")
        assert fs.fs.cat_file("/big.bin", LARGE, LARGE + 10) == b"tail"
        fs.copy_file("/big.bin", "/copy.bin")
        fs.rename("/copy.bin", "/moved.bin")
        assert fs.stat("/moved.bin").st_size == LARGE + 4
        fs.truncate("/moved.bin", LARGE)
        assert fs.fs.cat_file("/moved.bin", LARGE - 5) == _Pattern(LARGE).read(LARGE)[-5:]
        fs.unlink("/big.bin")
        fs.unlink("/moved.bin")
        assert fs.info()["bytes"] == 0

    def test_threads_write_concurrently(self, fs: FsxFacade) -> None:
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                fs.mkdir(f"/t{n}", recursive=True)
                for i in range(25):
                    fs.write_file(f"/t{n}/f{i}", f"{n}:{i}")
                    fs.append_file("/shared.log", f"{n}:{i}\n")
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        for n in range(4):
            assert [fs.read_file(f"/t{n}/f{i}") for i in range(25)] == [
                f"{n}:{i}" for i in range(25)]
        lines = fs.read_file("/shared.log").splitlines()
        assert sorted(lines) == sorted(f"{n}:{i}" for n in range(4) for i in range(25))

    def test_info_counts_files_and_bytes(self, fs: FsxFacade) -> None:
        fs.mkdir("/d")
        fs.write_file("/d/a", "123")
        fs.write_file("/b", "45")
        fs.symlink("b", "/link")
        info = fs.info()
        assert info["files"] == 2 and info["bytes"] == 5
        assert info["backend"] == self.backend_name

    # -- fsspec ---------------------------------------------------------------------------
    def test_fsspec_filesystem_api(self, fs: FsxFacade) -> None:
        f = fs.fs
        f.makedirs("/data")
        f.pipe_file("/data/x.csv", b"a,b\n1,2\n")
        assert f.cat_file("fsx://data/x.csv") == b"a,b\n1,2\n"
        assert f.ls("/data", detail=False) == ["/data/x.csv"]
        info = f.info("/data/x.csv")
        assert info["type"] == "file" and info["size"] == 8 and info["name"] == "/data/x.csv"
        assert f.info("/data")["type"] == "directory"
        assert f.isdir("/data") and f.isfile("/data/x.csv")
        assert f.find("/") == ["/data/x.csv"]
        f.makedirs("/a/b", exist_ok=True)
        with pytest.raises(FileExistsError):
            f.makedirs("/a/b")
        f.touch("/a/b/t")
        f.copy("/data", "/copied", recursive=True)
        assert f.cat_file("/copied/x.csv") == b"a,b\n1,2\n"
        f.mv("/copied/x.csv", "/a/moved.csv")
        assert f.exists("/a/moved.csv") and not f.exists("/copied/x.csv")
        f.rm("/a", recursive=True)
        assert not f.exists("/a")
        with pytest.raises(FileNotFoundError):
            f.info("/a")
        with f.open("/t.txt", "w") as handle:
            handle.write("text mode")
        assert f.read_text("/t.txt") == "text mode"
        assert isinstance(f.modified("/t.txt"), datetime)

    def test_pandas_round_trip(self, fs: FsxFacade) -> None:
        pd = pytest.importorskip("pandas")
        frame = pd.DataFrame({"name": ["a", "b", "ü"], "value": [1.5, 2.5, 3.5]})
        fs.mkdir("/frames")
        with fs.fs.open("/frames/df.csv", "w") as handle:
            frame.to_csv(handle, index=False)
        with fs.fs.open("/frames/df.csv", "rb") as handle:
            back = pd.read_csv(handle)
        assert back.equals(frame)

    # -- quotas ---------------------------------------------------------------------------
    @pytest.fixture
    def limited(self, tmp_path: Path) -> Iterator[Opener]:
        """Opens this backend's workspace with the quotas given (once per test)."""
        made: list[FsxFacade] = []

        def make(**limits: Any) -> FsxFacade:
            made.append(self.make(tmp_path, **limits))
            return made[-1]

        yield make
        for facade in made:
            facade.close()

    def test_quota_total_bytes(self, limited: Opener) -> None:
        fs = limited(max_bytes=1000)
        fs.write_file("/a", b"x" * 600)
        with quota_error(errno.EDQUOT, "max_bytes", "1000 bytes") as caught:
            fs.write_file("/b", b"y" * 401)
        assert caught.value.filename == "/b"
        assert not fs.exists("/b")  # nothing of the refused write is left
        fs.write_file("/b", b"y" * 400)  # exactly at the quota
        assert fs.info()["bytes"] == 1000
        with quota_error(errno.EDQUOT, "max_bytes"):
            fs.append_file("/a", b"+")
        assert fs.read_file("/a", encoding=None) == b"x" * 600  # unchanged
        fs.write_file("/a", b"z" * 600)  # a replacement no larger fits: the old is freed
        with quota_error(errno.EDQUOT, "max_bytes"):
            fs.write_file("/a", b"z" * 601)
        with quota_error(errno.EDQUOT, "max_bytes"):
            fs.truncate("/b", 401)
        with quota_error(errno.EDQUOT, "max_bytes"):
            fs.copy_file("/a", "/c")
        assert not fs.exists("/c")
        fs.truncate("/a", 100)  # shrinking always passes
        fs.copy_file("/b", "/c")  # 100 + 400 + 400
        fs.unlink("/b")  # deleting frees quota
        fs.mkdir("/d")
        fs.write_file("/d/e", b"e" * 500)
        assert fs.info()["bytes"] == 1000
        fs.rmdir("/d", recursive=True)
        fs.rename("/c", "/c2")  # moving takes no room
        fs.write_file("/f", b"f" * 500)
        assert fs.info()["bytes"] == 1000

    def test_quota_cuts_a_streaming_write(self, limited: Opener) -> None:
        fs = limited(max_bytes="3m")
        fs.write_file("/keep", b"old")
        endless = _Endless()
        with quota_error(errno.EDQUOT, "max_bytes"):
            fs.write_file("/big", _stream(endless))
        # Cut at the quota: never read more than the room left (3 MiB less /keep) and a byte.
        assert endless.given == (3 << 20) - 3 + 1
        assert not fs.exists("/big")
        with quota_error(errno.EDQUOT, "max_bytes"):
            fs.write_file("/keep", _stream(_Endless()))
        with quota_error(errno.EDQUOT, "max_bytes"):
            fs.append_file("/keep", _stream(_Endless()))
        assert fs.read_file("/keep") == "old"  # a refused replace or append changes nothing
        assert fs.info()["bytes"] == 3
        # A file opened for writing fails at the write that passes the quota, not at close,
        # and closing it then leaves the file as it was.
        chunk = b"c" * (1 << 20)
        for mode in ("wb", "ab"):
            for path in ("/keep", "/new"):
                handle = fs.open(path, mode)
                with quota_error(errno.EDQUOT, "max_bytes"):
                    for _ in range(10):
                        handle.write(chunk)
                assert handle.tell() <= 3 << 20
                with quota_error(errno.EDQUOT, "max_bytes"):
                    handle.write(b"more")  # the handle stays refused
                handle.close()
        assert fs.read_file("/keep") == "old" and not fs.exists("/new")
        with quota_error(errno.EDQUOT, "max_bytes"), fs.fs.open("/pd.bin", "wb") as handle:
            while True:
                handle.write(chunk)
        assert not fs.exists("/pd.bin")
        with fs.open("/fits", "wb") as handle:  # right up to the quota is fine
            handle.write(b"f" * ((3 << 20) - 3))
        assert fs.info()["bytes"] == 3 << 20

    def test_quota_largest_file(self, limited: Opener) -> None:
        fs = limited(max_file_size=1000)
        fs.write_file("/a", b"a" * 1000)
        # A write whose size is known says how big the file would be.
        with quota_error(errno.EFBIG, "max_file_size", "at most 1000 bytes",
                         "would be 1001 bytes"):
            fs.write_file("/b", b"b" * 1001)
        with quota_error(errno.EFBIG, "max_file_size", "would be 1001 bytes"):
            fs.append_file("/a", b"+")
        with quota_error(errno.EFBIG, "max_file_size"):
            fs.truncate("/a", 1001)
        with quota_error(errno.EFBIG, "max_file_size"):
            fs.write_file("/c", _stream(_Endless()))
        with pytest.raises(OSError, check=lambda e: e.errno == errno.EFBIG), \
                fs.open("/d", "wb") as handle:
            handle.write(b"d" * 600)
            handle.write(b"d" * 600)
        assert fs.readdir("/") == ["a"] and fs.stat("/a").st_size == 1000
        fs.write_file("/b", b"b" * 999)
        fs.copy_file("/a", "/copy")

    def test_quota_entries(self, limited: Opener) -> None:
        fs = limited(max_entries=5)
        fs.mkdir("/d")
        fs.write_file("/d/f", "1")
        fs.symlink("d/f", "/link")
        fs.copy_file("/d/f", "/g")
        fs.write_file("/h", "")
        for make in (lambda: fs.write_file("/x", "1"), lambda: fs.mkdir("/x"),
                     lambda: fs.symlink("d", "/x"), lambda: fs.copy_file("/g", "/x"),
                     lambda: fs.open("/x", "wb")):
            with quota_error(errno.EDQUOT, "max_entries", "at most 5 files, folders"):
                make()
        assert not fs.exists("/x") and not fs.lstat("/link").is_dir()
        fs.write_file("/h", "an existing file takes no new entry")
        fs.rename("/g", "/h")  # replacing frees one
        fs.mkdir("/a")
        fs.unlink("/h")
        fs.unlink("/link")
        with quota_error(errno.EDQUOT, "max_entries"):
            fs.mkdir("/a/b/c/d", recursive=True)  # three new of two free: none is made
        assert fs.readdir("/a") == []
        fs.mkdir("/a/b/c", recursive=True)
        assert sorted(fs.readdir("/")) == ["a", "d"]

    def test_quota_depth(self, limited: Opener) -> None:
        fs = limited(max_depth=4)
        fs.mkdir("/a/b/c/d", recursive=True)
        fs.write_file("/a/b/c/f", "3 folders and a file: 4 deep")
        with quota_error(errno.EDQUOT, "max_depth", "at most 4 deep"):
            fs.mkdir("/a/b/c/d/e")
        with quota_error(errno.EDQUOT, "max_depth"):
            fs.write_file("/a/b/c/d/f", "x")
        with quota_error(errno.EDQUOT, "max_depth"):
            fs.symlink("x", "/a/b/c/d/l")
        with quota_error(errno.EDQUOT, "max_depth"):
            fs.mkdir("/x/y/z/w/v/u", recursive=True)
        assert not fs.exists("/x")  # refused whole, not four folders in
        fs.symlink("a/b/c", "/short")
        with quota_error(errno.EDQUOT, "max_depth"):
            fs.write_file("/short/d/g", "through a link, still 5 deep")
        fs.mkdir("/m")
        with quota_error(errno.EDQUOT, "max_depth"):
            fs.rename("/a", "/m/a")  # /m/a/b/c/d would be 5 deep
        fs.rename("/a/b/c", "/m/c")  # shallower: fine
        assert fs.read_file("/m/c/f") == "3 folders and a file: 4 deep"
        fs.mkdir("/a/b/q")
        with quota_error(errno.EDQUOT, "max_depth"):
            fs.rename("/m/c", "/a/b/q/c")  # /a/b/q/c/d would be 5 deep
        assert fs.exists("/m/c/d") and not fs.exists("/a/b/q/c")

    def test_quota_path_length(self, limited: Opener) -> None:
        fs = limited(max_path_length=32)
        fs.mkdir("/" + "a" * 20)
        fs.write_file("/" + "a" * 20 + "/" + "b" * 10, "32 bytes exactly")
        with quota_error(errno.ENAMETOOLONG, "max_path_length", "at most 32 bytes"):
            fs.write_file("/" + "a" * 20 + "/" + "b" * 11, "33")
        with quota_error(errno.ENAMETOOLONG, "max_path_length"):
            fs.write_file("/" + "é" * 16, "two bytes each: 33 in all")
        with quota_error(errno.ENAMETOOLONG, "max_path_length"):
            fs.symlink("t" * 33, "/link")
        with quota_error(errno.ENAMETOOLONG, "max_path_length"):
            fs.rename("/" + "a" * 20, "/" + "a" * 21)  # its file's path would be 33
        fs.rename("/" + "a" * 20, "/short")
        assert fs.readdir("/short") == ["b" * 10]


class _Endless:
    """A stream that never ends, counting what it gave."""

    def __init__(self) -> None:
        self.given = 0

    def read(self, n: int = -1) -> bytes:
        n = 1 << 20 if n < 0 else min(n, 1 << 20)
        self.given += n
        return b"e" * n


def quota_error(code: int, setting: str, *detail: str) -> pytest.RaisesExc[OSError]:
    """pytest.raises for a quota's OSError: its errno, and a message that names the quota
    and says how to raise it."""
    def check(exc: BaseException) -> bool:
        text = str(exc)
        return (isinstance(exc, OSError) and exc.errno == code and f"c.Fsx.{setting} = " in text
                and f"--Fsx.{setting}=" in text and all(part in text for part in detail))
    return pytest.raises(OSError, check=check)
