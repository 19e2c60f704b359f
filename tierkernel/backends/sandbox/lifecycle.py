"""This kernel's sandbox container through its life: claimed from the spares or created when
a cell needs it, its agent started (again, after a crash), given a cell's new memory or CPUs in
place or replaced for a new runtime, and removed when the kernel goes.

:class:`KernelContainer` holds the container, its agent's session and the transport under it,
and guards changes to them with one lock, since the warm start, the cells and the shutdown
come from different threads. The session itself is opened by the tier (``open_agent``), which
owns the session's limits and what a new agent is given.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
from collections.abc import Callable

from tierkernel.backends.agent.session import AgentSession
from tierkernel.backends.sandbox import container as containers
from tierkernel.backends.sandbox import spares
from tierkernel.backends.sandbox.channel import channel_usable, read_exec_id
from tierkernel.backends.sandbox.container import Container
from tierkernel.backends.sandbox.engine import EngineLink, engine_url
from tierkernel.backends.sandbox.head_start import HeadStart
from tierkernel.backends.sandbox.labels import owner_labels, process_start
from tierkernel.backends.sandbox.settings import ContainerSettings, ContainerSpec
from tierkernel.backends.sandbox.transport import DockerExecTransport
from tierkernel.backends.usage import ContainerUsage, human_size
from tierkernel.errors import EngineError
from tierkernel.sizes import format_size

log = logging.getLogger(__name__)

#: Opens a session on a new agent's transport in the given container, waiting up to the given
#: seconds for it; EngineError when it does not come up.
OpenAgent = Callable[[DockerExecTransport, Container, float], AgentSession]


class KernelContainer:
    """The kernel's one sandbox container and the agent in it (see the module docstring)."""

    def __init__(self, engine: EngineLink, kernel_id: str, open_agent: OpenAgent,
                 memory_hint: Callable[[], str]) -> None:
        self.engine = engine
        self.kernel_id = kernel_id
        self._open_agent = open_agent
        #: How to raise the memory limit, for the out-of-memory message.
        self._memory_hint = memory_hint
        self.container: Container | None = None
        self.session: AgentSession | None = None
        self.transport: DockerExecTransport | None = None
        #: Held while the container or its agent changes (start, replace, shutdown).
        self.lock = threading.RLock()
        self.closed = False
        #: The container's OOM kills when the running cell started: more since then are its.
        self.oom_baseline = 0

    def is_up(self) -> bool:
        """Whether a usable container with a live agent is there."""
        container, session = self.container, self.session
        return (container is not None and not container.died and not container.suspect
                and session is not None and session.alive)

    def session_of(self, container: Container) -> AgentSession | None:
        """The agent's session while ``container`` is still the kernel's, else None."""
        return self.session if self.container is container else None

    def channel_ok(self, runtime: str) -> bool:
        """Whether containers of ``runtime`` can have the direct channel here (not with a
        remote engine, nor under runsc registered without --host-uds)."""
        return channel_usable(engine_url(), runtime,
                              dict(self.engine.runtimes().get(runtime) or {}))

    def ensure(self, spec: ContainerSpec, settings: ContainerSettings, *, claim: bool,
               head: HeadStart | None) -> str:
        """Make the container match ``spec`` and have a live agent; return a notice for the
        user when earlier state was lost on the way ("" otherwise). A new container is a
        claimed spare when ``claim`` allows it and one waits (after the head start ``head``
        is done with its own), else a created one. Blocking."""
        with self.lock:
            if self.closed:
                raise EngineError("the sandbox tier was shut down with its kernel")
            notice = ""
            current = self.container
            if current is not None and (current.died or current.suspect):
                self.drop()
                current = None
            if current is not None and current.spec != spec:
                notice = self._respec(current, spec)
                current = self.container
            if current is None:
                self.engine.require_runtime(spec.runtime)
                if not (claim and self._claim_spare(spec, settings, head)):
                    self._create(spec, settings)
            if self.session is None or not self.session.alive:
                self._kill_leftovers(spec, settings)
                try:
                    self._start_agent(settings)
                except EngineError:
                    # An exec that cannot start (pids exhausted, a wedged sandbox): one retry
                    # in a new container, then the error goes to the user.
                    log.warning("starting the agent failed; recreating the container",
                                exc_info=True)
                    self.drop()
                    self._create(spec, settings)
                    self._start_agent(settings)
            return notice

    def drop(self) -> None:
        """Forget and remove the container (and its agent with it). Never raises."""
        with self.lock:
            container, self.container = self.container, None
            session, self.session = self.session, None
            transport, self.transport = self.transport, None
        if session is not None:
            session.alive = False
        if transport is not None:
            transport.close()
        if container is not None:
            containers.close(self.engine.client().api, container)

    def shutdown(self) -> None:
        """Remove the container for good: no later :meth:`ensure` makes another."""
        self.closed = True
        with self.lock:
            self.drop()

    def exit_detail(self, container: Container, code: int | None) -> str:
        """Why the agent in ``container`` is gone, for the "state lost" message; marks a
        container that is no use any more (stopped, or out of memory under gVisor)."""
        if code in (None, 137) and not container.oom_seen.is_set():
            container.oom_seen.wait(1.5)  # the engine reports the OOM a moment after the kill
        if container.ooms > self.oom_baseline or container.oom_seen.is_set():
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
            return (f"out of memory: the cell went past the sandbox's "
                    f"{format_size(container.spec.memory)} memory limit{reached}; "
                    f"{self._memory_hint()}")
        if container.died:
            container.suspect = True
            return "the sandbox container stopped"
        if code is None:
            return "its connection to the container closed"
        if code > 128:
            with contextlib.suppress(ValueError):
                return f"it was killed by signal {signal.Signals(code - 128).name}"
        transport = self.transport
        tail = transport.stderr_tail() if transport is not None else ""
        return f"it exited with status {code}" + (f"; stderr: {tail}" if tail else "")

    # -- the steps of ensure, with the lock held -------------------------------------------
    def _respec(self, current: Container, spec: ContainerSpec) -> str:
        """Apply a new memory/cpus in place if possible, else replace the container."""
        if current.cells == 0:
            self.drop()  # nothing to lose yet: no notice
            return ""
        if current.spec.runtime == spec.runtime and containers.update_limits(
                self.engine.client().api, current, spec):
            return ""
        was = current.spec
        self.drop()
        return (f"sandbox: started a new container ({spec.describe()}; was {was.describe()}): "
                "variables and files from earlier sandbox cells are gone.")

    def _create(self, spec: ContainerSpec, settings: ContainerSettings) -> None:
        client = self.engine.client()
        kwargs = settings.create_kwargs(spec)
        name = containers.new_name("sandbox")
        folder = containers.channel_folder(name, self.channel_ok(spec.runtime))
        kwargs.update(name=name, labels=owner_labels(self.kernel_id, spec.runtime, folder))
        made = containers.create(client, kwargs, spec, folder)
        self.container = made
        containers.watch(client, made, functools.partial(self._on_die, made))

    def _claim_spare(self, spec: ContainerSpec, settings: ContainerSettings,
                     head: HeadStart | None) -> bool:
        """Take over a spare container made for this spec (agent already running); False
        when there is none to take.

        The head start ``head`` is waited for first, when it works for the same create
        arguments: its spare is nearly ready and a new container would take longer.
        """
        client = self.engine.client()
        kwargs = settings.create_kwargs(spec)
        key = spares.spec_key(kwargs)
        if head is not None:
            head.wait(key, timeout=min(settings.start_timeout, 30.0))
        me, started = os.getpid(), process_start(os.getpid()) or ""
        for found in spares.candidates(client, key):
            folder = spares.folder_of(found)
            if not folder.is_dir() or not spares.try_claim(folder, me, started):
                continue
            # Same key, so the spare was created with these very arguments.
            claimed = Container(found.id, spec, int(kwargs["pids_limit"]), folder=folder)
            self.container = claimed
            containers.watch(client, claimed, functools.partial(self._on_die, claimed))
            try:
                self._start_agent(settings, exec_id=read_exec_id(folder), timeout=3.0)
            except Exception:
                log.info("spare container %s did not answer; trying another", found.id[:12],
                         exc_info=True)
                self.drop()
                continue
            log.info("claimed spare sandbox container %s", found.id[:12])
            return True
        return False

    def _kill_leftovers(self, spec: ContainerSpec, settings: ContainerSettings) -> None:
        """An agent restart in the same container: kill every process the lost agent's cells
        left there first (see DockerExecTransport.kill_guests). A container that does not
        let them be killed is replaced."""
        transport = self.transport
        if transport is None or self.container is None:
            return  # a new container (or a claimed spare): no earlier agent to outlive
        if not transport.kill_guests():
            log.warning("could not kill what the lost agent left running; new container")
            self.drop()
            self._create(spec, settings)

    def _start_agent(self, settings: ContainerSettings, exec_id: str | None = None,
                     timeout: float | None = None) -> None:
        container = self.container
        assert container is not None
        wait = settings.start_timeout if timeout is None else timeout
        transport = containers.agent_transport(
            self.engine.client(), container, settings.user, wait, exec_id,
            lambda code: self.exit_detail(container, code))
        self.transport = transport
        self.session = self._open_agent(transport, container, wait)

    def _on_die(self, container: Container) -> None:
        """The engine says ``container`` stopped: a dead container may leave its exec stream
        hanging (runsc), so the agent's transport is ended."""
        transport = self.transport
        if transport is not None and transport.container_id == container.id:
            transport.close()
