"""Spare sandbox containers and the agent's direct channel, as a user sees them.

A kernel leaves a spare container (agent running) for the next kernel; that kernel's first
sandbox cell runs in it; its shutdown removes it; an unclaimed spare removes itself; two
kernels never get the same spare. Run per runtime: runc, and runsc where the engine has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import sandbox_support as sb
from tests.kernel_session import KernelSession
from tierkernel.backends.sandbox import spares as sandbox_spares

S = "%%tier sandbox\n"
CLI = os.path.join(os.path.dirname(sys.executable), "tierkernel")


@pytest.fixture(params=["runc", "runsc"])
def runtime(request: pytest.FixtureRequest) -> Iterator[str]:
    """The runtime under test; every spare is removed before and after, so each test starts
    from none (other tests' kernels leave theirs)."""
    sb.need_sandbox()
    if request.param not in sb.runtimes():
        pytest.skip(f"the engine has no {request.param} runtime (it has {sb.runtimes()})")
    from tierkernel.backends.sandbox.reaper import remove_spares

    remove_spares(sb.client())
    yield str(request.param)
    remove_spares(sb.client())


def start(runtime: str, *options: str) -> KernelSession:
    """A kernel whose default sandbox runtime is ``runtime``, making its spare at once."""
    return KernelSession(extra_arguments=[f"--SandboxBackend.runtime={runtime}",
                                          "--SandboxBackend.spare_delay=0", *options])


def spare_made_by(session: KernelSession, runtime: str) -> str:
    """The spare ``session`` makes for later kernels, once it is waiting. The kernel's own
    container comes first (it may be its head start's spare, waiting for a moment)."""
    assert session.run(S + "1").status == "ok"
    assert sb.wait_for(lambda: len(waiting_spares(runtime)) == 1, 60), "no spare made"
    return waiting_spares(runtime)[0]


def spare_left_by_a_kernel(runtime: str) -> str:
    """Start a kernel, wait for the spare it makes for later kernels, shut it down; the
    spare's id (it outlives its maker)."""
    maker = start(runtime)
    try:
        return spare_made_by(maker, runtime)
    finally:
        maker.close()


def spares_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``tierkernel spares ARGS``, run to its end."""
    return subprocess.run([CLI, "spares", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def waiting_spares(runtime: str) -> list[str]:
    """Ids of the unclaimed spares of ``runtime`` on the engine."""
    return sorted(
        c.id for c in sandbox_spares.list_spares(sb.client())
        if c.status == "running" and (c.labels or {}).get("org.tierkernel.runtime") == runtime
        and sandbox_spares.claimer(sandbox_spares.folder_of(c)) is None)


def kernel_pid(session: KernelSession) -> int:
    return int(session.run("import os\nos.getpid()").result["text/plain"])


def test_next_kernel_runs_its_first_cell_in_the_spare(runtime: str):
    spare = spare_left_by_a_kernel(runtime)
    # The spare outlives the kernel that made it: it is there for the next one.
    assert waiting_spares(runtime) == [spare]
    second = start(runtime)
    try:
        pid = kernel_pid(second)
        out = second.run(S + "x = 41\nimport os; os.environ.get('TIERKERNEL_AGENT_SOCKET')")
        assert out.status == "ok", out.outputs
        assert out.result["text/plain"] == "'/run/tierkernel/agent.sock'"  # direct channel
        assert sb.containers_of(pid) == [spare]  # the first cell ran in the claimed spare
        assert second.run(S + "x + 1").result["text/plain"] == "42"
        # It makes a new spare for the kernel after it; the claimed one is not waiting.
        assert sb.wait_for(lambda: len(waiting_spares(runtime)) == 1, 60)
        assert waiting_spares(runtime) != [spare]
    finally:
        second.close()
    # Shutting down removes the kernel's container, the claimed spare.
    assert sb.wait_for(lambda: spare not in sb.all_sandbox_containers(), 30)
    assert sb.containers_of(pid) == []


def test_an_expired_spare_is_removed_and_never_claimed(runtime: str):
    maker = start(runtime, "--SandboxBackend.spare_ttl=4")
    try:
        spare = spare_made_by(maker, runtime)
        if runtime == "runc":
            # Its agent stops waiting, its keeper ends the container, auto-remove does the rest.
            assert sb.wait_for(lambda: spare not in sb.all_sandbox_containers(), 40), \
                "the expired spare is still there"
            return
        time.sleep(5)
    finally:
        maker.close()
    # Under gVisor a container must not end by itself (see sandbox.py): the next kernel to
    # start removes the expired spare, and does not take it.
    successor = start(runtime, "--SandboxBackend.spares=0")
    try:
        pid = kernel_pid(successor)
        assert sb.wait_for(lambda: spare not in sb.all_sandbox_containers(), 40), \
            "the expired spare is still there"
        assert successor.run(S + "1").status == "ok"
        assert spare not in sb.containers_of(pid)
    finally:
        successor.close()


def test_no_spares_when_turned_off(runtime: str):
    session = start(runtime, "--SandboxBackend.spares=0")
    try:
        assert session.run(S + "1").status == "ok"
        assert not sb.wait_for(lambda: bool(waiting_spares(runtime)), 5, step=0.5)
    finally:
        session.close()


def spares_of(runtime: str) -> list[str]:
    """Ids of every spare of ``runtime`` on the engine, claimed or not."""
    return sorted(c.id for c in sandbox_spares.list_spares(sb.client())
                  if (c.labels or {}).get("org.tierkernel.runtime") == runtime)


def made_as_spare(container_id: str) -> bool:
    return sandbox_spares.LABEL_SPARE in (sb.client().containers.get(container_id).labels or {})


def helpers_of(session: KernelSession) -> list[int]:
    """Pids of the processes other than the kernel that run its command line (its head start
    helpers: forked from it, they keep its command line)."""
    connection = session.km.connection_file
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tierkernel" in cmdline and connection.encode() in cmdline:
            found.append(int(entry.name))
    return [pid for pid in found if pid != session.km.provisioner.pid]


def test_with_no_spare_the_kernel_makes_one_while_it_starts_and_runs_there(runtime: str):
    # spares=0: the kernel makes none for later kernels, so a spare it runs in is the one its
    # head start made while the kernel was still starting. A memory other than the default:
    # the helper, forked before the kernel reads its configuration, must make the spare with
    # the configuration the kernel then hands it, or the kernel would not claim it. Given as
    # a size, the way the magic line's --memory takes it.
    session = start(runtime, "--SandboxBackend.spares=0", "--SandboxBackend.memory=384m")
    try:
        pid = kernel_pid(session)
        assert session.run(S + "y = 6 * 7").status == "ok"
        [mine] = sb.containers_of(pid)
        assert made_as_spare(mine)
        assert session.run(S + "y").result["text/plain"] == "42"
        assert waiting_spares(runtime) == []  # claimed: nothing is left waiting
        assert sb.wait_for(lambda: helpers_of(session) == [], 10), "a helper stayed behind"
    finally:
        session.close()
    assert sb.wait_for(lambda: mine not in sb.all_sandbox_containers(), 30)


ENDINGS = {
    "exit": (S + "import os\nos._exit(3)", {}, "exited with status 3"),
    # Signals its whole process group (`kill 0`, a `trap 'kill 0' EXIT` idiom): that must end
    # its agent, never the container's keeper (whose end would end the container).
    "killpg": (S + "import os, signal\nos.killpg(0, signal.SIGTERM)", {},
               "killed by signal SIGTERM"),
    # Ignores the interrupt: its agent is killed, every process but the keeper with it.
    "ignored interrupt": (S + "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)"
                          "\nwhile True:\n    time.sleep(0.05)", {"interrupt_after": 0.5},
                          "variables are gone"),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_an_agent_that_ends_in_a_spare_is_told_and_replaced_in_the_same_container(
        runtime: str, ending: str):
    # The kernel's container is its head start's spare; under gVisor the agent there is
    # started by the container's own keeper, not by an exec, and must still be told about,
    # killed and replaced like any other.
    code, how, said = ENDINGS[ending]
    session = start(runtime, "--SandboxBackend.spares=0")
    try:
        pid = kernel_pid(session)
        assert session.run(S + "x = 1\nopen('/workspace/f.txt', 'w').write('kept')").status == "ok"
        [mine] = sb.containers_of(pid)
        assert made_as_spare(mine)
        out = session.run(code, timeout=60, **how)
        assert out.status == "error"
        assert said in out.error["evalue"], out.error
        after = session.run(S + "'x' in globals(), open('/workspace/f.txt').read()")
        assert after.result["text/plain"] == "(False, 'kept')", after.outputs
        assert sb.containers_of(pid) == [mine]
    finally:
        session.close()


def learned_then_changed(runtime: str, cache_home: Path, options: list[str],
                         config_dir: Path | None = None, **changes: Any) -> dict[str, str]:
    """Start and stop a kernel with ``options`` (its settings are learned in ``cache_home``),
    then change what it learned, as if learned before a change it cannot see; remove every
    spare once its head start is done. The environment for the next kernel (with
    ``config_dir`` as its config folder when given), which recalls the changed settings."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    if config_dir is not None:
        env["JUPYTER_CONFIG_DIR"] = str(config_dir)
    first = KernelSession(extra_arguments=options, env=env)
    try:
        # Its head start's spare may still be in the making: removed below only once made.
        assert sb.wait_for(lambda: helpers_of(first) == [], 60), "a helper stayed behind"
    finally:
        first.close()
    cache = cache_home / "tierkernel" / "head-start.json"
    [entry] = json.loads(cache.read_text())
    assert entry["values"]["memory"] == 384 * 2**20  # what the kernel ended up with
    entry["values"].update(changes)
    cache.write_text(json.dumps([entry]))
    from tierkernel.backends.sandbox.reaper import remove_spares

    remove_spares(sb.client())
    return env


def test_a_head_start_made_with_stale_learned_settings_is_not_claimed(
        runtime: str, tmp_path: Path):
    # A kernel remembers its sandbox settings; the next one started the same way makes its
    # head start with them before its own configuration is read. If they were wrong, that
    # spare must not become the kernel's container: its limits would not be the user's.
    options = [f"--SandboxBackend.runtime={runtime}", "--SandboxBackend.spares=0",
               f"--SandboxBackend.memory={384 * 2**20}"]
    # The early helper guesses only when it is ready before the kernel's configuration is
    # final (or it has no reason to): a config file that takes seconds to read makes sure the
    # guess is made, however slowly this machine imports.
    config = tmp_path / "config"
    config.mkdir()
    (config / "tierkernel_config.py").write_text("import time\ntime.sleep(3)\n")
    env = learned_then_changed(runtime, tmp_path, options, memory=320 * 2**20,
                               config_dir=config)
    session = KernelSession(extra_arguments=options, env=env)
    try:
        pid = kernel_pid(session)
        assert session.run(S + "1").status == "ok"
        [mine] = sb.containers_of(pid)
        memory = sb.client().containers.get(mine).attrs["HostConfig"]["Memory"]
        assert memory == 384 * 2**20
        # The guess was made, and is left for a later kernel of those settings.
        assert sb.wait_for(lambda: len(waiting_spares(runtime)) == 1, 60), \
            [(c.short_id, c.status, c.attrs["HostConfig"]["Memory"])
             for c in sandbox_spares.list_spares(sb.client())]
        [guess] = waiting_spares(runtime)
        assert sb.client().containers.get(guess).attrs["HostConfig"]["Memory"] == 320 * 2**20
    finally:
        session.close()
    # And the kernel corrected what it had learned.
    cache = tmp_path / "tierkernel" / "head-start.json"
    assert json.loads(cache.read_text())[0]["values"]["memory"] == 384 * 2**20


def test_a_head_start_learned_as_off_but_wanted_is_still_made(runtime: str, tmp_path: Path):
    # The early helper trusts "no head start for such a kernel" and ends at once; the
    # kernel, whose own configuration wants one, then makes it itself.
    options = [f"--SandboxBackend.runtime={runtime}", "--SandboxBackend.spares=0",
               f"--SandboxBackend.memory={384 * 2**20}"]
    env = learned_then_changed(runtime, tmp_path, options, head_start=False)
    session = KernelSession(extra_arguments=options, env=env)
    try:
        pid = kernel_pid(session)
        assert session.run(S + "1").status == "ok"
        [mine] = sb.containers_of(pid)
        assert made_as_spare(mine)  # its head start's
        assert sb.wait_for(lambda: helpers_of(session) == [], 10), "a helper stayed behind"
    finally:
        session.close()


def test_no_head_start_when_turned_off(runtime: str):
    session = start(runtime, "--SandboxBackend.spares=0", "--SandboxBackend.head_start=False")
    try:
        # The helper forked before the configuration was read is told so, and ends.
        assert sb.wait_for(lambda: helpers_of(session) == [], 10), helpers_of(session)
        pid = kernel_pid(session)
        assert session.run(S + "1").status == "ok"
        [mine] = sb.containers_of(pid)
        assert not made_as_spare(mine)  # the warm start's own container
        assert spares_of(runtime) == []
    finally:
        session.close()


def test_no_head_start_nor_warm_container_once_a_set_up_ran_no_sandbox_cell(
        runtime: str, tmp_path: Path):
    # tier_use.py: the kernels started this way (same command line and folder) ran no
    # sandbox cell lately, so the next one makes no container as it starts; its first
    # sandbox cell still runs, in a container of its own.
    def begin() -> KernelSession:
        return KernelSession(cwd=str(tmp_path), extra_arguments=[
            f"--SandboxBackend.runtime={runtime}", "--SandboxBackend.spare_delay=0",
            "--SandboxBackend.spares=0", "--Backend.warm_start_unused=1"])

    first = begin()
    try:  # a set-up seen for the first time: warmed as configured
        pid = kernel_pid(first)
        assert sb.wait_for(lambda: len(sb.containers_of(pid)) == 1, 60), "no warm container"
    finally:
        first.close()
    second = begin()
    try:
        assert sb.wait_for(lambda: helpers_of(second) == [], 10), helpers_of(second)
        deadline = time.monotonic() + 60
        while second.run("k = get_ipython().kernel\nk.router._warm_task.done()"
                         ).result["text/plain"] != "True":
            assert time.monotonic() < deadline, "the warm start did not end"
            time.sleep(0.1)
        pid = kernel_pid(second)
        assert sb.containers_of(pid) == []
        assert spares_of(runtime) == []
        assert second.run(S + "print(6 * 7)").stdout == "42\n"
        [mine] = sb.containers_of(pid)
        assert not made_as_spare(mine)
    finally:
        second.close()


def test_a_waiting_spare_is_claimed_and_no_second_one_made(runtime: str):
    spare = spare_left_by_a_kernel(runtime)
    session = start(runtime, "--SandboxBackend.spares=0")
    try:
        pid = kernel_pid(session)
        assert session.run(S + "1").status == "ok"
        assert sb.containers_of(pid) == [spare]
        # Its head start saw the waiting spare and made no other.
        assert not sb.wait_for(lambda: spares_of(runtime) != [spare], 3, step=0.5)
    finally:
        session.close()


def test_the_channel_folder_is_read_only_and_unlistable_in_the_guest(runtime: str):
    session = start(runtime, "--SandboxBackend.spares=0")
    try:
        out = session.run(S + "import os\n"
                          "try:\n    open('/run/tierkernel/x', 'w')\n"
                          "except OSError as e:\n    print('write', e.errno)\n"
                          "try:\n    os.listdir('/run/tierkernel')\n"
                          "except OSError as e:\n    print('list', e.errno)\n")
        assert out.status == "ok", out.outputs
        assert "write 30" in out.stdout or "write 13" in out.stdout  # EROFS, or EACCES
        assert "list 13" in out.stdout  # EACCES: the guest may pass through, not look
    finally:
        session.close()


def test_two_claims_of_one_spare_one_wins(tmp_path: Path):
    assert sandbox_spares.try_claim(tmp_path, 111, "5")
    assert not sandbox_spares.try_claim(tmp_path, 222, "6")
    assert sandbox_spares.claimer(tmp_path) == (111, "5")


def test_spares_command_lists_and_removes(runtime: str):
    spare_left_by_a_kernel(runtime)
    listed = spares_cli()
    assert listed.returncode == 0, listed.stderr
    assert "waiting for a kernel" in listed.stdout and f"runtime {runtime}" in listed.stdout
    removed = spares_cli("--remove")
    assert removed.returncode == 0, removed.stderr
    assert "removed 1 spare" in removed.stdout
    assert waiting_spares(runtime) == []


def test_a_folder_label_outside_this_users_folders_is_not_trusted(tmp_path: Path):
    from types import SimpleNamespace

    from tierkernel.backends.sandbox.channel import base_dir, new_folder, remove_folder
    from tierkernel.backends.sandbox.labels import LABEL_FOLDER

    victim = tmp_path / "precious"
    victim.mkdir()
    outside = SimpleNamespace(labels={LABEL_FOLDER: str(victim)})
    assert not sandbox_spares.folder_of(outside).exists()  # never claimed in, never removed
    mine = new_folder("tierkernel-test-folder")
    try:
        inside = SimpleNamespace(labels={LABEL_FOLDER: str(mine)})
        assert sandbox_spares.folder_of(inside) == mine
        assert mine.parent == base_dir() and oct(mine.stat().st_mode & 0o777) == "0o711"
        assert oct(base_dir().stat().st_mode & 0o777) == "0o700"
    finally:
        remove_folder(mine)
    assert victim.is_dir()


def test_spares_made_by_the_command_are_claimed_by_the_next_kernel(runtime: str):
    made = spares_cli("--make", "--runtime", runtime)
    assert made.returncode == 0, made.stderr
    assert "made spare tierkernel-spare-" in made.stdout and f"runtime {runtime}" in made.stdout
    [spare] = waiting_spares(runtime)
    again = spares_cli("--make", "--runtime", runtime)
    assert "already waiting; none made" in again.stdout and waiting_spares(runtime) == [spare]
    session = start(runtime, "--SandboxBackend.spares=0")
    try:
        pid = kernel_pid(session)
        assert session.run(S + "1").status == "ok"
        assert sb.containers_of(pid) == [spare]
    finally:
        session.close()


def test_spares_command_says_what_is_wrong_with_its_options():
    bad = spares_cli("--keep", "--ttl", "5")
    assert bad.returncode == 2 and "--ttl more than 15 s" in bad.stderr
    bad = spares_cli("--make", "--set", "memory")
    assert bad.returncode == 2 and "--set takes CLASS.NAME=VALUE" in bad.stderr
    bad = spares_cli("--make", "--set", "SandboxBackend.memory=lots")
    assert bad.returncode == 2 and "c.SandboxBackend.memory expects a size" in bad.stderr
    assert "Traceback" not in bad.stderr
    sb.need_sandbox()
    bad = spares_cli("--make", "--runtime", "nosuch")
    assert bad.returncode == 1 and "runtime 'nosuch' is not registered" in bad.stderr


def test_keep_replaces_each_spare_before_it_expires_until_stopped(runtime: str):
    keeper = subprocess.Popen([CLI, "spares", "--keep", "--runtime", runtime, "--ttl", "20",
                               "--interval", "1"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    failure = None
    try:
        assert sb.wait_for(lambda: len(waiting_spares(runtime)) >= 1, 60), "no spare made"
        first = waiting_spares(runtime)[0]
        # Replaced with 10 s left (half its time), then removed once expired.
        assert sb.wait_for(lambda: bool(set(waiting_spares(runtime)) - {first}), 40)
        assert sb.wait_for(lambda: first not in sb.all_sandbox_containers(), 40)
        assert waiting_spares(runtime), "the pool ran dry"
    except AssertionError as exc:
        failure = exc
    finally:
        keeper.terminate()
        output, _ = keeper.communicate(timeout=30)
    if failure is not None:  # with what the keeper said meanwhile
        raise AssertionError(f"{failure}\n--- tierkernel spares --keep said:\n{output}")
    assert keeper.returncode == 0, output
    assert "stopped; the spares made stay" in output
