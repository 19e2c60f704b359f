"""One workspace for every tier: what a cell writes in one tier, the next cell reads in another.

Run once per fsx backend (memory, sqlite, local), each in a kernel configured for it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import sandbox_support
from tests.kernel_session import KernelSession
from tierkernel.backends.wasm import runtime as wasm_runtime

W = "%%tier wasm\n"
S = "%%tier sandbox\n"

pytestmark = pytest.mark.skipif(
    wasm_runtime.runtime_problem() is not None or not wasm_runtime.is_compiled(),
    reason="the wasm runtime is not installed or not compiled: run 'tierkernel warm'",
)


@pytest.fixture(scope="module", params=["memory", "sqlite", "local"])
def kernel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[tuple[KernelSession, str, Path]]:
    where = tmp_path_factory.mktemp(f"ws-{request.param}")
    url = {"memory": "memory://", "sqlite": f"sqlite://{where / 'ws.db'}",
           "local": f"file://{where}"}[request.param]
    session = KernelSession(env=dict(os.environ, TIERKERNEL_FSX_URL=url))
    yield session, request.param, where
    session.close()


def test_native_writes_wasm_reads(kernel):
    session, _, _ = kernel
    out = session.run("fs.mkdir('/shared/deep', recursive=True)\n"
                      "fs.write_file('/shared/deep/hello.txt', 'from native ✓')")
    assert out.status == "ok", out.outputs
    read = session.run(W + "import os\nprint(open('shared/deep/hello.txt', encoding='utf-8')"
                           ".read())\nsorted(os.listdir('/workspace/shared'))")
    assert read.stdout == "from native ✓\n", read.outputs
    assert read.result["text/plain"] == "['deep']"


def test_wasm_writes_native_reads(kernel):
    session, backend, where = kernel
    out = session.run(W + "import os, pandas as pd\nos.makedirs('out/tables', exist_ok=True)\n"
                          "pd.DataFrame({'n': [1, 2, 3]}).to_csv('out/tables/n.csv', "
                          "index=False)\nopen('out/note.txt', 'w').write('from wasm')\n"
                          "os.rename('out/note.txt', 'out/renamed.txt')", timeout=120)
    assert out.status == "ok", out.outputs
    native = session.run("import pandas as pd\n"
                         "(fs.read_file('/out/renamed.txt'), fs.exists('/out/note.txt'), "
                         "int(pd.read_csv('fsx://out/tables/n.csv').n.sum()))")
    assert native.result["text/plain"] == "('from wasm', False, 6)", native.outputs
    if backend == "local":  # the local backend's files are plain files under its root
        assert (where / "out" / "renamed.txt").read_text() == "from wasm"


def test_deletes_and_errors_cross_tiers(kernel):
    session, _, _ = kernel
    session.run("fs.write_file('/gone.txt', 'x')")
    removed = session.run(W + "import os\nos.remove('gone.txt')\nos.path.exists('gone.txt')")
    assert removed.result["text/plain"] == "False"
    assert session.run("fs.exists('/gone.txt')").result["text/plain"] == "False"
    missing = session.run(W + "open('gone.txt').read()")
    assert missing.error["ename"] == "FileNotFoundError"


def test_guest_never_sees_the_host_path(kernel):
    session, backend, where = kernel
    out = session.run(W + "import os\nos.getcwd(), os.path.realpath('.')")
    assert out.result["text/plain"] == "('/workspace', '/workspace')"
    if backend != "memory":
        assert str(where) not in out.result["text/plain"]


@pytest.fixture()
def sandboxed(kernel):
    """The same kernel, for tests that need the sandbox tier too (fail in CI without it)."""
    sandbox_support.need_sandbox()
    return kernel


def test_native_and_wasm_write_sandbox_reads(sandboxed):
    session, _, _ = sandboxed
    session.run("fs.mkdir('/box', recursive=True)\nfs.write_file('/box/a.txt', 'native')")
    session.run(W + "open('box/b.txt', 'w').write('wasm')")
    out = session.run(S + "import os\nsorted(os.listdir('box')), open('box/a.txt').read(), "
                          "open('/workspace/box/b.txt').read(), os.getcwd()")
    assert out.result["text/plain"] == "(['a.txt', 'b.txt'], 'native', 'wasm', '/workspace')", \
        out.outputs


def test_sandbox_writes_are_in_fsx_before_the_reply(sandboxed):
    session, backend, where = sandboxed
    session.run("fs.write_file('/old.txt', 'to be removed')\nfs.write_file('/keep.txt', 'k')")
    out = session.run(S + "import os, pandas as pd\nos.makedirs('made/deep', exist_ok=True)\n"
                          "pd.DataFrame({'x': [1, 2]}).to_csv('made/deep/x.csv', index=False)\n"
                          "os.remove('old.txt')\nos.rename('keep.txt', 'kept.txt')\n"
                          "open('made/big.bin', 'wb').write(os.urandom(3 << 20))", timeout=120)
    assert out.status == "ok", out.outputs
    native = session.run("(fs.exists('/old.txt'), fs.exists('/keep.txt'), "
                         "fs.read_file('/kept.txt'), fs.stat('/made/big.bin').st_size, "
                         "fs.read_file('/made/deep/x.csv'))")
    assert native.result["text/plain"] == "(False, False, 'k', 3145728, 'x\\n1\\n2\\n')", \
        native.outputs
    wasm = session.run(W + "import pandas as pd\nint(pd.read_csv('made/deep/x.csv').x.sum())")
    assert wasm.result["text/plain"] == "3"
    if backend == "local":
        assert (where / "made" / "deep" / "x.csv").read_text() == "x\n1\n2\n"
    # A change made in fsx after that reaches the container at its next cell.
    session.run("fs.write_file('/kept.txt', 'changed by native')")
    again = session.run(S + "open('kept.txt').read()")
    assert again.result["text/plain"] == "'changed by native'"


def test_sandbox_writes_in_folders_made_by_earlier_cells_reach_fsx(sandboxed):
    # The agent hears its /workspace through inotify: a folder made (or moved) by one cell must
    # be heard by the next, whose only change is a write inside it.
    session, _, _ = sandboxed
    assert session.run(S + "import os\nos.makedirs('later/deep')").status == "ok"
    session.run(S + "open('later/deep/f.txt', 'w').write('in a new folder')")
    assert session.run("fs.read_file('/later/deep/f.txt')").result["text/plain"] == \
        "'in a new folder'"
    session.run(S + "os.rename('later', 'later2')")
    session.run(S + "open('later2/deep/g.txt', 'w').write('in a moved folder')")
    out = session.run("fs.exists('/later'), fs.read_file('/later2/deep/g.txt')")
    assert out.result["text/plain"] == "(False, 'in a moved folder')", out.outputs


def test_writes_through_a_memory_map_kept_across_cells_reach_fsx(sandboxed):
    # inotify does not hear writes through a shared map: a map left open by one cell and
    # written by the next must still be copied back.
    session, _, _ = sandboxed
    session.run(S + "pass")  # the agent has its watch (set up after a kernel's first cell)
    made = session.run(S + "import numpy as np\nnp.zeros(4096, dtype='u1').tofile('mm.bin')\n"
                           "m = np.memmap('mm.bin', dtype='u1', mode='r+')")
    assert made.status == "ok", made.outputs
    session.run(S + "m[:3] = [7, 8, 9]\nm.flush()")
    out = session.run("list(fs.read_file('/mm.bin', encoding=None)[:4])")
    assert out.result["text/plain"] == "[7, 8, 9, 0]", out.outputs
    session.run(S + "del m")


def test_a_map_made_by_the_first_cell_is_found_too(tmp_path):
    # Made before the agent had its watch (and its mmap tracking): found in its own maps.
    sandbox_support.need_sandbox()
    session = KernelSession(env=dict(os.environ, TIERKERNEL_FSX_URL="memory://"))
    try:
        made = session.run(S + "import numpy as np\nnp.zeros(8, dtype='u1').tofile('f.bin')\n"
                               "m = np.memmap('f.bin', dtype='u1', mode='r+')")
        assert made.status == "ok", made.outputs
        session.run(S + "m[:2] = [4, 2]\nm.flush()")
        out = session.run("list(fs.read_file('/f.bin', encoding=None)[:3])")
        assert out.result["text/plain"] == "[4, 2, 0]", out.outputs
    finally:
        session.close()


def test_writes_through_a_map_another_process_holds_reach_fsx(sandboxed):
    # A process the cell started maps a file and writes through the map after the cell ended.
    session, _, _ = sandboxed
    child = ("import mmap, time\nf = open('mm2.bin', 'r+b')\nm = mmap.mmap(f.fileno(), 0)\n"
             "time.sleep(0.5)\nm[:2] = b'hi'\nm.flush()\ntime.sleep(60)")
    started = session.run(S + "import subprocess, sys\nopen('mm2.bin', 'wb').write(b'..')\n"
                              f"holder = subprocess.Popen([sys.executable, '-c', {child!r}])")
    assert started.status == "ok", started.outputs
    time.sleep(1.5)
    session.run(S + "pass")
    out = session.run("fs.read_file('/mm2.bin')")
    session.run(S + "holder.kill(); holder.wait()")
    assert out.result["text/plain"] == "'hi'", out.outputs


def test_hard_links_made_in_the_sandbox_reach_fsx_as_files(sandboxed):
    # fsx has no hard links: each name arrives as a file of its own, through the agent's copy
    # (small) and through tar in a docker exec (over the agent's 2 MiB).
    session, _, _ = sandboxed
    out = session.run(S + "import os\nos.makedirs('hl', exist_ok=True)\n"
                          "open('hl/a.txt', 'w').write('linked')\nos.link('hl/a.txt', 'hl/b.txt')")
    assert out.status == "ok" and "could not be copied" not in out.stderr, out.outputs
    assert session.run("fs.read_file('/hl/b.txt')").result["text/plain"] == "'linked'"
    big = session.run(S + "open('hl/big.bin', 'wb').write(b'x' * (3 << 20))\n"
                          "os.link('hl/big.bin', 'hl/big2.bin')", timeout=120)
    assert big.status == "ok" and "could not be copied" not in big.stderr, big.outputs
    sizes = session.run("fs.stat('/hl/big2.bin').st_size, fs.read_file('/hl/a.txt')")
    assert sizes.result["text/plain"] == "(3145728, 'linked')", sizes.outputs
    session.run(S + "import shutil\nshutil.rmtree('hl')")


def leave_a_late_writer(session: KernelSession, folder: str) -> None:
    """A sandbox cell that leaves a process writing FOLDER/late.txt after the cell ended;
    returns once it wrote."""
    started = session.run(S + f"import os, subprocess\nos.makedirs({folder!r}, exist_ok=True)\n"
                              "subprocess.Popen(['sh', '-c', 'sleep 0.5; echo late > "
                              f"{folder}/late.txt'])")
    assert started.status == "ok", started.outputs
    time.sleep(1.5)


def test_what_a_background_process_writes_after_its_cell_reaches_fsx(sandboxed):
    session, _, _ = sandboxed
    leave_a_late_writer(session, "bg")
    session.run(S + "pass")  # the change since the last cell is brought back at this one's end
    assert session.run("fs.read_file('/bg/late.txt')").result["text/plain"] == "'late\\n'"


def test_a_background_write_is_kept_when_fsx_changes_before_the_next_cell(sandboxed):
    # fsx changes too before the next sandbox cell: its copy in must not swallow what the
    # background process wrote (the copy in becomes the agent's new baseline).
    session, _, _ = sandboxed
    leave_a_late_writer(session, "bg2")
    session.run("fs.write_file('/from_native.txt', 'native')")
    out = session.run(S + "open('from_native.txt').read()")
    assert out.result["text/plain"] == "'native'", out.outputs
    assert session.run("fs.read_file('/bg2/late.txt')").result["text/plain"] == "'late\\n'"


def test_host_changes_to_a_workspace_folder_reach_the_sandbox(sandboxed):
    # A file:// workspace may be changed by any host process, not only through fsx: the host
    # hears the folder through inotify and copies only when it changed.
    session, backend, where = sandboxed
    if backend != "local":
        pytest.skip("only a host folder can be changed behind fsx's back")
    (where / "same.txt").write_text("aaaa")
    assert session.run(S + "open('same.txt').read()").result["text/plain"] == "'aaaa'"
    (where / "same.txt").write_text("bbbb")  # the same size
    (where / "hostdir" / "sub").mkdir(parents=True)
    (where / "hostdir" / "sub" / "new.txt").write_text("from the host")
    out = session.run(S + "open('same.txt').read(), open('hostdir/sub/new.txt').read()")
    assert out.result["text/plain"] == "('bbbb', 'from the host')", out.outputs
    (where / "hostdir").rename(where / "hostdir2")
    (where / "hostdir2" / "sub" / "later.txt").write_text("later")
    (where / "same.txt").unlink()
    out = session.run(S + "import os\nos.path.exists('hostdir'), os.path.exists('same.txt'), "
                          "sorted(os.listdir('hostdir2/sub'))")
    assert out.result["text/plain"] == "(False, False, ['later.txt', 'new.txt'])", out.outputs
    (where / "hostdir2" / "sub" / "later.txt").write_text("changed again")
    out = session.run(S + "open('hostdir2/sub/later.txt').read()")
    assert out.result["text/plain"] == "'changed again'", out.outputs


def test_copies_larger_than_the_agent_channel_takes_arrive_whole(sandboxed):
    # Over 2 MiB (sandbox_workspace.AGENT_COPY_LIMIT) a copy goes through tar in a docker exec
    # instead of the agent's channel: both ways, the bytes must arrive the same.
    session, _, _ = sandboxed
    made = session.run("import hashlib, os\nbig = os.urandom(9 << 20)\n"
                       "fs.write_file('/huge_in.bin', big)\nhashlib.sha256(big).hexdigest()")
    inside = session.run(S + "import hashlib, os\n"
                             "out = os.urandom(9 << 20)\nopen('huge_out.bin', 'wb').write(out)\n"
                             "hashlib.sha256(open('huge_in.bin', 'rb').read()).hexdigest(), "
                             "hashlib.sha256(out).hexdigest()", timeout=120)
    assert inside.status == "ok", inside.outputs
    got_in, made_out = eval(inside.result["text/plain"])
    assert got_in == eval(made.result["text/plain"])
    back = session.run("hashlib.sha256(fs.read_file('/huge_out.bin', encoding=None)).hexdigest()")
    assert eval(back.result["text/plain"]) == made_out
    # And a small change after that, through the channel again, replaces and deletes.
    session.run("fs.unlink('/huge_in.bin')\nfs.write_file('/huge_out.bin', 'small now')")
    after = session.run(S + "os.path.exists('huge_in.bin'), open('huge_out.bin').read()")
    assert after.result["text/plain"] == "(False, 'small now')", after.outputs


def test_a_read_only_folder_reaches_the_sandbox_with_its_files(sandboxed):
    session, backend, where = sandboxed
    if backend != "local":
        pytest.skip("only a host folder keeps a folder's mode")
    folder = where / "readonly"
    folder.mkdir()
    (folder / "inside.txt").write_text("kept")
    folder.chmod(0o555)
    try:
        out = session.run(S + "import os, stat\n"
                              "open('readonly/inside.txt').read(), "
                              "oct(stat.S_IMODE(os.stat('readonly').st_mode))")
        assert out.status == "ok", out.outputs
        assert out.result["text/plain"] == "('kept', '0o555')"
    finally:
        folder.chmod(0o755)
