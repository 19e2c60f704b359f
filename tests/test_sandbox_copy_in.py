"""The copy into the container when tar there cannot write some files (a full /workspace):
the cell is told which and why, the container drops the partial files, and the copy back
never takes them for deleted. A fake engine stands in for docker's exec API."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from tierkernel.backends.sandbox.workspace import Room, WorkspaceSync
from tierkernel.fsx import Fsx


class FakeApi:
    """docker's exec API: tar -x fails on the names in ``fail``; other commands succeed."""

    def __init__(self, fail: list[str]) -> None:
        self.fail, self.commands, self.received = fail, [], bytearray()
        self._threads: list[threading.Thread] = []

    def exec_create(self, container: str, cmd: list[str], **kwargs: Any) -> dict[str, str]:
        self.commands.append(cmd)
        return {"Id": str(len(self.commands) - 1)}

    def exec_start(self, exec_id: str, **kwargs: Any) -> Any:
        if not kwargs.get("socket"):
            return b""
        ours, theirs = socket.socketpair()

        def container_side() -> None:
            while chunk := theirs.recv(65536):
                self.received += chunk
            for name in self.fail:
                text = f"tar: ./{name}: Cannot write: No space left on device\n".encode()
                theirs.sendall(bytes([2, 0, 0, 0]) + len(text).to_bytes(4, "big") + text)
            theirs.close()

        thread = threading.Thread(target=container_side, daemon=True)
        thread.start()
        self._threads.append(thread)
        return ours

    def exec_inspect(self, exec_id: str) -> dict[str, int]:
        cmd = self.commands[int(exec_id)]
        for thread in self._threads:
            thread.join(5)
        return {"ExitCode": 2 if cmd[0] == "tar" and self.fail else 0}


@pytest.fixture()
def workspace(monkeypatch):
    fs = Fsx(url="memory://").facade()
    monkeypatch.setattr(WorkspaceSync, "workspace", staticmethod(lambda: fs))
    yield fs
    fs.close()


def test_files_tar_could_not_write_are_named_removed_and_kept_in_fsx(workspace):
    workspace.write_file("/a.txt", "fits")
    workspace.write_file("/b.bin", b"x" * 5000)
    api = FakeApi(fail=["b.bin"])
    ws = WorkspaceSync("65534:65534")
    room = Room(1 << 30, "its size: raise it with c.SandboxBackend.workspace_size")
    assert ws.before_cell(api, "c1", None, room) is True
    assert "b.bin: No space left on device" in ws.notice, ws.notice
    assert "workspace_size" in ws.notice
    assert "a.bin" not in ws.notice and "a.txt" not in ws.notice
    # the partial file is removed in the container, and the manifest says it lacks it
    assert any(cmd[0] == "sh" and "/workspace/b.bin" in cmd for cmd in api.commands)
    assert ws._manifest is not None and "b.bin" not in ws._manifest
    assert "a.txt" in ws._manifest
    # nothing is tried again while fsx is unchanged
    assert ws.may_have_changes("c1") is False


def test_a_copy_that_fails_outright_still_lets_the_cell_run(workspace):
    workspace.write_file("/a.txt", "fits")

    class Broken(FakeApi):
        def exec_create(self, container: str, cmd: list[str], **kwargs: Any) -> dict[str, str]:
            raise OSError("the engine went away")

    ws = WorkspaceSync("65534:65534")
    assert ws.before_cell(Broken([]), "c1", None, None) is True  # never raises
    assert "could not be copied into the container's /workspace" in ws.notice
    assert "a.txt" in ws.notice and "the engine went away" in ws.notice
    assert ws._manifest == {}  # what the container surely had: nothing
    assert ws.may_have_changes("c1") is False  # not tried again until fsx changes
    workspace.write_file("/b.txt", "new")
    assert ws.may_have_changes("c1") is True
