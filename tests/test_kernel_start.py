"""How a new kernel starts, as a client sees it.

Its shell and iopub sockets are bound the moment ``python -m tierkernel`` starts
(``tierkernel/kernel/early_sockets.py``): a client that connects while the kernel is still
starting has its requests queued and answered, instead of waiting for ZeroMQ's next reconnect
attempt. And a request already waiting when the kernel's event loop starts is answered before
the tiers' warm start begins (``TierRouter.warm_soon``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq
from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.manager import KernelManager

from tierkernel.backends.sandbox import head_start
from tierkernel.kernel import early_sockets

#: A config file that holds the kernel just after it read its configuration (so after the
#: early sockets, before ipykernel binds the rest) until the test creates the gate file; the
#: tiers start nothing (no engine, no wasm session) so the kernel is quick and alone.
GATED_CONFIG = """
import os, time
c.Backend.warm_start = False
c.SandboxBackend.head_start = False
gate = {gate!r}
deadline = time.monotonic() + 120
while not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.01)
"""


def accepts(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port."""
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def connection_file(tmp_path: Path) -> Iterator[str]:
    path, _ = write_connection_file(str(tmp_path / "kernel.json"), ip="127.0.0.1")
    yield path


@pytest.fixture(autouse=True)
def nothing_left_bound() -> Iterator[None]:
    """A test that binds early sockets in this process leaves none behind for the next."""
    yield
    early = early_sockets._bound
    early_sockets._bound = None
    if early is not None:
        early.close()


def test_a_client_is_answered_that_connected_while_the_kernel_was_starting(
        tmp_path: Path, connection_file: str) -> None:
    gate = tmp_path / "gate"
    config = tmp_path / "config"
    config.mkdir()
    (config / "tierkernel_config.py").write_text(GATED_CONFIG.format(gate=str(gate)))
    info = json.loads(Path(connection_file).read_text())
    env = {**os.environ, "JUPYTER_CONFIG_PATH": f"{config}{os.pathsep}"
           f"{os.environ.get('JUPYTER_CONFIG_PATH', '')}",
           "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    log = (tmp_path / "kernel.log").open("wb")
    kernel = subprocess.Popen([sys.executable, "-m", "tierkernel", "-f", connection_file],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = BlockingKernelClient()
    try:
        deadline = time.monotonic() + 60
        while not accepts(info["shell_port"]):
            assert kernel.poll() is None, (tmp_path / "kernel.log").read_text()
            assert time.monotonic() < deadline, "the shell socket was never bound"
            time.sleep(0.005)
        # The kernel waits at the gate, in its config file: its shell and iopub sockets are
        # bound, the sockets ipykernel binds itself (heartbeat, control) are not yet.
        assert accepts(info["iopub_port"])
        assert not accepts(info["hb_port"])
        assert not accepts(info["control_port"])

        client.load_connection_file(connection_file)
        client.start_channels()
        asked = client.kernel_info()
        time.sleep(0.3)  # the request reaches the kernel's socket and waits there
        gate.touch()
        reply = client.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == asked
        assert reply["content"]["implementation"] == "tierkernel"
        welcome = client.get_iopub_msg(timeout=60)
        assert welcome["msg_type"] == "iopub_welcome"

        client.wait_for_ready(timeout=60)
        seen: list[dict[str, Any]] = []
        reply = client.execute_interactive("print(6 * 7)", timeout=60,
                                           output_hook=lambda msg: seen.append(msg))
        assert reply["content"]["status"] == "ok"
        assert any(msg["msg_type"] == "stream" and msg["content"]["text"] == "42\n"
                   for msg in seen)
        client.shutdown()
        assert kernel.wait(timeout=60) == 0
    finally:
        client.stop_channels()
        if kernel.poll() is None:
            kernel.kill()
            kernel.wait()
        log.close()


def app_for(path: str, **changes: object) -> SimpleNamespace:
    """What claim() reads of an application loaded from the connection file at ``path``."""
    info = json.loads(Path(path).read_text())
    settings = {"connection_file": path, "transport": "tcp", "ip": info["ip"],
                "shell_port": info["shell_port"], "iopub_port": info["iopub_port"],
                "curve_secretkey": None}
    return SimpleNamespace(**{**settings, **changes})


def test_claimed_sockets_take_a_clients_messages(connection_file: str) -> None:
    early_sockets.bind(["-f", connection_file])
    early = early_sockets.claim(app_for(connection_file))
    assert early is not None
    assert early_sockets.claim(app_for(connection_file)) is None  # handed out once
    info = json.loads(Path(connection_file).read_text())
    peer = early.context.socket(zmq.DEALER)
    try:
        peer.connect(f"tcp://127.0.0.1:{info['shell_port']}")
        peer.send(b"hello")
        assert early.shell.poll(10_000)
        assert early.shell.recv_multipart()[-1] == b"hello"
    finally:
        peer.close(linger=0)
        early.close()


@pytest.mark.parametrize("change", [{"shell_port": 1}, {"ip": "0.0.0.0"}, {"transport": "ipc"},
                                    {"curve_secretkey": b"x" * 40},
                                    {"connection_file": "/elsewhere/kernel.json"}])
def test_sockets_bound_for_other_settings_are_closed_and_their_ports_free(
        connection_file: str, change: dict[str, object]) -> None:
    early_sockets.bind(["-f", connection_file])
    assert early_sockets._bound is not None
    assert early_sockets.claim(app_for(connection_file, **change)) is None
    info = json.loads(Path(connection_file).read_text())
    context = zmq.Context()
    try:  # ipykernel binds the same ports next
        for port in (info["shell_port"], info["iopub_port"]):
            context.socket(zmq.ROUTER).bind(f"tcp://127.0.0.1:{port}")
    finally:
        context.destroy(linger=0)


@pytest.mark.parametrize("argv", [["-f=KERNEL"], ["--f=KERNEL"], ["--f", "KERNEL"],
                                  ["--debug", "-f", "KERNEL"]])
def test_the_connection_file_is_found_in_every_form_of_the_f_option(
        connection_file: str, argv: list[str]) -> None:
    assert early_sockets.connection_file([w.replace("KERNEL", connection_file)
                                          for w in argv]) == connection_file


@pytest.mark.parametrize("content", ["not json", json.dumps([1, 2]),
                                     json.dumps({"transport": "tcp", "ip": "127.0.0.1",
                                                 "shell_port": 0, "iopub_port": 0}),
                                     json.dumps({"transport": "udp", "ip": "127.0.0.1",
                                                 "shell_port": 5, "iopub_port": 6}),
                                     "x" * 100_000])
def test_nothing_is_bound_early_for_a_file_the_kernel_must_handle_itself(
        tmp_path: Path, content: str) -> None:
    path = tmp_path / "kernel.json"
    path.write_text(content)
    early_sockets.bind(["-f", str(path)])
    early_sockets.bind(["-f", str(tmp_path / "missing.json")])
    early_sockets.bind([])
    assert early_sockets._bound is None


def test_a_port_in_use_leaves_the_binding_and_its_error_to_ipykernel(
        connection_file: str) -> None:
    info = json.loads(Path(connection_file).read_text())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", info["iopub_port"]))
        taken.listen()
        early_sockets.bind(["-f", connection_file])
        assert early_sockets._bound is None
        context = zmq.Context()
        try:  # the shell port bound before the failure was given back
            context.socket(zmq.ROUTER).bind(f"tcp://127.0.0.1:{info['shell_port']}")
        finally:
            context.destroy(linger=0)


def test_the_head_start_helper_holds_none_of_the_kernels_descriptors() -> None:
    # A helper forked once the kernel's sockets are bound must not keep them (a restarted
    # kernel could not bind its ports while the helper makes its container).
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()

        def report(fd: int) -> None:
            os.write(fd, " ".join(sorted(os.listdir("/proc/self/fd"), key=int)).encode())

        read_fd = head_start._spawn(report)
        assert read_fd is not None
        text = b""
        while chunk := os.read(read_fd, 4096):
            text += chunk
        os.close(read_fd)
    held = {int(fd) for fd in text.split()}
    assert listening.fileno() not in held
    # Beside stdio: its report pipe and the descriptor listdir reads /proc/self/fd with.
    assert len([fd for fd in held if fd > 2]) <= 2, held


#: Counts the kernel's child processes (the process tier's agent, once that tier started).
CHILDREN = """
import os, time
def children():
    return sum(len(open(f"/proc/self/task/{tid}/children").read().split())
               for tid in os.listdir("/proc/self/task"))
"""


def test_a_first_cell_sent_at_once_is_answered_before_the_tiers_warm(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "tierkernel_config.py").write_text(
        "c.Backend.warm_start = False\nc.ProcessBackend.warm_start = True\n"
        "c.SandboxBackend.head_start = False\nc.Backend.warm_start_unused = 0\n")
    env = {**os.environ, "JUPYTER_CONFIG_PATH": f"{config}{os.pathsep}"
           f"{os.environ.get('JUPYTER_CONFIG_PATH', '')}",
           "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    km = KernelManager(kernel_name="tierkernel")
    km.start_kernel(cwd=str(tmp_path), env=env)
    client = km.client()
    printed: list[str] = []

    def run(code: str) -> None:
        reply = client.execute_interactive(
            CHILDREN + code, timeout=120,
            output_hook=lambda msg: printed.append(msg["content"].get("text", "")))
        assert reply["content"]["status"] == "ok", reply["content"]

    try:
        client.start_channels()
        # Sent before the kernel answered anything, so it waits in the socket for the kernel.
        # A warm start begun meanwhile would have the process tier's agent running within
        # this cell's 1.5 s.
        run("time.sleep(1.5); print(children())")
        # Once that cell is answered, the warm start begins: the agent comes.
        run("deadline = time.monotonic() + 60\n"
            "while not children() and time.monotonic() < deadline: time.sleep(0.05)\n"
            "print(children())")
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)
    assert "".join(printed).split() == ["0", "1"]
