"""How a new kernel starts, as a client sees it.

Its shell and iopub sockets are bound the moment ``python -m tierkernel`` starts
(``tierkernel/kernel/early_sockets.py``): a client that connects while the kernel is still
starting has its requests queued and answered, instead of waiting for ZeroMQ's next reconnect
attempt. And a request already waiting when the kernel's event loop starts is answered before
the tiers' warm start begins (``TierRouter.warm_soon``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import socket
import subprocess
import sys
import threading
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
from tierkernel.kernel.app import TierKernelApp

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


def kernel_env(tmp_path: Path, config: str) -> dict[str, str]:
    """The environment of a kernel that reads ``config`` as a tierkernel_config.py (before
    the test run's own) and finds no Docker engine."""
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "tierkernel_config.py").write_text(config)
    return {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock",
            "JUPYTER_CONFIG_PATH": f"{folder}{os.pathsep}"
                                   f"{os.environ.get('JUPYTER_CONFIG_PATH', '')}"}


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
    env = kernel_env(tmp_path, GATED_CONFIG.format(gate=str(gate)))
    info = json.loads(Path(connection_file).read_text())
    log = (tmp_path / "kernel.log").open("wb")
    kernel = subprocess.Popen([sys.executable, "-m", "tierkernel", "-f", connection_file],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = BlockingKernelClient()
    try:
        deadline = time.monotonic() + 60
        while not (accepts(info["shell_port"]) and accepts(info["iopub_port"])):
            assert kernel.poll() is None, (tmp_path / "kernel.log").read_text()
            assert time.monotonic() < deadline, "the shell and iopub sockets were never bound"
            time.sleep(0.005)
        # The kernel waits at the gate, in its config file: its shell and iopub sockets are
        # bound, the sockets ipykernel binds itself (heartbeat, control) are not yet.
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
        kinds = []
        while "iopub_welcome" not in kinds:  # the subscription made while the kernel started
            kinds.append(client.get_iopub_msg(timeout=60)["msg_type"])

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


def kernel_app(path: str) -> TierKernelApp:
    """The kernel's application with the connection file at ``path`` loaded, as it is when
    it binds its sockets."""
    app = TierKernelApp()
    app.connection_file = path
    app.init_connection_file()
    return app


def bind_and_claim(path: str) -> early_sockets.EarlySockets | None:
    early_sockets.bind(["-f", path])
    return early_sockets.claim(kernel_app(path))


def rebind(*ports: int) -> None:
    """Bind ``ports`` as ipykernel would next: they are free."""
    context = zmq.Context()
    try:
        for port in ports:
            sock = context.socket(zmq.ROUTER)
            try:
                sock.bind(f"tcp://127.0.0.1:{port}")
            finally:
                sock.close(linger=0)
    finally:
        context.term()


def test_claimed_sockets_take_a_clients_messages(connection_file: str) -> None:
    early = bind_and_claim(connection_file)
    assert early is not None
    assert early_sockets.claim(kernel_app(connection_file)) is None  # handed out once
    info = json.loads(Path(connection_file).read_text())
    peer = early.context.socket(zmq.DEALER)
    try:
        peer.connect(f"tcp://127.0.0.1:{info['shell_port']}")
        peer.send(b"hello")
        assert early.shell.poll(30_000)
        assert early.shell.recv_multipart()[-1] == b"hello"
    finally:
        peer.close(linger=0)
        early.close()


def test_every_interface_is_claimed_as_the_kernel_names_it(connection_file: str) -> None:
    info = json.loads(Path(connection_file).read_text())
    Path(connection_file).write_text(json.dumps({**info, "ip": "*"}))
    early = bind_and_claim(connection_file)
    assert early is not None and early.ip == "0.0.0.0"
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
    rebind(info["shell_port"], info["iopub_port"])


@pytest.mark.parametrize("argv", [["-f=KERNEL"], ["--f=KERNEL"], ["--f", "KERNEL"],
                                  ["--debug", "-f", "KERNEL"],
                                  ["-f", "KERNEL", "--IPKernelApp.trio_loop=False"]])
def test_the_connection_file_is_found_in_every_form_of_the_f_option(
        connection_file: str, argv: list[str]) -> None:
    assert early_sockets.connection_file([w.replace("KERNEL", connection_file)
                                          for w in argv]) == connection_file


@pytest.mark.parametrize("option", ["--ip=0.0.0.0", "--shell=5000", "--transport=ipc",
                                    "--IPKernelApp.iopub_port=5001",
                                    "--IPKernelApp.connection_file=other.json", "-f=other.json"])
def test_no_socket_is_bound_early_when_the_command_line_may_set_another_one(
        connection_file: str, option: str) -> None:
    early_sockets.bind(["-f", connection_file, option])
    assert early_sockets._bound is None


def valid(**changes: object) -> str:
    return json.dumps({"transport": "tcp", "ip": "127.0.0.1", "shell_port": 5,
                       "iopub_port": 6, **changes})


@pytest.mark.parametrize("content", [
    "not json", json.dumps([1, 2]), "[" * 5000, valid(shell_port=0, iopub_port=0),
    valid(transport="ipc", ip="kernel-ipc"), valid(transport="udp"), valid(shell_port=True),
    valid(iopub_port="6"), valid(shell_port=70000), valid(ip=7), valid(ip=""),
    valid(curve_secretkey=5, curve_publickey="x"), valid(padding="x" * 70_000),
    json.dumps({"ip": "127.0.0.1", "shell_port": 5, "iopub_port": 6})])
def test_nothing_is_bound_early_for_a_file_the_kernel_must_handle_itself(
        tmp_path: Path, content: str) -> None:
    path = tmp_path / "kernel.json"
    path.write_text(content)
    early_sockets.bind(["-f", str(path)])
    early_sockets.bind(["-f", str(tmp_path / "missing.json")])
    early_sockets.bind(["-f", str(tmp_path)])
    early_sockets.bind([])
    assert early_sockets._bound is None


def test_a_fifo_for_a_connection_file_is_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "kernel.json"
    os.mkfifo(fifo)
    binding = threading.Thread(target=early_sockets.bind, args=(["-f", str(fifo)],),
                               daemon=True)
    binding.start()
    binding.join(30)
    try:
        assert not binding.is_alive()
        assert early_sockets._bound is None
    finally:
        if binding.is_alive():  # let it end: a writer opens the FIFO
            with open(fifo, "w"):
                pass


def test_a_port_in_use_leaves_the_binding_and_its_error_to_ipykernel(
        connection_file: str) -> None:
    info = json.loads(Path(connection_file).read_text())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", info["iopub_port"]))
        taken.listen()
        early_sockets.bind(["-f", connection_file])
        assert early_sockets._bound is None
        rebind(info["shell_port"])  # the shell port bound before the failure was given back


def inode(fd: int) -> str:
    """What /proc says descriptor ``fd`` of this process is (``socket:[INODE]``, ...)."""
    return os.readlink(f"/proc/self/fd/{fd}")


def test_the_head_start_helper_holds_none_of_the_kernels_sockets(tmp_path: Path) -> None:
    # A helper forked once the kernel's sockets are bound must not keep them (a restarted
    # kernel could not bind its ports while the helper makes its container).
    with socket.socket() as listening, open(tmp_path / "kept", "w") as other:
        listening.bind(("127.0.0.1", 0))
        listening.listen()

        def report(fd: int) -> None:
            seen = []
            for name in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):  # listdir's own descriptor, closed now
                    seen.append(os.readlink(f"/proc/self/fd/{name}"))
            os.write(fd, "\n".join(seen).encode())

        read_fd = head_start._spawn(report)
        assert read_fd is not None
        text = b""
        while chunk := os.read(read_fd, 4096):
            text += chunk
        os.close(read_fd)
        held = set(text.decode().splitlines())
        assert held, "the helper reported nothing"
        assert inode(listening.fileno()) not in held
        assert inode(other.fileno()) in held  # a file stays: an object of the kernel owns it


#: Counts the kernel's child processes (the process tier's agent, once that tier started).
CHILDREN = """
import os, time
def children():
    return sum(len(open(f"/proc/self/task/{tid}/children").read().split())
               for tid in os.listdir("/proc/self/task"))
"""


def test_a_first_cell_sent_at_once_is_answered_before_the_tiers_warm(tmp_path: Path) -> None:
    env = kernel_env(tmp_path, "c.Backend.warm_start = False\nc.ProcessBackend.warm_start = True\n"
                     "c.SandboxBackend.head_start = False\nc.Backend.warm_start_unused = 0\n")
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


#: The first 16 hex digits of the sha256 of the source of each ipykernel method that
#: ``TierKernelApp.init_sockets`` mirrors, as checked against it (ipykernel 7.4.0).
MIRRORED = {"init_sockets": "2aa791c3f7a2e811", "init_iopub": "c8228627add3de71"}


def test_the_ipykernel_code_the_early_sockets_mirror_is_the_code_checked() -> None:
    from ipykernel.kernelapp import IPKernelApp

    now = {name: hashlib.sha256(inspect.getsource(getattr(IPKernelApp, name)).encode())
           .hexdigest()[:16] for name in MIRRORED}
    assert now == MIRRORED, (
        "ipykernel's socket set-up changed: bring TierKernelApp.init_sockets "
        "(tierkernel/kernel/app.py) in line with it, then update MIRRORED")
