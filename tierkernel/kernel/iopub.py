"""The kernel's :class:`~tierkernel.backends.base.OutputSink`: iopub messages for one cell."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from tierkernel.errors import InputNotAllowed
from tierkernel.kernel.stdin import NO_STDIN, StdinRequester

MimeBundle = dict[str, Any]

#: Stream text arriving within this many seconds of the last stream message is merged into
#: one message, sent at the end of the window (the first text goes at once). A guest printing
#: thousands of lines a second would otherwise send as many iopub messages, and a publisher
#: past its high-water mark drops messages (a busy client lost whole runs of lines).
STREAM_WINDOW = 0.05


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
        stdin: StdinRequester | None = None,
    ) -> None:
        self._session = session
        self._socket = socket
        self._topic = topic
        self._parent = parent
        self._execution_count = execution_count
        self._silent = silent
        #: Asks the cell's client for input (None: the client takes none).
        self._stdin = stdin
        self._closed = False
        self._lock = threading.Lock()
        #: Stream text held for the current window: (name, text) runs in arrival order.
        self._held: list[tuple[str, str]] = []
        self._last_stream = 0.0
        self._timer: threading.Timer | None = None

    def _publish(self, msg_type: str, content: dict[str, Any]) -> None:
        # Called with the lock held.
        self._session.send(
            self._socket, msg_type, content, parent=self._parent, ident=self._topic(msg_type)
        )

    def _release_held(self) -> None:
        """Send the held stream text, one message per run of one stream (lock held)."""
        held, self._held = self._held, []
        for name, text in held:
            self._publish("stream", {"name": name, "text": text})
        if held:
            self._last_stream = time.monotonic()

    def _send(self, msg_type: str, content: dict[str, Any]) -> None:
        with self._lock:
            if self._closed or self._silent:
                return
            self._release_held()  # what was printed before this output comes before it
            self._publish(msg_type, content)

    def _window_ended(self) -> None:
        with self._lock:
            self._timer = None
            if not self._closed:
                self._release_held()

    def stream(self, name: str, text: str) -> None:
        """A ``stream`` message; text within :data:`STREAM_WINDOW` of the last one is merged."""
        if not text:
            return
        with self._lock:
            if self._closed or self._silent:
                return
            if self._held and self._held[-1][0] == name:
                self._held[-1] = (name, self._held[-1][1] + text)
            else:
                self._held.append((name, text))
            wait = self._last_stream + STREAM_WINDOW - time.monotonic()
            if wait <= 0:
                self._release_held()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._window_ended)
                self._timer.daemon = True
                self._timer.start()

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

    def input(self, prompt: str, password: bool, cancel: threading.Event) -> str:
        """Ask the cell's client for one line on the stdin channel (see ``OutputSink.input``);
        what was printed before goes out first."""
        with self._lock:
            if not self._closed and not self._silent:
                self._release_held()
        if self._stdin is None:
            raise InputNotAllowed(NO_STDIN)
        return self._stdin.ask(prompt, password, cancel)

    def close(self) -> None:
        """The cell is over: send what is held, then drop anything still arriving."""
        with self._lock:
            if not self._closed and not self._silent:
                self._release_held()
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()


class HeldErrors:
    """A cell's sink that forwards its output at once but holds its errors until :meth:`release`
    (or :meth:`close`); :meth:`drop` forgets them. For a ``%tier auto`` cell that may run
    again one tier up: a capability error before any output is not shown, the run again
    is. ``produced`` says whether the cell showed anything."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.produced = False
        self._errors: list[tuple[str, str, list[str]]] = []

    def stream(self, name: str, text: str) -> None:
        """Forwarded; the cell has shown something."""
        self.produced = self.produced or bool(text)
        self.inner.stream(name, text)

    def display(self, data: MimeBundle, metadata: dict[str, Any] | None = None) -> None:
        """Forwarded; the cell has shown something."""
        self.produced = True
        self.inner.display(data, metadata)

    def result(self, data: MimeBundle, metadata: dict[str, Any] | None = None) -> None:
        """Forwarded; the cell has shown something."""
        self.produced = True
        self.inner.result(data, metadata)

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        """Held."""
        self._errors.append((ename, evalue, traceback))

    def clear_output(self, wait: bool = False) -> None:
        """Forwarded."""
        self.produced = True
        self.inner.clear_output(wait)

    def input(self, prompt: str, password: bool, cancel: threading.Event) -> str:
        """Forwarded; asking the user is showing something."""
        self.produced = True
        return str(self.inner.input(prompt, password, cancel))

    def drop(self) -> None:
        """Forget the held errors."""
        self._errors.clear()

    def release(self) -> None:
        """Publish the held errors."""
        errors, self._errors = self._errors, []
        for ename, evalue, traceback in errors:
            self.inner.error(ename, evalue, traceback)

    def close(self) -> None:
        """Publish what is held, then close the cell's sink."""
        self.release()
        self.inner.close()
