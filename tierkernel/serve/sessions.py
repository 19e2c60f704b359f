"""The execution API's sessions: each a real tierkernel kernel, started and spoken to through
jupyter_client as any notebook client would, so an execution over HTTP behaves exactly as a
notebook cell (same tiers, fsx, helpers, policy, audit).

What a client can make the server hold is counted here: sessions (``max_sessions``, then 429),
one execution per session at a time (a second gets 409), the output kept for an answer
(``max_output_bytes``, then the rest is dropped and the answer says so), and time (an execution
that outlives its timeout by ``grace`` is interrupted, and its session ended after as long
again). Idle sessions are ended after ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from tierkernel.backends.registry import discover
from tierkernel.errors import ApiError
from tierkernel.kernel.kernelspec import write_spec
from tierkernel.serve.settings import FREE_OPTIONS, Ceiling, Serve

log = logging.getLogger(__name__)

#: Called with each output event of a running execution: ("stream", {name, text}),
#: ("display", {data, metadata}), ("result", {...}), ("error", {...}), ("clear", {}).
EventSink = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclass
class Outcome:
    """What one execution produced, as the kernel told it."""

    success: bool
    tier: str
    duration_ms: float
    outputs: list[dict[str, Any]]
    logs: list[dict[str, str]]
    error: dict[str, Any] | None
    execution_id: str | None
    execution_count: int | None
    truncated: bool


@dataclass
class _Collector:
    """Builds an execution's notebook outputs from its iopub messages, within a byte budget."""

    budget: int
    outputs: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, str]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    used: int = 0
    truncated: bool = False

    def _fits(self, size: int) -> bool:
        if self.truncated or self.used + size > self.budget:
            self.truncated = True
            return False
        self.used += size
        return True

    def take(self, msg_type: str, content: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """Record one iopub message; the event to stream for it (None: nothing to show)."""
        if msg_type == "stream":
            name, text = str(content.get("name")), str(content.get("text", ""))
            # An answer holds a stream's text three times (its output, stdout or stderr,
            # and logs): each copy counts.
            if name not in ("stdout", "stderr") or not self._fits(3 * len(text.encode())):
                return None
            self.logs.append({"name": name, "text": text})
            last = self.outputs[-1] if self.outputs else None
            if last is not None and last["output_type"] == "stream" and last["name"] == name:
                last["text"] += text
            else:
                self.outputs.append({"output_type": "stream", "name": name, "text": text})
            return "stream", {"name": name, "text": text}
        if msg_type in ("display_data", "execute_result"):
            data, metadata = content.get("data", {}), content.get("metadata", {})
            if not self._fits(len(json.dumps(data)) + len(json.dumps(metadata))):
                return None
            output: dict[str, Any] = {"output_type": msg_type, "data": data,
                                      "metadata": metadata}
            if msg_type == "execute_result":
                output["execution_count"] = content.get("execution_count")
            self.outputs.append(output)
            return ("result" if msg_type == "execute_result" else "display"), output
        if msg_type == "error":
            error = {"ename": str(content.get("ename", "")),
                     "evalue": str(content.get("evalue", "")),
                     "traceback": [str(line) for line in content.get("traceback", [])]}
            self.error = error
            if self._fits(len(json.dumps(error))):
                self.outputs.append({"output_type": "error", **error})
            return "error", error
        if msg_type == "clear_output":
            if not self._fits(64):  # each clear is an event a stream carries
                return None
            self.outputs.clear()
            return "clear", {"wait": bool(content.get("wait"))}
        return None


@dataclass
class Kernel:
    """A started kernel, its client, and its folder (workspace, db() file, working folder)."""

    km: AsyncKernelManager
    client: Any
    folder: Path

    @property
    def workspace_url(self) -> str:
        """Its fsx workspace."""
        return workspace_url(self.folder)

    async def end(self) -> None:
        """Shut the kernel down (its containers and sandboxes with it) and remove its
        folder. Never raises."""
        with contextlib.suppress(Exception):
            self.client.stop_channels()
        try:
            await self.km.shutdown_kernel(now=False)
        except Exception:
            log.warning("ending a kernel", exc_info=True)
            with contextlib.suppress(Exception):
                await self.km.shutdown_kernel(now=True)
        shutil.rmtree(self.folder, ignore_errors=True)


class Session:
    """One kernel and its client; executions run one at a time."""

    def __init__(self, session_id: str, owner: str, tier: str, kernel: Kernel,
                 one_shot: bool) -> None:
        self.id = session_id
        self.owner = owner
        self.tier = tier
        self.one_shot = one_shot
        self.created = time.time()
        self.last_used = self.created
        self.executions = 0
        #: Limits and grants of its executions (an ExecuteConfig), set when it is made.
        self.defaults: Any = None
        #: The kernel's own Jupyter session id: its executions' key in the audit log.
        self.kernel_session: str | None = None
        self.kernel = kernel
        #: Its workspace, opened by the file routes on first use.
        self.files: Any = None
        self._km = kernel.km
        self._client = kernel.client
        self._lock = asyncio.Lock()
        #: Set once the kernel says it is busy with the running execution.
        self._started = asyncio.Event()
        self.closed = False

    @property
    def busy(self) -> bool:
        """Whether an execution is running in it now."""
        return self._lock.locked()

    async def run(self, cell: str, timeout: float | None, settings: Serve,
                  events: EventSink | None = None, silent: bool = False) -> Outcome:
        """Run ``cell`` (its first line a ``%%tier`` line) and wait for its end; ``events``
        gets each output as it comes. Raises ApiError 409 when another execution runs."""
        if self._lock.locked():
            raise ApiError(409, "session_busy", f"session {self.id} is running another "
                           "execution; wait for it, interrupt it (POST /sessions/{id}/"
                           "interrupt), or use another session")
        async with self._lock:
            self._started.clear()
            try:
                return await self._run(cell, timeout, settings, events, silent)
            finally:
                self._started.clear()
                self.last_used = time.time()

    async def _run(self, cell: str, timeout: float | None, settings: Serve,
                   events: EventSink | None, silent: bool) -> Outcome:
        client = self._client
        msg_id = client.execute(cell, silent=silent, store_history=not silent,
                                user_expressions={}, allow_stdin=False, stop_on_error=False)
        collector = _Collector(settings.max_output_bytes)
        # The kernel stops a cell at its timeout; this is the server's own guard, for a cell
        # or kernel that does not stop (a tier configured with no timeout included).
        timeout = timeout or settings.max_timeout
        deadline = time.monotonic() + timeout + settings.grace
        interrupted = False
        reply: dict[str, Any] | None = None
        idle = False
        while not (idle and reply is not None):
            now = time.monotonic()
            if now > deadline:
                if interrupted:
                    await self.close()
                    raise ApiError(504, "execution_timeout",
                                   f"the execution ran {2 * settings.grace:g} s past its "
                                   f"{timeout:g} s timeout and did not stop when interrupted; "
                                   f"session {self.id} was ended")
                interrupted = True
                await self.interrupt()
                deadline = now + settings.grace
            wait = max(0.05, min(1.0, deadline - now))
            if reply is None:
                with contextlib.suppress(Empty):
                    msg = await client.get_shell_msg(timeout=0.0 if not idle else wait)
                    if msg["parent_header"].get("msg_id") == msg_id:
                        reply = msg
                        self.kernel_session = msg["header"].get("session")
                        continue
            try:
                msg = await client.get_iopub_msg(timeout=wait)
            except Empty:
                if not await self._km.is_alive():
                    await self.close()
                    raise ApiError(502, "kernel_died", f"the kernel of session {self.id} "
                                   "ended during the execution; the session is gone") from None
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            msg_type, content = msg["msg_type"], msg["content"]
            if msg_type == "status":
                idle = content.get("execution_state") == "idle"
                if not idle:
                    self._started.set()
                continue
            event = collector.take(msg_type, content)
            if event is not None and events is not None:
                await events(*event)
        self.executions += 1
        content = reply["content"]
        meta = reply.get("metadata", {}).get("tierkernel", {})
        success = content.get("status") == "ok" and collector.error is None
        error = collector.error
        if content.get("status") == "error" and error is None:
            error = {"ename": str(content.get("ename", "")),
                     "evalue": str(content.get("evalue", "")),
                     "traceback": [str(t) for t in content.get("traceback", [])]}
        return Outcome(
            success=success, tier=str(meta.get("tier") or self.tier),
            duration_ms=float(meta.get("duration_ms") or 0.0), outputs=collector.outputs,
            logs=collector.logs, error=error, execution_id=meta.get("execution_id"),
            execution_count=content.get("execution_count"), truncated=collector.truncated)

    async def interrupt(self) -> None:
        """Interrupt the running execution (the stop button). One sent but not yet begun by
        the kernel is waited for a moment: an interrupt the kernel gets while idle is lost."""
        if self.busy and not self._started.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._started.wait(), 5.0)
        with contextlib.suppress(Exception):
            await self._km.interrupt_kernel()

    async def close(self) -> None:
        """End the kernel (its containers and sandboxes with it). Idempotent."""
        if self.closed:
            return
        self.closed = True
        await self.kernel.end()


class SessionPool:
    """Every live session of the server, with the caps that keep clients from exhausting it."""

    def __init__(self, settings: Serve) -> None:
        self.settings = settings
        self._sessions: dict[str, Session] = {}
        #: Sessions being started: they count against max_sessions already.
        self._starting = 0
        #: Kernel session ids of each owner's sessions, ended ones included (most recent
        #: kept), so GET /executions shows a token only its own executions.
        self.history: dict[str, dict[str, str]] = {}
        #: The server's own folder (0700): the kernelspec, and each kernel's folder.
        self._state = Path(tempfile.mkdtemp(prefix="tierkernel-serve-"))
        # Removed by close_all; this for a server that ends otherwise (an exception).
        atexit.register(shutil.rmtree, self._state, ignore_errors=True)
        write_spec(self._state / "kernels" / "tierkernel")
        self._specs = KernelSpecManager(kernel_dirs=[str(self._state / "kernels")])
        self._culler: asyncio.Task[None] | None = None
        #: Kernels started ahead, by the (tier, ceiling) of the sessions they are for.
        self._ahead: OrderedDict[tuple[str, Ceiling], asyncio.Future[Kernel]] = OrderedDict()
        self._closing = False
        #: Turns to start a kernel (made on the server's loop, at the first start).
        self._start_turns: asyncio.Semaphore | None = None

    def start_culling(self) -> None:
        """End idle sessions from now on (on the running event loop)."""
        if self._culler is None:
            self._culler = asyncio.ensure_future(self._cull_loop())

    async def create(self, owner: str, tier: str, ceiling: Ceiling,
                     one_shot: bool = False) -> Session:
        """A session whose kernel has default tier ``tier`` and is limited to ``ceiling``:
        a kernel started ahead for those (see :meth:`_refill`) when there is one, else a new
        one. Raises ApiError 429 when the token or the server has its most sessions alive,
        503 when the kernel cannot start."""
        if len(self.sessions_of(owner)) >= self.settings.max_sessions_per_token:
            raise ApiError(429, "too_many_sessions",
                           f"this token has {self.settings.max_sessions_per_token} sessions "
                           "alive, the most it may (c.Serve.max_sessions_per_token); end one "
                           "(DELETE /sessions/{id}) first")
        if len(self._sessions) + self._starting >= self.settings.max_sessions:
            raise ApiError(429, "too_many_sessions",
                           f"the server runs at most {self.settings.max_sessions} sessions "
                           "at once (c.Serve.max_sessions); end one (DELETE /sessions/{id}) "
                           "or try again later")
        key = (tier, ceiling)
        self._starting += 1
        try:
            started = None
            ahead = self._ahead.pop(key, None)
            if ahead is not None:
                try:
                    started = await ahead
                except Exception:  # it failed to start: start one now, which says why
                    started = None
            if started is None:
                started = await self._start_kernel(tier, ceiling)
            session = Session(secrets.token_hex(8), owner, tier, started, one_shot)
            self._sessions[session.id] = session
        finally:
            self._starting -= 1
        self._refill(key)
        return session

    async def _start_kernel(self, tier: str, ceiling: Ceiling,
                            delay: float = 0.0) -> Kernel:
        """A started kernel (and its client) with default tier ``tier`` and ``ceiling``,
        after ``delay`` s. Raises ApiError 503 when it does not start."""
        if delay:
            await asyncio.sleep(delay)
        # Each kernel has a folder of its own, ended with it: its workspace and db() file,
        # and its working folder (the notebook folder the sandbox tier copies in), empty, so
        # that no session sees another's files or the server's.
        folder = self._state / "sessions" / secrets.token_hex(8)
        (folder / "notebook").mkdir(parents=True, mode=0o700)
        config = folder / "config.json"
        config.write_text(json.dumps(_kernel_config(tier, ceiling, folder)))
        km = AsyncKernelManager(kernel_name="tierkernel", kernel_spec_manager=self._specs)
        if self._start_turns is None:
            turns = self.settings.concurrent_starts or max(2, os.cpu_count() or 2)
            self._start_turns = asyncio.Semaphore(turns)
        try:
            async with self._start_turns:
                # stdout to nowhere: under `tierkernel mcp` this process's stdout is the
                # protocol, and a kernel's own prints are no use to a client.
                await km.start_kernel(extra_arguments=[f"--config={config}"],
                                      cwd=str(folder / "notebook"), stdout=subprocess.DEVNULL)
                client = km.client()
                client.start_channels()
                await client.wait_for_ready(timeout=self.settings.start_timeout)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await km.shutdown_kernel(now=True)
            shutil.rmtree(folder, ignore_errors=True)
            raise ApiError(503, "kernel_start_failed",
                           f"the session's kernel did not start: {exc}") from None
        return Kernel(km, client, folder)

    def _refill(self, key: tuple[str, Ceiling]) -> None:
        """Start a kernel ahead for the next session like ``key``'s (``spare_sessions`` of
        them at most, for the most recently asked-for keys; an older key's is ended). It
        begins after a moment, so that it does not slow the new session's first cell."""
        if self.settings.spare_sessions <= 0 or key in self._ahead or self._closing:
            return
        while len(self._ahead) >= self.settings.spare_sessions:
            _, older = self._ahead.popitem(last=False)
            keep(asyncio.ensure_future(_discard(older)))
        task = asyncio.ensure_future(self._start_kernel(*key, delay=SPARE_DELAY))
        task.add_done_callback(_quiet)
        self._ahead[key] = task

    def get(self, session_id: str, owner: str) -> Session:
        """The owner's session ``session_id``; ApiError 404 for any other (another token's
        sessions are not told apart from missing ones)."""
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner or session.closed:
            raise ApiError(404, "no_such_session", f"no session {session_id!r}; create one "
                           "with POST /sessions (sessions end after "
                           f"{self.settings.idle_timeout:g} s unused)")
        return session

    def sessions_of(self, owner: str) -> list[Session]:
        """The owner's live sessions, oldest first."""
        return [s for s in self._sessions.values() if s.owner == owner and not s.closed]

    def remember(self, session: Session) -> None:
        """Keep the session's kernel session id for its owner's GET /executions."""
        if session.kernel_session is None:
            return
        known = self.history.setdefault(session.owner, {})
        known[session.kernel_session] = session.id
        while len(known) > 1000:  # bounded: the oldest go first
            del known[next(iter(known))]

    async def end(self, session: Session) -> None:
        """End ``session`` and forget it."""
        self.remember(session)
        self._sessions.pop(session.id, None)
        await session.close()

    async def close_all(self) -> None:
        """End every session and every kernel started ahead (the server is stopping)."""
        self._closing = True
        if self._culler is not None:
            self._culler.cancel()
        ahead = list(self._ahead.values())
        self._ahead.clear()
        await asyncio.gather(*(self.end(s) for s in list(self._sessions.values())),
                             *(_discard(task) for task in ahead), return_exceptions=True)
        shutil.rmtree(self._state, ignore_errors=True)

    async def _cull_loop(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.settings.idle_timeout / 2))
            cutoff = time.time() - self.settings.idle_timeout
            for session in list(self._sessions.values()):
                if not session.busy and session.last_used < cutoff:
                    log.info("ending idle session %s", session.id)
                    await self.end(session)


def workspace_url(folder: Path) -> str:
    """The fsx workspace of the kernel whose folder is ``folder``: a SQLite store there."""
    return "sqlite://" + str(folder / "workspace.db")


def _kernel_config(tier: str, ceiling: Ceiling, folder: Path) -> dict[str, Any]:
    """The configuration a session's kernel gets on top of the user's (its --config file):
    its tiers and ceilings, and its own workspace and db() file in ``folder``."""
    runtime: dict[str, Any] = {"db_path": str(folder / "db.sqlite3")}
    if ceiling.helpers is not None:
        runtime["helper_ceiling"] = list(ceiling.helpers)
    if ceiling.domains is not None:
        runtime["domain_ceiling"] = list(ceiling.domains)
    classes = discover()[0]
    every = {spec.name for cls in classes.values() for spec in cls.magic_options}
    fixed = sorted((every - FREE_OPTIONS - set(ceiling.options)) | set(ceiling.fixed))
    config: dict[str, Any] = {
        "TierKernel": {"default_tier": tier, "allowed_tiers": list(ceiling.tier_names),
                       "fixed_options": fixed},
        # A client's code is not kept in the server user's IPython history.
        "HistoryManager": {"enabled": False},
        "Runtime": runtime,
        "Fsx": {"url": workspace_url(folder)}}
    # Only the session's own tier starts as the kernel starts: a wasm session need not make
    # a container, nor a sandbox session open a wasm runtime, for cells that may never come.
    for name, cls in classes.items():
        if name in ceiling.tier_names and name != tier:
            config.setdefault(cls.__name__, {})["warm_start"] = False
    return config


#: Seconds after a session starts before the kernel for the next one is started.
SPARE_DELAY = 1.0
_background: set[asyncio.Future[Any]] = set()


def keep(task: asyncio.Future[Any]) -> None:
    """Hold a reference to ``task`` until it ends (asyncio keeps only weak ones)."""
    if not task.done():
        _background.add(task)
        task.add_done_callback(_background.discard)


def _quiet(task: asyncio.Future[Any]) -> None:
    """A kernel started ahead that failed: logged here, and started again when asked for."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("a kernel started ahead failed: %s", task.exception())


async def _discard(task: asyncio.Future[Kernel]) -> None:
    """End a kernel started ahead (once it has started)."""
    try:
        kernel = await task
    except BaseException:
        return
    await kernel.end()
