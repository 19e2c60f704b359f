"""Which tiers the kernels of one set-up used, so that later kernels warm only those.

A warm start costs: the sandbox tier's head start and warm start make a container as the
kernel starts (half a second of the container engine's CPU), the wasm tier opens a session in
the kernel's process, the process tier starts an agent. On a two-core laptop that work slows
the start of every kernel, and a notebook that never leaves the native tier gains nothing from
it. So each kernel records, for its set-up (its command line without the connection file, its
working folder, and the environment variables that choose its config folders), that it started
and which tiers ran a cell; a tier whose warm start is on skips it when the last
``Backend.warm_start_unused`` kernels of the set-up ran no cell in it. The next cell routed
there starts the tier as a cold cell would, and marks it used, so the kernel after that warms
it again. A set-up seen for the first time warms as configured.

The record is a JSON file in the user's cache folder (``cache_files.py``); a lost or damaged
record only means a warm start more or less, never a wrong result.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tierkernel.backends.cache_files import (
    CONFIG_ENV,
    folder,
    read_json,
    without_connection_file,
    write_json,
)

log = logging.getLogger(__name__)

#: Set-ups remembered (the most recently started first).
_KEPT = 32
#: Tier names kept per set-up, and their longest name: the file is read by every kernel start.
_TIERS = 32
_NAME = 64


def path() -> Any:
    """The record: ``$XDG_CACHE_HOME/tierkernel/tier-use.json`` (``~/.cache``)."""
    return folder() / "tier-use.json"


class TierUse:
    """The record of one set-up as this kernel found it when it started."""

    def __init__(self, argv: list[str], cwd: str) -> None:
        self.setup: list[Any] = [without_connection_file(argv), cwd,
                                 [os.environ.get(name) for name in CONFIG_ENV]]
        entry = _find(_entries(), self.setup) or {}
        #: Kernels of this set-up started before this one.
        self.kernels: int = entry.get("kernels", 0)
        #: For each tier, the number of the last kernel that ran a cell in it (1-based).
        self.used_at: dict[str, int] = entry.get("used", {})
        #: This kernel's number, once :meth:`kernel_started` counted it.
        self.serial: int | None = None
        self._marked: set[str] = set()

    def unused_for(self, tier: str) -> int:
        """How many of the kernels started before this one in a row ran no cell in ``tier``."""
        return max(0, self.kernels - self.used_at.get(tier, 0))

    def wants_warm(self, tier: str, unused_limit: int) -> bool:
        """Whether ``tier`` should warm start: always with a limit of 0, else unless the last
        ``unused_limit`` kernels of this set-up ran no cell in it."""
        return unused_limit <= 0 or self.unused_for(tier) < unused_limit

    def kernel_started(self) -> None:
        """Count this kernel in the record (once). Never raises."""
        if self.serial is not None:
            return
        self.serial = self.kernels + 1

        def count(entry: dict[str, Any]) -> None:
            entry["kernels"] = max(entry.get("kernels", 0), 0) + 1
            self.serial = entry["kernels"]

        self._update(count)

    def used(self, tier: str) -> None:
        """Record that this kernel ran a cell in ``tier`` (written once per tier). Never
        raises."""
        if tier in self._marked:
            return
        self._marked.add(tier)
        serial = self.serial or self.kernels + 1

        def mark(entry: dict[str, Any]) -> None:
            used = entry.setdefault("used", {})
            used[tier] = max(used.get(tier, 0), serial)

        self._update(mark)

    def _update(self, change: Any) -> None:
        """Apply ``change`` to this set-up's entry as the file holds it now (another kernel may
        have written since this one read it) and write the file back."""
        try:
            entries = _entries()
            entry = _find(entries, self.setup) or {"setup": self.setup, "kernels": 0, "used": {}}
            change(entry)
            rest = [e for e in entries if e.get("setup") != self.setup]
            write_json(path(), [entry, *rest][:_KEPT])
        except Exception as exc:
            log.debug("could not record the tiers used: %s", exc)


def _entries() -> list[dict[str, Any]]:
    """The record's entries, each checked to hold only what this module writes."""
    entries = read_json(path())
    if not isinstance(entries, list):
        return []
    return [entry for entry in entries[:_KEPT] if _valid(entry)]


def _valid(entry: Any) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("setup"), list):
        return False
    kernels, used = entry.get("kernels"), entry.get("used")
    return (type(kernels) is int and kernels >= 0 and isinstance(used, dict)
            and len(used) <= _TIERS
            and all(isinstance(name, str) and len(name) <= _NAME and type(at) is int
                    and 0 <= at <= kernels for name, at in used.items()))


def _find(entries: list[dict[str, Any]], setup: list[Any]) -> dict[str, Any] | None:
    return next((entry for entry in entries if entry["setup"] == setup), None)
