"""Warm starts follow use: a tier the last kernels of a set-up never ran a cell in is not
warmed (tier_use.py), its next cell still runs, and the kernel after that warms it again."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.kernel_session import KernelSession
from tierkernel.backends.tier_use import TierUse


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tierkernel" / "tier-use.json"


def kernel(argv: list[str], cwd: str, used: tuple[str, ...] = ()) -> TierUse:
    """What a kernel started with ``argv`` in ``cwd`` does with the record."""
    use = TierUse(argv, cwd)
    use.kernel_started()
    for tier in used:
        use.used(tier)
    return use


def test_a_tier_unused_by_the_last_kernels_is_not_warmed_until_used_again(cache: Path):
    argv = ["-f", "/run/kernel-1.json", "--ProcessBackend.warm_start=True"]
    for n in range(3):
        use = kernel([*argv[:1], f"/run/kernel-{n}.json", *argv[2:]], "/nb")
        assert use.wants_warm("process", 3), n  # the connection file is not the set-up
    fourth = kernel(argv, "/nb", used=("process",))
    assert fourth.unused_for("process") == 3
    assert not fourth.wants_warm("process", 3)
    assert fourth.wants_warm("process", 0)  # 0: always
    assert fourth.wants_warm("process", 4)
    fifth = TierUse(argv, "/nb")
    assert fifth.unused_for("process") == 0 and fifth.wants_warm("process", 3)
    assert fifth.unused_for("wasm") == 4
    assert TierUse(argv, "/elsewhere").wants_warm("wasm", 1)  # another folder: its own


def test_kernels_writing_in_turn_all_count(cache: Path):
    first, second = TierUse([], "/nb"), TierUse([], "/nb")  # read before either wrote
    first.kernel_started()
    second.kernel_started()
    assert {first.serial, second.serial} == {1, 2}
    second.used("sandbox")
    assert TierUse([], "/nb").used_at == {"sandbox": 2}


@pytest.mark.parametrize("content", [
    "{not json", "[1, 2]", json.dumps([{"setup": 1}]),
    json.dumps([{"setup": [[], "/nb", []], "kernels": -4, "used": {}}]),
    json.dumps([{"setup": [[], "/nb", []], "kernels": 2, "used": {"x": 9}}]),
    json.dumps([{"setup": [[], "/nb", []], "kernels": 2, "used": {"x" * 999: 1}}]),
])
def test_a_damaged_record_is_ignored_and_replaced(cache: Path, content: str):
    cache.parent.mkdir(parents=True, mode=0o700)
    cache.write_text(content)
    use = kernel([], "/nb", used=("wasm",))
    assert use.wants_warm("wasm", 1) and use.serial == 1
    assert TierUse([], "/nb").used_at == {"wasm": 1}


def test_the_record_is_not_written_through_a_link(cache: Path, tmp_path: Path):
    cache.parent.mkdir(parents=True, mode=0o700)
    planted = tmp_path / "elsewhere.json"
    planted.write_text("[]")
    cache.symlink_to(planted)
    kernel([], "/nb", used=("wasm",))
    assert planted.read_text() == "[]"
    assert not cache.is_symlink() and cache.stat().st_mode & 0o077 == 0


def agents_of(pid: int) -> list[int]:
    """Processes under ``pid`` running the agent of an agent tier."""
    parents: dict[int, int] = {}
    commands: dict[int, bytes] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    commands[int(entry)] = cmdline.read()
            except (OSError, ValueError, IndexError):
                continue

    def under(child: int) -> bool:
        while child > 1:
            child = parents.get(child, 0)
            if child == pid:
                return True
        return False

    return [p for p, cmd in commands.items() if b"guest/agent.py" in cmd and under(p)]


def start(cwd: Path) -> tuple[KernelSession, int]:
    """A kernel of one set-up whose only warm tier is the process tier; returns it and its pid
    once its warm start has run (started the tier or decided not to)."""
    session = KernelSession(cwd=str(cwd), extra_arguments=[
        "--Backend.warm_start_unused=2", "--ProcessBackend.warm_start=True",
        "--WasmBackend.warm_start=False", "--SandboxBackend.warm_start=False"])
    deadline = time.monotonic() + 60
    while session.run("%%tier native\nk = get_ipython().kernel\n"
                      "k.router._warm_task is not None and k.router._warm_task.done()"
                      ).result["text/plain"] != "True":
        assert time.monotonic() < deadline, "the warm start did not end"
        time.sleep(0.1)
    pid = int(session.run("%%tier native\nimport os\nos.getpid()").result["text/plain"])
    return session, pid


def test_kernels_of_a_set_up_stop_warming_an_unused_tier_and_start_again(tmp_path: Path):
    for n in range(2):  # a new set-up: warmed as configured, though no process cell runs
        session, pid = start(tmp_path)
        try:
            assert agents_of(pid), f"kernel {n} did not warm the process tier"
        finally:
            session.close()
    session, pid = start(tmp_path)  # the last 2 ran no process cell
    try:
        assert agents_of(pid) == []
        ran = session.run("%%tier process\nprint('cold start')")
        assert ran.status == "ok" and ran.stdout == "cold start\n", ran.outputs
    finally:
        session.close()
    session, pid = start(tmp_path)  # its predecessor used the tier: warmed again
    try:
        assert agents_of(pid)
    finally:
        session.close()
