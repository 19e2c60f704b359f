"""The sandbox tier's workspace copies under hostile cells (issue 14), as a user sees them:
the copy back is linear in a deep tree, within a byte, file and time budget, stopped by the
stop button and by --timeout; the copy in says which files the container lacks and why, and
the cells run anyway; a ``file://`` workspace gets no special modes nor links out of it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import sandbox_support as sb
from tests.kernel_session import KernelSession

S = "%%tier sandbox\n"


@pytest.fixture(scope="module")
def sqlite_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelSession]:
    """A kernel with a sqlite workspace and the default budgets (a short interrupt grace,
    so a cell stopped at its time limit leaves its copy back half a second), whose fsx
    quotas let a 2000-deep tree in."""
    sb.need_sandbox()
    where = tmp_path_factory.mktemp("ws")
    session = KernelSession(extra_arguments=["--SandboxBackend.interrupt_grace=0.5",
                                             # room for the deep trees (fsx's own quotas)
                                             "--Fsx.max_depth=4096", "--Fsx.max_path_length=4096"],
                            env=dict(os.environ, TIERKERNEL_FSX_URL=f"sqlite://{where}/ws.db"))
    try:
        yield session
    finally:
        session.close()


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelSession, Path]]:
    """A kernel whose workspace is a host folder, with small copy budgets and /workspace."""
    sb.need_sandbox()
    root = tmp_path_factory.mktemp("host") / "root"
    root.mkdir()
    session = KernelSession(
        extra_arguments=["--SandboxBackend.copy_back_files=300",
                         "--SandboxBackend.copy_back_bytes=64m",
                         "--SandboxBackend.workspace_size=24m"],
        env=dict(os.environ, TIERKERNEL_FSX_URL=root.as_uri()))
    try:
        yield session, root
    finally:
        session.close()


@pytest.mark.parametrize("depth", [300, 2000])
def test_a_deep_tree_comes_back_in_seconds(sqlite_kernel: KernelSession, depth: int):
    """os.makedirs('/workspace/' + 'a/' * 300) held the kernel 37 s; depth 2000, hours."""
    # os.makedirs recurses once per level: a loop goes as deep as Linux lets it
    out = sqlite_kernel.run(S + f"import os\np = '/workspace/deep{depth}'\nos.mkdir(p)\n"
                                f"for _ in range({depth}):\n    p += '/a'\n    os.mkdir(p)\n"
                                "open(p + '/end.txt', 'w').write('deep')", timeout=60)
    assert out.status == "ok", out.outputs
    assert out.stderr == ""
    seen = sqlite_kernel.run(f"fs.read_file('/deep{depth}/' + 'a/' * {depth} + 'end.txt')")
    assert seen.result["text/plain"] == "'deep'", seen.outputs
    sqlite_kernel.run(S + f"import shutil\nshutil.rmtree('/workspace/deep{depth}')", timeout=60)


def test_a_sparse_terabyte_file_fails_its_cell_and_is_never_streamed(
        sqlite_kernel: KernelSession):
    out = sqlite_kernel.run(S + "import os\nopen('/workspace/huge.bin', 'w').close()\n"
                                "os.truncate('/workspace/huge.bin', 1 << 40)\n"
                                "open('/workspace/small.txt', 'w').write('small')", timeout=60)
    assert out.status == "error", out.outputs
    assert out.error["ename"] == "WorkspaceCopyError"
    assert "copy_back_bytes" in out.error["evalue"], out.error
    assert "Nothing of it was copied" in out.error["evalue"]
    # nothing partial: neither file reached fsx; the container still has both
    listed = sqlite_kernel.run("sorted(fs.readdir('/'))")
    assert "huge.bin" not in listed.result["text/plain"], listed.outputs
    assert "small.txt" not in listed.result["text/plain"], listed.outputs
    # the user removes it: the next change brings the rest, and the tier works on
    fixed = sqlite_kernel.run(S + "os.remove('/workspace/huge.bin')\nsorted(os.listdir())")
    assert fixed.status == "ok", fixed.outputs
    assert sqlite_kernel.run("fs.read_file('/small.txt')").result["text/plain"] == "'small'"


def test_the_stop_button_ends_a_copy_back(sqlite_kernel: KernelSession):
    # 1.45 GiB of zeros (sparse in the container: no memory) is within the default byte
    # budget, and takes seconds to stream: the stop button ends it.
    out = sqlite_kernel.run(S + "import os\nopen('/workspace/zeros.bin', 'w').close()\n"
                                "os.truncate('/workspace/zeros.bin', 1485 << 20)",
                            interrupt_after=1.0, timeout=60)
    assert out.status == "error", out.outputs
    assert out.error["ename"] == "KeyboardInterrupt", out.error
    assert "copy back of /workspace was stopped: the cell was interrupted" in \
        out.error["evalue"]
    assert "zeros.bin" not in sqlite_kernel.run("fs.readdir('/')").result["text/plain"]
    assert sqlite_kernel.run(S + "os.remove('/workspace/zeros.bin')").status == "ok"


def test_the_cells_timeout_ends_a_copy_back(sqlite_kernel: KernelSession):
    out = sqlite_kernel.run("%%tier sandbox --timeout 3\nimport os, time\ntime.sleep(2.4)\n"
                            "open('/workspace/zeros.bin', 'w').close()\n"
                            "os.truncate('/workspace/zeros.bin', 1485 << 20)", timeout=60)
    assert out.status == "error", out.outputs
    assert out.error["ename"] == "TimeoutError", out.error
    assert "longer than its 3 s limit" in out.error["evalue"]
    assert "--timeout" in out.error["evalue"]
    assert "zeros.bin" not in sqlite_kernel.run("fs.readdir('/')").result["text/plain"]
    assert sqlite_kernel.run(S + "os.remove('/workspace/zeros.bin')").status == "ok"


def test_the_byte_and_file_budgets_fail_the_cell_and_name_the_setting(host_kernel):
    session, root = host_kernel
    out = session.run(S + "import os\nos.makedirs('/workspace/many')\n"
                          "for i in range(400):\n"
                          "    open(f'/workspace/many/{i}.txt', 'w').write('x')")
    assert out.status == "error" and out.error["ename"] == "WorkspaceCopyError", out.outputs
    assert "300 files" in out.error["evalue"] and "copy_back_files" in out.error["evalue"]
    assert not (root / "many").exists()
    assert session.run(S + "import shutil\nshutil.rmtree('/workspace/many')").status == "ok"
    out = session.run(S + "open('/workspace/big.bin', 'w').close()\n"
                          "os.truncate('/workspace/big.bin', 80 << 20)")  # sparse: no room used
    assert out.status == "error" and out.error["ename"] == "WorkspaceCopyError", out.outputs
    assert "64 MiB" in out.error["evalue"] and "copy_back_bytes" in out.error["evalue"]
    assert not (root / "big.bin").exists()
    assert session.run(S + "os.remove('/workspace/big.bin')").status == "ok"


def test_a_workspace_larger_than_the_container_holds_still_runs_its_cells(host_kernel):
    session, root = host_kernel
    for name in ("a.bin", "b.bin", "c.bin"):
        (root / name).write_bytes(b"z" * (10 << 20))
    os.mkfifo(root / "pipe")  # cannot be read as a file
    try:
        out = session.run(S + "sorted(n for n in os.listdir() if n.endswith('.bin'))")
        assert out.status == "ok", out.outputs
        # /workspace holds 24 MiB: one 10 MiB file stays out, and the user is told
        assert "can hold 24 MiB" in out.stderr and "workspace_size" in out.stderr, out.stderr
        assert "pipe (unreadable:" in out.stderr, out.stderr
        shown = eval(out.result["text/plain"])
        assert len(shown) == 2
        left_out = ({"a.bin", "b.bin", "c.bin"} - set(shown)).pop()
        assert left_out in out.stderr
        # the next cells work, and do not try (nor tell) again while fsx is unchanged
        again = session.run(S + "open('/workspace/new.txt', 'w').write('made')")
        assert again.status == "ok" and again.stderr == "", again.outputs
        assert (root / "new.txt").read_text() == "made"
        assert (root / left_out).read_bytes() == b"z" * (10 << 20)  # never taken as deleted
        # a small memory limit is the real cap, and the message says so
        small = session.run("%%tier sandbox --memory 112m\nsorted(os.listdir())")
        assert small.status == "ok", small.outputs
        assert "memory limit of 112m" in small.stderr, small.stderr
    finally:
        for name in ("a.bin", "b.bin", "c.bin", "pipe", "new.txt"):
            (root / name).unlink(missing_ok=True)
        session.run("%tier sandbox --memory 512m")


def test_hostile_modes_and_links_never_reach_host_disk(host_kernel):
    session, root = host_kernel
    (root.parent / "x").write_text("outside")
    out = session.run(S + "import os\n"
                          "open('/workspace/suid.sh', 'w').write('#!/bin/sh\\n')\n"
                          "os.chmod('/workspace/suid.sh', 0o4777)\n"
                          "os.makedirs('/workspace/d/e')\nos.chmod('/workspace/d', 0o1777)\n"
                          "os.symlink('/etc/passwd', '/workspace/passwd')\n"
                          "os.symlink('../../x', '/workspace/d/up')\n"
                          "os.symlink('../suid.sh', '/workspace/d/ok')")
    assert out.status == "ok", out.outputs
    assert stat.S_IMODE(os.lstat(root / "suid.sh").st_mode) & 0o7002 == 0
    assert stat.S_IMODE(os.lstat(root / "d").st_mode) & 0o7002 == 0
    assert not os.path.lexists(root / "passwd")
    assert not os.path.lexists(root / "d" / "up")
    assert os.readlink(root / "d" / "ok") == "../suid.sh"
    assert "passwd: a link to the absolute path '/etc/passwd'" in out.stderr, out.stderr
    assert "d/up: a link to '../../x', which leads out of the workspace" in out.stderr
