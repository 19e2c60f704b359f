"""What the kernel holds of the runtime: the config, the broker, the audit log, the current cell.

``TierKernel`` calls :meth:`RuntimeHost.begin` when a cell starts and :meth:`RuntimeHost.finish`
when it ends (or :meth:`RuntimeHost.refuse` when it never runs), whatever its tier, and
:meth:`RuntimeHost.commit_records` before the cell's reply goes out. Native
cells reach the broker through :meth:`RuntimeHost.native_call`; other tiers get the cell's
:class:`CallContext` from :attr:`RuntimeHost.current` and forward their guests' requests to
``host.broker.handle`` (or ``handle_json``) with it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from tierkernel.errors import CellTooLargeError, FsxConfigError
from tierkernel.fsx import current
from tierkernel.guest.helpers import make_helpers
from tierkernel.results import ExecResult
from tierkernel.runtime.audit import AuditLog
from tierkernel.runtime.broker import Broker, CallContext, note_dropped
from tierkernel.runtime.policy import Runtime


class RuntimeHost:
    """The kernel's runtime: one per kernel process."""

    def __init__(self, parent: Any, session_id: str, native_tier: str = "native") -> None:
        self.config = Runtime(parent=parent)
        self.session_id = session_id
        self.audit = AuditLog(self.config.audit_log)
        self.broker = Broker(self.config, self.audit, workspace=file_workspace)
        self.native_tier = native_tier
        #: The cell running now (set between begin and finish), None between cells.
        self.current: CallContext | None = None
        self._current_trusted = False

    # -- the cell's lifecycle ---------------------------------------------------------------
    def check_size(self, code: str) -> None:
        """Raise :class:`CellTooLargeError` for a cell over the configured size."""
        limit = self.config.code_size_limit
        size = len(code.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise CellTooLargeError(
                f"this cell is {size / 1024:.1f} KB, over the {limit / 1024:g} KB limit; it was "
                "not run. Split it into smaller cells, load large data from a file or db(), or "
                "raise c.Runtime.code_size_limit"
            )

    def begin(self, code: str, tier: str, trusted: bool, options: Mapping[str, Any],
              cell_id: str | None, execution_count: int | None) -> CallContext:
        """Record a starting cell; return the context its helper calls run under."""
        context = CallContext(new_id(), self.config.policy_for(tier, trusted, options))
        self.audit.start(context.execution_id or "", self.session_id, cell_id,
                         execution_count, tier, code, time.time())
        self.current, self._current_trusted = context, trusted
        return context

    def finish(self, context: CallContext, result: ExecResult, duration: float) -> None:
        """Record how a cell ended; its console entries join ``result.logs``."""
        if self.current is context:
            self.current = None
        note_dropped(context)
        result.logs.extend(context.logs)
        error, usage = result.error, result.usage
        self.audit.finish(
            context.execution_id or "",
            "ok" if result.success else "error",
            round(duration * 1000, 3),
            f"{error.ename}: {error.evalue}" if error is not None and not result.success
            else None,
            [asdict(entry) for entry in result.logs],
            usage=None if usage is None else (usage.cpu_seconds, usage.peak_memory_bytes,
                                               usage.processes),
            # A cell of the kernel's own IPython: committed in the pause ipykernel takes
            # before such a cell's reply (see commit_records).
            defer=context.policy.trusted,
        )

    def refuse(self, code: str, tier: str, cell_id: str | None, execution_count: int | None,
               exc: Exception, duration: float) -> str:
        """Record a cell that was refused before running (bad %%tier line, too large)."""
        execution_id = new_id()
        self.audit.start(execution_id, self.session_id, cell_id, execution_count, tier, code,
                         time.time() - duration)
        self.audit.finish(execution_id, "refused", round(duration * 1000, 3),
                          f"{type(exc).__name__}: {exc}", [])
        return execution_id

    # -- the native tier --------------------------------------------------------------------
    def native_call(self, request: dict[str, Any]) -> dict[str, Any]:
        """The ``call`` of the native tier's helpers: the broker, in process.

        The request and response make the same JSON round trip as in any other tier, so
        values (tuples become lists, ...) and errors are exactly what a sandbox would see. A
        call from a thread a native cell left running after it ended gets the native tier's
        default policy and no execution id.
        """
        context = self.current if self._current_trusted else None
        if context is None:
            context = CallContext(None, self.config.policy_for(self.native_tier, True, {}))
        answer: dict[str, Any] = json.loads(
            self.broker.handle_json(json.dumps(request), context))
        return answer

    def native_helpers(self) -> dict[str, Any]:
        """``ai``, ``api``, ``db`` and ``console`` for the kernel's own namespace."""
        return make_helpers(self.native_call)

    def commit_records(self) -> None:
        """Commit the audit records of the cells that ended so far. Called by the kernel
        before it sends a cell's reply: in ipykernel's pause before a native cell's reply,
        and again (a no-op by then) when it adds the reply's metadata."""
        self.audit.commit_ended()

    def close(self) -> None:
        """Release the HTTP client, the database and the audit log (kernel shutdown)."""
        self.broker.close()
        self.audit.close()


def file_workspace() -> Path | None:
    """The folder of this process's fsx workspace when it is a ``file://`` one (a host folder
    cells of every tier write to), else None."""
    try:
        url = current().url
    except FsxConfigError:
        return None
    parts = urlsplit(url)
    if parts.scheme.lower() != "file" or not parts.path:
        return None
    return Path(unquote(parts.path))


def new_id() -> str:
    """A new execution id: 16 hex digits (64 random bits)."""
    return os.urandom(8).hex()
