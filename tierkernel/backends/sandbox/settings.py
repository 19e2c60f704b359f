"""What a sandbox container is created with: the tier's settings and a cell's options turned
into the engine's create arguments (mounts, tmpfs, capabilities, security options, limits),
and the environment and command of the agent inside it.

The hardening is fixed here, not settable: no network, a read-only root with tmpfs ``/tmp``,
``/workspace`` and ``/notebook``, every capability dropped, no-new-privileges, a non-root user,
docker-init as PID 1. What is settable (``c.SandboxBackend.*``) arrives as one
:class:`ContainerSettings`; what a cell may change (``--runtime``, ``--memory``, ``--cpus``)
as its :class:`ContainerSpec`. The same arguments make the kernel's own container and the
spares it makes for the next kernels, so that a spare's key (a hash of them) matches exactly
the kernels that would have created the same container.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tierkernel.backends.agent.notebook_folder import GUEST_PATH as NOTEBOOK
from tierkernel.backends.sandbox.channel import GUEST_DIR, SOCKET_NAME, WAKE_NAME, wake_usable
from tierkernel.backends.sandbox.workspace import GUEST_PATH as WORKSPACE
from tierkernel.backends.sandbox.workspace import Room
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
from tierkernel.sizes import format_size

#: Memory left to the interpreter when the container's /workspace is sized by its memory
#: limit (the agent with numpy takes 16-32 MiB; /tmp's files count too).
INTERPRETER_MEMORY = 96 * 2**20

#: The agent's environment in every sandbox container.
ENVIRONMENT = {
    "HOME": "/tmp",
    "MPLCONFIGDIR": "/tmp/matplotlib",  # must be writable: the root is read-only
    MPL_SEED_ENV: "/opt/tierkernel/mplconfig",  # the image's prebuilt font cache
    "PYTHONDONTWRITEBYTECODE": "1",
    "LANG": "C.UTF-8",
    # The agent reports at each cell's end whether /workspace changed (it is copied back then)
    # and how many processes the container holds (a fork bomb left running, under gVisor).
    WATCH_ENV: WORKSPACE,
    COUNT_PROCS_ENV: "1",
}


def agent_command() -> list[str]:
    """How the agent is started in a container: its source is handed to ``python3 -c`` at
    every start instead of living in the image, so the agent in the container is always the
    kernel's own, and editing it never means rebuilding the image. No shell around it: under
    gVisor every process start costs 10-20 ms (the matplotlib font cache is copied by the
    agent itself, when needed)."""
    return ["python3", "-c", agent_program()]


def agent_environment(runtime: str, wait: float) -> dict[str, str]:
    """The environment of an agent that connects to its host socket (the direct channel),
    waiting for it up to ``wait`` s: woken through the FIFO where it may sleep on one, else
    looking for the socket every 25 ms."""
    environment = {**ENVIRONMENT, SOCKET_ENV: f"{GUEST_DIR}/{SOCKET_NAME}",
                   WAIT_ENV: f"{wait:g}"}
    if wake_usable(runtime):
        environment[WAKE_ENV] = f"{GUEST_DIR}/{WAKE_NAME}"
    else:
        environment[POLL_ENV] = "0.025"  # gVisor's file lookups cost: look less often
    return environment


@dataclass(frozen=True)
class ContainerSpec:
    """What a container is created with that a cell may ask to change."""

    runtime: str
    memory: int
    cpus: float

    def describe(self) -> str:
        """``runtime runc, memory 512m, cpus 1`` for messages."""
        return f"runtime {self.runtime}, memory {format_size(self.memory)}, cpus {self.cpus:g}"


@dataclass(frozen=True)
class ContainerSettings:
    """The tier's settings that shape its containers and their agents, as the backend's
    traits hold them when a container is made (``SandboxBackend.container_settings``)."""

    #: The image reference (the configured one, or the one ``tierkernel image build`` makes).
    image: str
    #: ``uid:gid`` the agent and the cells run as.
    user: str
    #: Size of /tmp (a tmpfs size, ``256m``) and the most /workspace may hold, in bytes.
    tmpfs_size: str
    workspace_size: int
    #: The pids cgroup limit under runc and under runsc, and ``ulimit nproc`` under runsc.
    pids_limit: int
    runsc_pids_limit: int
    runsc_nproc: int
    #: The tmpfs options of /notebook (sized by the notebook folder's caps).
    notebook_tmpfs: str
    #: Seconds the agent may take to start; seconds a spare waits for a kernel.
    start_timeout: float
    spare_ttl: float

    def create_kwargs(self, spec: ContainerSpec) -> dict[str, Any]:
        """The engine's create arguments for a container with ``spec``, but its name, labels
        and mounts (the same for this kernel's own container and for the spares it makes).
        The caller checks first that the engine has ``spec.runtime``."""
        # Imported here, not at the top: the Docker SDK takes a while to import, and a kernel
        # that never runs a sandbox cell need not wait for it.
        from docker.types import Ulimit

        runsc = spec.runtime == "runsc"
        tmpfs_opts = f"rw,nosuid,nodev,size={self.tmpfs_size},mode=1777"
        workspace_opts = f"rw,nosuid,nodev,size={self.workspace_size},mode=1777"
        kwargs: dict[str, Any] = {
            "image": self.image,
            "command": ["sleep", "infinity"],
            "hostname": "sandbox",
            "network_mode": "none",
            "read_only": True,
            "tmpfs": {"/tmp": tmpfs_opts, WORKSPACE: workspace_opts,
                      NOTEBOOK: self.notebook_tmpfs},
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "user": self.user,
            "working_dir": WORKSPACE,
            "environment": ENVIRONMENT,
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

    def room(self, spec: ContainerSpec) -> Room:
        """What a container's /workspace can hold: its tmpfs size, or less when the memory
        limit is lower (tmpfs pages are memory), leaving the interpreter its share."""
        by_memory = spec.memory - INTERPRETER_MEMORY
        if by_memory < self.workspace_size:
            return Room(max(by_memory, 0), "its files are kept in memory, within the "
                        f"container's memory limit of {format_size(spec.memory)}: raise it "
                        "with --memory or c.SandboxBackend.memory")
        return Room(self.workspace_size, "its size: raise it with "
                    "c.SandboxBackend.workspace_size (and --memory with it)")
