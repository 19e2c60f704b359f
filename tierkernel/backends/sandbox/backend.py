"""The ``sandbox`` tier: cells run in a hardened Docker container, by a persistent agent.

One container per kernel session, started in the background when the kernel starts (warm
start), hardened by default: no network, read-only root with tmpfs ``/tmp`` and ``/workspace``,
every capability dropped, no-new-privileges, uid 65534, pids/memory/CPU limits, and docker-init
as PID 1. ``--runtime runsc`` (or ``c.SandboxBackend.runtime``) runs it under gVisor.

Cells are run by the same stdlib-only guest agent as the ``process`` tier, started once per
container (with ``docker exec``, or by the container's own keeper in a gVisor spare) and driven
over a unix socket of the host's, or its exec stream, by
:class:`~tierkernel.backends.agent.session.AgentSession`: no ``docker exec`` per cell.

Containers carry labels (kernel id, owner pid and host); they are removed on shutdown, restart
and exit, and a starting kernel removes those whose owner is dead (a SIGKILLed kernel's).
Facts this module relies on were measured on the target machines: shared/notes/container-tier.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traitlets import Bool, Float, Int, Unicode
from traitlets.config import Config

from tierkernel.backends.agent.notebook_folder import GUEST_PATH as NOTEBOOK
from tierkernel.backends.agent.notebook_folder import NotebookFolder, Scan, guest_config
from tierkernel.backends.agent.queries import AgentQueries
from tierkernel.backends.agent.session import AgentSession, ChannelLimits
from tierkernel.backends.base import (
    Availability,
    Backend,
    CellRequest,
    ExecError,
    ExecResult,
    HeldErrorSink,
    OutputSink,
)
from tierkernel.backends.config_traits import ByteSize
from tierkernel.backends.hooks import Command, ConfigSources
from tierkernel.backends.options import MIN_MEMORY
from tierkernel.backends.sandbox import head_start, spares
from tierkernel.backends.sandbox import options as sandbox_options
from tierkernel.backends.sandbox.channel import (
    AGENT_EXIT_FILE,
    GUEST_DIR,
    MAIN_AGENT,
    SOCKET_NAME,
    WAKE_NAME,
    Listener,
    channel_usable,
    make_wake,
    mount,
    new_folder,
    read_exec_id,
    remove_folder,
    wake,
    wake_usable,
    write_exec_id,
)
from tierkernel.backends.sandbox.engine import (
    LABEL_KERNEL,
    LABEL_OWNER_HOST,
    LABEL_OWNER_PID,
    connect,
    engine_url,
    explain,
    unreachable_message,
)
from tierkernel.backends.sandbox.image import describe_missing, image_exists, image_ref
from tierkernel.backends.sandbox.notebook import FolderWatch, copy_in, tmpfs_options
from tierkernel.backends.sandbox.transport import DockerExecTransport, SocketTransport
from tierkernel.backends.sandbox.workspace import Room, WorkspaceSync
from tierkernel.backends.usage import ContainerUsage, human_size
from tierkernel.errors import (
    ChannelError,
    CopyBudgetError,
    CopyStopped,
    EngineError,
    FsxQuotaError,
    ProcessLimitError,
    WorkspaceCopyError,
)
from tierkernel.fsx import sync
from tierkernel.guest import protocol
from tierkernel.guest.agent import (
    COUNT_PROCS_ENV,
    MPL_SEED_ENV,
    POLL_ENV,
    SOCKET_ENV,
    WAIT_ENV,
    WAKE_ENV,
    WATCH_ENV,
    agent_program,
)
from tierkernel.runtime import packages
from tierkernel.sizes import format_size

log = logging.getLogger(__name__)

#: When the owning kernel process started (clock ticks since boot): a pid alone may be reused.
LABEL_OWNER_START = "org.tierkernel.owner-start"
LABEL_RUNTIME = "org.tierkernel.runtime"



def _agent_command() -> list[str]:
    """The agent's source is handed to `python3 -c` at every agent start instead of living in
    the image: the agent in the container is then always the kernel's own, and editing it
    never means rebuilding the image. No shell around it: under gVisor every process start
    costs 10-20 ms (the matplotlib font cache is copied by the agent itself, when needed)."""
    return ["python3", "-c", agent_program()]

#: Seconds between a live kernel's sweeps for expired spares and dead kernels' containers.
_SWEEP_INTERVAL = 60.0
#: Memory left to the interpreter when the container's /workspace is sized by its memory
#: limit (the agent with numpy takes 16-32 MiB; /tmp's files count too).
_INTERPRETER_MEMORY = 96 * 2**20
#: Seconds a process count must stay low after a fork bomb before the container is kept.
_SETTLED_FOR = 1.0
# A spare container's main process (under runc): it outlives the agent's wait (spare_ttl) by
# a little, then ends the container unless a kernel has claimed it (the claim file is in the
# read-only mount).
_SPARE_KEEPER = (f'sleep "$1"; while [ -e {GUEST_DIR}/{spares.CLAIM_NAME} ]; do sleep 30; '
                 'done')
# A gVisor spare's main process: it starts the agent itself ($1 is the agent's source), since a
# docker exec costs 70 ms there and a head start's spare is wanted at once; it keeps the
# agent's exit status where the kernel can read it (there is no exec to inspect), then stays,
# as `sleep infinity`: a gVisor container must never end by itself (see _make_spare).
# (In the foreground: a background job of sh would start with SIGINT and SIGQUIT ignored.)
_AGENT_KEEPER = f'python3 -c "$1"; echo $? > {AGENT_EXIT_FILE}; exec sleep infinity'
_ENVIRONMENT = {
    "HOME": "/tmp",
    "MPLCONFIGDIR": "/tmp/matplotlib",  # must be writable: the root is read-only
    MPL_SEED_ENV: "/opt/tierkernel/mplconfig",  # the image's prebuilt font cache
    "PYTHONDONTWRITEBYTECODE": "1",
    "LANG": "C.UTF-8",
    # The agent reports at each cell's end whether /workspace changed (it is copied back then)
    # and how many processes the container holds (a fork bomb left running, under gVisor).
    WATCH_ENV: "/workspace",
    COUNT_PROCS_ENV: "1",
}


@dataclass(frozen=True)
class ContainerSpec:
    """What a container is created with that a cell may ask to change."""

    runtime: str
    memory: int
    cpus: float

    def describe(self) -> str:
        """``runtime runc, memory 512m, cpus 1`` for messages."""
        return f"runtime {self.runtime}, memory {format_size(self.memory)}, cpus {self.cpus:g}"


@dataclass
class _Container:
    """One sandbox container and what the tier has learnt about it from the engine's events."""

    id: str
    spec: ContainerSpec
    pids_limit: int
    #: The host folder of its direct channel (sandbox_channel); None: the exec stream.
    folder: Path | None = None
    cells: int = 0
    ooms: int = 0
    died: bool = False
    suspect: bool = False  # stop using it: recreate before the next cell
    events: Any = None
    oom_seen: threading.Event = field(default_factory=threading.Event)


class SandboxBackend(AgentQueries, ChannelLimits, Backend):
    """Runs cells in a per-kernel Docker container (runc or gVisor) through the guest agent."""

    isolation = ("Docker container: no network, read-only root, no capabilities, uid 65534, "
                 "pids/memory/CPU limits; --runtime runsc = gVisor")
    magic_options = sandbox_options.OPTIONS

    warm_start = Bool(
        True,
        help="Start the sandbox container and its agent in the background when the kernel "
        "starts, so the first sandbox cell does not wait for container creation.",
    ).tag(config=True)
    image = Unicode(
        "", help="Image to run; empty: the image `tierkernel image build` makes "
        "(tierkernel-sandbox:<recipe hash>)."
    ).tag(config=True)
    runtime = Unicode(
        "runc", help="Container runtime: runc, or runsc for gVisor (registered with the engine). "
        "Overridden per cell with --runtime."
    ).tag(config=True)
    memory = ByteSize(
        512 * 2**20, minimum=MIN_MEMORY, help="Memory limit of the container (swap included), "
        "as 512m, 1g or bytes; per cell: --memory 1g."
    ).tag(config=True)
    cpus = Float(1.0, help="CPU share of the container; per cell: --cpus 0.5.").tag(config=True)
    pids_limit = Int(
        256, help="Most processes (and threads) the container may have under runc."
    ).tag(config=True)
    runsc_pids_limit = Int(
        4096, help="The pids limit under runsc, where the host cgroup counts gVisor's own threads "
        "(a small limit crashes the sandbox); processes are then capped by runsc_nproc."
    ).tag(config=True)
    runsc_nproc = Int(
        64, help="Per-user process limit (ulimit nproc) inside a gVisor sandbox."
    ).tag(config=True)
    tmpfs_size = Unicode(
        "256m", help="Size of the container's /tmp (a tmpfs); counted in --memory."
    ).tag(config=True)
    workspace_size = ByteSize(
        1536 * 2**20, minimum=16 * 2**20, help="Most the container's /workspace (a tmpfs "
        "holding a copy of the fsx workspace) may hold: at least the workspace's byte quota. "
        "Its files are kept in memory and count toward --memory, so the memory limit caps it "
        "too; files that do not fit are left out of the copy, and the cell is told which."
    ).tag(config=True)
    copy_back_bytes = ByteSize(
        1536 * 2**20, help="Most bytes (tar archive) one copy of /workspace back into the "
        "workspace may bring; over it the cell fails and nothing is copied."
    ).tag(config=True)
    copy_back_files = Int(
        150_000, help="Most files, folders and links one copy of /workspace back into the "
        "workspace may bring; over it the cell fails and nothing is copied."
    ).tag(config=True)
    copy_back_seconds = Float(
        300.0, help="Most seconds one copy of /workspace back into the workspace may take "
        "(it also ends with the cell's --timeout and the stop button)."
    ).tag(config=True)
    user = Unicode("65534:65534", help="uid:gid the cells run as (not root).").tag(config=True)
    interrupt_grace = Float(
        3.0, help="Seconds a cell may take to honour an interrupt before its agent is killed."
    ).tag(config=True)
    output_limit = ByteSize(
        16 * 1024 * 1024, help="Output one cell may produce before it is stopped (16m, or bytes)."
    ).tag(config=True)
    start_timeout = Float(
        60.0, help="Seconds to wait for the agent to start in the container."
    ).tag(config=True)
    engine_timeout = Float(
        60.0, help="Seconds to wait for one Docker engine request."
    ).tag(config=True)
    reap_orphans = Bool(
        True, help="After the tier's first start and then every minute, remove sandbox "
        "containers whose kernel is dead and spares past their time."
    ).tag(config=True)
    spares = Int(
        1, help="Spare containers, with their interpreter already running, that this kernel "
        "keeps ready for the next kernel of this user with the same settings, whose first "
        "sandbox cell then does not wait for a container. 0: none."
    ).tag(config=True)
    spare_ttl = Float(
        600.0, help="Seconds an unclaimed spare container waits for a kernel; then it removes "
        "itself (runc) or is removed by the next kernel's sweep (runsc)."
    ).tag(config=True)
    head_start = Bool(
        True, help="With warm_start: as soon as the kernel's configuration is read, before the "
        "kernel has finished starting, make a spare container in a helper process for the "
        "warm start to claim (unless an unclaimed one is waiting already), so a first cell "
        "sent the moment the kernel answers does not wait for a container either."
    ).tag(config=True)
    spare_delay = Float(
        3.0, help="Seconds after this kernel's own container is up before it makes spares, so "
        "that making them does not slow its first cells."
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._kernel_id = str(getattr(self.parent, "ident", "") or uuid.uuid4())
        self._client: Any = None
        self._probe: Any = None
        self._container: _Container | None = None
        self._session: AgentSession | None = None
        self._transport: DockerExecTransport | None = None
        self._workspace = WorkspaceSync(self.user)
        self._copy_stopped = threading.Event()  # the stop button, during a copy back
        self._alock: asyncio.Lock | None = None
        self._tlock = threading.RLock()  # the containers: start, recreate, shutdown
        self._closed = False
        self._runtimes: dict[str, Any] | None = None
        self._oom_baseline = 0
        self._after_start_done = False
        self._starting = False
        #: What %pip installed in this kernel's sandbox (made at the first %pip), given to
        #: every new container's agent.
        self._packages: packages.PackageStore | None = None
        self._packages_lock = threading.Lock()
        #: Said at the next cell: the packages could not all be given to a new container.
        self._packages_notice = ""
        #: The agent whose files are set up (fsx://, /notebook, the hint; see _setup_files),
        #: the container whose /notebook holds the copy, and what that copy took.
        self._files_agent: AgentSession | None = None
        self._notebook_copied: str | None = None
        self._notebook_scan: Scan | None = None
        self._notebook_watch = FolderWatch()
        self._files_lock = threading.Lock()
        #: The warm start's notice about that copy, for the first cell.
        self._notebook_notice = ""

    # -- the contract ---------------------------------------------------------------------
    @classmethod
    def config_loaded(cls, config: Config, sources: ConfigSources) -> None:
        """Begin the head start: a spare container made while the kernel starts
        (head_start.py)."""
        head_start.begin(config, sources)

    @classmethod
    def commands(cls) -> Sequence[Command]:
        """``tierkernel image`` and ``tierkernel spares`` (cli.py)."""
        # Loaded only when the tierkernel command asks: a kernel, which imports this module,
        # never runs a command, and the commands use this module's reaper functions.
        from tierkernel.backends.sandbox import cli

        return cli.COMMANDS

    def availability(self) -> Availability:
        """Engine reachable, image built, default runtime registered (quick: cached probes)."""
        if self._is_up() or self._starting:
            # Starting: the start reports its own failure to the cell that waits for it.
            return Availability.yes(self._where())
        try:
            probe = self._probe_client()
            probe.ping()
        except Exception as exc:
            self._probe = None
            return Availability.no(unreachable_message(exc))
        ref = self._image_ref()
        try:
            if not image_exists(probe, ref):
                return Availability.no(describe_missing(ref))
            runtimes = self._engine_runtimes(probe)
        except EngineError as exc:
            return Availability.no(str(exc))
        if self.runtime not in runtimes:
            return Availability.no(self._no_runtime(self.runtime, runtimes))
        return Availability.yes(self._where())

    def defaults(self) -> dict[str, Any]:
        """Timeout, memory, cpus and runtime, as configured."""
        return {"timeout": self.timeout, "memory": self.memory, "cpus": self.cpus,
                "runtime": self.runtime}

    async def start(self) -> None:
        """Create the container (removing dead kernels' orphans first) and start the agent.

        A container that is still there keeps its spec (a cell's --runtime/--memory may have
        set it): only its agent is restarted. ``execute`` applies each cell's own spec.
        """
        if self._is_up():
            return
        try:
            async with self._async_lock():
                if not self._is_up():
                    current = self._container
                    spec = current.spec if current is not None else self._default_spec()
                    self._starting = True
                    try:
                        await asyncio.to_thread(self._ensure_and_sync, spec)
                    finally:
                        self._starting = False
        finally:
            self._after_first_start()

    def _ensure_and_sync(self, spec: ContainerSpec) -> None:
        """Start the container and copy the workspace in now (a warm start does this in the
        background), so the first cell does not wait for that copy."""
        self._ensure(spec)
        container = self._container
        if container is not None:
            try:
                self._notebook_notice = self._setup_files()
            except Exception:  # the first cell tries again and reports the error
                log.warning("setting up the sandbox's files failed", exc_info=True)
            try:
                session = self._session
                if (self._workspace.before_cell(self._engine().api, container.id, session,
                                                self._room(container.spec))
                        and session is not None):
                    session.reset_watch()
            except Exception:  # the first cell tries again and reports the error
                log.warning("copying the workspace into the new container failed",
                            exc_info=True)

    async def execute(self, request: CellRequest, sink: OutputSink) -> ExecResult:
        """Run the cell in the container's agent; a changed runtime/memory/cpus is applied
        first (in place when the engine allows, else by a new container, which the user is
        told about)."""
        spec = ContainerSpec(
            runtime=str(request.options.get("runtime") or self.runtime),
            memory=int(request.options.get("memory") or self.memory),
            cpus=float(request.options.get("cpus") or self.cpus),
        )
        notice = ""
        container = self._container
        if not (self._is_up() and container is not None and container.spec == spec):
            # Only when something must change: the common case costs no thread hop.
            async with self._async_lock():
                notice = await asyncio.to_thread(self._ensure, spec)
        if notice:
            sink.stream("stderr", notice + "\n")
        session, container = self._session, self._container
        if session is None or container is None:
            raise EngineError("the sandbox container is not running (it was shut down)")
        held = HeldErrorSink(sink)
        self._oom_baseline = container.ooms
        container.oom_seen.clear()
        gateway = packages.route(self.helper_gateway(), self._package_store())
        # The copies back count in the cell's time and end with the stop button.
        started, option = time.monotonic(), request.options.get("timeout")
        timeout = float(option) if option else None

        # A new agent, or the notebook's folder changed: not per cell.
        if self._files_agent is not session or self._notebook_watch.changed():
            notice = await asyncio.to_thread(self._setup_files)
            if notice:
                sink.stream("stderr", notice + "\n")
        if self._notebook_notice:  # the warm start's
            sink.stream("stderr", self._notebook_notice + "\n")
            self._notebook_notice = ""
        # fsx -> /workspace, the cell, /workspace -> fsx. The copies may take the engine's
        # time and run in a thread; the common cell (nothing to copy either way) needs none.
        if self._workspace.may_have_changes(container.id):
            api = self._engine().api
            if container.cells and await asyncio.to_thread(session.tree_changed):
                # Changed in the container since the last cell (by a process it left
                # running): copied back first, since the copy in becomes the new baseline.
                early = await asyncio.to_thread(self._copy_back, container, sink, started,
                                                timeout)
                if early is not None:
                    sink.stream("stderr", f"tierkernel: {early.evalue}\n")
            if await asyncio.to_thread(self._workspace.before_cell, api, container.id,
                                       session, self._room(container.spec)):
                session.reset_watch()
        if self._workspace.notice:  # files the container could not be given (or warm start's)
            sink.stream("stderr", self._workspace.notice)
            self._workspace.notice = ""
        if self._packages_notice:
            sink.stream("stderr", self._packages_notice)
            self._packages_notice = ""
        result = await session.run_async(request, held, option, gateway)
        if session.alive and not session.watching:
            # After the first cell, not before: setting the watch up takes the agent 10-25 ms
            # under gVisor, which a kernel's first cell should not wait for. Until then the
            # agent walks /workspace to find changes.
            session.install_watch()
        # A cell whose agent died (killed after an ignored interrupt, a crash) sent no "done"
        # to say what it changed, and the next agent takes /workspace as it finds it: so
        # what it wrote is copied now, from its container, if that is still there.
        lost = not session.alive and not container.died and not container.suspect
        error = None
        if session.workspace_changed or lost:
            error = await asyncio.to_thread(self._copy_back, container, sink, started,
                                            timeout)
            if error is not None and not result.success:
                sink.stream("stderr", f"tierkernel: {error.evalue}\n")  # one error a cell
                error = None
        container.cells += 1
        if held.held is not None or self._pids_high(container):
            # Said first: the container's state (out of memory, processes) may need acting on.
            after = await asyncio.to_thread(self._after_cell, container, held.held)
            if after is not None and error is not None:
                sink.stream("stderr", f"tierkernel: {error.evalue}\n")
            error = after or error
        if error is not None:
            sink.error(error.ename, error.evalue, error.traceback)
            result = dataclasses.replace(result, success=False, error=error)
        return result

    def _setup_files(self) -> str:
        """Once per agent: the notebook's folder copied into the container's /notebook (once
        per container), then the agent's files set up (``fsx://``, the read-only fall-back
        to /notebook, the missing-file hint). Returns a notice for the user ("" if none)."""
        with self._files_lock:
            container, session = self._container, self._session
            if container is None or session is None:
                return ""
            again = self._notebook_watch.changed()
            if self._files_agent is session and not again:
                return ""
            folder = NotebookFolder(parent=self)
            refused, view, notice = folder.refusal(), NOTEBOOK, ""
            if again and self._notebook_copied == container.id and self._notebook_scan:
                self._notebook_watch.mark()  # before the look: a change meanwhile is heard
                if folder.scan().stamps == self._notebook_scan.stamps:
                    # Only what no copy takes changed (the notebook saved, a hidden file).
                    again = False
                    if self._files_agent is session:
                        return ""
            if not refused and (self._notebook_copied != container.id or again):
                self._notebook_watch.start(folder.folder())
                self._notebook_watch.mark()
                try:
                    scan, notice = copy_in(self._engine().api, container.id, folder)
                except Exception as exc:
                    log.warning("copying the notebook's folder into %s failed",
                                container.id[:12], exc_info=True)
                    notice = (f"tierkernel: the notebook's folder could not be copied into "
                              f"the sandbox's {NOTEBOOK} ({exc}); its cells read the "
                              "workspace only.")
                    view, scan = "", None
                self._notebook_copied = container.id if view else None
                self._notebook_scan = scan
            session.install_files(guest_config(
                "/workspace", view if self._notebook_copied == container.id else "", refused,
                self._notebook_scan, ""))
            self._files_agent = session
            return notice

    def _room(self, spec: ContainerSpec) -> Room:
        """What the container's /workspace can hold: its tmpfs size, or less when the memory
        limit is lower (tmpfs pages are memory), leaving the interpreter its share."""
        by_memory = spec.memory - _INTERPRETER_MEMORY
        if by_memory < self.workspace_size:
            return Room(max(by_memory, 0), "its files are kept in memory, within the "
                        f"container's memory limit of {format_size(spec.memory)}: raise it "
                        "with --memory or c.SandboxBackend.memory")
        return Room(self.workspace_size, "its size: raise it with "
                    "c.SandboxBackend.workspace_size (and --memory with it)")

    def _copy_stop(self, started: float, timeout: float | None) -> Callable[[], str | None]:
        """What ends a copy back that starts now: the stop button pressed during it, or the
        cell's time limit (counted from the cell's start; a cell stopped at its limit leaves
        its copy back ``interrupt_grace`` seconds, so what it wrote still arrives)."""
        self._copy_stopped.clear()
        ends = None if timeout is None else max(started + timeout,
                                                time.monotonic() + self.interrupt_grace)

        def stop() -> str | None:
            if self._copy_stopped.is_set():
                return "the cell was interrupted"
            if ends is not None and time.monotonic() > ends:
                return (f"the cell ran longer than its {timeout:g} s limit (raise it with "
                        f"'%%tier {self.name} --timeout SECONDS' or c.SandboxBackend.timeout)")
            return None

        return stop

    def _copy_back(self, container: _Container, sink: OutputSink, started: float,
                   timeout: float | None) -> ExecError | None:
        """Bring the cell's changes in /workspace into fsx (blocking), within the cell's
        time (see :meth:`_copy_stop`). Over its budget or stopped, nothing is copied and the
        error for the cell is returned; another failure is reported on the cell's stderr
        and never loses the cell's result."""
        stop = self._copy_stop(started, timeout)
        budget = sync.Budget(self.copy_back_bytes, self.copy_back_files,
                             self.copy_back_seconds)
        try:
            session = self._session if self._container is container else None
            applied = self._workspace.after_cell(self._engine().api, container.id, True,
                                                 session, budget, stop)
        except (CopyBudgetError, CopyStopped) as exc:
            log.info("copy back of %s ended: %s", container.id[:12], exc)
            ename = (WorkspaceCopyError.__name__ if isinstance(exc, CopyBudgetError)
                     else "TimeoutError" if "limit" in str(exc) else "KeyboardInterrupt")
            evalue = (f"{exc.strerror}. Nothing of it was copied into the workspace: the "
                      "container still has the files, and they are copied with the next "
                      "change a cell makes in /workspace.")
            return ExecError(ename, evalue, [f"{ename}: {evalue}"])
        except Exception as exc:
            # A workspace quota is the user's limit, told below, not a fault to log with a
            # traceback (the kernel's log reaches the cell's stderr too).
            quota = isinstance(exc, FsxQuotaError)
            log.log(logging.INFO if quota else logging.WARNING,
                    "copying /workspace back into fsx failed", exc_info=not quota)
            sink.stream("stderr", f"tierkernel: the cell's changes in /workspace could not be "
                                  f"copied into the workspace: {exc}\n")
            return None
        if applied is not None and applied.conflicts:
            sink.stream("stderr", "tierkernel: changed in the workspace meanwhile, so the "
                        "container's version was saved beside it as NAME.sandbox-conflict: "
                        + ", ".join(applied.conflicts) + "\n")
        if applied is not None and applied.skipped:
            sink.stream("stderr", "tierkernel: not copied into the workspace (a folder on "
                        "the host): " + "; ".join(f"{rel}: {why}" for rel, why in
                                                 applied.skipped) + "\n")
        return None

    def interrupt(self) -> None:
        """SIGINT to the agent (a ``kill`` exec); killed if ignored for ``interrupt_grace``.
        A copy back of /workspace in progress ends too."""
        self._copy_stopped.set()
        session = self._session
        if session is not None:
            session.interrupt()

    def shutdown(self) -> None:
        """Remove the container (and stop the agent with it). Idempotent; never raises."""
        self._closed = True
        with self._tlock:
            self._drop_container()
        with self._files_lock:
            self._notebook_watch.close()
        for client in (self._client, self._probe):
            with contextlib.suppress(Exception):
                if client is not None:
                    client.close()
        self._client = self._probe = None
        if self._packages is not None:
            self._packages.close()

    def describe_limits(self) -> str:
        """Timeout, memory, CPUs, runtime, pids and output limits for ``%tier``."""
        pids = self.pids_limit if self.runtime != "runsc" else self.runsc_nproc
        return (f"{super().describe_limits()}, pids={pids}, "
                f"output={self.output_limit / 2**20:g}MiB")

    # -- containers -----------------------------------------------------------------------
    def _ensure(self, spec: ContainerSpec) -> str:
        """Make the container match ``spec`` and have a live agent; return a notice for the
        user when earlier state was lost on the way ("" otherwise). Blocking."""
        with self._tlock:
            if self._closed:
                raise EngineError("the sandbox tier was shut down with its kernel")
            client = self._engine()
            notice = ""
            current = self._container
            if current is not None and (current.died or current.suspect):
                self._drop_container()
                current = None
            if current is not None and current.spec != spec:
                notice = self._respec(current, spec)
                current = self._container
            if current is None and not self._claim_spare(client, spec):
                self._create(client, spec)
            if self._session is None or not self._session.alive:
                self._kill_leftovers(client, spec)
                try:
                    self._start_agent(client)
                except EngineError:
                    # An exec that cannot start (pids exhausted, a wedged sandbox): one retry
                    # in a new container, then the error goes to the user.
                    log.warning("starting the agent failed; recreating the container",
                                exc_info=True)
                    self._drop_container()
                    self._create(client, spec)
                    self._start_agent(client)
            return notice

    def _kill_leftovers(self, client: Any, spec: ContainerSpec) -> None:
        """An agent restart in the same container: kill every process the lost agent's cells
        left there first (see DockerExecTransport.kill_guests). A container that does not
        let them be killed is replaced."""
        transport = self._transport
        if transport is None or self._container is None:
            return  # a new container (or a claimed spare): no earlier agent to outlive
        if not transport.kill_guests():
            log.warning("could not kill what the lost agent left running; new container")
            self._drop_container()
            self._create(client, spec)

    def _respec(self, current: _Container, spec: ContainerSpec) -> str:
        """Apply a new memory/cpus in place if possible, else replace the container."""
        if current.cells == 0:
            self._drop_container()  # nothing to lose yet: no notice
            return ""
        if current.spec.runtime == spec.runtime:
            try:
                self._engine().api.update_container(
                    current.id, mem_limit=spec.memory, memswap_limit=spec.memory,
                    cpu_period=100_000, cpu_quota=int(spec.cpus * 100_000))
            except Exception:
                log.info("in-place update of %s failed; recreating", current.id[:12],
                         exc_info=True)
            else:
                current.spec = spec
                return ""
        was = current.spec
        self._drop_container()
        return (f"sandbox: started a new container ({spec.describe()}; was {was.describe()}): "
                "variables and files from earlier sandbox cells are gone.")

    def _create_kwargs(self, client: Any, spec: ContainerSpec) -> dict[str, Any]:
        """What a container with ``spec`` is created with, but its name, labels and mounts
        (the same for this kernel's own container and for the spares it makes)."""
        runsc = spec.runtime == "runsc"
        runtimes = self._engine_runtimes(client)
        if spec.runtime not in runtimes:
            raise EngineError(self._no_runtime(spec.runtime, runtimes))
        from docker.types import Ulimit

        tmpfs_opts = f"rw,nosuid,nodev,size={self.tmpfs_size},mode=1777"
        workspace_opts = f"rw,nosuid,nodev,size={self.workspace_size},mode=1777"
        kwargs: dict[str, Any] = {
            "image": self._image_ref(),
            "command": ["sleep", "infinity"],
            "hostname": "sandbox",
            "network_mode": "none",
            "read_only": True,
            "tmpfs": {"/tmp": tmpfs_opts, "/workspace": workspace_opts,
                      NOTEBOOK: tmpfs_options(NotebookFolder(parent=self))},
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "user": self.user,
            "working_dir": "/workspace",
            "environment": _ENVIRONMENT,
            "pids_limit": self.runsc_pids_limit if runsc else self.pids_limit,
            "mem_limit": spec.memory,
            "memswap_limit": spec.memory,
            # period/quota rather than nano_cpus: only these can be changed by `docker update`.
            "cpu_period": 100_000,
            "cpu_quota": int(spec.cpus * 100_000),
            "init": True,
            "runtime": spec.runtime,
        }
        if runsc:
            # Under gVisor the host pids cgroup counts the sandbox's own threads; the process
            # cap that a fork bomb meets is this in-sandbox ulimit instead.
            kwargs["ulimits"] = [Ulimit(name="nproc", soft=self.runsc_nproc,
                                        hard=self.runsc_nproc)]
        return kwargs

    def _labels(self, spec: ContainerSpec, folder: Path | None) -> dict[str, str]:
        labels = {
            LABEL_KERNEL: self._kernel_id,
            LABEL_OWNER_PID: str(os.getpid()),
            LABEL_OWNER_START: _process_start(os.getpid()) or "",
            LABEL_OWNER_HOST: socket.gethostname(),
            spares.LABEL_OWNER_UID: str(os.getuid()),
            LABEL_RUNTIME: spec.runtime,
        }
        if folder is not None:
            labels[spares.LABEL_FOLDER] = str(folder)
        return labels

    def _channel_ok(self, client: Any, runtime: str) -> bool:
        """Whether containers of ``runtime`` can have the direct channel here (not with a
        remote engine, nor under runsc registered without --host-uds)."""
        return channel_usable(engine_url(), runtime,
                              dict(self._engine_runtimes(client).get(runtime) or {}))

    def _channel_folder(self, client: Any, runtime: str, name: str) -> Path | None:
        """A new host folder for the container's direct channel, or None when it cannot have
        one (then the agent talks over the exec stream)."""
        if not self._channel_ok(client, runtime):
            return None
        try:
            return new_folder(name)
        except OSError:
            log.warning("no host folder for the agent's socket; using the exec stream",
                        exc_info=True)
            return None

    def _create(self, client: Any, spec: ContainerSpec) -> None:
        kwargs = self._create_kwargs(client, spec)
        name = f"tierkernel-sandbox-{uuid.uuid4().hex[:12]}"
        folder = self._channel_folder(client, spec.runtime, name)
        kwargs.update(name=name, labels=self._labels(spec, folder))
        if folder is not None:
            kwargs["volumes"] = mount(folder)
        try:
            container = client.containers.create(**kwargs)
        except Exception as exc:
            remove_folder(folder)
            if "No such image" in str(exc) or type(exc).__name__ == "ImageNotFound":
                raise EngineError(describe_missing(self._image_ref())) from exc
            raise explain(exc, "creating the sandbox container") from exc
        handle = _Container(container.id, spec, int(kwargs["pids_limit"]), folder=folder)
        self._container = handle
        try:
            container.start()
        except Exception as exc:
            self._drop_container()
            raise explain(exc, f"starting the sandbox container ({spec.describe()})") from exc
        self._watch(client, handle)
        log.info("sandbox container %s started (%s)", container.id[:12], spec.describe())

    # -- spares ---------------------------------------------------------------------------
    @staticmethod
    def _spare_key(create_kwargs: dict[str, Any]) -> str:
        # With the agent and the keepers: a kernel of another tierkernel version (another
        # environment on this machine) must not claim a spare made a way it does not know.
        return spares.spec_key(create_kwargs,
                               agent_program() + _AGENT_KEEPER + _SPARE_KEEPER)

    def _claim_spare(self, client: Any, spec: ContainerSpec) -> bool:
        """Take over a spare container made for this spec (agent already running); False
        when there is none to take. Blocking; the caller holds the lock.

        A head start this kernel began (sandbox_head_start.py) is waited for first, when it
        works for the same create arguments: its spare is nearly ready and a new container
        would take longer.
        """
        head = head_start.pending() if self.head_start else None
        if (self.spares <= 0 and head is None) or spec != self._default_spec():
            return False
        kwargs = self._create_kwargs(client, spec)
        key = self._spare_key(kwargs)
        if head is not None:
            head.wait(key, timeout=min(self.start_timeout, 30.0))
        me, started = os.getpid(), _process_start(os.getpid()) or ""
        for found in spares.candidates(client, key):
            folder = spares.folder_of(found)
            if not folder.is_dir() or not spares.try_claim(folder, me, started):
                continue
            # Same key, so the spare was created with these very arguments.
            handle = _Container(found.id, spec, int(kwargs["pids_limit"]), folder=folder)
            self._container = handle
            self._watch(client, handle)
            try:
                self._start_agent(client, exec_id=read_exec_id(folder), timeout=3.0)
            except Exception:
                log.info("spare container %s did not answer; trying another", found.id[:12],
                         exc_info=True)
                self._drop_container()
                continue
            log.info("claimed spare sandbox container %s", found.id[:12])
            return True
        return False

    def make_head_start(self, report: Callable[[str], None]) -> None:
        """In the head start's helper process: make one spare for the default spec, unless
        an unclaimed one is waiting already; ``report`` each step (sandbox_head_start.py)."""
        if not (self.warm_start and self.head_start):
            report("off warm_start or head_start is off")
            return
        try:
            client, spec, kwargs, key = self._default_spare_args()
        except EngineError as exc:
            report(f"off {exc}")
            return
        report(f"key {key}")
        if spares.unclaimed(client, key) > 0:
            report("have")
            return
        self._make_spare(client, spec, dict(kwargs), key)
        report("ready")

    def keep_spares(self, count: int, fresh_for: float = 5.0) -> list[str]:
        """Make spares for the default spec until ``count`` wait with more than
        ``fresh_for`` s left (a kernel's own spares; ``tierkernel spares --make/--keep``);
        return their names. Stops early when the tier shuts down. Raises EngineError when
        the engine, the image, the runtime or the direct channel is not there."""
        client, spec, kwargs, key = self._default_spare_args()
        made = []
        for _ in range(count - spares.unclaimed(client, key, fresh_for)):
            if self._closed:
                break
            try:
                made.append(self._make_spare(client, spec, dict(kwargs), key))
            except Exception as exc:  # the engine's or the folder's error, in words
                raise explain(exc, f"making a spare {spec.runtime} container") from exc
        return made

    def _default_spare_args(self) -> tuple[Any, ContainerSpec, dict[str, Any], str]:
        """The engine client, the default spec, its create arguments and its spare key: what
        making a spare takes. Raises EngineError when this backend cannot make one here."""
        available = self.availability()
        if not available.available:
            raise EngineError(available.reason)
        client = self._engine()
        spec = self._default_spec()
        if not self._channel_ok(client, spec.runtime):
            # A spare is claimed through its socket: none without the direct channel.
            raise EngineError(f"spares need the direct channel to the agent, which "
                              f"{spec.runtime} containers of the engine at {engine_url()} "
                              "cannot have (a remote engine, or runsc without --host-uds)")
        kwargs = self._create_kwargs(client, spec)
        return client, spec, kwargs, self._spare_key(kwargs)

    def engine(self) -> Any:
        """The Docker SDK client this backend uses (connected on first use)."""
        return self._engine()

    def warm_engine(self) -> None:
        """Connect to the engine and learn its runtimes now, for :meth:`adopt_engine` (a
        head start's helper does this while it waits for the kernel's configuration). An
        error is left for the calls that need the engine to report."""
        with contextlib.suppress(Exception):
            self._engine_runtimes(self._probe_client())
            self._engine()

    def adopt_engine(self, warm: SandboxBackend) -> None:
        """Use the connections and runtimes ``warm`` (made with other settings) has already
        got; its client only if it was made with this backend's ``engine_timeout``."""
        self._probe = self._probe or warm._probe
        self._runtimes = self._runtimes or warm._runtimes
        if self._client is None and warm.engine_timeout == self.engine_timeout:
            self._client = warm._client

    def _after_first_start(self) -> None:
        """Once per kernel, after its first start: in a thread, remove dead kernels'
        containers (not before: the first cell need not wait for that), then, after
        ``spare_delay``, make the spares."""
        if self._after_start_done or self._closed:
            return
        self._after_start_done = True

        def work() -> None:
            if self.reap_orphans:
                with contextlib.suppress(Exception):
                    reap_orphans(self._engine())
            if self.spares > 0:
                time.sleep(self.spare_delay)
                try:
                    self.keep_spares(self.spares)
                except Exception:
                    log.info("making a spare sandbox container failed", exc_info=True)
            # While the kernel lives, remove expired spares (those that cannot remove
            # themselves, under gVisor) and dead kernels' containers now and then.
            while self.reap_orphans and not self._closed:
                time.sleep(_SWEEP_INTERVAL)
                with contextlib.suppress(Exception):
                    if not self._closed:
                        reap_orphans(self._engine())

        threading.Thread(target=work, daemon=True, name="sandbox-after-start").start()

    def _make_spare(self, client: Any, spec: ContainerSpec, kwargs: dict[str, Any],
                    key: str) -> str:
        """Create one spare from ``kwargs`` (``_create_kwargs``; updated here) with its agent
        waiting; return its name."""
        name = f"tierkernel-spare-{uuid.uuid4().hex[:12]}"
        folder = new_folder(name)
        if wake_usable(spec.runtime):
            make_wake(folder)
        labels = self._labels(spec, folder)
        labels[spares.LABEL_SPARE] = key
        labels[spares.LABEL_EXPIRES] = f"{time.time() + self.spare_ttl:.0f}"
        kwargs.update(name=name, labels=labels, volumes=mount(folder), auto_remove=True)
        main_agent = spec.runtime != "runc"
        if main_agent:
            # The agent starts with the container, not by a docker exec after it (70 ms
            # saved). The keeper stays after it: a container that ends by itself while an
            # exec of it exists (the agent's, even exited) wedges under gVisor; expired
            # gVisor spares are removed by the reaper of any live or starting kernel instead.
            kwargs["command"] = ["sh", "-c", _AGENT_KEEPER, "tierkernel-keeper",
                                 agent_program()]
            kwargs["environment"] = self._agent_environment(spec.runtime, self.spare_ttl)
        else:
            # The keeper ends an unclaimed spare (auto-remove then removes it) once its agent
            # has given up waiting; a claimed one lives on while its folder holds the claim.
            kwargs["command"] = ["sh", "-c", _SPARE_KEEPER, "tierkernel-keeper",
                                 f"{self.spare_ttl + 10:.0f}"]
        container = None
        try:
            container = client.containers.create(**kwargs)
            container.start()
            exec_id = (MAIN_AGENT if main_agent else
                       self._exec_agent(client, container.id, spec.runtime, wait=self.spare_ttl))
            write_exec_id(folder, exec_id)
        except Exception:
            if container is not None:
                with contextlib.suppress(Exception):
                    container.remove(force=True)
            remove_folder(folder)
            raise
        log.info("spare sandbox container %s ready for the next kernel", container.id[:12])
        return name

    def _watch(self, client: Any, handle: _Container) -> None:
        """Follow the engine's oom/die events of the container in a thread."""
        try:
            stream = client.api.events(
                filters={"container": handle.id, "event": ["oom", "die"]}, decode=True)
        except Exception:
            log.debug("cannot follow the container's events", exc_info=True)
            return
        handle.events = stream

        def follow() -> None:
            with contextlib.suppress(Exception):
                for event in stream:
                    status = event.get("status") or event.get("Action")
                    if status == "oom":
                        handle.ooms += 1
                        handle.oom_seen.set()
                    elif status == "die":
                        handle.died = True
                        transport = self._transport
                        # A dead container may leave its exec stream hanging (runsc): end it.
                        if transport is not None and transport.container_id == handle.id:
                            transport.close()
                        return

        threading.Thread(target=follow, daemon=True, name="sandbox-events").start()

    @staticmethod
    def _agent_environment(runtime: str, wait: float) -> dict[str, str]:
        """The environment of an agent that connects to its host socket, waiting for it up
        to ``wait`` s."""
        environment = {**_ENVIRONMENT, SOCKET_ENV: f"{GUEST_DIR}/{SOCKET_NAME}",
                       WAIT_ENV: f"{wait:g}"}
        if wake_usable(runtime):
            environment[WAKE_ENV] = f"{GUEST_DIR}/{WAKE_NAME}"
        else:
            environment[POLL_ENV] = "0.025"  # gVisor's file lookups cost: look less often
        return environment

    def _exec_agent(self, client: Any, container_id: str, runtime: str, wait: float) -> str:
        """Start the agent detached, to connect to its host socket; return the exec id."""
        exec_id: str = client.api.exec_create(
            container_id, _agent_command(), user=self.user,
            environment=self._agent_environment(runtime, wait), workdir="/workspace")["Id"]
        client.api.exec_start(exec_id, detach=True)
        return exec_id

    def _connect(self, client: Any, container: _Container, exec_id: str | None,
                 timeout: float) -> SocketTransport:
        """The agent's direct channel: listen on the container's socket, start the agent
        (unless ``exec_id`` names one already waiting, a spare's), accept its connection."""
        assert container.folder is not None
        listener = Listener(container.folder)
        try:
            if not exec_id:
                exec_id = self._exec_agent(client, container.id, container.spec.runtime,
                                           wait=self.start_timeout)
                write_exec_id(container.folder, exec_id)
            else:
                wake(container.folder)  # a spare's agent sleeping on its FIFO
        except Exception:
            listener.close()
            raise
        agent = exec_id

        def gone() -> str | None:
            if agent == MAIN_AGENT:  # no exec to ask: only a dead container says it is gone
                return "the sandbox container stopped" if container.died else None
            try:
                info = client.api.exec_inspect(agent)
            except Exception as exc:
                return f"the engine lost the agent's process ({exc})"
            if info.get("Running") or info.get("ExitCode") is None:
                return None
            return self._exit_detail(container, int(info["ExitCode"]))

        conn = listener.accept(timeout, gone)
        return SocketTransport(client.api, container.id, agent, conn, user=self.user,
                               runtime=container.spec.runtime,
                               detail=lambda code: self._exit_detail(container, code))

    def _start_agent(self, client: Any, exec_id: str | None = None,
                     timeout: float | None = None) -> None:
        container = self._container
        assert container is not None
        wait = self.start_timeout if timeout is None else timeout
        transport: DockerExecTransport
        try:
            if container.folder is not None:
                transport = self._connect(client, container, exec_id, wait)
            else:
                transport = DockerExecTransport(
                    client.api, container.id,
                    _agent_command(),
                    user=self.user, environment=_ENVIRONMENT, workdir="/workspace",
                    runtime=container.spec.runtime,
                    detail=lambda code: self._exit_detail(container, code),
                )
        except ChannelError as exc:
            raise EngineError(f"the interpreter in the sandbox container did not start: "
                              f"{exc}") from exc
        except Exception as exc:
            raise explain(exc, "starting the interpreter in the sandbox container") from exc
        self._transport = transport
        session = AgentSession(
            transport,
            tier=self.name,
            grace=self.interrupt_grace,
            output_limit=self.output_limit,
            limit_hint=f"raise it with '%%tier {self.name} --timeout SECONDS' or "
            "c.SandboxBackend.timeout",
            **self.channel_limits(self.output_limit),
        )
        try:
            session.wait_ready(wait)
        except Exception as exc:
            raise EngineError(str(exc)) from exc
        session.install_helpers(packages_site=packages.SANDBOX_SITE)
        self._give_packages(session, wait)
        # Each cell's CPU time, peak memory and processes, from the container's cgroups.
        session.usage_probe = ContainerUsage(container.id,
                                             count_processes=container.spec.runtime == "runc")
        self._session = session

    def _package_store(self) -> packages.PackageStore:
        """This kernel's %pip packages for the sandbox (the folder is made on first use)."""
        with self._packages_lock:
            if self._packages is None:
                self._packages = packages.PackageStore(
                    packages.Packages(parent=self), packages.Target(self.name, pure_only=False))
            return self._packages

    def _give_packages(self, session: AgentSession, timeout: float) -> None:
        """Copy what %pip installed in this kernel into a new agent's container, so that a
        replaced container (a --memory change, a crash) still has it."""
        store = self._packages
        if store is None:
            return
        try:
            for part in store.parts():
                answer = session.ask({"type": protocol.UNPACK, "root": packages.SANDBOX_SITE,
                                      "delete": [],
                                      "data": base64.b64encode(part).decode("ascii")}, timeout)
                if answer.get("error"):
                    raise OSError(answer["error"])
        except OSError as exc:
            # The container still runs cells; what is missing is sent again by the next
            # %pip install of it (the guest reports it missing).
            log.warning("copying %%pip's packages into the container failed: %s", exc)
            self._packages_notice = (
                "tierkernel: the packages installed with %pip could not all be copied into the "
                f"new sandbox container ({exc}); run the %pip install again\n")

    def _drop_container(self) -> None:
        """Forget and remove the current container (and its agent). Never raises."""
        container, self._container = self._container, None
        session, self._session = self._session, None
        transport, self._transport = self._transport, None
        if session is not None:
            session.alive = False
        if transport is not None:
            transport.close()
        if container is None:
            return
        if container.events is not None:
            with contextlib.suppress(Exception):
                container.events.close()
        failed = _force_remove(self._engine().api, container.id, container.folder)
        if failed:
            log.warning("could not remove sandbox container %s: %s", container.id[:12], failed)

    # -- after a cell ---------------------------------------------------------------------
    def _pids_high(self, container: _Container) -> bool:
        """Whether the container's processes at the cell's end look like a fork bomb's.

        runc: 90% of the pids limit, from the host's pids cgroup (microseconds to read).
        runsc: the host cgroup counts gVisor's own threads, so the agent's count is used; a bomb
        in gVisor holds 60-70% of ``ulimit nproc``, so half of it is enough to look closer.
        """
        if container.spec.runtime == "runc":
            current = _pids_current(container.id)
            return current is not None and current >= int(container.pids_limit * 0.9)
        session = self._session
        procs = session.procs if session is not None else None
        return procs is not None and procs >= self.runsc_nproc // 2

    def _pids_settle(self, container: _Container, within: float) -> bool:
        """Wait up to ``within`` s for the container's processes to fall back to a quarter of
        their limit and stay there; True when they did (or cannot be counted), or when at the
        end the count is below 90% of the limit and nothing is still forking at a furious
        rate (a pool of workers: under runsc, half the limit is only 32 processes).

        One low sample is not enough: a bomb whose processes die in a burst dips below a
        quarter for a moment, and its survivors fill the limit again within milliseconds
        (seen on a loaded CI machine). A count that stays low for ``_SETTLED_FOR`` s with
        its churn marker still (no new pid under runsc; under runc, where only refused forks
        are counted, just low) has no forking loop left in it, unless the wait so far shows
        a bomb's churn (a bomb quiet for longer than that is caught after a later cell).
        At the end, a count that was full again in the second half of the wait is a bomb
        that pauses between rounds, and churn tells one sampled at, say, 80%:
        under runc the pids cgroup counts the forks it refused (in the last second), under
        runsc the agent reports the highest pid it has seen (over the whole wait).
        """
        start = time.monotonic()
        runc = container.spec.runtime == "runc"
        limit = container.pids_limit if runc else self.runsc_nproc
        samples: list[tuple[float, int, int]] = []
        low_since: float | None = None
        low_mark = 0
        while True:
            sample = self._count(container, runc)
            now = time.monotonic()
            if sample is None:
                return True
            samples.append((now, *sample))
            if sample[0] >= limit // 4:
                low_since = None
            elif low_since is None or sample[1] != low_mark:
                # Low, but processes are still being made (or refused): a refill may be
                # under way, so the quiet stretch starts again.
                low_since, low_mark = now, sample[1]
            elif now - low_since >= _SETTLED_FOR and not _churning(samples, runc, limit):
                return True
            if now - start >= within:
                # Full again at any time in the second half of the wait: something keeps
                # filling the limit (a bomb that pauses between rounds is full in each).
                peak = max(n for t, n, _ in samples if t >= now - within / 2)
                return not (peak >= int(limit * 0.9) or _churning(samples, runc, limit))
            time.sleep(0.05)

    def _count(self, container: _Container, runc: bool) -> tuple[int, int] | None:
        """(processes, churn marker) in the container now, or None when it cannot be told.

        The marker grows while processes keep being made: under runc the forks the pids
        cgroup refused so far, under runsc the highest pid seen so far.
        """
        if runc:
            return _pids_cgroup(container.id)
        session = self._session
        if session is None or self._container is not container:
            return None
        return session.count_processes()

    def _limit_text(self, container: _Container) -> str:
        return (f"{self.runsc_nproc} processes (ulimit nproc)"
                if container.spec.runtime == "runsc"
                else f"{container.pids_limit} processes (pids limit)")

    def _after_cell(self, container: _Container, held: ExecError | None) -> ExecError | None:
        """Name the limit behind a failure; replace a container a fork bomb filled up (in
        the cell, or left running in the background)."""
        error = held
        limited = error is not None and _is_process_limit(error)
        # A dying bomb frees its slots within a moment; a live one keeps churning near the
        # limit, and then the container is no use to the next cell.
        suspicious = self._pids_high(container) or limited
        if suspicious and not self._pids_settle(container, within=3.0):
            with self._tlock:
                container.suspect = True
                if self._container is container:
                    self._drop_container()
            error = ExecError(
                ProcessLimitError.__name__,
                f"the cell's processes filled the sandbox's limit of "
                f"{self._limit_text(container)} and kept it full, so the container was "
                "removed; its variables and files are gone and the next sandbox cell starts a "
                "new one",
                [],
            )
            error.traceback.append(f"{error.ename}: {error.evalue}")
            return error
        if error is not None and limited:
            evalue = f"{error.evalue} -- the sandbox allows at most {self._limit_text(container)}"
            return ExecError(error.ename, evalue, [*error.traceback[:-1],
                                                   f"{error.ename}: {evalue}"])
        return error

    def _exit_detail(self, container: _Container, code: int | None) -> str:
        """Why the agent is gone, for the "state lost" message."""
        if code in (None, 137) and not container.oom_seen.is_set():
            container.oom_seen.wait(1.5)  # the engine reports the OOM a moment after the kill
        mem = format_size(container.spec.memory)
        if container.ooms > self._oom_baseline or container.oom_seen.is_set():
            if container.died or container.spec.runtime == "runsc":
                container.suspect = True
            # The cgroup's peak was reset when the cell started: this is the cell's.
            peak = ContainerUsage(container.id, count_processes=False).peak_memory()
            # Gone with the container (gVisor's OOM ends the whole sandbox): an OOM kill
            # means the cgroup's usage met its limit, as the engine reported.
            reached = (f" (its memory reached {human_size(peak)}, measured on the host)"
                       if peak is not None else
                       " (its memory reached the limit: the engine reported the "
                       "out-of-memory kill)")
            return (f"out of memory: the cell went past the sandbox's {mem} memory limit"
                    f"{reached}; raise it with '%%tier {self.name} --memory 2g' or "
                    "c.SandboxBackend.memory")
        if container.died:
            container.suspect = True
            return "the sandbox container stopped"
        if code is None:
            return "its connection to the container closed"
        if code > 128:
            import signal

            with contextlib.suppress(ValueError):
                return f"it was killed by signal {signal.Signals(code - 128).name}"
        transport = self._transport
        tail = transport.stderr_tail() if transport is not None else ""
        return f"it exited with status {code}" + (f"; stderr: {tail}" if tail else "")

    # -- helpers --------------------------------------------------------------------------
    def _query_session(self) -> AgentSession | None:
        """The running container's agent, for completion and inspection (None while the
        container is being made or replaced: a query never waits for that)."""
        return self._session if self._is_up() and not self._starting else None

    def _is_up(self) -> bool:
        container, session = self._container, self._session
        return (container is not None and not container.died and not container.suspect
                and session is not None and session.alive)

    def _async_lock(self) -> asyncio.Lock:
        if self._alock is None:
            self._alock = asyncio.Lock()
        return self._alock

    def _default_spec(self) -> ContainerSpec:
        return ContainerSpec(self.runtime, self.memory, self.cpus)

    def _image_ref(self) -> str:
        return self.image or image_ref()

    def _engine(self) -> Any:
        if self._client is None:
            self._client = connect(self.engine_timeout)
        return self._client

    def _probe_client(self) -> Any:
        if self._probe is None:
            self._probe = connect(timeout=5)
        return self._probe

    def _engine_runtimes(self, client: Any) -> dict[str, Any]:
        """The engine's runtimes by name, each with its path and runtimeArgs (asked once)."""
        if self._runtimes is None:
            try:
                info = client.info()
            except Exception as exc:
                raise explain(exc, "asking the engine for its runtimes") from exc
            self._runtimes = dict(info.get("Runtimes") or {"runc": {}})
        return self._runtimes

    def _no_runtime(self, runtime: str, runtimes: dict[str, Any]) -> str:
        hint = (" (install runsc and register it: scripts/engine.sh does both)"
                if runtime == "runsc" else "")
        return (f"runtime {runtime!r} is not registered with the docker engine at "
                f"{engine_url()} (it has: {', '.join(sorted(runtimes))}){hint}")

    def _where(self) -> str:
        container = self._container
        spec = container.spec if container is not None else self._default_spec()
        return f"image {self._image_ref()}, runtime {spec.runtime}"


# -- orphans ------------------------------------------------------------------------------
def reap_orphans(client: Any) -> list[str]:
    """Remove sandbox containers of this host whose owning kernel process is gone, and spares
    that no kernel will claim (see :mod:`tierkernel.backends.sandbox.spares`).

    Returns the ids removed. A kernel killed with SIGKILL cannot clean up; the next kernel to
    start does it here.
    """
    removed: list[str] = []
    host = socket.gethostname()
    try:
        found = client.containers.list(all=True, ignore_removed=True,
                                       filters={"label": LABEL_KERNEL})
    except Exception:
        log.debug("listing sandbox containers failed", exc_info=True)
        return removed
    for container in found:
        labels = container.labels or {}
        if labels.get(LABEL_OWNER_HOST) != host:
            continue  # another host's kernel: its pid means nothing here
        if spares.LABEL_SPARE in labels:
            if labels.get(spares.LABEL_OWNER_UID) != str(os.getuid()):
                continue  # another user's spare: its folder is not ours to read
            if not spares.stale(container, _owner_alive):
                continue
            pid = -1
        else:
            try:
                pid = int(labels.get(LABEL_OWNER_PID, ""))
            except ValueError:
                pid = -1
            if pid > 0 and _owner_alive(pid, labels.get(LABEL_OWNER_START, "")):
                continue
        if _remove(client, container):
            removed.append(container.id)
            log.info("removed orphaned sandbox container %s (owner pid %s is gone)",
                     container.id[:12], pid)
    return removed


def kernel_containers(client: Any, pid: int) -> list[str]:
    """Ids of the sandbox containers the kernel process ``pid`` owns: those it created for
    itself and the spare it claimed (not the spares it made for others)."""
    owned = []
    # ignore_removed: one may be gone before the SDK inspects it (see spares.list_spares).
    for container in client.containers.list(all=True, ignore_removed=True,
                                            filters={"label": LABEL_KERNEL}):
        labels = container.labels or {}
        if spares.LABEL_SPARE in labels:
            owner = spares.claimer(spares.folder_of(container))
            if owner is not None and owner[0] == pid:
                owned.append(container.id)
        elif labels.get(LABEL_OWNER_PID) == str(pid):
            owned.append(container.id)
    return sorted(owned)


def remove_spares(client: Any) -> list[str]:
    """Remove this user's unclaimed spares (a claimed one is its kernel's); their ids."""
    removed = []
    for container in spares.list_spares(client):
        labels = container.labels or {}
        if labels.get(spares.LABEL_OWNER_UID) != str(os.getuid()):
            continue
        if spares.claimer(spares.folder_of(container)) is not None:
            continue
        if _remove(client, container):
            removed.append(container.id)
    return removed


def _remove(client: Any, container: Any) -> bool:
    """Remove a container the engine listed, and its folder if it is one of ours."""
    folder = spares.folder_of(container)
    failed = _force_remove(client.api, container.id, folder if folder.is_dir() else None)
    if failed:
        log.debug("removing %s failed: %s", container.id[:12], failed)
    return not failed


def _force_remove(api: Any, container_id: str, folder: Path | None) -> str:
    """Remove a container (gone already counts) and then its host folder; "" when done, else
    the engine's reason. The folder stays while its container does: the reaper needs it."""
    try:
        api.remove_container(container_id, force=True)
    except Exception as exc:
        if "No such container" not in str(exc) and "already in progress" not in str(exc):
            return str(exc)
    remove_folder(folder)
    return ""


def _owner_alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _process_start(pid)
    return not started or now is None or now == started


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


#: Containers' pids cgroup folders, once found (asked after every cell; they never move).
_cgroup_dirs: dict[str, str] = {}


def _pids_cgroup_dir(container_id: str) -> str | None:
    """The container's pids cgroup folder on this host (cgroup v1 or v2), or None when it is
    not visible here (a remote engine, another cgroup layout, not made yet)."""
    found = _cgroup_dirs.get(container_id)
    if found is not None:
        return found
    if len(_cgroup_dirs) > 256:  # containers come and go: forget the old ones
        _cgroup_dirs.clear()
    for path in (f"/sys/fs/cgroup/pids/docker/{container_id}",
                 f"/sys/fs/cgroup/docker/{container_id}",
                 f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope"):
        if os.path.exists(f"{path}/pids.current"):
            _cgroup_dirs[container_id] = path
            return path
    return None


def _pids_current(container_id: str) -> int | None:
    """How many tasks the container's pids cgroup holds, read from the host's cgroup files
    (microseconds, unlike an engine stats call); None when they are not visible here."""
    path = _pids_cgroup_dir(container_id)
    if path is None:
        return None
    try:
        with open(f"{path}/pids.current") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _pids_cgroup(container_id: str) -> tuple[int, int] | None:
    """(tasks in the container's pids cgroup, forks it has refused at the limit so far), or
    None when the cgroup is not visible here."""
    current = _pids_current(container_id)
    path = _pids_cgroup_dir(container_id)
    if current is None or path is None:
        return None
    refused = 0
    with contextlib.suppress(OSError, ValueError), open(f"{path}/pids.events") as handle:
        for line in handle:
            key, _, value = line.partition(" ")
            if key == "max":
                refused = int(value)
    return current, refused


def _churning(samples: list[tuple[float, int, int]], runc: bool, limit: int) -> bool:
    """Whether the (time, processes, marker) samples show processes still being made at a
    bomb's rate. runc: forks refused at the limit in the last second (a pool of workers
    below the limit never has one refused). runsc: pids advancing by the limit or more over
    the whole wait (a steady pool reuses few)."""
    if runc:
        last_t, _, last_refused = samples[-1]
        earlier = [s for s in samples if s[0] <= last_t - 1.0] or samples[:1]
        return last_refused > earlier[-1][2]
    return samples[-1][2] - samples[0][2] >= limit


def _is_process_limit(error: ExecError) -> bool:
    text = f"{error.ename}: {error.evalue}"
    return error.ename == "BlockingIOError" or "Resource temporarily unavailable" in text
