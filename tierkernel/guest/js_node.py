"""JavaScript and TypeScript cells: what the tiers share, and the sandbox tier's Node.js.

Standard library only. The host imports it (``tierkernel.guest.js_node``) for the rules both
JS tiers apply (:func:`refused`) and for how a JS value is shown (:func:`bundle`); the sandbox
agent is sent it as source at its first JS cell (:func:`module_source`), with the Node program
``js_driver.js`` in it, and runs the cell through :func:`run_cell`.

In the sandbox, one ``node`` process holds the kernel's JS context. The agent starts it at the
first JS cell, in the workspace, with the agent's captured stdout and stderr (what a cell's
child processes print is forwarded as a Python cell's is); it talks to it on two pipes of its
own (see js_driver.js). The agent relays what the cell sends: output, displays and its
result, as the agent's own messages; helper calls through the agent's ``call_host``, so the
host's policy, audit and per-cell limits hold for them as for a Python cell's.

The stop button (and the host's timeout and output limit, which stop a cell the same way)
reaches the agent as SIGINT, which it passes on to ``node``: a cell waiting for something, or
running synchronous code at its top level, ends with its context kept; a cell that does not
stop within ``STOP_GRACE`` seconds (a loop after an ``await``) ends with ``node`` killed and
the context made anew at the next cell, which the error says.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: The languages of a cell (``--lang``).
LANGS = ("python", "js", "ts")

#: The constructs a JS cell may be refused (``--strict``, the tier's ``js_refuse``): what runs
#: code made at run time, or reaches for Node's host objects. Read line by line, so a use
#: inside a string or a comment is refused too: the rule errs on the side of refusing.
REFUSABLE = {
    "eval": re.compile(r"\beval\s*\("),
    "Function": re.compile(r"\bFunction\s*\("),
    "import": re.compile(r"\bimport\s*\("),
    "require": re.compile(r"\brequire\s*\("),
    "process": re.compile(r"\bprocess\b"),
}

#: Seconds a stopped JS cell has to end before ``node`` is killed (below the host's grace for
#: the agent, so that the agent, and the Python variables, outlive it).
STOP_GRACE = 1.0
#: Seconds ``node`` may take to start (under gVisor, with the image's modules cold).
START_TIMEOUT = 30.0
#: Longest message line ``node`` may send the agent; a longer one ends the context.
LINE_LIMIT = 64 << 20


#: A static ``import``/``export ... from`` of a TS cell: TypeScript makes it a ``require``,
#: so it is refused where ``require`` is.
STATIC_IMPORT = re.compile(r"^\s*(import\b(?!\s*\()|export\b.*\bfrom\b)")


def refused(code: str, rules: list[str] | tuple[str, ...], lang: str = "js") -> str | None:
    """The first use in ``code`` (a ``lang`` cell) of a construct ``rules`` name, as "NAME
    on line N", or None."""
    for number, line in enumerate(code.splitlines(), 1):
        for rule in rules:
            if REFUSABLE[rule].search(line):
                shown = "import()" if rule == "import" else rule
                return f"{shown} on line {number}"
        if lang == "ts" and "require" in rules and STATIC_IMPORT.search(line):
            return f"a static import (a require once its types are stripped) on line {number}"
    return None


#: Rows and columns of a table shown for an array of records; past them, no table.
TABLE_ROWS = 1000
TABLE_COLUMNS = 50


def bundle(value: Any) -> dict[str, Any]:
    """A JS value (as JSON gives it) as a mime bundle: pretty JSON text, and the JSON itself,
    or an HTML table for an array of records (at most TABLE_ROWS by TABLE_COLUMNS: a table
    costs rows times columns, whatever the value's size)."""
    if isinstance(value, str):
        return {"text/plain": json.dumps(value, ensure_ascii=False)}
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return {"text/plain": str(value)}
    shown: dict[str, Any] = {"text/plain": text}
    columns = list(dict.fromkeys(key for row in value for key in row)) if (
        isinstance(value, list) and 0 < len(value) <= TABLE_ROWS
        and all(isinstance(row, dict) for row in value)) else []
    if 0 < len(columns) <= TABLE_COLUMNS:
        # A table, and no JSON beside it: JupyterLab would pick its JSON viewer over HTML.
        head = "".join(f"<th>{_escape(column)}</th>" for column in columns)
        rows = "".join("<tr>" + "".join(f"<td>{_escape(row.get(column, ''))}</td>"
                                        for column in columns) + "</tr>" for row in value)
        shown["text/html"] = f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    elif isinstance(value, (dict, list)):
        shown["application/json"] = value
    return shown


def _escape(value: Any) -> str:
    import html

    return html.escape(value if isinstance(value, str) else json.dumps(value, default=str))


def module_source() -> str:
    """This module's source with the Node program in it (``DRIVER``), as the host sends it
    to a sandbox agent (which has no file of tierkernel's to read). Called on the host."""
    folder = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(folder, "js_node.py"), encoding="utf-8") as f:
        source = f.read()
    with open(os.path.join(folder, "js_driver.js"), encoding="utf-8") as f:
        driver = f.read()
    return f"{source}\nDRIVER = {driver!r}\n"


# -- in the sandbox agent ---------------------------------------------------------------------
DRIVER = ""  # set by module_source()

#: Bytes of a result's or display's JSON past which it is shown as compact text only (no
#: pretty copy, no JSON view, no table): what a Python cell's large value costs, not 3x that.
RICH_LIMIT = 1 << 20


class NodeContext:
    """The ``node`` process of the agent's JS cells, and the pipes to it.

    Requests to ``node`` are written by a thread of their own, never by the relay: ``node``
    reads them only when its event loop is free, and a cell that sends many helper calls at
    once would otherwise have both sides blocked writing to each other."""

    def __init__(self) -> None:
        self.process: Any = None
        self._requests = -1
        self._messages = -1
        self._buffer = bytearray()
        self._scanned = 0
        self._outbox: Any = None
        self.cells = 0
        #: V8's heap limit in MiB (0: node's own).
        self.heap = 0
        #: Why ``node`` is gone, once it is: it closed its end of the messages' pipe, or sent
        #: a line over LINE_LIMIT.
        self.gone = ""
        #: The agent's cell id of each of node's recent cell numbers (helper calls of work an
        #: earlier cell left behind are refused under that cell, as a Python thread's are).
        self.cell_ids: dict[int, Any] = {}

    @property
    def alive(self) -> bool:
        """Whether the context is there to run a cell."""
        return self.process is not None and self.process.poll() is None and not self.gone

    def start(self, wake: int = -1) -> None:
        """Start ``node`` with the driver and wait for it to say it is ready (or for
        ``wake``: a stop, which ends the start)."""
        import queue
        import subprocess
        import threading

        requests_read, self._requests = os.pipe()
        self._messages, messages_write = os.pipe()
        argv = ["node"]
        heap = _heap_limit()
        if heap:
            argv.append(f"--max-old-space-size={heap}")
        env = dict(os.environ, TIERKERNEL_JS_FDS=f"{requests_read},{messages_write}")
        try:
            self.process = subprocess.Popen(
                [*argv, "-e", DRIVER], stdin=subprocess.DEVNULL, env=env,
                pass_fds=(requests_read, messages_write), close_fds=True)
        except OSError as exc:
            self.close()
            raise RuntimeError(f"node could not be started ({exc}); the sandbox image needs "
                               "the nodejs package (tierkernel image build)") from None
        finally:
            os.close(requests_read)
            os.close(messages_write)
        # Out of memory, the kernel's killer takes node first, not the agent beside it.
        with contextlib.suppress(OSError), open(f"/proc/{self.process.pid}/oom_score_adj",
                                                "w") as f:
            f.write("1000")
        self.heap = heap
        self._outbox = queue.SimpleQueue()
        threading.Thread(target=self._write_requests, args=(self._outbox, self._requests),
                         daemon=True, name="js-requests").start()
        msg = self.read(START_TIMEOUT, wake)
        if msg is None or msg.get("type") != "ready":
            detail = self.gone or ("it was stopped" if wake >= 0 and _readable(wake)
                                   else "it did not answer")
            self.close()
            raise RuntimeError(f"node did not start: {detail}")

    def send(self, msg: dict[str, Any]) -> None:
        """Queue one request to ``node`` (never blocks)."""
        if self._outbox is not None:
            self._outbox.put((json.dumps(msg) + "\n").encode("utf-8", "replace"))

    @staticmethod
    def _write_requests(outbox: Any, fd: int) -> None:
        """The writer thread; it owns ``fd`` and closes it when it ends (closed by another
        thread, its number could be a new pipe's by the time a write here comes)."""
        try:
            while True:
                data = outbox.get()
                if data is None:
                    return
                while data:
                    data = data[os.write(fd, data):]
        except OSError:  # node is gone: the relay sees its messages' pipe end
            return
        finally:
            os.close(fd)

    def read(self, timeout: float | None, wake: int = -1) -> dict[str, Any] | None:
        """The next message, or None when ``timeout`` passed, ``wake`` became readable, or
        ``node`` is gone (then :attr:`gone` says why)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                self._scanned = 0
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict):
                    return msg
                continue
            self._scanned = len(self._buffer)
            if len(self._buffer) > LINE_LIMIT:
                self.gone = (f"the JavaScript context sent a message over {LINE_LIMIT >> 20} "
                             "MiB and was ended")
                self.kill()
                return None
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            watched = [self._messages] if wake < 0 else [self._messages, wake]
            try:
                ready, _, _ = select.select(watched, [], [], wait)
            except InterruptedError:
                continue
            if not ready or (wake >= 0 and wake in ready):
                return None
            chunk = os.read(self._messages, 1 << 16)
            if not chunk:
                self.gone = self.ended()
                return None
            self._buffer += chunk

    def ended(self) -> str:
        """Why ``node`` ended, as the error of the cell it was running says it."""
        code = None
        if self.process is not None:
            with contextlib.suppress(Exception):
                code = self.process.wait(timeout=2.0)
        if code == -signal.SIGKILL:
            return ("the JavaScript context was killed, most likely because the sandbox's "
                    "memory filled up (raise it with --memory)")
        if code == -signal.SIGABRT:  # V8's "JavaScript heap out of memory" aborts
            limit = f": node's heap limit is {self.heap} MiB" if self.heap else ""
            return (f"the JavaScript context ran out of memory{limit} (three quarters of the "
                    "sandbox's; raise it with --memory)")
        if code is not None and code < 0:
            return f"the JavaScript context ended with signal {-code}"
        return f"the JavaScript context ended (its process exited with status {code})"

    def kill(self) -> None:
        """End ``node`` at once (the context is gone); not waited for long."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.process.kill()
                self.process.wait(timeout=0.5)

    def close(self) -> None:
        """Kill ``node`` and close the pipes. Idempotent."""
        self.kill()
        if self._outbox is not None:
            self._outbox.put(None)  # the writer thread closes the requests' pipe
            self._outbox = None
        elif self._requests >= 0:
            with contextlib.suppress(OSError):
                os.close(self._requests)
        if self._messages >= 0:
            with contextlib.suppress(OSError):
                os.close(self._messages)
        self._requests = self._messages = -1
        self._buffer = bytearray()
        self._scanned = 0
        self.gone = ""
        self.cell_ids = {}


def _heap_limit() -> int:
    """V8's heap limit in MiB: three quarters of the sandbox's memory (so a JS cell that
    fills it fails with node's own error before the container's limit kills anything), or 0
    when that cannot be read."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 50):
            return max(64, int(text) * 3 // 4 >> 20)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0
    return max(64, total * 3 // 4 >> 20)


_context = NodeContext()


class _Stop:
    """The relay's SIGINT handling while a JS cell runs: the signal is noted and wakes the
    relay (a byte on a pipe it watches), wherever the relay is; it raises KeyboardInterrupt
    only inside a helper call, which waits for the host and must end when the cell does."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.at: float | None = None
        self.in_helper = False
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)
        os.set_blocking(self.wake_read, False)
        self.previous: Any = None

    def __enter__(self) -> _Stop:
        self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)
        os.close(self.wake_read)
        os.close(self.wake_write)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.at is None:
            self.at = time.monotonic()
        with contextlib.suppress(OSError):
            os.write(self.wake_write, b"\0")
        if self.in_helper:
            channel = self.agent.channel
            if getattr(channel, "deferring", False):  # half a message out: raised after
                channel.pending = True
                return
            raise KeyboardInterrupt

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self.wake_read, 64)


def run_cell(agent: Any, code: str, lang: str) -> bool:
    """Run one JS or TS cell of ``agent`` (its ``cell_id`` is set); True when it succeeded.
    Its output, result and error go to the host as a Python cell's do."""
    protocol = sys.modules.get("tierkernel_protocol") or _package_protocol()
    context = _context
    with _Stop(agent) as stop:
        if not context.alive:
            if context.cells:
                agent.emit_stream("stderr", "tierkernel: the JavaScript context starts anew; "
                                            "its variables are gone.\n")
            context.close()
            context.cells = 0
            try:
                context.start(stop.wake_read)
            except RuntimeError as exc:
                if stop.at is None:
                    _error(agent, protocol, "TierError", str(exc), [])
                    return False
            if stop.at is not None:
                _error(agent, protocol, "KeyboardInterrupt", "interrupted", [])
                return False
        context.cells += 1
        cell = context.cells
        context.cell_ids[cell] = agent.cell_id
        for old in [number for number in context.cell_ids if number < cell - 64]:
            del context.cell_ids[old]
        context.send({"type": "run", "cell": cell, "code": code, "lang": lang})
        signalled = False
        while True:
            if stop.at is not None and not signalled:
                signalled = True
                with contextlib.suppress(OSError):
                    context.process.send_signal(signal.SIGINT)
            if stop.at is not None and time.monotonic() > stop.at + STOP_GRACE:
                context.close()
                _error(agent, protocol, "KeyboardInterrupt",
                       f"the cell did not stop within {STOP_GRACE:g} s, so the JavaScript "
                       "context was ended; its variables are gone", [])
                return False
            timeout = None if stop.at is None else max(
                0.0, stop.at + STOP_GRACE - time.monotonic())
            msg = context.read(timeout, stop.wake_read)
            if msg is None:
                stop.drain()
                if not context.gone:
                    continue  # a stop came (handled above), or the grace is being counted
                detail = context.gone
                _error(agent, protocol, "MemoryError" if "memory" in detail else "TierError",
                       f"{detail}; its variables are gone, and the next JS cell starts a new "
                       "context", [])
                context.close()
                return False
            kind = msg.get("type")
            if kind == "helper":
                _relay_helper(agent, protocol, context, stop, cell, msg)
                continue
            if msg.get("cell") != cell:
                continue
            if kind == "stream":
                agent.emit_stream("stderr" if msg.get("name") == "stderr" else "stdout",
                                  str(msg.get("text", "")))
            elif kind in ("display", "result"):
                data = shown(msg)
                if kind == "display":
                    agent.send_display(data, {})
                else:
                    agent._flush_text()
                    agent.channel.send({"type": protocol.RESULT, "id": agent.cell_id,
                                        "data": data, "metadata": {}})
            elif kind == "error":
                name = str(msg.get("name") or "Error")
                message = str(msg.get("message") or "")
                stack = [str(line) for line in msg.get("stack") or []]
                _error(agent, protocol, name, message, stack)
            elif kind == "done":
                return bool(msg.get("ok"))


def _relay_helper(agent: Any, protocol: Any, context: NodeContext, stop: _Stop, cell: int,
                  msg: dict[str, Any]) -> None:
    """One helper call of node: through the agent to the host when the running cell made
    it; refused (and recorded under its own cell) when work an earlier cell left made it."""
    request = msg.get("request") if isinstance(msg.get("request"), dict) else {}
    origin = msg.get("origin")
    if origin != cell:
        origin_id = context.cell_ids.get(origin) if isinstance(origin, int) else None
        agent.channel.send({"type": protocol.HELPER, "id": origin_id, "seq": None,
                            "request": request})
        response: dict[str, Any] = {"ok": False, "error": {
            "type": "PermissionError",
            "message": f"{protocol.BACKGROUND_REFUSED}: this call "
                       "was made by a timer or promise an earlier cell left, after that cell "
                       "ended; call ai/api/db/console from the cell that needs them"}}
    elif stop.at is not None:
        response = {"ok": False, "error": {"type": "KeyboardInterrupt",
                                           "message": "the cell was stopped"}}
    else:
        stop.in_helper = True
        try:
            response = agent.call_host(request)
        except KeyboardInterrupt:
            response = {"ok": False, "error": {"type": "KeyboardInterrupt",
                                               "message": "the cell was stopped"}}
        except Exception as exc:
            response = {"ok": False, "error": {"type": type(exc).__name__,
                                               "message": str(exc)}}
        finally:
            stop.in_helper = False
    if msg.get("wait"):
        context.send({"type": "answer", "seq": msg.get("seq"), "response": response})


def shown(msg: dict[str, Any]) -> dict[str, Any]:
    """The mime bundle of a result or display message: rich for what JSON gives within
    RICH_LIMIT, compact text past it, node's inspection for the rest."""
    if "json" not in msg:
        return {"text/plain": str(msg.get("text"))}
    text = str(msg["json"])
    if len(text) > RICH_LIMIT:
        return {"text/plain": text}
    try:
        value = json.loads(text)
    except ValueError:
        return {"text/plain": text}
    return bundle(value)


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _package_protocol() -> Any:
    """The protocol module where the agent runs from the package (a test of this module)."""
    from tierkernel.guest import protocol

    return protocol


def error_lines(name: str, message: str, stack: list[str]) -> list[str]:
    """A JS error as the notebook shows it: its name and message, then the stack's lines (as
    Node and QuickJS print them)."""
    return [f"\x1b[0;31m{name}\x1b[0m: {message}", *stack]


def _error(agent: Any, protocol: Any, name: str, message: str, stack: list[str]) -> None:
    agent._flush_text()
    agent.channel.send({"type": protocol.ERROR, "id": agent.cell_id, "ename": name,
                        "evalue": message, "traceback": error_lines(name, message, stack)})
