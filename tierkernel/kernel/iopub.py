"""The kernel's :class:`~tierkernel.backends.base.OutputSink`: iopub messages for one cell."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

MimeBundle = dict[str, Any]


class IopubSink:
    """Publishes one cell's output on iopub, from any thread, under the cell's parent header.

    ``session.send`` on ipykernel's iopub socket is thread-safe (it queues to the IOPub thread),
    so backend reader threads call this directly. After :meth:`close` (the cell has returned)
    further calls are dropped: output after the reply would arrive after ``status: idle``.
    """

    def __init__(
        self,
        session: Any,
        socket: Any,
        topic: Callable[[str], bytes],
        parent: dict[str, Any],
        execution_count: int,
        silent: bool = False,
    ) -> None:
        self._session = session
        self._socket = socket
        self._topic = topic
        self._parent = parent
        self._execution_count = execution_count
        self._silent = silent
        self._closed = False
        self._lock = threading.Lock()

    def _send(self, msg_type: str, content: dict[str, Any]) -> None:
        with self._lock:
            if self._closed or self._silent:
                return
            self._session.send(
                self._socket, msg_type, content, parent=self._parent, ident=self._topic(msg_type)
            )

    def stream(self, name: str, text: str) -> None:
        """A ``stream`` message."""
        if text:
            self._send("stream", {"name": name, "text": text})

    def display(self, data: MimeBundle, metadata: dict[str, Any] | None = None) -> None:
        """A ``display_data`` message."""
        self._send("display_data", {"data": data, "metadata": metadata or {}, "transient": {}})

    def result(self, data: MimeBundle, metadata: dict[str, Any] | None = None) -> None:
        """An ``execute_result`` message carrying the cell's execution count."""
        self._send(
            "execute_result",
            {"execution_count": self._execution_count, "data": data, "metadata": metadata or {}},
        )

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        """An ``error`` message."""
        self._send("error", {"ename": ename, "evalue": evalue, "traceback": traceback})

    def clear_output(self, wait: bool = False) -> None:
        """A ``clear_output`` message."""
        self._send("clear_output", {"wait": wait})

    def close(self) -> None:
        """The cell is over: drop anything still arriving."""
        with self._lock:
            self._closed = True
