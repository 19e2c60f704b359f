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


def refused(code: str, rules: list[str] | tuple[str, ...]) -> str | None:
    """The first use in ``code`` of a construct ``rules`` name, as "NAME on line N", or
    None."""
    for number, line in enumerate(code.splitlines(), 1):
        for rule in rules:
            if REFUSABLE[rule].search(line):
                shown = "import()" if rule == "import" else rule
                return f"{shown} on line {number}"
    return None


def bundle(value: Any) -> dict[str, Any]:
    """A JS value (as JSON gives it) as a mime bundle: pretty JSON text, and the JSON itself,
    or an HTML table for an array of records."""
    if isinstance(value, str):
        return {"text/plain": json.dumps(value, ensure_ascii=False)}
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return {"text/plain": str(value)}
    shown: dict[str, Any] = {"text/plain": text}
    if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
        # A table, and no JSON beside it: JupyterLab would pick its JSON viewer over HTML.
        columns = list(dict.fromkeys(key for row in value for key in row))
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


class NodeContext:
    """The ``node`` process of the agent's JS cells, and the pipes to it."""

    def __init__(self) -> None:
        self.process: Any = None
        self._requests = -1
        self._messages = -1
        self._buffer = b""
        self.cells = 0
        #: V8's heap limit in MiB (0: node's own).
        self.heap = 0
        #: Whether ``node`` closed its end of the messages' pipe (it ended).
        self.gone = False

    @property
    def alive(self) -> bool:
        """Whether the context is there to run a cell."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start ``node`` with the driver and wait for it to say it is ready."""
        import subprocess

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
        self.heap = heap
        msg = self.read(START_TIMEOUT)
        if msg is None or msg.get("type") != "ready":
            detail = self.ended() if self.gone else "it did not answer"
            self.close()
            raise RuntimeError(f"node did not start: {detail}")

    def send(self, msg: dict[str, Any]) -> None:
        """One request to ``node`` (a broken pipe: it is gone, which the next read says)."""
        data = (json.dumps(msg) + "\n").encode("utf-8", "replace")
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self._requests, data):]

    def read(self, timeout: float | None) -> dict[str, Any] | None:
        """The next message, or None when ``timeout`` passed or ``node`` is gone (then
        :attr:`gone` is set). A SIGINT meanwhile raises KeyboardInterrupt."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line, self._buffer = self._buffer[:end], self._buffer[end + 1:]
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict):
                    return msg
                continue
            if len(self._buffer) > LINE_LIMIT:
                self.kill()
                return None
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._messages], [], [], wait)
            if not ready:
                return None
            chunk = os.read(self._messages, 1 << 16)
            if not chunk:
                self.gone = True
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
        """End ``node`` at once (the context is gone)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.process.kill()
                self.process.wait(timeout=5)

    def close(self) -> None:
        """Kill ``node`` and close the pipes. Idempotent."""
        self.kill()
        for fd in (self._requests, self._messages):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._requests = self._messages = -1
        self._buffer = b""
        self.gone = False


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


def run_cell(agent: Any, code: str, lang: str) -> bool:
    """Run one JS or TS cell of ``agent`` (its ``cell_id`` is set); True when it succeeded.
    Its output, result and error go to the host as a Python cell's do."""
    protocol = sys.modules.get("tierkernel_protocol") or _package_protocol()
    context = _context
    if not context.alive:
        if context.cells:
            agent.emit_stream("stderr", "tierkernel: the JavaScript context starts anew; "
                                        "its variables are gone.\n")
        context.close()
        context.cells = 0
        try:
            context.start()
        except RuntimeError as exc:
            _error(agent, protocol, "TierError", str(exc), [])
            return False
    context.cells += 1
    cell = context.cells
    context.send({"type": "run", "cell": cell, "code": code, "lang": lang})
    stopped_at: float | None = None
    while True:
        agent.in_cell = True
        try:
            timeout = None if stopped_at is None else max(
                0.0, stopped_at + STOP_GRACE - time.monotonic())
            msg = context.read(timeout)
        except KeyboardInterrupt:
            if stopped_at is None:
                stopped_at = time.monotonic()
            if context.process is not None:
                with contextlib.suppress(OSError):
                    context.process.send_signal(signal.SIGINT)
            continue
        finally:
            agent.in_cell = False
        if msg is None:
            if not context.gone:  # the grace after a stop passed
                context.kill()
                _error(agent, protocol, "KeyboardInterrupt",
                       f"the cell did not stop within {STOP_GRACE:g} s, so the JavaScript "
                       "context was ended; its variables are gone", [])
                return False
            detail = context.ended()
            _error(agent, protocol, "MemoryError" if "memory" in detail else "TierError",
                   f"{detail}; its variables are gone, and the next JS cell starts a new "
                   "context", [])
            context.close()
            return False
        if msg.get("cell") != cell:
            continue
        kind = msg.get("type")
        if kind == "stream":
            agent.emit_stream("stderr" if msg.get("name") == "stderr" else "stdout",
                              str(msg.get("text", "")))
        elif kind in ("display", "result"):
            value = _json(msg) if "json" in msg else _BAD
            data = bundle(value) if value is not _BAD else {"text/plain": str(msg.get("text"))}
            if kind == "display":
                agent.send_display(data, {})
            else:
                agent._flush_text()
                agent.channel.send({"type": protocol.RESULT, "id": agent.cell_id,
                                    "data": data, "metadata": {}})
        elif kind == "helper":
            try:
                response = agent.call_host(msg.get("request") or {})
            except Exception as exc:
                response = {"ok": False, "error": {"type": type(exc).__name__,
                                                   "message": str(exc)}}
            if msg.get("wait"):
                context.send({"type": "answer", "seq": msg.get("seq"), "response": response})
        elif kind == "error":
            name = str(msg.get("name") or "Error")
            message = str(msg.get("message") or "")
            stack = [str(line) for line in msg.get("stack") or []]
            _error(agent, protocol, name, message, stack)
        elif kind == "done":
            return bool(msg.get("ok"))


_BAD = object()


def _json(msg: dict[str, Any]) -> Any:
    try:
        return json.loads(msg["json"])
    except (TypeError, ValueError):
        return _BAD


def _package_protocol() -> Any:
    """The protocol module where the agent runs from the package (a test of this module)."""
    from tierkernel.guest import protocol

    return protocol


def _error(agent: Any, protocol: Any, name: str, message: str, stack: list[str]) -> None:
    agent._flush_text()
    agent.channel.send({"type": protocol.ERROR, "id": agent.cell_id, "ename": name,
                        "evalue": message,
                        "traceback": [f"\x1b[0;31m{name}\x1b[0m: {message}", *stack]})
