"""Jupyter's stdin channel for the cells of the isolated tiers: ``input()`` and ``getpass()``.

A native cell's ``input()`` is ipykernel's ``raw_input``, which asks the client with an
``input_request`` on the stdin socket under the cell's parent header and waits for the
``input_reply``. A cell in another tier asks its host side (the agent session), which asks
here; this does what ipykernel does, but from the session's thread and with a wait that ends
when the cell is stopped (ipykernel's ends only on a KeyboardInterrupt in its own thread).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from tierkernel.errors import InputCancelled, InputNotAllowed

#: ipykernel's words when the client does not allow stdin (nbclient, papermill by default).
NO_STDIN = "raw_input was called, but this frontend does not support input requests."
#: How often the wait looks whether the cell was stopped, in seconds.
POLL = 0.05


class StdinRequester:
    """Asks one cell's client for input, as that cell's execute_request allows.

    Made at the cell's start, with the parent header and the routing identity of its
    execute_request (ipykernel sends the ``input_request`` to the same client). Only one
    thread waits at a time (the session allows one input per cell), and the kernel's own
    thread does not read the stdin socket while an isolated cell runs.
    """

    def __init__(self, kernel: Any, parent: dict[str, Any], ident: Any,
                 allow_stdin: bool) -> None:
        self._kernel = kernel
        self._parent = parent
        self._ident = ident
        self.allow_stdin = allow_stdin
        self._lock = threading.Lock()

    def ask(self, prompt: str, password: bool, cancel: threading.Event) -> str:
        """Send the ``input_request`` and wait for its reply (see ``OutputSink.input``)."""
        import zmq

        if not self.allow_stdin:
            raise InputNotAllowed(NO_STDIN)
        kernel = self._kernel
        socket = kernel.stdin_socket
        with self._lock:
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    stream.flush()
            while True:  # stale replies (an earlier request that was given up) go first
                try:
                    socket.recv_multipart(zmq.NOBLOCK)
                except zmq.ZMQError:
                    break
            sent = kernel.session.send(socket, "input_request",
                                       {"prompt": prompt, "password": bool(password)},
                                       self._parent, ident=self._ident)
            asked = (sent or {}).get("header", {}).get("msg_id")
            while True:
                if cancel.is_set():
                    raise InputCancelled("interrupted while waiting for input")
                readable, _, broken = zmq.select([socket], [], [socket], POLL)
                if not (readable or broken):
                    continue
                try:
                    _, reply = kernel.session.recv(socket)
                except Exception:  # a malformed message: ipykernel logs it and waits on
                    kernel.log.warning("bad input_reply", exc_info=True)
                    continue
                if reply is None:
                    continue
                answered = reply.get("parent_header", {}).get("msg_id")
                if asked and answered and answered != asked:
                    continue  # a late answer to an earlier request that was given up
                value = reply.get("content", {}).get("value", "")
                if not isinstance(value, str):
                    value = ""
                if value == "\x04":  # the client's end of input, as ipykernel reads it
                    raise EOFError("end of input")
                return value
