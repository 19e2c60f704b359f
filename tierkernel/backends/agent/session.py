"""The host side of the guest agent protocol (``tierkernel/guest/agent.py``; the messages
are named in ``tierkernel/guest/protocol.py``, which both sides import).

An :class:`AgentSession` drives one agent over some :class:`AgentTransport` (a child process's
pipes here; a container's exec socket in the sandbox tier): it sends cells, forwards the
agent's output to the cell's sink as it arrives, and enforces the cell's time and output limits.
Stopping is two-step: SIGINT first (the cell gets ``KeyboardInterrupt`` and the session keeps
its state), then, after a grace period, a hard kill (the state is lost and the user is told).

Everything the agent sends is counted here, on the host, against limits the guest cannot
raise: the length of one message line (:class:`LineTooLong`), the messages of a cell (any
type, forged ones included), the bytes of its output (streams, rich output, errors, console
entries, input prompts), its helper calls (in all, and at once), and its input() requests (one
at a time, the prompt and the answer each capped).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from traitlets import Int
from traitlets.config import Configurable

from tierkernel.backends.base import (
    CellRequest,
    ExecError,
    ExecResult,
    MimeBundle,
    OutputSink,
)
from tierkernel.backends.usage import UsageProbe
from tierkernel.errors import (
    AgentStartError,
    ChannelLimitError,
    InputCancelled,
    InputNotAllowed,
    LineTooLong,
    OutputLimitError,
    TierSessionLost,
)
from tierkernel.guest import protocol
from tierkernel.sizes import ByteSize

log = logging.getLogger(__name__)

#: The guest side of the runtime helpers, sent to agents as source by install_helpers().
HELPERS_SOURCE = Path(__file__).resolve().parents[2] / "guest" / "helpers.py"
#: The guest's inotify watch of its workspace, sent as source by install_watch().
TREE_WATCH_SOURCE = HELPERS_SOURCE.with_name("tree_watch.py")
#: Guest modules sent as source with the helpers (``install_module``): IPython's glue.
GUEST_MODULES = ("ishell", "values")
#: The guest's ``%pip`` magic, sent as source with the helpers to a sandbox agent.
PIP_MAGIC_SOURCE = HELPERS_SOURCE.with_name("pip_magic.py")
#: fsx:// URLs, the notebook folder's fall-back and the missing-file hint (install_files()).
FILES_SOURCE = HELPERS_SOURCE.with_name("files.py")


class AgentTransport(Protocol):
    """A byte channel to one running agent, plus the two ways to stop what it runs."""

    def send(self, data: bytes) -> None:
        """Write request bytes to the agent's stdin. Raises OSError when it is gone."""

    def readline(self, limit: int) -> bytes:
        """Block for the agent's next message line; ``b""`` once the agent is gone. Raises
        :class:`LineTooLong` once the line being read passes ``limit`` bytes with no end in
        sight: the transport never holds more than about that much of one line."""
        ...

    def interrupt(self) -> None:
        """Deliver SIGINT to the agent's interpreter (not to its children)."""

    def kill(self) -> None:
        """Kill the agent and everything it started, at once. Idempotent."""

    def exit_detail(self) -> str:
        """Why the agent is gone (exit status, last words on stderr), for error messages."""
        ...


#: A cell's route to the runtime helpers: takes ``{"helper", "args"}``, returns the broker's
#: ``{"ok": ..., "value" | "error": ...}`` answer (see ``tierkernel/runtime/broker.py``).
HelperGateway = Callable[[dict[str, Any]], dict[str, Any]]

_NO_HELPERS: dict[str, Any] = {"ok": False, "error": {
    "type": "RuntimeError",
    "message": "ai/api/db/console are not available here (no kernel runtime for this cell)"}}


# The requests that carry nothing but their type, as the lines sent.
_SHUTDOWN_LINE = json.dumps({"type": protocol.SHUTDOWN}).encode() + b"\n"
_WATCH_RESET_LINE = json.dumps({"type": protocol.WATCH_RESET}).encode() + b"\n"
_PROCS_LINE = json.dumps({"type": protocol.PROCS}).encode() + b"\n"


def _refusal(kind: str, message: str) -> dict[str, Any]:
    """The broker's answer shape for a call the session refuses itself."""
    return {"ok": False, "error": {"type": kind, "message": message}}


def line_limit_for(output_limit: int) -> int:
    """The longest message line an agent may send, from the tier's output limit.

    The largest legitimate line is a rich output (counted whole against the output limit, so at
    most that long), a helper request (api/db arguments) or a workspace archive (2 MiB, base64):
    twice the output limit, and never below 32 MiB, leaves room for all of them and for JSON's
    escapes (the agent cuts long stream text into pieces of a million characters, at most
    12 bytes each once escaped).
    """
    return max(2 * output_limit, 32 << 20) + (1 << 20)


#: Say ``1,000,000``, not ``1000000``, in messages.
def _count(n: int) -> str:
    return f"{n:,}"


class ChannelLimits(Configurable):
    """The limits of an agent tier's channel to the host, counted by the host per cell.

    Every agent tier has them through its base class (``agent/base.py``'s ``AgentBackend``),
    so each limit is ``c.<TierBackend>.<name>`` (e.g. ``c.SandboxBackend.message_limit``).
    """

    line_limit = ByteSize(
        0,
        help="Longest single message the tier's agent may send the kernel (e.g. 64m); 0 "
        "derives it from output_limit (twice it, at least 32 MiB, plus 1 MiB). A longer line "
        "ends the cell and restarts the tier's interpreter.",
    ).tag(config=True)
    message_limit = Int(
        1_000_000, min=1,
        help="Messages (prints, displays, helper calls, anything the agent sends) one cell "
        "may send the kernel; past it the cell is stopped.",
    ).tag(config=True)
    helper_limit = Int(
        10_000, min=0,
        help="ai/api/db/console calls one cell may make; the calls past it are refused.",
    ).tag(config=True)
    helper_concurrency = Int(
        4, min=1,
        help="ai/api/db/console calls of one cell answered at the same time (each on a host "
        "thread); calls past it are refused at once, never queued.",
    ).tag(config=True)
    completion_limit = Int(
        1000, min=0,
        help="Matches of one Tab completion taken from the tier's interpreter; the rest are "
        "dropped.",
    ).tag(config=True)
    query_reply_limit = ByteSize(
        1 << 20,
        help="Bytes the tier's interpreter may send in answer to one completion (Tab) or "
        "inspection (Shift-Tab, obj?) request (e.g. 1m); a longer answer is dropped unread "
        "and the user gets none.",
    ).tag(config=True)

    input_prompt_limit = Int(
        16_384, min=1,
        help="Characters of an input()/getpass() prompt shown to the user; a longer prompt "
        "is cut there (with a note saying so).",
    ).tag(config=True)
    input_reply_limit = Int(
        1 << 20, min=1,
        help="Characters the user's answer to input()/getpass() may have; a longer answer "
        "is not given to the cell, whose input() raises ValueError instead.",
    ).tag(config=True)

    def channel_limits(self, output_limit: int) -> dict[str, Any]:
        """The keyword arguments of :class:`AgentSession` for these limits."""
        return {
            "line_limit": self.line_limit or line_limit_for(output_limit),
            "message_limit": self.message_limit,
            "helper_limit": self.helper_limit,
            "helper_concurrency": self.helper_concurrency,
            "query_reply_limit": self.query_reply_limit,
            "prompt_limit": self.input_prompt_limit,
            "reply_limit": self.input_reply_limit,
            "settings": f"c.{type(self).__name__}",
        }


def one_line(text: str, limit: int = 300) -> str:
    """Guest text for a message of the kernel's own: one line, no control characters
    (a terminal escape or a new line would let it pass for the kernel's words)."""
    clean = "".join(ch if ch.isprintable() else " " for ch in text[:limit * 4])
    return clean[:limit] + ("..." if len(clean) > limit else "")


@dataclass
class _Cell:
    id: str
    sink: OutputSink
    done: threading.Event = field(default_factory=threading.Event)
    success: bool = False
    output: MimeBundle | None = None
    error: ExecError | None = None
    stop_reason: str | None = None  # "interrupt" | "timeout" | "output"
    stop_detail: str = ""
    stopped_at: float | None = None
    output_bytes: int = 0
    over_limit: bool = False
    lost: bool = False
    #: Why the host killed the agent itself, if it did: told instead of how the agent ended.
    killed_because: str = ""
    #: Answers the guest's ai/api/db/console requests for this cell (None: not available).
    helpers: HelperGateway | None = None
    #: Called (from whichever thread ends the cell) right after ``done`` is set.
    on_done: Callable[[], None] | None = None
    #: Lines the agent sent while this cell ran (whatever they were), and helper calls made.
    messages: int = 0
    flooded: bool = False
    helper_calls: int = 0
    #: Helper calls being answered now (each on a thread of its own).
    helpers_running: int = 0
    #: Whether the error of the limit that stopped the cell was published.
    limit_told: bool = False
    #: The wait for the user's answer to the cell's input(), while there is one: set to end
    #: it (the cell is stopped); when it began; seconds waited in earlier ones (not counted
    #: in the cell's time limit).
    input_cancel: threading.Event | None = None
    input_since: float | None = None
    input_waited: float = 0.0
    #: The bytes of values the request asked back (0: none asked), and what came (a blob,
    #: or why none): one VALUES message per cell.
    values_limit: int = 0
    values: bytes | None = None
    values_error: str | None = None
    values_parts: list[bytes] = field(default_factory=list)
    values_received: int = 0

    def input_time(self, now: float) -> float:
        """Seconds this cell has spent waiting for the user's input so far."""
        since = self.input_since
        return self.input_waited + (now - since if since is not None else 0.0)

    def finish(self) -> None:
        """Mark the cell over and tell whoever waits for it."""
        self.done.set()
        if self.on_done is not None:
            self.on_done()


class AgentSession:
    """One running agent: cells go in one at a time, output streams out.

    ``run`` blocks (call it in a worker thread); ``interrupt`` may be called from any thread.
    """

    def __init__(
        self,
        transport: AgentTransport,
        *,
        tier: str,
        grace: float = 3.0,
        output_limit: int = 16 * 1024 * 1024,
        limit_hint: str = "",
        line_limit: int | None = None,
        message_limit: int = 1_000_000,
        helper_limit: int = 10_000,
        helper_concurrency: int = 4,
        query_reply_limit: int = 1 << 20,
        settings: str = "",
        prompt_limit: int = 16_384,
        reply_limit: int = 1 << 20,
    ) -> None:
        self.transport = transport
        self.tier = tier
        self.grace = grace
        self.output_limit = output_limit
        self.limit_hint = limit_hint
        self.line_limit = line_limit or line_limit_for(output_limit)
        self.message_limit = message_limit
        self.helper_limit = helper_limit
        self.helper_concurrency = helper_concurrency
        self.query_reply_limit = query_reply_limit
        self.prompt_limit = prompt_limit
        self.reply_limit = reply_limit
        #: Whether an interrupt during an input wait is delivered by answering the wait with
        #: KeyboardInterrupt only, not through the transport (wasm, where stopping a running
        #: turn ends the session).
        self.interrupt_by_answer = False
        #: Where the limits are set (``c.ProcessBackend``), named in errors.
        self.settings = settings or f"the {tier} tier's settings"
        #: Lines received while no cell ran (a background thread's, or forged).
        self._idle_messages = 0
        #: Helper calls refused while no cell ran (each may be an audit row: see _admit).
        self._idle_helper_calls = 0
        #: Bytes of the lines received unasked while no cell ran (see _counted).
        self._idle_bytes = 0
        #: Whether a "procs" answer is awaited (see count_processes).
        self._procs_waiting = False
        #: The last cells' helper routes, by cell id: a call tagged with one of them after
        #: that cell ended is refused and audited under it (see _on_helper).
        self._recent: OrderedDict[str, HelperGateway | None] = OrderedDict()
        #: Refusals waiting to be sent, answered by one thread (see _refuse).
        self._refusals: queue.Queue[bytes] = queue.Queue(maxsize=256)
        self._refuser: threading.Thread | None = None
        self._count_lock = threading.Lock()
        self.alive = True
        self.info: dict[str, Any] = {}
        #: Whether the agent's watched folder changed during the last cell (see agent.py's
        #: WATCH_ENV); the sandbox tier copies its workspace back only then.
        self.workspace_changed = False
        #: Whether the agent was sent its workspace watch (install_watch).
        self.watching = False
        #: Processes in the agent's container at the end of the last cell (or when last
        #: asked), and the highest pid the agent has seen, when the agent counts them (agent.py's
        #: COUNT_PROCS_ENV); None otherwise.
        self.procs: int | None = None
        #: The guest modules this session's agent was sent (see install_module).
        self.modules: set[str] = set()
        self.last_pid: int | None = None
        #: Measures each cell's CPU time and memory on the host (set by the tier), so the
        #: result carries them; None: not measured.
        self.usage_probe: UsageProbe | None = None
        self._procs_answer = threading.Event()
        #: Requests waiting for their answer, by sequence number (see :meth:`ask`).
        self._asked: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._ask_seq = 0
        #: Completion/inspection requests waiting for their answer, by sequence number, with
        #: the type of answer each expects (see :meth:`query`).
        self._queries: dict[int, tuple[threading.Event, list[dict[str, Any]], str]] = {}
        #: The last query sent whose answer has not arrived (even if nobody waits for it any
        #: more): the agent is still busy with it, so no other is sent (see :meth:`query`).
        self._query_outstanding: int | None = None
        #: Bytes read while a query waited (see _counted).
        self._query_bytes = 0
        self._ready = threading.Event()
        self._cell: _Cell | None = None
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name=f"{tier}-agent")
        self._reader.start()

    # -- lifecycle ------------------------------------------------------------------------
    def wait_ready(self, timeout: float) -> None:
        """Block until the agent says it is ready; raise :class:`AgentStartError` if not."""
        if self._ready.wait(timeout) and self.alive:
            return
        self.transport.kill()
        raise AgentStartError(
            f"the {self.tier} tier's interpreter did not start within {timeout:g} s: "
            f"{self.transport.exit_detail()}"
        )

    def close(self) -> None:
        """Stop the agent for good. Idempotent, never raises."""
        self.alive = False
        with contextlib.suppress(OSError):
            self.transport.send(_SHUTDOWN_LINE)
        try:
            self.transport.kill()
        except Exception:  # close() runs at shutdown and atexit: it must not raise
            log.debug("killing the %s agent failed", self.tier, exc_info=True)

    # -- cells ----------------------------------------------------------------------------
    def install_helpers(self, packages_site: str | None = None) -> None:
        """Give the agent the runtime helpers (``ai``, ``api``, ``db``, ``console``): the
        stdlib-only module is sent as source, so nothing needs to exist in the guest. With
        ``packages_site``, ``%pip`` too (``pip_magic.py``), installing into that folder. Then
        the guest modules (IPython's glue)."""
        msg = {"type": protocol.INSTALL_HELPERS,
               "source": HELPERS_SOURCE.read_text(encoding="utf-8")}
        if packages_site:
            msg["packages_source"] = PIP_MAGIC_SOURCE.read_text(encoding="utf-8")
            msg["packages_site"] = packages_site
        self.transport.send((json.dumps(msg) + "\n").encode())
        for name in GUEST_MODULES:
            self.install_module(name)

    def install_module(self, name: str, source: str | None = None) -> None:
        """Send the agent the stdlib-only guest module ``tierkernel/guest/NAME.py`` (or
        ``source``) as source (the process and sandbox agents have no folder of tierkernel's
        to import from)."""
        if source is None:
            source = HELPERS_SOURCE.with_name(f"{name}.py").read_text(encoding="utf-8")
        self.modules.add(name)
        self.transport.send((json.dumps({"type": protocol.INSTALL_MODULE, "name": name,
                                         "source": source}) + "\n").encode())

    def install_files(self, config: dict[str, Any]) -> None:
        """Set up the agent's files (``tierkernel/guest/files.py``, sent as source): the
        ``fsx://`` protocol for fsspec, the read-only fall-back to the notebook's folder and
        the hint on a missing file; ``config`` is :class:`~tierkernel.guest.files.
        NotebookFiles`' (the folders as the agent sees them)."""
        source = FILES_SOURCE.read_text(encoding="utf-8")
        with contextlib.suppress(OSError):  # the agent is gone: the next cell says so
            self.transport.send((json.dumps({"type": protocol.INSTALL_FILES, "source": source,
                                             "config": config}) + "\n").encode())

    def install_watch(self) -> None:
        """Let the agent watch its workspace folder with inotify instead of walking it
        around each cell (``tierkernel/guest/tree_watch.py``, sent as source)."""
        self.watching = True
        source = TREE_WATCH_SOURCE.read_text(encoding="utf-8")
        with contextlib.suppress(OSError):  # the agent is gone: the next cell says so
            self.transport.send((json.dumps({"type": protocol.INSTALL_WATCH, "source": source})
                                 + "\n").encode())

    def reset_watch(self) -> None:
        """Tell the agent that its watched folder's current state came from the host (a
        workspace copy), so the next cell does not report it as changed."""
        with contextlib.suppress(OSError):
            self.transport.send(_WATCH_RESET_LINE)

    def tree_changed(self, timeout: float = 30.0) -> bool:
        """Whether the agent's watched folder changed since the last cell ended (a process
        the cell left running wrote there). Asked before the host copies its own changes in,
        which the agent then takes as its new baseline: what changed before must be copied
        back first, or it would never be. True when the agent cannot say."""
        try:
            return bool(self.ask({"type": protocol.TREE_STATE}, timeout).get("changed", True))
        except OSError:
            return True

    def count_processes(self, timeout: float = 1.0) -> tuple[int, int] | None:
        """Ask the agent (between cells) how many processes its container holds now and the
        highest pid it has seen; None when it does not answer in time."""
        self._procs_answer.clear()
        self._procs_waiting = True
        try:
            self.transport.send(_PROCS_LINE)
            if not self._procs_answer.wait(timeout) or self.procs is None:
                return None
        except OSError:
            return None
        finally:
            self._procs_waiting = False
        return self.procs, self.last_pid if self.last_pid is not None else -1

    def ask(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a request between cells and wait for the agent's answer to it (matched by a
        sequence number). Raises OSError when the agent is gone or takes too long."""
        with self._lock:
            self._ask_seq += 1
            seq = self._ask_seq
            answered, answer = threading.Event(), list[dict[str, Any]]()
            self._asked[seq] = (answered, answer)
        try:
            self._send_within((json.dumps({**msg, "seq": seq}) + "\n").encode(), timeout)
            if not answered.wait(timeout) or not answer:
                why = (f"it is gone ({self.transport.exit_detail()})" if not self.alive
                       else f"no answer within {timeout:g} s")
                raise OSError(f"the {self.tier} agent did not answer a {msg.get('type')!r} "
                              f"request: {why}")
            return answer[0]
        finally:
            with self._lock:
                self._asked.pop(seq, None)

    def query(self, msg: dict[str, Any], answer: str, timeout: float) -> dict[str, Any] | None:
        """Send a completion or inspection request (``msg``) between cells and wait up to
        ``timeout`` s for the agent's answer of type ``answer``, matched by sequence number.

        None, at once, while a cell runs or while the agent has not answered the previous
        query yet (it is busy with it: the request would only queue in front of the next
        cell); None when the agent is gone, takes too long, or answers with more than
        :attr:`query_reply_limit` bytes (dropped unread). Never raises, never kills the agent:
        a late answer is dropped by its sequence number, whenever it comes.
        """
        with self._lock:
            if (not self.alive or self._cell is not None or self._asked or self._procs_waiting
                    or self._query_outstanding is not None):
                return None
            self._ask_seq += 1
            seq = self._ask_seq
            answered, answers = threading.Event(), list[dict[str, Any]]()
            self._queries[seq] = (answered, answers, answer)
            self._query_outstanding = seq
            self._query_bytes = 0
        try:
            try:
                self.transport.send((json.dumps({**msg, "seq": seq}) + "\n").encode())
            except OSError:
                with self._lock:
                    self._query_outstanding = None
                return None
            answered.wait(timeout)
            return answers[0] if answers else None
        finally:
            with self._lock:
                self._queries.pop(seq, None)

    def _drop_queries(self) -> None:
        """Wake every waiting query with no answer (its answer was too large, or the agent
        is gone)."""
        with self._lock:
            waiting = list(self._queries.values())
            self._queries.clear()
        for answered, _, _ in waiting:
            answered.set()

    def _send_within(self, data: bytes, timeout: float) -> None:
        """Send ``data``, or give the connection up after ``timeout`` s: an agent that
        stopped reading (stopped by its own cell, a wedged sandbox) must not hang the kernel
        on a large request. The send runs in a thread because the socket has no timeout of
        its own (the reader thread shares it)."""
        failure: list[BaseException] = []

        def send() -> None:
            try:
                self.transport.send(data)
            except BaseException as exc:  # handed to the caller below
                failure.append(exc)

        sender = threading.Thread(target=send, daemon=True, name=f"{self.tier}-send")
        sender.start()
        sender.join(timeout)
        if sender.is_alive():
            self.transport.kill()  # ends it and the send; the next cell starts a new agent
            raise OSError(f"the {self.tier} agent stopped taking requests "
                          f"({len(data)} bytes not sent within {timeout:g} s)")
        if failure:
            raise OSError(f"the {self.tier} agent's connection failed: {failure[0]}")

    def run(self, request: CellRequest, sink: OutputSink, timeout: float | None,
            helpers: HelperGateway | None = None) -> ExecResult:
        """Run one cell to completion, a stop, or the agent's death; the guest's helper
        requests during the cell are answered by ``helpers``. Blocks: call it in a thread."""
        cell, start = self._begin(request, sink, helpers, None)
        deadline = start + timeout if timeout else None
        while not cell.done.wait(0.05):
            if self._police(cell, deadline, timeout):
                self._kill_for(cell)
        return self._end(cell, start)

    async def run_async(self, request: CellRequest, sink: OutputSink, timeout: float | None,
                        helpers: HelperGateway | None = None) -> ExecResult:
        """:meth:`run` on the caller's event loop: the request is sent from it and the reader
        thread wakes it when the cell is done, with no worker thread in between (two thread
        hand-offs fewer per cell). Only a hard kill, which may wait on the engine, runs in a
        thread."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(woken.set)

        cell, start = self._begin(request, sink, helpers, wake)
        deadline = start + timeout if timeout else None
        while not cell.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), 0.05)
            if not cell.done.is_set() and self._police(cell, deadline, timeout):
                await asyncio.to_thread(self._kill_for, cell)
        return self._end(cell, start)

    def _begin(self, request: CellRequest, sink: OutputSink, helpers: HelperGateway | None,
               on_done: Callable[[], None] | None) -> tuple[_Cell, float]:
        start = time.perf_counter()
        cell = _Cell(uuid.uuid4().hex, sink, helpers=helpers, on_done=on_done)
        self.workspace_changed = False  # said by this cell's "done", if it sends one
        with self._lock:
            self._cell = cell
            self._idle_messages = self._idle_helper_calls = self._idle_bytes = 0
            self._recent[cell.id] = helpers
            while len(self._recent) > 64:
                self._recent.popitem(last=False)
        msg = {
            "type": protocol.EXECUTE,
            "id": cell.id,
            "code": request.body,
            "filename": request.filename,
            "first_line": request.first_line,
            "execution_count": request.execution_count,
        }
        lang = request.options.get("lang")
        if lang and lang != "python":
            msg["lang"] = lang
        if request.inputs:
            msg["inputs"] = base64.b64encode(request.inputs).decode("ascii")
        if request.outputs:
            cell.values_limit = max(0, request.values_limit)
            msg["outputs"] = list(request.outputs)
            msg["values_limit"] = cell.values_limit
        if self.usage_probe is not None:
            try:
                self.usage_probe.begin()
            except Exception:  # measured as far as it can be; the cell runs regardless
                log.debug("measuring the %s cell's resource use failed", self.tier,
                          exc_info=True)
        try:
            self.transport.send((json.dumps(msg) + "\n").encode())
        except OSError:
            self._lose(cell, f"its interpreter is gone: {self.transport.exit_detail()}")
        return cell, start

    def _police(self, cell: _Cell, deadline: float | None, timeout: float | None) -> bool:
        """Enforce the cell's time limit; True when its stop was ignored past the grace period
        and the agent must be killed."""
        now = time.perf_counter()
        # The time the cell waited for the user's input is not the cell's to spend.
        if (deadline is not None and now - cell.input_time(now) >= deadline
                and cell.stop_reason is None):
            self._stop(cell, "timeout", f"the cell ran longer than its {timeout:g} s limit")
        return cell.stopped_at is not None and now - cell.stopped_at > self.grace

    def _end(self, cell: _Cell, start: float) -> ExecResult:
        with self._lock:
            self._cell = None
            # The agent read this cell's request, so it is done with any query sent before.
            self._query_outstanding = None
            waiting = cell.input_cancel
        if waiting is not None:
            # An input request the cell left unanswered (sent, then not waited for) ends with
            # it: a host thread waiting on, and reading, the stdin channel for a cell that is
            # over would take the answer meant for the next input() of any tier.
            waiting.set()
        duration = time.perf_counter() - start
        usage = None
        if self.usage_probe is not None:
            try:
                usage = self.usage_probe.end()
            except Exception:  # a measurement must never cost the cell its result
                log.debug("measuring the %s cell's resource use failed", self.tier,
                          exc_info=True)
        return ExecResult(
            success=cell.success and cell.error is None,
            tier=self.tier,
            duration=duration,
            output=cell.output,
            error=cell.error,
            usage=usage,
            values=cell.values,
            values_error=cell.values_error,
            workspace_changed=self.workspace_changed,
            helper_calls=cell.helper_calls,
        )

    def interrupt(self) -> None:
        """The user pressed stop: interrupt the running cell (no-op when idle)."""
        cell = self._cell
        if cell is not None:
            self._stop(cell, "interrupt", "interrupted")

    def _stop(self, cell: _Cell, reason: str, detail: str) -> None:
        with self._lock:
            if cell.stop_reason is None:
                cell.stop_reason, cell.stop_detail = reason, detail
            if cell.stopped_at is None:
                cell.stopped_at = time.perf_counter()
            waiting = cell.input_cancel
        if waiting is not None:
            waiting.set()  # the wait ends, and the guest's input() raises KeyboardInterrupt
            if self.interrupt_by_answer:
                return
        try:
            self.transport.interrupt()
        except Exception:
            log.debug("interrupting the %s agent failed", self.tier, exc_info=True)

    def _kill_for(self, cell: _Cell) -> None:
        log.warning("%s agent ignored SIGINT for %.1f s; killing it", self.tier, self.grace)
        # Said before the kill: the reader thread, which sees the agent end first, tells it.
        cell.killed_because = (f"it did not stop within {self.grace:g} s of being "
                               "interrupted, so it was killed")
        self.transport.kill()
        self._lose(cell, cell.killed_because)

    def _lose(self, cell: _Cell, why: str) -> None:
        """The agent is gone: fail the cell with a message that says the state is lost."""
        self.alive = False
        with self._lock:
            # Once only: the reader thread (the agent's end) and the policing one (its kill)
            # may both get here for the same cell.
            if cell.done.is_set() or cell.lost:
                return
            cell.lost = True
            why = cell.killed_because or why
        names = {"interrupt": "KeyboardInterrupt", "timeout": "TimeoutError",
                 "output": OutputLimitError.__name__, "channel": ChannelLimitError.__name__}
        ename = names.get(cell.stop_reason or "", TierSessionLost.__name__)
        head = f"{cell.stop_detail}; " if cell.stop_detail else ""
        evalue = (f"{head}the {self.tier} tier's interpreter was lost ({why}). Its variables "
                  f"are gone; the next {self.tier} cell starts a fresh interpreter.")
        if cell.stop_reason == "timeout" and self.limit_hint:
            evalue += f" To allow more time, {self.limit_hint}."
        elif cell.stop_reason == "output":
            evalue += f" To allow more output, raise {self.settings}.output_limit."
        self._fail(cell, ename, evalue, [])
        cell.finish()

    def _fail(self, cell: _Cell, ename: str, evalue: str, tb: list[str]) -> None:
        cell.success = False
        cell.error = ExecError(ename, evalue, [*tb, f"{ename}: {evalue}"])
        cell.sink.error(cell.error.ename, cell.error.evalue, cell.error.traceback)

    # -- the reader thread ----------------------------------------------------------------
    def _read_loop(self) -> None:
        while True:
            try:
                line = self.transport.readline(self.line_limit)
            except LineTooLong:
                self._line_too_long()
                line = b""
            except Exception:
                line = b""
            if not line:
                break
            if not self._counted(line):
                continue
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):  # deep nesting raises RecursionError
                log.debug("%s agent sent a bad line: %r", self.tier, line[:200])
                continue
            try:
                if isinstance(msg, dict):
                    self._dispatch(msg, len(line))
            except Exception:  # a malformed message (the guest may forge any): not fatal
                log.debug("%s agent sent a message that could not be handled: %r",
                          self.tier, line[:200], exc_info=True)
        self.alive = False
        self._ready.set()
        with self._lock:
            for answered, _ in self._asked.values():
                answered.set()  # with no answer: the asker raises at once
        self._drop_queries()
        cell = self._cell
        if cell is not None and not cell.done.is_set():
            self._lose(cell, self.transport.exit_detail())

    def _line_too_long(self) -> None:
        """The agent sent a line past the limit: the channel is out of step and the agent is
        not to be trusted any more, so it is killed (the cell is told why, and that the state
        is lost)."""
        limit = f"{self.line_limit / 2**20:g} MiB"
        detail = (f"the cell sent a single message longer than {limit}, the {self.tier} "
                  f"tier's line limit ({self.settings}.line_limit, derived from output_limit)")
        cell = self._cell
        if cell is not None:
            with self._lock:
                if cell.stop_reason is None:
                    cell.stop_reason, cell.stop_detail = "channel", detail
            cell.killed_because = "it broke the channel's limits, so it was killed"
        log.warning("%s agent: %s; killing it", self.tier, detail)
        self.transport.kill()

    def _counted(self, line: bytes) -> bool:
        """Count one line against the running cell's message limit (or, between cells,
        against the same number of lines, past which the agent is killed: nothing legitimate
        talks between cells). False when the line is to be dropped unread."""
        cell = self._cell
        if cell is None:
            self._idle_messages += 1
            # While a completion/inspection query waits, what the agent sends is its answer,
            # up to query_reply_limit bytes in all; past that it is dropped undecoded, the
            # query gets none, and the rest counts as unasked.
            over_query = False
            if self._queries and not self._asked and not self._procs_waiting:
                self._query_bytes += len(line)
                over_query = self._query_bytes > self.query_reply_limit
                if over_query:
                    self._drop_queries()
                    self._query_outstanding = None  # its answer was this (too long) line
            # Unasked, a line is no answer (a workspace archive may be large): its bytes are
            # counted too, up to one line limit's worth, or many lines just under the line
            # limit would each be read and decoded.
            unasked = len(line) if over_query or (
                not self._asked and not self._procs_waiting and not self._queries) else 0
            self._idle_bytes += unasked
            if (self._idle_messages == self.message_limit + 1
                    or self._idle_bytes > self.line_limit >= self._idle_bytes - unasked):
                log.warning("%s agent sent %s messages (%s bytes unasked) between cells; "
                            "killing it", self.tier, _count(self._idle_messages),
                            _count(self._idle_bytes))
                self.transport.kill()
            if self._idle_bytes > self.line_limit:
                return False
            # The asked-for answers (tree_state, pack...) are still read below the limit.
            return self._idle_messages <= self.message_limit and not over_query
        cell.messages += 1
        if cell.messages <= self.message_limit:
            return True
        if not cell.flooded:
            cell.flooded = cell.over_limit = True
            self._stop(cell, "channel",
                       f"the cell sent more than {_count(self.message_limit)} messages "
                       f"(prints, displays, helper calls...), the {self.tier} tier's limit; "
                       f"raise it with {self.settings}.message_limit")
        # Past the limit, only the cell's end is looked for (cheaply); the rest is dropped
        # unread, and an agent that goes on is killed after the grace period.
        return b'"done"' in line or b'"error"' in line

    def _dispatch(self, msg: dict[str, Any], size: int = 0) -> None:
        kind = msg.get("type")
        if kind == protocol.HELPER:
            self._on_helper(msg)
            return
        if kind == protocol.INPUT_REQUEST:
            self._on_input(msg, size)
            return
        if kind == protocol.PROTOCOL_ERROR:
            self._charge_stray(size)
            log.warning("%s agent: %.500s", self.tier, msg.get("detail"))
            return
        if kind == protocol.READY:
            self._charge_stray(size)
            self.info = msg
            self._ready.set()
            return
        if kind in (protocol.COMPLETED, protocol.INSPECTED):
            self._on_query_answer(msg, kind, size)
            return
        if kind in (protocol.UNPACKED, protocol.PACKED, protocol.TREE_STATED):
            seq = msg.get("seq")
            with self._lock:
                waiting = self._asked.get(seq) if isinstance(seq, int) else None
            if waiting is None:
                self._charge_stray(size)  # nobody asked (answers are asked between cells)
            else:
                waiting[1].append(msg)
                waiting[0].set()
            return
        if kind == protocol.PROCS:
            self._charge_stray(size)
            self.procs = int(msg.get("count", -1))
            self.last_pid = int(msg.get("last_pid", -1))
            self._procs_answer.set()
            return
        cell = self._cell
        if cell is None or msg.get("id") != cell.id or cell.lost:
            self._charge_stray(size)
            return  # output of a cell that was already given up on
        if cell.flooded and kind not in (protocol.DONE, protocol.ERROR):
            return
        if kind == protocol.VALUES and cell.values_limit:
            self._on_values(cell, msg, size)
            return
        if kind == protocol.DONE:
            cell.success = bool(msg.get("success"))
            if cell.stop_reason in ("output", "channel"):
                self._tell_limit(cell)  # even if the agent says it ended well
            self.workspace_changed = bool(msg.get("workspace_changed"))
            if "procs" in msg:
                self.procs = int(msg["procs"])
                self.last_pid = int(msg.get("last_pid", -1))
            cell.finish()
        elif kind == protocol.ERROR:
            # Counted like any output: a flood of errors is output too. Past the limit the
            # cell's outcome is the limit's error, said by the host.
            if not cell.over_limit and self._charge(cell, size):
                self._on_error(cell, msg)
            else:
                self._tell_limit(cell)
        elif not cell.over_limit:
            text = msg.get("text") if kind == protocol.STREAM else None
            # Stream text is counted by its characters (a print's cost, whatever JSON makes of
            # it); anything else by the whole line the host received, metadata included.
            if self._charge(cell, len(text) if isinstance(text, str) else size):
                self._forward(cell, kind, msg)

    def _on_values(self, cell: _Cell, msg: dict[str, Any], size: int) -> None:
        """The values the cell's request asked back: kept undecoded (the kernel decodes them,
        with limits); a second message, or one past the limit, is refused and counted as
        output."""
        if cell.values is not None or cell.values_error is not None:
            self._charge(cell, size)
            return
        data, error = msg.get("data"), msg.get("error")
        if isinstance(error, str):
            cell.values_error = f"the {self.tier} tier said: {one_line(error)}"
        elif not isinstance(data, str):
            cell.values_error = f"the {self.tier} tier sent malformed values"
        else:
            cell.values_received += len(data)
            if cell.values_received > cell.values_limit * 4 // 3 + 4:
                cell.values_error = (f"the values are over their limit of "
                                     f"{cell.values_limit / 2**20:.1f} MiB "
                                     "(c.TierKernel.value_limit)")
            else:
                try:
                    cell.values_parts.append(base64.b64decode(data, validate=True))
                except (ValueError, binascii.Error):
                    cell.values_error = f"the {self.tier} tier sent malformed values"
                else:
                    if not msg.get("more"):
                        cell.values = b"".join(cell.values_parts)
        if cell.values is not None or cell.values_error is not None:
            cell.values_parts = []

    def _on_query_answer(self, msg: dict[str, Any], kind: str, size: int) -> None:
        """A completion or inspection answer: handed to the query waiting for it; a late one
        (its query gave up), a forged one or one of the wrong type is only counted."""
        seq = msg.get("seq")
        with self._lock:
            waiting = self._queries.get(seq) if type(seq) is int else None
            if type(seq) is int and seq == self._query_outstanding:
                self._query_outstanding = None
        if waiting is None or waiting[2] != kind or waiting[1]:
            self._charge_stray(size)
            return
        waiting[1].append(msg)
        waiting[0].set()

    def _charge_stray(self, size: int) -> None:
        """Count a line the host reads but forwards nowhere (no cell's, another cell's, an
        answer nobody asked for) against the running cell's output limit: the guest made
        the kernel read and decode it all the same."""
        cell = self._cell
        if cell is not None and not cell.lost and not cell.done.is_set():
            self._charge(cell, size)

    def _charge(self, cell: _Cell, size: int) -> bool:
        """Count ``size`` bytes of the cell's output; False (and the cell stopped) past the
        output limit. (wasm's helper calls count from the guest's thread, the rest from the
        reader: hence the lock.)"""
        with self._count_lock:
            cell.output_bytes += size
            within = cell.output_bytes <= self.output_limit
        if within:
            return True
        if not cell.over_limit:
            cell.over_limit = True
            limit = f"{self.output_limit / 2**20:g} MiB"
            self._stop(cell, "output", f"the cell's output passed the {limit} output limit")
        return False

    # -- helper calls -------------------------------------------------------------------------
    def call_helper(self, request: Any, origin: Any = None) -> dict[str, Any]:
        """Answer one helper request of the running cell, counted against its limits; for a
        tier whose guest calls the host directly (wasm's tool) rather than by a message line.
        ``origin`` is the id of the cell the guest says made the call (None: the running one).
        """
        cell = self._cell
        if origin is None and cell is not None:
            origin = cell.id
        refusal = self._admit(cell, origin, request)
        if refusal is not None:
            return refusal
        assert cell is not None
        try:
            return self._run_helper(cell, request)
        finally:
            with self._lock:
                cell.helpers_running -= 1

    def _on_helper(self, msg: dict[str, Any]) -> None:
        """A helper request line: answered on a thread of its own (a helper may take seconds:
        HTTP, SQL; the reader must keep forwarding output meanwhile), or refused at once."""
        cell = self._cell
        seq = msg.get("seq")
        refusal = self._admit(cell, msg.get("id"), msg.get("request"))
        if refusal is not None:
            # Not answered between cells (the agent's main loop reads requests then), nor a
            # request with no sequence number (the agent tells of a call it refused itself).
            if cell is not None and seq is not None:
                self._refuse(seq, refusal)
            return
        assert cell is not None
        threading.Thread(target=self._answer_helper, args=(cell, seq, msg.get("request")),
                         daemon=True, name=f"{self.tier}-helper").start()

    def _admit(self, cell: _Cell | None, origin: Any, request: Any) -> dict[str, Any] | None:
        """Take one helper call of ``cell`` on (counted: it then holds one of the cell's
        concurrent slots), or the answer that refuses it.

        A call belongs to the cell the guest tagged it with: the cell whose code started the
        calling thread (see agent.py's ``Agent.call_host``). A call of an earlier cell, made
        after it ended, gets no access under the running cell's ``--allow``: it is refused, and
        recorded in the earlier cell's audit log. This stops background work (a thread that a
        cell left running) from borrowing a later cell's permissions by accident or by design
        of the code that started it. It does not stop hostile code in the same interpreter from
        reading the running cell's id and forging the tag: the guest's interpreter is one trust
        domain; the boundary that holds against it is the tier itself (what the running cell
        is allowed to do).
        """
        if not isinstance(origin, str) or cell is None or origin != cell.id or cell.done.is_set():
            message = (f"{protocol.BACKGROUND_REFUSED}: this call "
                       "was made by a thread that an earlier cell started, after that cell "
                       "ended; call ai/api/db/console from the cell that needs them (threads "
                       "and thread pools started in it may call them while it runs)")
            route = self._recent.get(origin) if isinstance(origin, str) else None
            refuse = getattr(route, "refuse", None)
            # Each recorded refusal is an audit row: counted like any helper call (of the
            # running cell, or of the time between cells), and past the limit not recorded.
            with self._lock:
                if cell is not None and not cell.done.is_set():
                    cell.helper_calls += 1
                    recorded = cell.helper_calls <= self.helper_limit
                else:
                    self._idle_helper_calls += 1
                    recorded = self._idle_helper_calls <= self.helper_limit
            if refuse is not None and recorded and isinstance(request, dict):
                with contextlib.suppress(Exception):  # the audit is best effort here
                    return dict(refuse(request, message))
            return _refusal("PermissionError", message)
        with self._lock:
            cell.helper_calls += 1
            if cell.helper_calls > self.helper_limit:
                return _refusal("PermissionError",
                                f"this cell made more than {_count(self.helper_limit)} "
                                "ai/api/db/console calls, the limit of the "
                                f"{self.tier} tier; raise it with {self.settings}.helper_limit")
            if cell.helpers_running >= self.helper_concurrency:
                return _refusal("RuntimeError",
                                f"more than {self.helper_concurrency} ai/api/db/console calls "
                                "of this cell at once; wait for one to finish (raise it with "
                                f"{self.settings}.helper_concurrency)")
            cell.helpers_running += 1
        if isinstance(request, dict) and request.get("helper") == "console":
            # A console entry is output too (it is kept in the cell's log), whether the guest
            # printed it or sent the request by hand.
            args = request.get("args")
            entry = args.get("message") if isinstance(args, dict) else None
            if isinstance(entry, str) and not self._charge(cell, len(entry)):
                with self._lock:
                    cell.helpers_running -= 1
                return _refusal("RuntimeError", f"{cell.stop_detail}: console entry refused")
        return None

    def _answer_helper(self, cell: _Cell, seq: Any, request: Any) -> None:
        # The call holds its slot until its answer is written: an agent that does not read
        # its answers blocks that write, and each blocked one is a thread holding an answer.
        try:
            response = self._run_helper(cell, request)
            reply = {"type": protocol.HELPER_RESULT, "seq": seq, "response": response}
            with contextlib.suppress(OSError):  # the agent is gone: nobody is waiting any more
                self.transport.send((json.dumps(reply) + "\n").encode())
        finally:
            with self._lock:
                cell.helpers_running -= 1

    def _run_helper(self, cell: _Cell, request: Any) -> dict[str, Any]:
        if cell.helpers is None:
            return _NO_HELPERS
        if not isinstance(request, dict):
            return _refusal("ValueError", "a helper request must be an object")
        try:
            return cell.helpers(request)
        except Exception as exc:  # the broker answers errors itself; this is a bug guard
            log.exception("%s helper call failed", self.tier)
            return _refusal("RuntimeError", f"the helper failed: {exc}")

    def _refuse(self, seq: Any, response: dict[str, Any]) -> None:
        """Send a refusal from one thread of the session's: a flood of forged requests must
        neither start a thread each nor block the reader on a full request channel (an agent
        that does not read its answers). Past 256 waiting, refusals are dropped: the legitimate
        agent waits for one answer at a time."""
        reply = (json.dumps({"type": protocol.HELPER_RESULT, "seq": seq, "response": response})
                 + "\n").encode()
        try:
            self._refusals.put_nowait(reply)
        except queue.Full:
            return
        self._start_refuser()

    def _start_refuser(self) -> None:
        if self._refuser is None:
            self._refuser = threading.Thread(target=self._send_refusals, daemon=True,
                                             name=f"{self.tier}-refusals")
            self._refuser.start()

    def _send_refusals(self) -> None:
        while True:
            reply = self._refusals.get()
            try:
                self.transport.send(reply)
            except OSError:
                if not self.alive:
                    return

    # -- input() / getpass() ---------------------------------------------------------------
    def call_input(self, request: Any) -> dict[str, Any]:
        """Answer one input request of the running cell (``{"id", "prompt", "password"}``)
        with ``{"value"}`` or ``{"error": {"type", "message"}}``, blocking until the user
        answers; for a tier whose guest calls the host directly (wasm's tool)."""
        cell = self._cell
        request = request if isinstance(request, dict) else {}
        size = len(json.dumps(request))
        refusal = self._admit_input(cell, request, size)
        if refusal is not None:
            return refusal
        assert cell is not None
        return self._ask_user(cell, request)

    def _on_input(self, msg: dict[str, Any], size: int) -> None:
        """An input request line: the user's answer may take minutes, so it is waited for
        on a thread of its own (the reader goes on forwarding the cell's other output)."""
        cell = self._cell
        seq = msg.get("seq")
        refusal = self._admit_input(cell, msg, size)
        if refusal is not None:
            if cell is not None and not cell.done.is_set():
                self._queue_reply({"type": protocol.INPUT_REPLY, "seq": seq, **refusal})
            return
        assert cell is not None
        threading.Thread(target=self._answer_input, args=(cell, seq, msg), daemon=True,
                         name=f"{self.tier}-input").start()

    def _admit_input(self, cell: _Cell | None, msg: dict[str, Any],
                     size: int) -> dict[str, Any] | None:
        """Take one input request of ``cell`` on (then it is the cell's one wait), or the
        answer that refuses it: no cell runs, another cell's, or one already waits."""
        if cell is None or msg.get("id") != cell.id or cell.done.is_set() or cell.lost:
            return {"error": {"type": "RuntimeError", "message":
                              "input() can only be called while its cell runs"}}
        if cell.stop_reason is not None:
            return {"error": {"type": "RuntimeError", "message":
                              f"input() refused: the cell is being stopped ({cell.stop_detail})"}}
        self._charge(cell, size)  # the prompt is output the user sees
        with self._lock:
            if cell.done.is_set():  # ended meanwhile: _end has looked for a wait to end
                return {"error": {"type": "RuntimeError", "message":
                                  "input() can only be called while its cell runs"}}
            if cell.input_cancel is not None:
                return {"error": {"type": "RuntimeError", "message":
                                  "input() is already waiting for the user in this cell; "
                                  "one input at a time"}}
            cell.input_cancel = threading.Event()
            cell.input_since = time.perf_counter()
        return None

    def _answer_input(self, cell: _Cell, seq: Any, msg: dict[str, Any]) -> None:
        reply = {"type": protocol.INPUT_REPLY, "seq": seq, **self._ask_user(cell, msg)}
        with contextlib.suppress(OSError):  # the agent is gone: nobody is waiting any more
            self.transport.send((json.dumps(reply) + "\n").encode())

    def _ask_user(self, cell: _Cell, msg: dict[str, Any]) -> dict[str, Any]:
        """Ask the cell's client (through its sink) and end the cell's wait, whatever the
        outcome; the prompt and the answer are held to the session's limits."""
        cancel = cell.input_cancel
        assert cancel is not None
        try:
            prompt = msg.get("prompt")
            prompt = prompt if isinstance(prompt, str) else str(prompt)
            if len(prompt) > self.prompt_limit:
                prompt = (f"{prompt[:self.prompt_limit]}… [prompt cut at "
                          f"{_count(self.prompt_limit)} characters, the {self.tier} tier's "
                          f"limit: {self.settings}.input_prompt_limit] ")
            try:
                value = cell.sink.input(prompt, bool(msg.get("password")), cancel)
            except InputNotAllowed as exc:
                return {"error": {"type": protocol.STDIN_NOT_IMPLEMENTED, "message": str(exc)}}
            except InputCancelled:
                return {"error": {"type": "KeyboardInterrupt",
                                  "message": "Interrupted by user"}}
            except EOFError:
                return {"error": {"type": "EOFError", "message": "end of input"}}
            except Exception as exc:  # the kernel's side failed: the cell is told, not hung
                log.warning("%s input request failed", self.tier, exc_info=True)
                return {"error": {"type": "RuntimeError",
                                  "message": f"could not ask for input: {exc}"}}
            if cancel.is_set():  # stopped while the answer arrived: the stop wins
                return {"error": {"type": "KeyboardInterrupt", "message": "Interrupted by user"}}
            if len(value) > self.reply_limit:
                return {"error": {"type": "ValueError", "message":
                                  f"the answer was {_count(len(value))} characters, more than "
                                  f"the {_count(self.reply_limit)} the {self.tier} tier "
                                  f"takes; raise it with {self.settings}.input_reply_limit"}}
            return {"value": value}
        finally:
            with self._lock:
                now = time.perf_counter()
                if cell.input_since is not None:
                    cell.input_waited += now - cell.input_since
                cell.input_since = None
                cell.input_cancel = None

    def _queue_reply(self, reply: dict[str, Any]) -> None:
        """Send a refusal from the session's one refusing thread (see :meth:`_refuse`)."""
        try:
            self._refusals.put_nowait((json.dumps(reply) + "\n").encode())
        except queue.Full:
            return
        self._start_refuser()

    def _forward(self, cell: _Cell, kind: Any, msg: dict[str, Any]) -> None:
        if kind == protocol.STREAM:
            cell.sink.stream(str(msg.get("name", "stdout")), str(msg.get("text", "")))
        elif kind == protocol.DISPLAY:
            cell.sink.display(msg.get("data") or {}, msg.get("metadata") or {})
        elif kind == protocol.RESULT:
            cell.output = msg.get("data") or {}
            cell.sink.result(cell.output, msg.get("metadata") or {})
        elif kind == protocol.CLEAR_OUTPUT:
            cell.sink.clear_output(bool(msg.get("wait")))

    def _tell_limit(self, cell: _Cell, tb: list[str] | None = None) -> None:
        """Fail the cell with the error of the limit that stopped it, once."""
        if not cell.limit_told:
            cell.limit_told = True
            self._fail(cell, *self._limit_error(cell), tb or [])

    def _limit_error(self, cell: _Cell) -> tuple[str, str]:
        """(ename, evalue) of the limit that stopped ``cell``, with how to raise it."""
        evalue = cell.stop_detail or "the cell's output passed its limit"
        if cell.stop_reason == "timeout":
            return "TimeoutError", evalue + (f"; {self.limit_hint}" if self.limit_hint else "")
        if cell.stop_reason == "channel":
            return ChannelLimitError.__name__, evalue
        return OutputLimitError.__name__, (
            f"{evalue}; further output was dropped; raise the limit with "
            f"{self.settings}.output_limit (the tier's output_limit setting)")

    def _on_error(self, cell: _Cell, msg: dict[str, Any]) -> None:
        ename = str(msg.get("ename", "Error"))
        evalue = str(msg.get("evalue", ""))
        tb = [str(line) for line in msg.get("traceback", [])]
        if ename == "KeyboardInterrupt" and cell.stop_reason in ("timeout", "output",
                                                                 "channel"):
            # The agent saw our SIGINT; tell the user which limit stopped the cell instead,
            # with what the guest added (a JS cell: whether its context was kept).
            if cell.stop_reason == "timeout":
                ename, limit = self._limit_error(cell)
                note = evalue.removeprefix("interrupted; ")
                self._fail(cell, ename, f"{limit}; {note}" if note else limit, tb[:-1])
            else:
                self._tell_limit(cell, tb[:-1])
            return
        cell.success = False
        cell.error = ExecError(ename, evalue, tb)
        cell.sink.error(ename, evalue, tb)
