"""What running a cell produces, as plain data: its result, its error, its log, what it used.

A leaf module (no tierkernel imports): the tiers build these (re-exported by
``tierkernel.backends.base``, the tier contract) and the runtime records them
(``tierkernel.runtime``), which sits below the tiers and so must not import them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

MimeBundle = dict[str, Any]


@dataclass(frozen=True)
class ExecError:
    """A failed cell, in the shape of a Jupyter ``error`` message."""

    ename: str
    evalue: str
    traceback: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LogEntry:
    """One entry of an execution's log (console helper calls, tier notices)."""

    level: str
    message: str
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ResourceUsage:
    """What one cell used, as measured on the host (never as the guest reports it).

    ``cpu_seconds``: CPU time spent running the cell. ``peak_memory_bytes``: the highest
    memory use while it ran. ``processes``: the most tasks (processes and threads) the cell's
    container held, where the host can count them. Each is None when this host cannot
    measure it; each tier's backend says what exactly it measures.
    """

    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    processes: int | None = None

    def as_metadata(self) -> dict[str, Any]:
        """The measured values, for the execute_reply's ``metadata.tierkernel``."""
        out: dict[str, Any] = {}
        if self.cpu_seconds is not None:
            out["cpu_seconds"] = round(self.cpu_seconds, 4)
        if self.peak_memory_bytes is not None:
            out["peak_memory_bytes"] = self.peak_memory_bytes
        if self.processes is not None:
            out["processes"] = self.processes
        return out


@dataclass
class ExecResult:
    """What a backend returns for one cell (the execution-layer spec's shape).

    ``output`` is the mime bundle of the cell's last expression, or ``None``. ``duration`` is in
    seconds. ``payload`` and ``user_expressions`` carry the IPython-only parts of an
    execute_reply; tiers that do not run IPython leave them empty. ``usage`` is what the cell
    used, measured on the host (None when the tier does not measure it).
    """

    success: bool
    tier: str
    duration: float
    output: MimeBundle | None = None
    error: ExecError | None = None
    logs: list[LogEntry] = field(default_factory=list)
    payload: list[dict[str, Any]] = field(default_factory=list)
    user_expressions: dict[str, Any] = field(default_factory=dict)
    usage: ResourceUsage | None = None
    #: The values blob of the request's ``outputs`` (still to be decoded, with limits: it comes
    #: from the tier), or why the tier could not send them.
    values: bytes | None = None
    values_error: str | None = None
    #: Whether the cell changed the workspace, where the tier can tell (an agent tier that
    #: watches its working folder); False where it cannot.
    workspace_changed: bool = False
    #: Runtime helper calls (ai, api, db, console) the cell made, where the tier counts them.
    helper_calls: int = 0
