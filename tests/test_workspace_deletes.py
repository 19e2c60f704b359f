"""Deletions the host asks the container for (a file removed in fsx): never through a link.

A cell may have replaced a folder by a link to another folder (``mv model model_v1; ln -s
model_v1 model``); a deletion the host still asks for under the old folder's name must not
reach the files the link now points to. Both ways the container deletes are checked here: the
agent's (small copies) and the shell script a ``docker exec`` runs (large ones), on a plain
folder standing in for /workspace.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tierkernel.backends.sandbox.workspace import _DELETE
from tierkernel.guest.agent import unpack_workspace


def by_agent(root: Path, rels: list[str]) -> None:
    unpack_workspace(str(root), b"", rels)


def by_exec(root: Path, rels: list[str]) -> None:
    subprocess.run(["sh", "-c", _DELETE, "rm", *[f"{root}/{rel}" for rel in rels]],
                   check=True)


@pytest.mark.parametrize("delete", [by_agent, by_exec], ids=["agent", "exec"])
def test_deletions_never_go_through_a_link_and_never_fail(
        tmp_path: Path, delete: Callable[[Path, list[str]], None]):
    root = tmp_path / "workspace"
    (root / "model_v1").mkdir(parents=True)
    (root / "model_v1" / "weights.bin").write_text("keep me")
    (root / "model").symlink_to("model_v1")
    (root / "was_a_folder").write_text("a file now")
    (root / "gone.txt").write_text("delete me")
    (root / "old").mkdir()
    (root / "old" / "x.txt").write_text("delete me too")
    delete(root, ["model/weights.bin", "was_a_folder/child.txt", "gone.txt", "old",
                  "never_there.txt"])
    assert (root / "model_v1" / "weights.bin").read_text() == "keep me"
    assert (root / "model").is_symlink()
    assert (root / "was_a_folder").read_text() == "a file now"
    assert not (root / "gone.txt").exists() and not (root / "old").exists()
