"""`fs` and %fsx through a real tierkernel kernel, on a sqlite workspace this test also opens."""

from __future__ import annotations

import os

import pytest

from tests.kernel_session import KernelSession
from tierkernel.fsx import Fsx


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    db = tmp_path_factory.mktemp("kernel-ws") / "ws.db"
    url = f"sqlite://{db}"
    env = dict(os.environ, TIERKERNEL_FSX_URL=url)
    session = KernelSession(env=env)
    yield session, url
    session.close()


@pytest.mark.timeout(180)
def test_fs_in_the_namespace_writes_the_configured_workspace(ws):
    kernel, url = ws
    out = kernel.run("fs.mkdir('/k', recursive=True)\nfs.write_file('/k/from-kernel.txt', 'hi')\n"
                     "fs.readdir('/k')")
    assert out.status == "ok", out.outputs
    assert out.result["text/plain"] == "['from-kernel.txt']"
    other = Fsx(url=url).facade()  # another process, same database
    try:
        assert other.read_file("/k/from-kernel.txt") == "hi"
        other.write_file("/k/from-test.txt", "written outside the kernel")
    finally:
        other.close()
    back = kernel.run("print(fs.read_file('/k/from-test.txt'))")
    assert back.stdout == "written outside the kernel\n"
    err = kernel.run("fs.read_file('/k/missing')")
    assert err.status == "error" and err.error["ename"] == "FileNotFoundError"


@pytest.mark.timeout(180)
def test_fsx_magic_commands(ws, tmp_path):
    kernel, url = ws
    host = tmp_path / "host.csv"
    host.write_text("a,b\n1,2\n")
    put = kernel.run(f"%fsx put {host} /data/in.csv")
    assert put.status == "error"  # /data does not exist yet: a clear one-line error
    assert put.reply["ename"] == "UsageError"
    assert put.stderr == "UsageError: %fsx put: No such file or directory: /data/in.csv\n"
    kernel.run("fs.mkdir('/data', recursive=True)")
    put = kernel.run(f"%fsx put {host} /data/in.csv")
    assert put.status == "ok" and "copied 1 file(s)" in put.stdout
    listing = kernel.run("%fsx ls /data")
    assert listing.stdout.startswith("in.csv\t8 B")
    assert kernel.run("%fsx cat /data/in.csv").stdout == "a,b\n1,2\n"
    frame = kernel.run("import pandas as pd\npd.read_csv('fsx://data/in.csv').b.sum()")
    assert frame.status == "ok", frame.outputs
    assert frame.result["text/plain"] == "np.int64(2)" or frame.result["text/plain"] == "2"
    target = tmp_path / "out.csv"
    got = kernel.run(f"%fsx get /data/in.csv {target}")
    assert got.status == "ok" and target.read_text() == "a,b\n1,2\n"
    again = kernel.run(f"%fsx get /data/in.csv {target}")
    assert again.status == "error" and "--force" in again.stderr
    assert kernel.run(f"%fsx get /data/in.csv {target} --force").status == "ok"
    info = kernel.run("%fsx info")
    assert "backend: sqlite" in info.stdout and url in info.stdout
    one = kernel.run("%fsx info data/in.csv")
    assert one.status == "ok", one.stderr
    assert one.stdout.splitlines()[:3] == ["path:     /data/in.csv", "type:     file",
                                           "size:     8 B (8 bytes)"]
    assert "mode:     -rw-" in one.stdout and "modified: " in one.stdout
    kernel.run("fs.symlink('in.csv', '/data/link'); fs.symlink('gone', '/data/dangling')")
    folder = kernel.run("%fsx info /data")
    assert "type:     directory" in folder.stdout
    assert "entries:  3 (1 file, 0 directories, 2 links)" in folder.stdout
    link = kernel.run("%fsx info /data/link")
    assert "link to:  in.csv (/data/in.csv)" in link.stdout and "type:     file" in link.stdout
    assert "(dangling: No such file or directory)" in kernel.run(
        "%fsx info /data/dangling").stdout
    missing = kernel.run("%fsx info /nope")
    assert missing.stderr == "UsageError: %fsx info: No such file or directory: /nope\n"
    assert "takes 0 to 1 arguments, got 2" in kernel.run("%fsx info a b").stderr
    helped = kernel.run("%fsx help")
    assert helped.status == "ok" and "%fsx info PATH" in helped.stdout
    assert kernel.run("%fsx ls --help").stdout == helped.stdout
    rm_dir = kernel.run("%fsx rm /data")
    assert rm_dir.status == "error" and "rm -r" in rm_dir.stderr
    assert kernel.run("%fsx rm -r /data").status == "ok"
    assert kernel.run("fs.exists('/data')").result["text/plain"] == "False"
    bad = kernel.run("%fsx frobnicate")
    assert bad.status == "error" and "unknown %fsx command 'frobnicate'" in bad.stderr
    assert "usage:" in kernel.run("%fsx").stderr
    assert "takes 1 argument, got 0" in kernel.run("%fsx cat").stderr
