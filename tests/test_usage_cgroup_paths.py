"""The sandbox's per-cell memory peak is reset by writing its container's own cgroup file as
root: that write must never reach any other file on the host, whatever the container id."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tierkernel.backends import usage
from tierkernel.backends.usage import ContainerUsage

ID = "a" * 64


def _v1(root: Path, container_id: str = ID) -> Path:
    for kind in ("cpuacct", "memory", "pids"):
        (root / kind / "docker" / container_id).mkdir(parents=True, exist_ok=True)
    memory = root / "memory" / "docker"
    for folder in (memory, memory / container_id):
        (folder / "memory.max_usage_in_bytes").write_text("12345\n")
    return memory


@pytest.fixture()
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(usage, "_CGROUP", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("bad", ["", ".", "..", "../..", "a" * 63, "A" * 64, ID + "/..",
                                 "../" + ID[3:], ID[:-1] + "\n"])
def test_a_bad_container_id_reads_and_writes_nothing(root: Path, bad: str) -> None:
    memory = _v1(root)
    probe = ContainerUsage(bad, count_processes=True)
    probe.begin()
    assert probe.end() is None
    # The docker folder's own peak (every container's) is left alone.
    assert (memory / "memory.max_usage_in_bytes").read_text() == "12345\n"
    assert (memory / ID / "memory.max_usage_in_bytes").read_text() == "12345\n"


def test_the_reset_writes_only_the_container_s_own_file(root: Path) -> None:
    memory = _v1(root)
    probe = ContainerUsage(ID, count_processes=False)
    probe.begin()
    # (cgroupfs takes the write whole; on a plain file it overwrites the first byte)
    assert (memory / ID / "memory.max_usage_in_bytes").read_text().startswith("0")
    assert (memory / "memory.max_usage_in_bytes").read_text() == "12345\n"


def test_a_symlink_anywhere_on_the_way_is_not_followed(root: Path, tmp_path: Path) -> None:
    memory = _v1(root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "memory.max_usage_in_bytes"
    victim.write_text("precious\n")
    # The container's folder is a link to another folder.
    other = "b" * 64
    os.symlink(elsewhere, memory / other)
    ContainerUsage(other, count_processes=False).begin()
    assert victim.read_text() == "precious\n"
    # The file in the container's own folder is a link to another file.
    os.unlink(memory / ID / "memory.max_usage_in_bytes")
    os.symlink(victim, memory / ID / "memory.max_usage_in_bytes")
    ContainerUsage(ID, count_processes=False).begin()
    assert victim.read_text() == "precious\n"


def test_the_reset_never_creates_a_file(root: Path) -> None:
    memory = _v1(root)
    os.unlink(memory / ID / "memory.max_usage_in_bytes")
    probe = ContainerUsage(ID, count_processes=False)
    probe.begin()
    probe.end()
    assert not (memory / ID / "memory.max_usage_in_bytes").exists()
