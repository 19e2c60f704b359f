"""A ``file://`` workspace never holds what the host runs or trusts.

Cells of every tier write the workspace, the sandboxed ones included; a workspace that held
IPython's startup folder, a Jupyter config or data folder, a kernelspec, the kernel's Python
packages or the user's home would let a cell run code on the host the next time it starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests import sandbox_support as sb
from tests.kernel_session import KernelSession
from tierkernel.fsx import FsxConfigError
from tierkernel.fsx.config import open_url


@pytest.mark.parametrize("variable", ["IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR",
                                      "JUPYTER_RUNTIME_DIR"])
def test_a_folder_holding_host_state_is_refused(tmp_path, monkeypatch, variable):
    inner = tmp_path / "ws" / "deep" / "state"
    inner.mkdir(parents=True)
    monkeypatch.setenv(variable, str(inner))
    for url in ((tmp_path / "ws").as_uri(), inner.as_uri()):
        with pytest.raises(FsxConfigError, match=f"holds .*{inner}.*run code on the host"):
            open_url(url)
    beside = tmp_path / "data"
    beside.mkdir()
    open_url(beside.as_uri()).close()  # a folder beside it is fine


def test_home_the_root_and_the_python_installation_are_refused(tmp_path, monkeypatch):
    home = tmp_path / "home" / "me"
    (home / "project").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for folder in (home, home.parent, Path("/")):
        with pytest.raises(FsxConfigError, match="home folder"):
            open_url(folder.as_uri())
    open_url((home / "project").as_uri()).close()
    with pytest.raises(FsxConfigError, match=r"Python installation|Jupyter"):
        open_url(Path(sys.prefix).as_uri())


def test_a_symlink_to_a_folder_holding_host_state_is_refused(tmp_path, monkeypatch):
    (tmp_path / "real" / "ipython").mkdir(parents=True)
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "real" / "ipython"))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(FsxConfigError, match="IPython"):
        open_url((tmp_path / "link").as_uri())


@pytest.mark.timeout(300)
def test_every_tier_says_why_the_workspace_is_refused_and_the_kernel_goes_on(tmp_path):
    sb.need_sandbox()
    workspace = tmp_path / "ws"
    (workspace / "ipython").mkdir(parents=True)
    env = dict(os.environ, TIERKERNEL_FSX_URL=workspace.as_uri(),
               IPYTHONDIR=str(workspace / "ipython"))
    kernel = KernelSession(env=env)
    try:
        native = kernel.run("fs.readdir('/')")
        assert native.error["ename"] == "FsxConfigError", native.outputs
        for tier in ("wasm", "sandbox"):
            out = kernel.run(f"%%tier {tier}\nimport os\nos.listdir('/workspace')", timeout=180)
            assert out.status == "error", out.outputs
            assert "IPython's profile folder" in out.error["evalue"], out.outputs
            assert "run code on the host" in out.error["evalue"]
        # Nothing was written into the refused folder, and cells without fsx still run.
        assert sorted(p.name for p in workspace.iterdir()) == ["ipython"]
        assert kernel.run("%%tier process\n6 * 7").result["text/plain"] == "42"
    finally:
        kernel.close()
