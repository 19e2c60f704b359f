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
sockets as ipykernel would: same addresses, socket types, options and CurveZMQ server keys.
:meth:`TierKernelApp.init_sockets <tierkernel.kernel.app.TierKernelApp.init_sockets>` then
:func:`claim`\\ s them when the application's final settings (command line and config files
applied) name the same file, address, ports and keys. Otherwise they are closed and ipykernel
binds its own; a request a client sent meanwhile is then lost (``wait_for_ready`` sends its
``kernel_info`` again), so :func:`bind` binds only where the settings cannot differ: a TCP
kernel (the transport kernel managers use) launched with ``-f FILE`` and no option of the
command line that sets an address, a port, the transport or keys. Anything else (no file, a
file that is not a regular one, a port of 0 for the kernel to pick, a port in use) leaves the
binding to ipykernel, which reports what is wrong as it always did.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: A connection file is a few hundred bytes; anything much larger is not one.
_MAX_FILE = 64 * 1024

#: Command-line options (ipykernel's aliases, or the trait after ``--Class.``) that set what
#: the two sockets are bound to: with one of them, the settings may differ from the file's,
#: and the kernel binds where ipykernel does.
_SOCKET_OPTIONS = frozenset({"ip", "transport", "shell", "iopub", "shell_port", "iopub_port",
                             "curve_publickey", "curve_secretkey", "connection_file"})


#: What :func:`claim` compares, in its order: the app's settings against the early sockets'.
_FIELDS = ("connection_file", "transport", "ip", "shell_port", "iopub_port", "curve_secretkey")


@dataclass
class EarlySockets:
    """The sockets :func:`bind` bound, with what they were bound for."""

    context: Any  #: the zmq.Context they live in, which the kernel then uses for all others
    shell: Any  #: the shell ROUTER socket
    iopub: Any  #: the iopub XPUB socket
    path: str  #: the connection file's absolute path
    ip: str
    shell_port: int
    iopub_port: int
    curve_secretkey: bytes | None

    def close(self) -> None:
        """Close both sockets and their context at once."""
        self.context.destroy(linger=0)


_bound: EarlySockets | None = None


def connection_file(argv: Sequence[str]) -> str | None:
    """The connection file named in a kernel's command line (``-f FILE``, ``-f=FILE``,
    ``--f=FILE``), as ipykernel's ``f`` alias takes it; None if there is none, or if another
    option may set what the sockets are bound to (see :data:`_SOCKET_OPTIONS`)."""
    found: list[str] = []
    words = iter(argv)
    for word in words:
        if word in ("-f", "--f"):
            found.append(next(words, ""))
        elif word.startswith(("-f=", "--f=")):
            found.append(word.partition("=")[2])
        elif word.startswith("-"):
            name = word.lstrip("-").partition("=")[0].rpartition(".")[2]
            if name in _SOCKET_OPTIONS:
                return None
    return found[0] if len(found) == 1 and found[0] else None


def _read(path: str) -> dict[str, Any] | None:
    """The connection file's settings when early binding can honour them, else None.

    Opened without blocking and read only if it is a regular file: a FIFO or a terminal
    named by ``-f`` must not hold the kernel here (ipykernel then says what is wrong)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, _MAX_FILE + 1)
        info = json.loads(data) if len(data) <= _MAX_FILE else None
    except Exception:  # unreadable, not JSON, nested past the parser's depth
        return None
    finally:
        os.close(fd)
    if not isinstance(info, dict) or info.get("transport") != "tcp":
        return None
    ports = [info.get("shell_port"), info.get("iopub_port")]
    if not all(type(port) is int and 0 < port < 65536 for port in ports):
        return None  # the kernel is to pick its ports and write them: ipykernel's job
    if not isinstance(info.get("ip"), str) or not info["ip"]:
        return None
    keys = info.get("curve_publickey"), info.get("curve_secretkey")
    if any(key is not None for key in keys) and not all(isinstance(key, str) for key in keys):
        return None
    return info


def bind(argv: Sequence[str]) -> None:
    """Bind the shell and iopub sockets of the kernel that ``argv`` launches, if it names
    a connection file early binding can honour (see the module); called by ``python -m
    tierkernel`` right after the tiers' early work began (a fork must come before any
    socket). Never raises and never waits."""
    global _bound
    if _bound is not None:
        return
    try:
        path = connection_file(argv)
        info = _read(path) if path else None
        if path and info:
            _bound = _bind(os.path.abspath(path), info)
    except Exception:  # whatever it was, ipykernel meets it again and says what is wrong
        return


def _bind(path: str, info: dict[str, Any]) -> EarlySockets | None:
    import zmq  # here: only a kernel launch needs it, and ipykernel imports it anyway

    # As jupyter_client's ConnectionFileMixin takes the address: "*" is every interface.
    ip = "0.0.0.0" if info["ip"] == "*" else info["ip"]
    public, secret = info.get("curve_publickey"), info.get("curve_secretkey")
    context = zmq.Context()
    try:
        sockets = []
        for kind, port in ((zmq.ROUTER, info["shell_port"]), (zmq.XPUB, info["iopub_port"])):
            sock = context.socket(kind)
            sockets.append(sock)
            sock.linger = 1000
            if kind == zmq.ROUTER and hasattr(zmq, "ROUTER_HANDOVER"):
                sock.router_handover = 1  # ipykernel's work-around (ipython/ipykernel#270)
            if secret is not None:  # as IPKernelApp._apply_curve_server_options
                sock.curve_secretkey = secret.encode()
                sock.curve_publickey = str(public).encode()
                sock.curve_server = True
            sock.bind(f"tcp://{ip}:{port}")  # as IPKernelApp._try_bind_socket
    except Exception:  # a port in use, say: ipykernel tries again and says what is wrong
        context.destroy(linger=0)
        return None
    return EarlySockets(context, sockets[0], sockets[1], path, ip, info["shell_port"],
                        info["iopub_port"], secret.encode() if secret is not None else None)


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
    bound = (early.path, "tcp", early.ip, early.shell_port, early.iopub_port,
             early.curve_secretkey)
    if wanted != bound:
        # A request a client sent meanwhile is lost with them; a config file that sets the
        # kernel's ports or address is the one way here (the command line is looked at).
        log.warning("the sockets bound as the kernel started are closed and bound again: "
                    "the kernel's %s differ from its connection file's",
                    ", ".join(name for name, v, b in zip(_FIELDS, wanted, bound, strict=True)
                              if v != b))
        early.close()
        return None
    log.debug("shell and iopub sockets bound as the kernel started: ports %i, %i",
              early.shell_port, early.iopub_port)
    return early

