"""The ``remote`` tier: ``%%tier remote`` cells run on a real ``tierkernel serve``, as a
notebook user sees them (output streamed back, state kept, stop button, limits, errors)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from tests.kernel_session import KernelSession
from tests.serve_support import MAIN, Server

R = "%%tier remote\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("remote-server"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def kernel(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelSession]:
    config = tmp_path_factory.mktemp("remote-kernel")
    (config / "tierkernel_config.py").write_text(
        f"c.RemoteBackend.servers = {{'box': {{'url': {server.url!r}, 'token': {MAIN!r}}}, "
        f"'wrong': {{'url': {server.url!r}, 'token': 'not-a-token-of-it-0000000'}}}}\n"
        "c.RemoteBackend.tier = 'wasm'\n")
    session = KernelSession(env={**os.environ, "JUPYTER_CONFIG_DIR": str(config)})
    yield session
    session.close()


def remote_sessions(server: Server) -> list[str]:
    with server.client() as api:
        return [s["id"] for s in api.get("/sessions").json()]


def test_a_remote_cell_streams_its_output_and_keeps_its_variables(kernel: KernelSession):
    out = kernel.run(R + "import time\nx = 6\nprint('first', flush=True)\ntime.sleep(1.5)\n"
                     "print('second')\nx * 7")
    assert out.status == "ok", out.outputs
    assert out.result["text/plain"] == "42"
    assert out.metadata["tierkernel"]["tier"] == "remote"
    streams = [o for o in out.of_type("stream")]
    assert "".join(o.content["text"] for o in streams) == "first\nsecond\n"
    assert streams[-1].at - streams[0].at > 1.0  # the first line came while the cell slept
    assert kernel.run(R + "x + 1").result["text/plain"] == "7"


def test_the_remote_tier_and_the_servers_ceiling(kernel: KernelSession):
    # --on picks the server's tier: a container, where subprocess works.
    out = kernel.run("%%tier remote --on sandbox\nimport subprocess\n"
                     "subprocess.run(['true']).returncode")
    assert out.result["text/plain"] == "0", out.outputs
    refused = kernel.run("%%tier remote --on native\nimport os")
    assert refused.error["ename"] == "TierUsageError"
    assert "may not run cells in 'native'" in refused.error["evalue"]


def test_a_remote_cell_can_be_stopped_and_times_out(kernel: KernelSession):
    out = kernel.run(R + "import time\nprint('looping', flush=True)\nwhile True:\n"
                     "    time.sleep(0.05)", timeout=90, interrupt_after=4)
    assert out.status == "error"
    assert out.error["ename"] == "KeyboardInterrupt", out.error
    timed = kernel.run("%%tier remote --timeout 2\nwhile True:\n    pass", timeout=90)
    assert timed.error["ename"] == "TimeoutError", timed.error
    # The session goes on (the wasm tier's interpreter was reset by the stop).
    assert kernel.run(R + "1 + 1").result["text/plain"] == "2"


def test_bad_servers_and_tokens_are_said_plainly(kernel: KernelSession):
    unknown = kernel.run("%%tier remote --to nowhere\n1")
    assert unknown.error["ename"] == "TierUsageError"
    assert "no remote server 'nowhere'; configured: box, wrong" in unknown.error["evalue"]
    wrong = kernel.run("%%tier remote --to wrong\n1")
    assert wrong.error["ename"] == "TierUnavailableError"
    assert "refused the token" in wrong.error["evalue"]
    assert kernel.run("1 + 1").result["text/plain"] == "2"  # the kernel carries on


def test_the_remote_session_ends_with_the_kernel(server: Server, tmp_path_factory:
                                                  pytest.TempPathFactory):
    config = tmp_path_factory.mktemp("remote-kernel-2")
    (config / "tierkernel_config.py").write_text(
        f"c.RemoteBackend.servers = {{'box': {{'url': {server.url!r}, 'token': {MAIN!r}}}}}\n"
        "c.RemoteBackend.tier = 'wasm'\n")
    before = set(remote_sessions(server))
    kernel = KernelSession(env={**os.environ, "JUPYTER_CONFIG_DIR": str(config)})
    try:
        assert kernel.run(R + "y = 1").status == "ok"
        assert len(set(remote_sessions(server)) - before) == 1
    finally:
        kernel.close()
    assert set(remote_sessions(server)) <= before
    with httpx.Client() as client:  # and the server itself carries on
        assert client.get(server.url + "/openapi.json").status_code == 200
