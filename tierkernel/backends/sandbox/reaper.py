"""Removing sandbox containers nobody will use: those of dead kernels, and stale spares.

A kernel removes its own container when it shuts down, restarts or exits, but one killed with
SIGKILL cannot. Containers carry their owner in their labels (``labels.py``), so every
starting kernel (and then each live one every minute, and ``tierkernel spares --keep``) finds
those whose owner is gone and removes them, with their host folders. The tests and
``tierkernel spares`` use :func:`kernel_containers` and :func:`remove_spares`.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from tierkernel.backends.sandbox import spares
from tierkernel.backends.sandbox.container import force_remove
from tierkernel.backends.sandbox.labels import (
    LABEL_KERNEL,
    LABEL_OWNER_HOST,
    LABEL_OWNER_PID,
    LABEL_OWNER_START,
    LABEL_OWNER_UID,
    owner_alive,
)

log = logging.getLogger(__name__)


def reap_orphans(client: Any) -> list[str]:
    """Remove sandbox containers of this host whose owning kernel process is gone, and spares
    that no kernel will claim (see :func:`spares.stale`); return the ids removed."""
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
            if labels.get(LABEL_OWNER_UID) != str(os.getuid()):
                continue  # another user's spare: its folder is not ours to read
            if not spares.stale(container, owner_alive):
                continue
            pid = -1
        else:
            try:
                pid = int(labels.get(LABEL_OWNER_PID, ""))
            except ValueError:
                pid = -1
            if pid > 0 and owner_alive(pid, labels.get(LABEL_OWNER_START, "")):
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
        if labels.get(LABEL_OWNER_UID) != str(os.getuid()):
            continue
        if spares.claimer(spares.folder_of(container)) is not None:
            continue
        if _remove(client, container):
            removed.append(container.id)
    return removed


def _remove(client: Any, container: Any) -> bool:
    """Remove a container the engine listed, and its folder if it is one of ours."""
    folder = spares.folder_of(container)
    failed = force_remove(client.api, container.id, folder if folder.is_dir() else None)
    if failed:
        log.debug("removing %s failed: %s", container.id[:12], failed)
    return not failed
