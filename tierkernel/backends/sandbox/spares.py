"""Spare sandbox containers: started ahead, with their agent running, for the next kernel.

Creating a container and starting its interpreter takes 0.3-1 s; a kernel's first sandbox
cell should not wait for that. So once a kernel's own container is up it makes ``spares``
more with the default spec, each with its agent already running and waiting for a host socket
(``tierkernel.guest.agent.connect_host``). The next kernel of the same user on this host with
the same spec claims one instead of creating its own: the first cell then costs about what a
warm cell does.

- **Matching**: a spare carries ``LABEL_SPARE=<key>``, the hash of everything it was created
  with and of the agent's source (:func:`spec_key`): a kernel only claims an exact match.
- **Claiming** is an exclusive create of the file ``claim`` in the spare's host folder
  (``O_CREAT|O_EXCL``): of two kernels racing for one spare exactly one wins. The file holds the
  claimer's pid and start time, so the claimer is the owner from then on; the labels still name
  the creator (they cannot be changed).
- **Expiry**: an unclaimed spare's agent stops its container after ``spare_ttl`` seconds, and
  the container removes itself (auto-remove). A starting kernel also removes spares that are
  past their time, claimed spares whose claimer is dead, and spares whose folder is gone.
- ``tierkernel sandbox spares [--remove]`` lists or removes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from tierkernel.backends.sandbox.channel import base_dir
from tierkernel.backends.sandbox.engine import LABEL_OWNER_HOST

log = logging.getLogger(__name__)

#: On a spare: the key of the spec it was made with (see spec_key).
LABEL_SPARE = "org.tierkernel.spare"
#: On a spare: the unix time after which nobody should claim it.
LABEL_EXPIRES = "org.tierkernel.spare-expires"
#: On every container with a direct channel: its host folder (sandbox_channel).
LABEL_FOLDER = "org.tierkernel.folder"
#: The uid of the kernel that created the container (folders are per user).
LABEL_OWNER_UID = "org.tierkernel.owner-uid"
CLAIM_NAME = "claim"


def spec_key(create_kwargs: dict[str, Any], agent_source: str) -> str:
    """A hash of what a container is created with (but its name and labels) and of the agent
    it runs: two kernels whose keys are equal would create the same container."""
    relevant = {k: v for k, v in create_kwargs.items()
                if k not in ("name", "labels", "volumes", "auto_remove")}
    text = json.dumps(relevant, sort_keys=True, default=repr) + agent_source
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def try_claim(folder: Path, pid: int, started: str) -> bool:
    """Claim the spare whose folder is ``folder``; False when another kernel has it."""
    try:
        fd = os.open(folder / CLAIM_NAME, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return False
    except OSError:
        log.debug("cannot claim the spare in %s", folder, exc_info=True)
        return False
    with os.fdopen(fd, "w") as out:
        out.write(f"{pid} {started}\n")
    return True


def claimer(folder: Path) -> tuple[int, str] | None:
    """The pid and start time of the kernel that claimed the spare in ``folder``, or None."""
    try:
        pid, _, started = (folder / CLAIM_NAME).read_text().strip().partition(" ")
        return int(pid), started
    except (OSError, ValueError):
        return None


def candidates(client: Any, key: str, fresh_for: float = 5.0) -> list[Any]:
    """Running spares of this user on this host made with spec ``key``, oldest first, with
    more than ``fresh_for`` s left before they expire."""
    try:
        found = client.containers.list(ignore_removed=True, filters={
            "status": "running",
            "label": [f"{LABEL_SPARE}={key}", f"{LABEL_OWNER_HOST}={socket.gethostname()}",
                      f"{LABEL_OWNER_UID}={os.getuid()}"]})
    except Exception:
        log.debug("listing spare sandbox containers failed", exc_info=True)
        return []
    now = time.time()
    usable = [c for c in found if _expires(c) > now + fresh_for]  # not about to end
    return sorted(usable, key=lambda c: c.attrs.get("Created", ""))


def unclaimed(client: Any, key: str, fresh_for: float = 5.0) -> int:
    """How many spares with spec ``key`` are waiting for a kernel (with more than
    ``fresh_for`` s left)."""
    return sum(1 for c in candidates(client, key, fresh_for)
               if not (folder_of(c) / CLAIM_NAME).exists())


_NO_FOLDER = Path("/nonexistent/tierkernel-sandbox-folder")


def folder_of(container: Any) -> Path:
    """The host folder a container's labels name, if it is one of this user's container
    folders (a direct child of ``base_dir()``, not a link); a path that does not exist
    otherwise. A label is only trusted that far: the folder is claimed in and removed."""
    label = (container.labels or {}).get(LABEL_FOLDER, "")
    if not label:
        return _NO_FOLDER
    folder = Path(label)
    try:
        if folder.parent != base_dir() or folder.is_symlink():
            return _NO_FOLDER
    except OSError:
        return _NO_FOLDER
    return folder


def stale(container: Any, alive: Any) -> bool:
    """Whether a spare should be removed: past its time and unclaimed, claimed by a dead
    kernel, or without its folder. ``alive(pid, started)`` says whether a kernel lives."""
    folder = folder_of(container)
    if not folder.is_dir():
        return True
    owner = claimer(folder)
    if owner is not None:
        return not alive(*owner)
    return _expires(container) < time.time()


def list_spares(client: Any) -> list[Any]:
    """Every spare container on the engine (any user's, any spec), claimed or not."""
    with contextlib.suppress(Exception):
        # ignore_removed: the SDK inspects each listed container, and one may be gone by
        # then (a spare removing itself, a kernel reaping); without it the whole list fails.
        return list(client.containers.list(all=True, ignore_removed=True,
                                           filters={"label": LABEL_SPARE}))
    return []


def _expires(container: Any) -> float:
    try:
        return float((container.labels or {}).get(LABEL_EXPIRES, "0"))
    except ValueError:
        return 0.0
