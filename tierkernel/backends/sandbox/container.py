"""One sandbox container: what the tier knows of it, and the engine calls that make it, follow
it, start the agent in it and remove it.

Used for the kernel's own container (:mod:`tierkernel.backends.sandbox.lifecycle`) and for the
spares made for the next kernels (:mod:`tierkernel.backends.sandbox.spares`); every engine
error leaves here as an :class:`EngineError` that says what to do.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierkernel.backends.sandbox.channel import (
    MAIN_AGENT,
    Listener,
    mount,
    new_folder,
    remove_folder,
    wake,
    write_exec_id,
)
from tierkernel.backends.sandbox.engine import explain
from tierkernel.backends.sandbox.image import describe_missing
from tierkernel.backends.sandbox.settings import (
    ENVIRONMENT,
    ContainerSpec,
    agent_command,
    agent_environment,
)
from tierkernel.backends.sandbox.transport import DockerExecTransport, SocketTransport
from tierkernel.backends.sandbox.workspace import GUEST_PATH as WORKSPACE
from tierkernel.errors import ChannelError, EngineError

log = logging.getLogger(__name__)


@dataclass
class Container:
    """One sandbox container and what the tier has learnt about it from the engine's events."""

    id: str
    spec: ContainerSpec
    pids_limit: int
    #: The host folder of its direct channel (see channel.py); None: the exec stream.
    folder: Path | None = None
    cells: int = 0
    ooms: int = 0
    died: bool = False
    suspect: bool = False  # stop using it: recreate before the next cell
    events: Any = None
    oom_seen: threading.Event = field(default_factory=threading.Event)


def new_name(kind: str) -> str:
    """A fresh container name: ``tierkernel-<kind>-<12 hex digits>``."""
    return f"tierkernel-{kind}-{uuid.uuid4().hex[:12]}"


def channel_folder(name: str, usable: bool) -> Path | None:
    """A new host folder for container ``name``'s direct channel, or None when it cannot have
    one (not ``usable`` with this engine and runtime, or no folder could be made): then the
    agent talks over the exec stream."""
    if not usable:
        return None
    try:
        return new_folder(name)
    except OSError:
        log.warning("no host folder for the agent's socket; using the exec stream",
                    exc_info=True)
        return None


def create(client: Any, kwargs: dict[str, Any], spec: ContainerSpec,
           folder: Path | None) -> Container:
    """Create and start a container with ``kwargs`` (``ContainerSettings.create_kwargs`` plus
    its name and labels), mounting ``folder`` for the direct channel when given. On failure
    nothing is left behind (the folder included) and EngineError says why."""
    if folder is not None:
        kwargs["volumes"] = mount(folder)
    try:
        made = client.containers.create(**kwargs)
    except Exception as exc:
        remove_folder(folder)
        if "No such image" in str(exc) or type(exc).__name__ == "ImageNotFound":
            raise EngineError(describe_missing(str(kwargs["image"]))) from exc
        raise explain(exc, "creating the sandbox container") from exc
    container = Container(made.id, spec, int(kwargs["pids_limit"]), folder=folder)
    try:
        made.start()
    except Exception as exc:
        failed = force_remove(client.api, made.id, folder)
        if failed:
            log.warning("could not remove sandbox container %s: %s", made.id[:12], failed)
        raise explain(exc, f"starting the sandbox container ({spec.describe()})") from exc
    log.info("sandbox container %s started (%s)", made.id[:12], spec.describe())
    return container


def watch(client: Any, container: Container, on_die: Callable[[], None]) -> None:
    """Follow the engine's oom and die events of ``container`` in a thread: count its OOM
    kills, mark it dead and call ``on_die`` when it stops."""
    try:
        stream = client.api.events(
            filters={"container": container.id, "event": ["oom", "die"]}, decode=True)
    except Exception:
        log.debug("cannot follow the container's events", exc_info=True)
        return
    container.events = stream

    def follow() -> None:
        with contextlib.suppress(Exception):
            for event in stream:
                status = event.get("status") or event.get("Action")
                if status == "oom":
                    container.ooms += 1
                    container.oom_seen.set()
                elif status == "die":
                    container.died = True
                    on_die()
                    return

    threading.Thread(target=follow, daemon=True, name="sandbox-events").start()


def exec_agent(client: Any, container_id: str, runtime: str, user: str, wait: float) -> str:
    """Start the agent detached, to connect to its host socket within ``wait`` s; return
    the exec id."""
    exec_id: str = client.api.exec_create(
        container_id, agent_command(), user=user,
        environment=agent_environment(runtime, wait), workdir=WORKSPACE)["Id"]
    client.api.exec_start(exec_id, detach=True)
    return exec_id


def agent_transport(client: Any, container: Container, user: str, timeout: float,
                    exec_id: str | None, detail: Callable[[int | None], str]
                    ) -> DockerExecTransport:
    """The channel to an agent in ``container``, started now unless ``exec_id`` names one
    that waits already (a spare's): its direct channel when the container has a folder, else
    its exec stream. ``detail(code)`` says why the agent is gone; EngineError when it does
    not start within ``timeout`` s."""
    try:
        if container.folder is not None:
            return _connect(client, container, user, timeout, exec_id, detail)
        return DockerExecTransport(
            client.api, container.id, agent_command(), user=user, environment=ENVIRONMENT,
            workdir=WORKSPACE, runtime=container.spec.runtime, detail=detail)
    except ChannelError as exc:
        raise EngineError(f"the interpreter in the sandbox container did not start: "
                          f"{exc}") from exc
    except Exception as exc:
        raise explain(exc, "starting the interpreter in the sandbox container") from exc


def _connect(client: Any, container: Container, user: str, timeout: float,
             exec_id: str | None, detail: Callable[[int | None], str]) -> SocketTransport:
    """The agent's direct channel: listen on the container's socket, start the agent
    (unless ``exec_id`` names one already waiting, a spare's), accept its connection."""
    assert container.folder is not None
    listener = Listener(container.folder)
    try:
        if not exec_id:
            exec_id = exec_agent(client, container.id, container.spec.runtime, user,
                                 wait=timeout)
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
        return detail(int(info["ExitCode"]))

    conn = listener.accept(timeout, gone)
    return SocketTransport(client.api, container.id, agent, conn, user=user,
                           runtime=container.spec.runtime, detail=detail)


def update_limits(api: Any, container: Container, spec: ContainerSpec) -> bool:
    """Give a running container ``spec``'s memory and CPUs in place (same runtime); False
    when the engine refuses (the caller replaces the container then)."""
    try:
        api.update_container(
            container.id, mem_limit=spec.memory, memswap_limit=spec.memory,
            cpu_period=100_000, cpu_quota=int(spec.cpus * 100_000))
    except Exception:
        log.info("in-place update of %s failed; recreating", container.id[:12], exc_info=True)
        return False
    container.spec = spec
    return True


def close(api: Any, container: Container) -> None:
    """Stop following ``container``'s events and remove it with its folder. Never raises."""
    if container.events is not None:
        with contextlib.suppress(Exception):
            container.events.close()
    failed = force_remove(api, container.id, container.folder)
    if failed:
        log.warning("could not remove sandbox container %s: %s", container.id[:12], failed)


def force_remove(api: Any, container_id: str, folder: Path | None) -> str:
    """Remove a container (gone already counts) and then its host folder; "" when done, else
    the engine's reason. The folder stays while its container does: the reaper needs it."""
    try:
        api.remove_container(container_id, force=True)
    except Exception as exc:
        if "No such container" not in str(exc) and "already in progress" not in str(exc):
            return str(exc)
    remove_folder(folder)
    return ""
