"""The ``sandbox`` tier: cells run in a hardened Docker container, by a persistent agent.

One container per kernel session, started in the background when the kernel starts (warm
start), hardened by default: no network, read-only root with tmpfs ``/tmp`` and ``/workspace``,
every capability dropped, no-new-privileges, uid 65534, pids/memory/CPU limits, and docker-init
as PID 1. ``--runtime runsc`` (or ``c.SandboxBackend.runtime``) runs it under gVisor.

Cells are run by the same stdlib-only guest agent as the ``process`` tier, started once per
container (with ``docker exec``, or by the container's own keeper in a gVisor spare) and driven
over a unix socket of the host's, or its exec stream, by
:class:`~tierkernel.backends.agent.session.AgentSession`: no ``docker exec`` per cell.

This module is the tier's contract (:class:`SandboxBackend`); the rest of the package does the
work it asks for:

- ``settings.py``: the settings and a cell's options turned into a container's create arguments;
- ``lifecycle.py``, ``container.py``: this kernel's container, created or claimed, its agent
  started, replaced, removed; the engine calls on one container;
- ``spares.py``, ``head_start.py``, ``pool.py``, ``learned.py``: spare containers made ahead
  for the next kernel, while a kernel starts, or with no kernel running;
- ``pids.py``: the fork-bomb check after a cell; ``reaper.py``: removing dead kernels' containers
  (found by their ``labels.py``);
- ``engine.py``, ``channel.py``, ``transport.py``: the engine, and the agent's channel to the
  kernel; ``image.py``, ``extras.py``: the image; ``workspace.py``, ``notebook.py``: the fsx
  workspace and the notebook's folder in the container.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from traitlets import Bool, Float, Int, Unicode
from traitlets.config import Config

from tierkernel.backends.agent.base import WorkspaceCopyBackend
from tierkernel.backends.agent.notebook_folder import NotebookFolder
from tierkernel.backends.agent.session import AgentSession
from tierkernel.backends.base import (
    Availability,
    CellRequest,
    ExecError,
    ExecResult,
    HeldErrorSink,
    OutputSink,
)
from tierkernel.backends.hooks import Command, ConfigSources
from tierkernel.backends.js_cells import js_cell_problem, js_refuse_trait
from tierkernel.backends.options import MIN_MEMORY
from tierkernel.backends.sandbox import head_start, pids, reaper, spares
from tierkernel.backends.sandbox import options as sandbox_options
from tierkernel.backends.sandbox.container import Container
from tierkernel.backends.sandbox.engine import (
    EngineLink,
    engine_url,
    no_runtime_message,
    unreachable_message,
)
from tierkernel.backends.sandbox.image import describe_missing, image_exists, image_ref
from tierkernel.backends.sandbox.lifecycle import KernelContainer
from tierkernel.backends.sandbox.notebook import NotebookCopy, tmpfs_options
from tierkernel.backends.sandbox.settings import ContainerSettings, ContainerSpec
from tierkernel.backends.sandbox.transport import DockerExecTransport
from tierkernel.backends.sandbox.workspace import WorkspaceSync
from tierkernel.backends.usage import ContainerUsage
from tierkernel.errors import EngineError
from tierkernel.fsx import sync
from tierkernel.guest import js_node, protocol
from tierkernel.runtime import packages
from tierkernel.sizes import ByteSize

log = logging.getLogger(__name__)

#: Seconds between a live kernel's sweeps for expired spares and dead kernels' containers.
_SWEEP_INTERVAL = 60.0


class SandboxBackend(WorkspaceCopyBackend):
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
    user = Unicode("65534:65534", help="uid:gid the cells run as (not root).").tag(config=True)
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

    js_refuse = js_refuse_trait()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._engine = EngineLink(self.engine_timeout)
        self._box = KernelContainer(
            self._engine, str(getattr(self.parent, "ident", "") or uuid.uuid4()),
            self._open_agent, lambda: self.raise_hint("memory", "2g"))
        self._workspace = WorkspaceSync(self.user)
        self._alock: asyncio.Lock | None = None
        self._after_start_done = False
        self._starting = False
        #: What %pip installed in this kernel's sandbox (made at the first %pip), given to
        #: every new container's agent.
        self._packages: packages.PackageStore | None = None
        self._packages_lock = threading.Lock()
        #: Said at the next cell: the packages could not all be given to a new container.
        self._packages_notice = ""
        self._notebook = NotebookCopy()
        #: The warm start's notice about the notebook folder's copy, for the first cell.
        self._notebook_notice = ""

    # -- the contract ---------------------------------------------------------------------
    @classmethod
    def config_loaded(cls, config: Config, sources: ConfigSources) -> None:
        """Begin the head start: a spare container made while the kernel starts
        (head_start.py)."""
        head_start.begin(config, sources, cls)

    @classmethod
    def commands(cls) -> Sequence[Command]:
        """``tierkernel image`` and ``tierkernel spares`` (cli.py of this package)."""
        # Loaded only when the tierkernel command asks: a kernel, which imports this module,
        # never runs a command.
        from tierkernel.backends.sandbox import cli

        return cli.COMMANDS

    def availability(self) -> Availability:
        """Engine reachable, image built, default runtime registered (quick: cached probes).
        Called by the kernel for ``%tier`` and before each sandbox cell."""
        if self._box.is_up() or self._starting:
            # Starting: the start reports its own failure to the cell that waits for it.
            return Availability.yes(self._where())
        try:
            probe = self._engine.probe()
            probe.ping()
        except Exception as exc:
            self._engine.forget_probe()
            return Availability.no(unreachable_message(exc))
        ref = self._image_ref()
        try:
            if not image_exists(probe, ref):
                return Availability.no(describe_missing(ref))
            runtimes = self._engine.runtimes(probe)
        except EngineError as exc:
            return Availability.no(str(exc))
        if self.runtime not in runtimes:
            return Availability.no(no_runtime_message(self.runtime, runtimes))
        return Availability.yes(self._where())

    def defaults(self) -> dict[str, Any]:
        """Timeout, memory, cpus and runtime, as configured."""
        return {"timeout": self.timeout, "memory": self.memory, "cpus": self.cpus,
                "runtime": self.runtime}

    async def start(self) -> None:
        """Create the container (or claim a spare) and start the agent; called by the kernel
        for its warm start and before each cell.

        A container that is still there keeps its spec (a cell's --runtime/--memory may have
        set it): only its agent is restarted. ``execute`` applies each cell's own spec.
        """
        if self._box.is_up():
            return
        try:
            async with self._async_lock():
                if not self._box.is_up():
                    current = self._box.container
                    spec = current.spec if current is not None else self._default_spec()
                    self._starting = True
                    try:
                        await asyncio.to_thread(self._ensure_and_sync, spec)
                    finally:
                        self._starting = False
        finally:
            self._after_first_start()

    async def execute(self, request: CellRequest, sink: OutputSink) -> ExecResult:
        """Run the cell in the container's agent; a changed runtime/memory/cpus is applied
        first (in place when the engine allows, else by a new container, which the user is
        told about). Called by the kernel, one cell at a time."""
        lang = request.options.get("lang") or "python"
        if lang != "python":
            problem = js_cell_problem(request, list(self.js_refuse),
                                      "c.SandboxBackend.js_refuse")
            if problem is not None:
                return self._fail(sink, time.perf_counter(), "TierUsageError", problem)
        spec = ContainerSpec(
            runtime=str(request.options.get("runtime") or self.runtime),
            memory=int(request.options.get("memory") or self.memory),
            cpus=float(request.options.get("cpus") or self.cpus),
        )
        notice = ""
        container = self._box.container
        if not (self._box.is_up() and container is not None and container.spec == spec):
            # Only when something must change: the common case costs no thread hop.
            async with self._async_lock():
                notice = await asyncio.to_thread(self._ensure, spec)
        if notice:
            sink.stream("stderr", notice + "\n")
        session, container = self._box.session, self._box.container
        if session is None or container is None:
            raise EngineError("the sandbox container is not running (it was shut down)")
        held = HeldErrorSink(sink)
        self._box.oom_baseline = container.ooms
        container.oom_seen.clear()
        gateway = packages.route(self.helper_gateway(), self._package_store())
        # The copies back count in the cell's time and end with the stop button.
        started, option = time.monotonic(), request.options.get("timeout")
        timeout = float(option) if option else None

        # A new agent, or the notebook's folder changed: not per cell.
        if self._notebook.due(session):
            notice = await asyncio.to_thread(self._setup_files)
            if notice:
                sink.stream("stderr", notice + "\n")
        if self._notebook_notice:  # the warm start's
            sink.stream("stderr", self._notebook_notice + "\n")
            self._notebook_notice = ""
        # fsx -> /workspace, the cell, /workspace -> fsx. The copies may take the engine's
        # time and run in a thread; the common cell (nothing to copy either way) needs none.
        if self._workspace.may_have_changes(container.id):
            api = self._engine.client().api
            if container.cells and await asyncio.to_thread(session.tree_changed):
                # Changed in the container since the last cell (by a process it left
                # running): copied back first, since the copy in becomes the new baseline.
                early = await asyncio.to_thread(self._copy_back, container, sink, started,
                                                timeout)
                if early is not None:
                    sink.stream("stderr", f"tierkernel: {early.evalue}\n")
            if await asyncio.to_thread(self._workspace.before_cell, api, container.id,
                                       session, self.container_settings().room(container.spec)):
                session.reset_watch()
        if self._workspace.notice:  # files the container could not be given (or warm start's)
            sink.stream("stderr", self._workspace.notice)
            self._workspace.notice = ""
        if self._packages_notice:
            sink.stream("stderr", self._packages_notice)
            self._packages_notice = ""
        if lang != "python" and "js_node" not in session.modules:
            # At the first JS cell of an agent: Node.js is started by this module, which has
            # the Node program in it.
            session.install_module("js_node", js_node.module_source())
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
        if held.held is not None or pids.at_limit(container, self._box.session_of(container),
                                                  self.runsc_nproc):
            # Said first: the container's state (out of memory, processes) may need acting on.
            after = await asyncio.to_thread(self._after_cell, container, held.held)
            if after is not None and error is not None:
                sink.stream("stderr", f"tierkernel: {error.evalue}\n")
            error = after or error
        if error is not None:
            sink.error(error.ename, error.evalue, error.traceback)
            result = dataclasses.replace(result, success=False, error=error)
        return result

    def interrupt(self) -> None:
        """SIGINT to the agent (a ``kill`` exec); killed if ignored for ``interrupt_grace``.
        A copy back of /workspace in progress ends too. Called from the kernel's SIGINT
        handler."""
        self.stop_copy()
        session = self._box.session
        if session is not None:
            session.interrupt()

    def shutdown(self) -> None:
        """Remove the container (and stop the agent with it). Called by the kernel at
        shutdown and restart and at exit; idempotent, never raises."""
        self._box.shutdown()
        self._notebook.close()
        self._engine.close()
        if self._packages is not None:
            self._packages.close()

    def limit_notes(self) -> list[str]:
        """The process limit a cell meets, for ``%tier``."""
        return [f"pids={self.pids_limit if self.runtime != 'runsc' else self.runsc_nproc}"]

    # -- for the head start and the spares' pool --------------------------------------------
    def container_settings(self) -> ContainerSettings:
        """The settings that shape this tier's containers, as the traits hold them now."""
        return ContainerSettings(
            image=self._image_ref(), user=self.user, tmpfs_size=self.tmpfs_size,
            workspace_size=self.workspace_size, pids_limit=self.pids_limit,
            runsc_pids_limit=self.runsc_pids_limit, runsc_nproc=self.runsc_nproc,
            notebook_tmpfs=tmpfs_options(NotebookFolder(parent=self)),
            start_timeout=self.start_timeout, spare_ttl=self.spare_ttl)

    def make_head_start(self, report: Callable[[str], None]) -> None:
        """In the head start's helper process (head_start.py): make one spare for the default
        spec, unless an unclaimed one is waiting already; ``report`` each step."""
        if not (self.warm_start and self.head_start):
            report("off warm_start or head_start is off")
            return
        try:
            client = self._spare_client()
        except EngineError as exc:
            report(f"off {exc}")
            return
        settings, spec = self.container_settings(), self._default_spec()
        key = spares.spec_key(settings.create_kwargs(spec))
        report(f"key {key}")
        if spares.unclaimed(client, key) > 0:
            report("have")
            return
        spares.make_spare(client, settings, spec, self._box.kernel_id)
        report("ready")

    def keep_spares(self, count: int, fresh_for: float = 5.0) -> list[str]:
        """Make spares for the default spec until ``count`` wait with more than
        ``fresh_for`` s left (a kernel's own spares; ``tierkernel spares --make/--keep``);
        return their names. Stops early when the tier shuts down. Raises EngineError when
        the engine, the image, the runtime or the direct channel is not there."""
        client = self._spare_client()
        return spares.top_up(client, self.container_settings(), self._default_spec(),
                             self._box.kernel_id, count, fresh_for, lambda: self._box.closed)

    def engine(self) -> Any:
        """The Docker SDK client this backend uses (connected on first use)."""
        return self._engine.client()

    def warm_engine(self) -> None:
        """Connect to the engine and learn its runtimes now, for :meth:`adopt_engine` (a
        head start's helper does this while it waits for the kernel's configuration)."""
        self._engine.warm()

    def adopt_engine(self, warm: SandboxBackend) -> None:
        """Use the connections and runtimes ``warm`` (made with other settings) has already
        got; its client only if it was made with this backend's ``engine_timeout``."""
        self._engine.adopt(warm._engine)

    # -- helpers --------------------------------------------------------------------------
    def _ensure(self, spec: ContainerSpec) -> str:
        """Make the container match ``spec`` with a live agent (see KernelContainer.ensure);
        a spare may be claimed for the default spec, after this kernel's head start."""
        head = head_start.pending() if self.head_start else None
        claim = (self.spares > 0 or head is not None) and spec == self._default_spec()
        return self._box.ensure(spec, self.container_settings(), claim=claim, head=head)

    def _ensure_and_sync(self, spec: ContainerSpec) -> None:
        """Start the container and copy the workspace in now (a warm start does this in the
        background), so the first cell does not wait for that copy."""
        self._ensure(spec)
        container, session = self._box.container, self._box.session
        if container is None:
            return
        try:
            self._notebook_notice = self._setup_files()
        except Exception:  # the first cell tries again and reports the error
            log.warning("setting up the sandbox's files failed", exc_info=True)
        try:
            if (self._workspace.before_cell(self._engine.client().api, container.id, session,
                                            self.container_settings().room(container.spec))
                    and session is not None):
                session.reset_watch()
        except Exception:  # the first cell tries again and reports the error
            log.warning("copying the workspace into the new container failed", exc_info=True)

    def _open_agent(self, transport: DockerExecTransport, container: Container,
                    timeout: float) -> AgentSession:
        """A session on a new agent in ``container``: ready, with the runtime helpers and
        %pip, this kernel's packages, and the container's cgroups measuring each cell."""
        session = self.open_session(transport)
        try:
            session.wait_ready(timeout)
        except Exception as exc:
            raise EngineError(str(exc)) from exc
        session.install_helpers(packages_site=packages.SANDBOX_SITE)
        self._give_packages(session, timeout)
        # Each cell's CPU time, peak memory and processes, from the container's cgroups.
        session.usage_probe = ContainerUsage(container.id,
                                             count_processes=container.spec.runtime == "runc")
        return session

    def _setup_files(self) -> str:
        """The notebook's folder copied into the container and the agent's files set up,
        when due (see NotebookCopy); a notice for the user ("" if none)."""
        container, session = self._box.container, self._box.session
        if container is None or session is None:
            return ""
        return self._notebook.set_up(self._engine.client().api, container.id, session,
                                     NotebookFolder(parent=self))

    def _copy_back(self, container: Container, sink: OutputSink, started: float,
                   timeout: float | None) -> ExecError | None:
        """Bring the cell's changes in /workspace into fsx (see :meth:`copy_back`)."""
        api, session = self._engine.client().api, self._box.session_of(container)

        def apply(budget: sync.Budget, stop: Callable[[], str | None]) -> sync.Applied | None:
            return self._workspace.after_cell(api, container.id, True, session, budget, stop)

        return self.copy_back(
            apply, sink, started, timeout, source="/workspace",
            kept="the container still has the files, and they are copied with the next "
            "change a cell makes in /workspace", version="container's")

    def _after_cell(self, container: Container, held: ExecError | None) -> ExecError | None:
        """Name the limit behind a failure; replace a container a fork bomb filled up (in
        the cell, or left running in the background)."""
        error, replace = pids.after_cell(container, self._box.session_of(container),
                                         self.runsc_nproc, held)
        if replace:
            with self._box.lock:
                container.suspect = True
                if self._box.container is container:
                    self._box.drop()
        return error

    def _after_first_start(self) -> None:
        """Once per kernel, after its first start: in a thread, remove dead kernels'
        containers (not before: the first cell need not wait for that), then, after
        ``spare_delay``, make the spares."""
        if self._after_start_done or self._box.closed:
            return
        self._after_start_done = True

        def work() -> None:
            if self.reap_orphans:
                with contextlib.suppress(Exception):
                    reaper.reap_orphans(self._engine.client())
            if self.spares > 0:
                time.sleep(self.spare_delay)
                try:
                    self.keep_spares(self.spares)
                except Exception:
                    log.info("making a spare sandbox container failed", exc_info=True)
            # While the kernel lives, remove expired spares (those that cannot remove
            # themselves, under gVisor) and dead kernels' containers now and then.
            while self.reap_orphans and not self._box.closed:
                time.sleep(_SWEEP_INTERVAL)
                with contextlib.suppress(Exception):
                    if not self._box.closed:
                        reaper.reap_orphans(self._engine.client())

        threading.Thread(target=work, daemon=True, name="sandbox-after-start").start()

    def _spare_client(self) -> Any:
        """The engine client, once this backend can make spares of its default spec here;
        EngineError otherwise."""
        available = self.availability()
        if not available.available:
            raise EngineError(available.reason)
        runtime = self.runtime
        if not self._box.channel_ok(runtime):
            # A spare is claimed through its socket: none without the direct channel.
            raise EngineError(f"spares need the direct channel to the agent, which "
                              f"{runtime} containers of the engine at {engine_url()} "
                              "cannot have (a remote engine, or runsc without --host-uds)")
        self._engine.require_runtime(runtime)
        return self._engine.client()

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

    def _query_session(self) -> AgentSession | None:
        """The running container's agent, for completion and inspection (None while the
        container is being made or replaced: a query never waits for that)."""
        return self._box.session if self._box.is_up() and not self._starting else None

    def _async_lock(self) -> asyncio.Lock:
        if self._alock is None:
            self._alock = asyncio.Lock()
        return self._alock

    def _default_spec(self) -> ContainerSpec:
        return ContainerSpec(self.runtime, self.memory, self.cpus)

    def _image_ref(self) -> str:
        return self.image or image_ref()

    def _where(self) -> str:
        container = self._box.container
        spec = container.spec if container is not None else self._default_spec()
        return f"image {self._image_ref()}, runtime {spec.runtime}"
