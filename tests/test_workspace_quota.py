"""Workspace quotas through a real kernel: a hostile cell in each tier that writes without end
stops at the quota with an error that names it, and the kernel and the workspace stay usable.

The kernel gets small quotas from its command line (``--Fsx.max_bytes=8m``), as a user's
config would set them, so each case runs in seconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import sandbox_support
from tests.kernel_session import KernelSession
from tierkernel.backends.wasm import runtime as wasm_runtime
from tierkernel.fsx import Fsx

W = "%%tier wasm\n"
S = "%%tier sandbox\n"
QUOTA = 8 << 20

needs_wasm = pytest.mark.skipif(
    wasm_runtime.runtime_problem() is not None or not wasm_runtime.is_compiled(),
    reason="the wasm runtime is not installed or not compiled: run 'tierkernel warm'",
)

CLEAR = ("for name in fs.readdir('/'):\n"
         "    fs.rmdir('/' + name, recursive=True) if fs.lstat('/' + name).is_dir() "
         "else fs.unlink('/' + name)\n")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelSession, str]]:
    url = f"sqlite://{tmp_path_factory.mktemp('quota') / 'ws.db'}"
    session = KernelSession(
        extra_arguments=[f"--Fsx.max_bytes={QUOTA}", "--Fsx.max_depth=16"],
        env=dict(os.environ, TIERKERNEL_FSX_URL=url))
    yield session, url
    session.close()


@pytest.fixture()
def ws(kernel: tuple[KernelSession, str]) -> Iterator[tuple[KernelSession, Fsx]]:
    """The kernel, with its workspace emptied, and the workspace opened here too."""
    session, url = kernel
    assert session.run(CLEAR).status == "ok"
    facade = Fsx(url=url).facade()
    try:
        yield session, facade
    finally:
        facade.close()


def _says_how_to_raise(text: str, setting: str = "max_bytes") -> bool:
    return f"c.Fsx.{setting} = " in text and f"--Fsx.{setting}=" in text


@needs_wasm
@pytest.mark.timeout(240)
def test_wasm_cell_writing_without_end_stops_at_the_quota(ws):
    session, workspace = ws
    out = session.run(W + "chunk = b'x' * (1 << 20)\n"
                          "for i in range(32):  # 4 times the quota\n"
                          "    with open('/workspace/big', 'ab') as f:\n"
                          "        f.write(chunk)\n", timeout=180)
    assert out.status == "error"
    assert out.error["ename"] == "OSError" and "Quota exceeded" in out.error["evalue"]
    # The guest has only the errno; the kernel says which quota, and how to raise it.
    assert "/workspace/big: Disk quota exceeded" in out.stderr
    assert _says_how_to_raise(out.stderr), out.stderr
    assert workspace.stat("/big").st_size == QUOTA  # every chunk that fitted, none beyond
    later = session.run(W + "import os\nos.remove('/workspace/big')\n"
                            "open('/workspace/after.txt', 'w').write('room again')\n"
                            "print(sorted(os.listdir('/workspace')))")
    assert later.status == "ok", later.outputs
    assert later.stdout == "['after.txt']\n"
    assert session.run("fs.read_file('/after.txt')").result["text/plain"] == "'room again'"


@pytest.mark.timeout(120)
def test_native_cells_writing_without_end_stop_at_the_quota(ws):
    session, workspace = ws
    stream = session.run("import fsspec\n"
                         "with fsspec.open('fsx://big', 'wb') as f:\n"
                         "    for i in range(64):\n"
                         "        f.write(b'x' * (1 << 20))")
    assert stream.status == "error"
    assert stream.error["ename"] == "FsxQuotaError"
    assert stream.error["evalue"].startswith("[Errno 122] Disk quota exceeded: the workspace "
                                             "holds at most 8m of file content")
    assert _says_how_to_raise(stream.error["evalue"])
    assert not workspace.exists("/big")  # cut at the quota, and nothing of it committed
    appends = session.run("for i in range(64):\n"
                          "    fs.append_file('/log', b'y' * (1 << 20))")
    assert appends.status == "error" and appends.error["ename"] == "FsxQuotaError"
    assert _says_how_to_raise(appends.error["evalue"])
    assert workspace.stat("/log").st_size == QUOTA
    deep = session.run("fs.mkdir('/' + 'd/' * 40, recursive=True)")
    assert deep.status == "error" and _says_how_to_raise(deep.error["evalue"], "max_depth")
    assert not workspace.exists("/d")
    later = session.run("fs.unlink('/log')\nfs.write_file('/after.txt', 'room again')\n"
                        "fs.readdir('/')")
    assert later.status == "ok" and later.result["text/plain"] == "['after.txt']"


@pytest.mark.timeout(300)
def test_sandbox_cell_writing_past_the_quota_is_told_at_the_copy_back(ws):
    sandbox_support.need_sandbox()
    session, workspace = ws
    out = session.run(S + "with open('/workspace/big', 'wb') as f:\n"
                          "    for i in range(12):\n"
                          "        f.write(b'x' * (1 << 20))\n"
                          "print('written in the container')", timeout=240)
    assert out.stdout == "written in the container\n", out.outputs
    assert "could not be copied into the workspace" in out.stderr
    assert "Disk quota exceeded" in out.stderr and _says_how_to_raise(out.stderr), out.stderr
    assert "Traceback" not in out.stderr  # a limit, told as one: not a fault's traceback
    assert not workspace.exists("/big")  # the container may hold more; fsx does not
    deep = session.run(S + "import os\nos.remove('/workspace/big')\n"
                           "os.makedirs('/workspace/' + 'd/' * 40)", timeout=240)
    assert _says_how_to_raise(deep.stderr, "max_depth"), deep.outputs
    later = session.run(S + "import shutil\nshutil.rmtree('/workspace/d')\n"
                            "open('/workspace/after.txt', 'w').write('room again')\n"
                            "print('ok')", timeout=240)
    assert later.status == "ok" and later.stdout == "ok\n", later.outputs
    assert workspace.read_file("/after.txt") == "room again"
