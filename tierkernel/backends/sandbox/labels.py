"""The labels on every tierkernel container, and what they say about its owner.

A container carries the id of the kernel that made it, that kernel's process (pid, start time,
host, user), its runtime and its channel folder. They outlive the kernel: a kernel killed with
SIGKILL cannot remove its container, so the next one finds it by these labels and, once
:func:`owner_alive` says the owner is gone, removes it (``reaper.py``).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

#: Every tierkernel container; its value is the kernel's id.
LABEL_KERNEL = "org.tierkernel.kernel"
#: The pid of the kernel process that owns a container (for orphan reaping).
LABEL_OWNER_PID = "org.tierkernel.owner-pid"
#: When that process started (clock ticks since boot): a pid alone may be reused.
LABEL_OWNER_START = "org.tierkernel.owner-start"
#: The host that owner pid belongs to (pids mean nothing on another host).
LABEL_OWNER_HOST = "org.tierkernel.owner-host"
#: The uid of the kernel that created the container (folders are per user).
LABEL_OWNER_UID = "org.tierkernel.owner-uid"
#: The container's runtime (runc, runsc).
LABEL_RUNTIME = "org.tierkernel.runtime"
#: On every container with a direct channel: its host folder (see channel.py).
LABEL_FOLDER = "org.tierkernel.folder"


def owner_labels(kernel_id: str, runtime: str, folder: Path | None) -> dict[str, str]:
    """The labels of a container this process creates now, for kernel ``kernel_id``."""
    labels = {
        LABEL_KERNEL: kernel_id,
        LABEL_OWNER_PID: str(os.getpid()),
        LABEL_OWNER_START: process_start(os.getpid()) or "",
        LABEL_OWNER_HOST: socket.gethostname(),
        LABEL_OWNER_UID: str(os.getuid()),
        LABEL_RUNTIME: runtime,
    }
    if folder is not None:
        labels[LABEL_FOLDER] = str(folder)
    return labels


def owner_alive(pid: int, started: str) -> bool:
    """Whether process ``pid`` of this host lives and is the one that started at ``started``
    (clock ticks since boot; "" when unknown, then any process with that pid counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start(pid)
    return not started or now is None or now == started


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
