"""Files the way a notebook user expects, in every tier (issue 15): ``fsx://`` URLs with pandas,
the process tier's workspace, the notebook's own folder read-only, and the hint on a missing
file. Through real kernels started in a notebook folder, as Jupyter starts them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel_session import KernelSession
from tests.tier_support import need_tier
from tierkernel.backends.process.workspace import PREFIX, HostFolderSync

TIERS = ["process", "wasm", "sandbox"]
BIRTHS = "year,births\n2000,5\n2001,7\n"


RUNSC = "sandbox --runtime runsc"


def _notebook_folder(where: Path) -> Path:
    folder = where / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "births.csv").write_text(BIRTHS)
    (folder / "helpers_nb.py").write_text("ANSWER = 42\n")
    (folder / "analysis.ipynb").write_text("{}")
    (folder / ".env").write_text("SECRET=1\n")
    (where / "secret.csv").write_text("not,yours\n")
    (folder / "data" / "outside.csv").symlink_to(where / "secret.csv")
    return folder


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelSession, Path]]:
    """A kernel started in a notebook's folder (``data/births.csv`` beside it), with a
    workspace of its own."""
    where = tmp_path_factory.mktemp("files")
    folder = _notebook_folder(where)
    session = KernelSession(cwd=str(folder), env=dict(
        os.environ, TIERKERNEL_FSX_URL=f"sqlite://{where / 'ws.db'}"))
    yield session, folder
    session.close()


def run(session: KernelSession, tier: str, code: str) -> object:
    need_tier(tier)
    return session.run(f"%%tier {tier}\n{code}", timeout=180)


@pytest.mark.parametrize("tier", [*TIERS, RUNSC])
def test_fsx_urls_with_pandas(kernel, tier):
    session, _ = kernel
    tier_name = tier
    tier = tier_name.split()[-1]
    native = session.run("import pandas as pd\n"
                         f"pd.DataFrame({{'n': [1, 2, 3]}}).to_csv('fsx://from-native-{tier}.csv',"
                         " index=False)")
    assert native.status == "ok", native.outputs
    out = run(session, tier_name,
              "import pandas as pd, fsspec\n"
              f"total = int(pd.read_csv('fsx://from-native-{tier}.csv').n.sum())\n"
              f"pd.DataFrame({{'m': [total, 1]}}).to_csv('fsx:///sub-{tier}/out.csv', "
              "index=False)\n"
              f"with fsspec.open('fsx://sub-{tier}/note.txt', 'w') as f:\n"
              "    f.write('via fsspec')\n"
              f"print(total, sorted(fsspec.filesystem('fsx').ls('/sub-{tier}')))")
    assert out.status == "ok", out.outputs
    assert out.stdout == f"6 ['/sub-{tier}/note.txt', '/sub-{tier}/out.csv']\n"
    back = session.run(f"(fs.read_file('/sub-{tier}/out.csv'), "
                       f"fs.read_file('/sub-{tier}/note.txt'))")
    assert back.result["text/plain"] == "('m\\n6\\n1\\n', 'via fsspec')", back.outputs


def test_process_runs_in_the_workspace_folder(kernel):
    session, folder = kernel
    out = run(session, "process", "import os\n"
              "print(os.getcwd() == os.environ['TIERKERNEL_WORKSPACE'], os.getcwd())")
    assert out.status == "ok", out.outputs
    same, cwd = out.stdout.split()
    assert same == "True" and Path(cwd) != folder and not Path(cwd).is_relative_to(folder)


@pytest.mark.parametrize("other", ["wasm", "sandbox"])
def test_process_and_other_tiers_share_files(kernel, other):
    session, _ = kernel
    wrote = run(session, "process", f"import os\nos.makedirs('shared-{other}', exist_ok=True)\n"
                f"open('shared-{other}/p.txt', 'w').write('from process')")
    assert wrote.status == "ok", wrote.outputs
    assert session.run(f"fs.read_file('/shared-{other}/p.txt')").result["text/plain"] == \
        "'from process'"
    read = run(session, other, f"print(open('shared-{other}/p.txt').read())\n"
               f"open('shared-{other}/o.txt', 'w').write('from {other}')")
    assert read.stdout == "from process\n", read.outputs
    back = run(session, "process", f"print(open('shared-{other}/o.txt').read())\n"
               f"import os; os.remove('shared-{other}/p.txt')")
    assert back.stdout == f"from {other}\n", back.outputs
    gone = run(session, other, f"import os\nprint(os.path.exists('shared-{other}/p.txt'))")
    assert gone.stdout == "False\n", gone.outputs


@pytest.mark.parametrize("tier", [*TIERS, RUNSC])
def test_notebook_data_by_relative_path(kernel, tier):
    session, _ = kernel
    out = run(session, tier, "import pandas as pd, pathlib\n"
              "df = pd.read_csv('data/births.csv')\n"
              "print(int(df.births.sum()), pathlib.Path('data/births.csv').read_text() == "
              f"{BIRTHS!r})\n"
              "import helpers_nb\nprint(helpers_nb.ANSWER)")
    assert out.status == "ok", out.outputs
    assert out.stdout == "12 True\n42\n"


@pytest.mark.parametrize("tier", ["wasm", "sandbox"])
def test_hidden_files_of_the_notebook_folder_stay_hidden(kernel, tier):
    session, _ = kernel
    for name in (".env", "data/outside.csv"):  # a hidden name; a link out of the folder
        out = run(session, tier, f"open({name!r}).read()")
        assert out.error["ename"] == "FileNotFoundError", out.outputs
    listing = run(session, tier, "import os\nsorted(os.listdir('/notebook'))")
    assert listing.result["text/plain"] == "['data', 'helpers_nb.py']", listing.outputs


@pytest.mark.parametrize("tier", ["wasm", "sandbox"])
def test_files_added_to_the_notebook_folder_later_are_seen(kernel, tier):
    session, folder = kernel
    run(session, tier, "1")  # the tier is up, its view of the folder made
    (folder / "data" / f"later-{tier}.csv").write_text("n\n5\n")
    out = run(session, tier, f"import pandas as pd\nint(pd.read_csv('data/later-{tier}.csv').n[0])")
    assert out.result["text/plain"] == "5", out.outputs
    (folder / "data" / f"later-{tier}.csv").unlink()
    gone = run(session, tier, f"import os\nos.path.exists('/notebook/data/later-{tier}.csv')")
    assert gone.result["text/plain"] == "False", gone.outputs


@pytest.mark.parametrize("tier", TIERS)
def test_writes_go_to_the_workspace_never_the_notebook_folder(kernel, tier):
    session, folder = kernel
    out = run(session, tier, "import os\nos.makedirs('data', exist_ok=True)\n"
              f"open('data/births.csv', 'a').write('2002,{tier}\\n')\n"
              f"open('new-{tier}.txt', 'w').write('x')\n"
              "print(open('data/births.csv').read().count('\\n'))")
    assert out.status == "ok", out.outputs
    assert (folder / "data" / "births.csv").read_text() == BIRTHS
    assert not (folder / f"new-{tier}.txt").exists()
    assert session.run(f"fs.exists('/new-{tier}.txt')").result["text/plain"] == "True"
    session.run("fs.unlink('/data/births.csv')")


@pytest.mark.parametrize("tier", ["wasm", "sandbox", RUNSC])
def test_the_notebook_view_is_read_only(kernel, tier):
    session, folder = kernel
    out = run(session, tier, "open('/notebook/data/births.csv', 'w').write('gone')")
    assert out.error["ename"] in ("PermissionError", "OSError"), out.outputs
    assert (folder / "data" / "births.csv").read_text() == BIRTHS


@pytest.mark.parametrize("tier", ["wasm", "sandbox"])
def test_missing_file_hint_says_where_the_tier_reads(kernel, tier):
    session, folder = kernel
    out = run(session, tier, "open('data/nowhere.csv')")
    error = out.error
    assert error["ename"] == "FileNotFoundError"
    assert "not in the workspace (/workspace) nor in the notebook's folder, which this tier " \
           "reads at /notebook" in error["evalue"]
    assert "/notebook" in error["traceback"][-1]
    assert "tierkernel files" not in "".join(error["traceback"])  # only the user's frames
    host = run(session, tier, f"open({str(folder / 'data' / 'births.csv')!r})")
    assert host.error["ename"] == "FileNotFoundError", host.outputs
    assert "this tier does not see the host's files, only /workspace and, read-only, " \
           "/notebook: use a path relative to the notebook" in host.error["evalue"]


# -- a notebook folder that holds host state, and a hostile huge one ---------------------

@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelSession, Path]]:
    """A kernel whose notebook folder holds IPython's profile folder (host state)."""
    where = tmp_path_factory.mktemp("refused")
    folder = _notebook_folder(where)
    session = KernelSession(cwd=str(folder), env=dict(
        os.environ, TIERKERNEL_FSX_URL=f"sqlite://{where / 'ws.db'}",
        IPYTHONDIR=str(folder / "ipython")))
    yield session, folder
    session.close()


@pytest.mark.parametrize("tier", ["wasm", "sandbox"])
def test_a_folder_holding_host_state_is_not_shown_and_the_hint_says_why(refused, tier):
    session, _ = refused
    out = run(session, tier, "import pandas as pd\npd.read_csv('data/births.csv')")
    error = out.error
    assert error["ename"] == "FileNotFoundError", out.outputs
    assert "the notebook's folder is not shown to it because it holds IPython's profile " \
           "folder" in error["evalue"]
    assert "fs.write_file('data/births.csv', open('data/births.csv', 'rb').read())" \
        in error["evalue"]
    seen = run(session, tier, "import os\nos.path.exists('/notebook/data')")
    assert seen.result["text/plain"] == "False"
    # The way the hint gives works.
    assert session.run("fs.mkdir('/data', recursive=True)\nfs.write_file('data/births.csv', "
                       "open('data/births.csv', 'rb').read())").status == "ok"
    again = run(session, tier, "import pandas as pd\nint(pd.read_csv('data/births.csv')"
                ".births.sum())")
    assert again.result["text/plain"] == "12", again.outputs
    session.run("fs.unlink('/data/births.csv')")


def test_the_process_tier_reads_such_a_folder_in_place(refused):
    session, _ = refused  # not a boundary: it could read it anyway
    out = run(session, "process", "import pandas as pd\nint(pd.read_csv('data/births.csv')"
              ".births.sum())")
    assert out.result["text/plain"] == "12", out.outputs


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelSession, Path]]:
    """A kernel in a notebook folder with more than the caps allow: a 3 MiB file over a
    1 MiB cap, and 3000 small files over a 50-file cap."""
    where = tmp_path_factory.mktemp("huge")
    folder = _notebook_folder(where)
    (folder / "big.bin").write_bytes(b"\1" * (3 << 20))
    many = folder / "zz-many"
    many.mkdir()
    for i in range(3000):
        (many / f"f{i:04}.txt").write_text("x")
    session = KernelSession(cwd=str(folder), env=dict(
        os.environ, TIERKERNEL_FSX_URL=f"sqlite://{where / 'ws.db'}"),
        extra_arguments=["--NotebookFolder.max_bytes=1m", "--NotebookFolder.max_files=50",
                         "--ProcessBackend.copy_back_bytes=1m",
                         "--ProcessBackend.copy_back_files=200"])
    yield session, folder
    session.close()


def test_a_huge_notebook_folder_is_capped_with_a_clear_message_sandbox(huge):
    session, _ = huge
    out = run(session, "sandbox", "import os, pandas as pd\n"
              "print(int(pd.read_csv('data/births.csv').births.sum()))\n"
              "print(sum(len(f) for _, _, f in os.walk('/notebook')))")
    assert out.status == "ok", out.outputs
    births, copied = out.stdout.split()
    assert births == "12" and int(copied) <= 50
    assert "the notebook's folder was copied into the sandbox's /notebook in part" in out.stderr
    assert "big.bin" in out.stderr and "c.NotebookFolder.max_bytes" in out.stderr
    assert "only the first 50 files were taken (c.NotebookFolder.max_files)" in out.stderr
    big = run(session, "sandbox", "open('big.bin', 'rb').read()")
    assert big.error["ename"] == "FileNotFoundError"
    assert "big.bin is in the notebook's folder but this tier was not given it (over " \
           "c.NotebookFolder.max_bytes" in big.error["evalue"]


def test_a_huge_file_is_not_read_into_the_host_for_wasm(huge):
    session, _ = huge
    out = run(session, "wasm", "open('/notebook/big.bin', 'rb').read()")
    assert out.error["ename"] == "OSError" and "too large" in out.error["evalue"].lower(), \
        out.outputs
    small = run(session, "wasm", "import pandas as pd\n"
                "int(pd.read_csv('data/births.csv').births.sum())")
    assert small.result["text/plain"] == "12", small.outputs


@pytest.mark.parametrize(("code", "setting"), [
    ("open('flood.bin', 'wb').write(b'x' * (3 << 20))", "c.ProcessBackend.copy_back_bytes"),
    ("import os\nos.makedirs('flood', exist_ok=True)\n"
     "for i in range(400):\n    open(f'flood/{i}', 'w').close()",
     "c.ProcessBackend.copy_back_files"),
])
def test_a_process_cell_over_the_copy_back_budget_fails_that_cell_only(huge, code, setting):
    session, folder = huge
    out = run(session, "process", code)
    assert out.error["ename"] == "WorkspaceCopyError", out.outputs
    assert setting in out.error["evalue"] and "Nothing of it was copied" in out.error["evalue"]
    assert session.run("fs.readdir('/')").result["text/plain"] == "[]"
    cleaned = run(session, "process", "import os, shutil\nshutil.rmtree('flood', True)\n"
                  "os.path.exists('flood.bin') and os.remove('flood.bin')\n"
                  "open('small.txt', 'w').write('ok')")
    assert cleaned.status == "ok", cleaned.outputs
    assert session.run("fs.read_file('/small.txt')").result["text/plain"] == "'ok'"
    session.run("fs.unlink('/small.txt')")
    assert not (folder / "small.txt").exists()


def test_a_workspace_that_cannot_be_opened_leaves_the_process_tier_running(tmp_path):
    workspace = tmp_path / "ws"
    (workspace / "ipython").mkdir(parents=True)
    folder = _notebook_folder(tmp_path)
    session = KernelSession(cwd=str(folder), env=dict(
        os.environ, TIERKERNEL_FSX_URL=workspace.as_uri(), IPYTHONDIR=str(workspace / "ipython")))
    try:
        out = run(session, "process", "import pandas as pd\nopen('scratch.txt', 'w').write('x')\n"
                  "int(pd.read_csv('data/births.csv').births.sum())")
        assert out.result["text/plain"] == "12", out.outputs
        assert "the process tier's folder is not the workspace, which cannot be opened" in \
            out.stderr and "IPython's profile folder" in out.stderr
        again = run(session, "process", "open('scratch.txt').read()")
        assert again.result["text/plain"] == "'x'" and again.stderr == "", again.outputs
        assert sorted(p.name for p in workspace.iterdir()) == ["ipython"]
    finally:
        session.close()


def test_folders_of_killed_kernels_are_removed_by_the_next():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = Path(tempfile.gettempdir()) / f"{PREFIX}{gone.stdout.strip()}-abc"
    alive = Path(tempfile.gettempdir()) / f"{PREFIX}{os.getpid()}-abc"
    for folder in (dead, alive):
        (folder / "sub").mkdir(parents=True)
    try:
        HostFolderSync().close()
        assert not dead.exists() and alive.exists()
    finally:
        for folder in (dead, alive):
            if folder.exists():
                shutil.rmtree(folder)


@pytest.mark.parametrize("tier", TIERS)
def test_the_notebook_folder_shows_in_listings_and_lookups(kernel, tier):
    """What the notebook's folder has, a cell also finds by looking (os.path.exists, glob,
    os.listdir, pathlib), as in native; a write into one of its folders goes to the
    workspace; nothing of it is copied into the workspace by being looked at."""
    session, folder = kernel
    out = run(session, tier, "import os, glob, pathlib\n"
              "print(os.path.exists('data/births.csv'), glob.glob('data/b*.csv'),\n"
              "      'data' in os.listdir('.'), pathlib.Path('data').is_dir(),\n"
              "      sorted(p.name for p in pathlib.Path('data').iterdir()\n"
              "             if p.name.startswith('births')))\n"
              "if not os.path.exists('data'):\n"
              "    os.makedirs('data')\n"
              f"pathlib.Path('data/summary-{tier}.txt').write_text('12')\n"
              f"print(sorted(n for n in os.listdir('data') if n.startswith(('births', 'summ'))))")
    assert out.status == "ok", out.outputs
    assert out.stdout == ("True ['data/births.csv'] True True ['births.csv']\n"
                          f"['births.csv', 'summary-{tier}.txt']\n")
    assert not (folder / "data" / f"summary-{tier}.txt").exists()
    listed = session.run("sorted(fs.readdir('/data')), fs.exists('/data/births.csv')")
    assert listed.result["text/plain"] == f"(['summary-{tier}.txt'], False)", listed.outputs
    session.run("fs.rmdir('/data', recursive=True)")


def test_the_process_tier_reads_and_writes_slash_workspace(kernel):
    """The host has no /workspace; Python's own file functions of a process cell read it as
    the tier's workspace folder, so code written for the sandboxed tiers runs unchanged."""
    session, folder = kernel
    out = run(session, "process", "import os, pandas as pd\n"
              "os.makedirs('/workspace/abs/deeper', exist_ok=True)\n"
              "pd.DataFrame({'n': [4, 5]}).to_csv('/workspace/abs/out.csv', index=False)\n"
              "print(int(pd.read_csv('/workspace/abs/out.csv').n.sum()),\n"
              "      sorted(os.listdir('/workspace/abs')),\n"
              "      int(pd.read_csv('/workspace/data/births.csv').births.sum()))\n"
              "os.chdir('/workspace/abs')\n"
              "print(os.getcwd() == os.path.join(os.environ['TIERKERNEL_WORKSPACE'], 'abs'))\n"
              "os.chdir('..')")
    assert out.status == "ok", out.outputs
    assert out.stdout == "9 ['deeper', 'out.csv'] 12\nTrue\n"
    back = session.run("fs.read_file('/abs/out.csv')")
    assert back.result["text/plain"] == "'n\\n4\\n5\\n'", back.outputs
    assert not (folder / "abs").exists()
    session.run("fs.rmdir('/abs', recursive=True)")
