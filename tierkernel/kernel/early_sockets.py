"""The kernel's shell and iopub sockets, bound the moment ``python -m tierkernel`` starts.

A client opens its channels right after it launches the kernel, long before the kernel has
bound anything, so its first connection attempts are refused; ZeroMQ then tries again every
``reconnect_ivl`` (100 ms) plus a random jitter of up to as much again. A kernel that binds
its sockets where ipykernel does (``IPKernelApp.init_sockets``, once ipykernel and the
kernel's own modules are imported, some 0.15-0.2 s into the process) is reached at whichever
attempt comes next: 0-200 ms after it could have answered. Bound 50 ms into the process, the
sockets are there for the client's second attempt (100-200 ms in), so the requests a client
sends (``kernel_info``, the first cell) are queued by ZeroMQ until the kernel reads them, and
the kernel answers them as soon as its event loop runs.

Only the two sockets a client's first exchange needs are bound early: the shell socket
(``kernel_info`` and ``execute`` requests) and the iopub socket (the ``iopub_welcome`` a client
waits for, JEP 65). stdin, control and the heartbeat are bound where ipykernel binds them.

:func:`bind` reads the connection file a kernel manager wrote (``-f FILE``) and binds the
sockets as ipykernel would: same addresses, socket types, linger and CurveZMQ server keys.
:meth:`TierKernelApp.init_sockets <tierkernel.kernel.app.TierKernelApp.init_sockets>` then
:func:`claim`\\ s them when the application's final settings (command line and config files
applied) name the same file, transport, address, ports and keys; otherwise they are closed and
ipykernel binds its own. Anything unexpected (no file, a port of 0 for the kernel to pick, a
port in use) leaves the binding to ipykernel, which reports what is wrong as it always did.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: A connection file is a few hundred bytes; anything much larger is not one.
_MAX_FILE = 64 * 1024


@dataclass
class EarlySockets:
    """The sockets :func:`bind` bound, with what they were bound for."""

    context: Any  #: the zmq.Context they live in, which the kernel then uses for all others
    shell: Any  #: the shell ROUTER socket
    iopub: Any  #: the iopub XPUB socket
    path: str  #: the connection file's absolute path
    transport: str
    ip: str
    shell_port: int
    iopub_port: int
    curve_secretkey: bytes | None

    def close(self) -> None:
        """Close both sockets and their context at once (nothing was sent on them)."""
        self.context.destroy(linger=0)


_bound: EarlySockets | None = None


def connection_file(argv: Sequence[str]) -> str | None:
    """The connection file named in a kernel's command line (``-f FILE``, ``-f=FILE``,
    ``--f=FILE``), as ipykernel's ``f`` alias takes it; None if there is none."""
    for i, word in enumerate(argv):
        if word in ("-f", "--f") and i + 1 < len(argv):
            return argv[i + 1]
        for prefix in ("-f=", "--f="):
            if word.startswith(prefix):
                return word[len(prefix):]
    return None


def _address(transport: str, ip: str, port: int) -> str:
    """The endpoint ipykernel binds for ``port`` (``IPKernelApp._try_bind_socket``)."""
    return f"tcp://{ip}:{port}" if transport == "tcp" else f"ipc://{ip}-{port}"


def _read(path: str) -> dict[str, Any] | None:
    """The connection file's settings when early binding can honour them, else None."""
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_FILE + 1)
        info = json.loads(data) if len(data) <= _MAX_FILE else None
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("transport", "tcp") not in ("tcp", "ipc"):
        return None
    ports = [info.get("shell_port"), info.get("iopub_port")]
    if not all(isinstance(port, int) and port > 0 for port in ports):
        return None  # the kernel is to pick its ports and write them: ipykernel's job
    if not isinstance(info.get("ip", "127.0.0.1"), str):
        return None
    keys = info.get("curve_publickey"), info.get("curve_secretkey")
    if any(key is not None for key in keys) and not all(isinstance(key, str) for key in keys):
        return None
    return info


def bind(argv: Sequence[str]) -> None:
    """Bind the shell and iopub sockets of the kernel that ``argv`` launches, if its
    connection file is there and names their ports; called by ``python -m tierkernel`` right
    after the tiers' early work began (a fork must come before any socket). Never raises."""
    global _bound
    path = connection_file(argv)
    info = _read(path) if path else None
    if _bound is not None or path is None or info is None:
        return
    import zmq  # here: only a kernel launch needs it, and ipykernel imports it anyway

    transport, ip = info.get("transport", "tcp"), info.get("ip", "127.0.0.1")
    public, secret = info.get("curve_publickey"), info.get("curve_secretkey")
    context = zmq.Context()
    try:
        sockets = []
        for kind, port in ((zmq.ROUTER, info["shell_port"]), (zmq.XPUB, info["iopub_port"])):
            sock = context.socket(kind)
            sock.linger = 1000
            if secret is not None:  # as IPKernelApp._apply_curve_server_options
                sock.curve_secretkey = secret.encode()
                sock.curve_publickey = str(public).encode()
                sock.curve_server = True
            sockets.append(sock)
            sock.bind(_address(transport, ip, port))
    except Exception:  # a port in use, say: ipykernel tries again and says what is wrong
        context.destroy(linger=0)
        return
    _bound = EarlySockets(context, sockets[0], sockets[1], os.path.abspath(path), transport,
                          ip, info["shell_port"], info["iopub_port"],
                          secret.encode() if secret is not None else None)


def claim(app: Any) -> EarlySockets | None:
    """The early sockets, if they were bound for what ``app`` (an ``IPKernelApp`` whose
    connection file is loaded) is about to bind; None otherwise, with any early sockets
    closed so that the app can bind those ports itself. Either way they are handed out once."""
    global _bound
    early, _bound = _bound, None
    if early is None:
        return None
    wanted = (os.path.abspath(app.connection_file), app.transport, app.ip, app.shell_port,
              app.iopub_port, app.curve_secretkey)
    if wanted != (early.path, early.transport, early.ip, early.shell_port, early.iopub_port,
                  early.curve_secretkey):
        early.close()
        return None
    return early
