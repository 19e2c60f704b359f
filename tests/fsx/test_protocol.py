"""fsx:// URLs: fsspec and pandas use the process's current workspace."""

from __future__ import annotations

import subprocess
import sys

import fsspec
import pytest

from tierkernel.fsx import Fsx, current, set_current


@pytest.fixture
def workspace(tmp_path):
    facade = Fsx(url=f"sqlite://{tmp_path}/ws.db").facade()
    set_current(facade)
    yield facade
    set_current(None)
    facade.close()


def test_fsspec_open_reads_and_writes_the_current_workspace(workspace):
    # fsspec.open makes missing parents for writing (its auto_mkdir), as for any filesystem.
    with fsspec.open("fsx://notes/today.txt", "w") as f:
        f.write("written by fsspec")
    assert workspace.read_file("/notes/today.txt") == "written by fsspec"
    with fsspec.open("fsx:///notes/today.txt", "rb") as f:
        assert f.read() == b"written by fsspec"
    assert fsspec.filesystem("fsx") is workspace.fs
    with pytest.raises(TypeError, match="takes no storage options"):
        fsspec.filesystem("fsx", anon=True)


def test_pandas_reads_and_writes_fsx_urls(workspace):
    pd = pytest.importorskip("pandas")
    workspace.write_file("/data.csv", "city,temp\nOslo,4.5\nLima,19\n")
    frame = pd.read_csv("fsx://data.csv")
    assert list(frame["city"]) == ["Oslo", "Lima"]
    frame.assign(temp=frame.temp * 2).to_csv("fsx://doubled.csv", index=False)
    assert workspace.read_file("/doubled.csv") == "city,temp\nOslo,9.0\nLima,38.0\n"


def test_without_a_workspace_the_error_says_what_to_do():
    set_current(None)
    with pytest.raises(Exception, match="this process has none"):
        current()
    # A fresh interpreter that never imported tierkernel finds fsx:// by entry point.
    code = ("import fsspec\ntry:\n    fsspec.open('fsx://x').open()\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert "FsxConfigError" in out.stdout and "this process has none" in out.stdout
