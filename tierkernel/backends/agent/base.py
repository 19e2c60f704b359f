"""The base of the agent tiers: process, wasm and sandbox run their cells in tierkernel's guest
agent (``tierkernel/guest/agent.py``), driven from the kernel by an :class:`AgentSession`.

:class:`AgentBackend` holds what each of them has: how long a cell may take to honour an
interrupt, how much output it may produce, how long the agent may take to start, the channel's
limits (:class:`ChannelLimits`), completion and inspection by the agent (:class:`AgentQueries`),
the hints a limit's error gives, and the making of the session with all of these.
:class:`WorkspaceCopyBackend` adds, for the tiers whose agent works in a copy of the workspace
(process, sandbox), the copy of a cell's changes back into fsx.

Each trait is ``c.<TierBackend>.<name>`` (``c.SandboxBackend.start_timeout``), as traitlets
hands a base class's traits down; ``c.AgentBackend.<name>`` sets it for every agent tier.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from traitlets import Float, Int

import tierkernel.guest
from tierkernel.backends.agent.queries import AgentQueries
from tierkernel.backends.agent.session import AgentSession, AgentTransport, ChannelLimits
from tierkernel.backends.base import Backend, ExecError, ExecResult, OutputSink
from tierkernel.backends.js_cells import LANGUAGES_NOTE, runs_js
from tierkernel.errors import CopyBudgetError, CopyStopped, FsxQuotaError, WorkspaceCopyError
from tierkernel.fsx import sync
from tierkernel.sizes import ByteSize

log = logging.getLogger(__name__)

#: The guest agent's source: run as a file by the process tier, handed to ``python3 -c`` in
#: a sandbox container, mounted read-only in the wasm guest (with its package).
AGENT_PATH = Path(tierkernel.guest.__file__).resolve().parent / "agent.py"


class AgentBackend(AgentQueries, ChannelLimits, Backend):
    """A tier whose cells run in the guest agent (see the module docstring).

    Its agent takes and sends variables (``CellRequest.inputs``, ``outputs``).

    A subclass starts its agent over some :class:`AgentTransport` and wraps it with
    :meth:`open_session`; it provides ``_query_session`` (its live session, for completion
    and inspection) and the contract methods of :class:`Backend`.
    """

    moves_values = True

    interrupt_grace = Float(
        3.0, help="Seconds a cell may take to honour an interrupt before its interpreter is "
        "killed (its variables are then lost)."
    ).tag(config=True)
    output_limit = ByteSize(
        16 * 1024 * 1024, help="Output one cell may produce before it is stopped (16m, or bytes)."
    ).tag(config=True)
    start_timeout = Float(
        30.0, help="Seconds to wait for the tier's interpreter (the guest agent) to start."
    ).tag(config=True)

    def setting(self, trait: str) -> str:
        """Where ``trait`` is set for this tier, for messages: ``c.ProcessBackend.timeout``."""
        return f"c.{type(self).__name__}.{trait}"

    def raise_hint(self, option: str, value: str = "SECONDS", trait: str = "") -> str:
        """How the user raises the limit of magic-line option ``option`` (the trait of that
        name, unless ``trait`` names another), for the error that limit gives: "raise it with
        '%%tier process --timeout SECONDS' or c.ProcessBackend.timeout"."""
        return (f"raise it with '%%tier {self.name} --{option} {value}' or "
                f"{self.setting(trait or option)}")

    def open_session(self, transport: AgentTransport) -> AgentSession:
        """A session on the agent behind ``transport`` with this tier's limits: its grace,
        its output and channel limits, and the hint a cell's time limit gives. Called by the
        subclass each time it starts an agent; the caller then waits for the agent
        (``wait_ready``)."""
        return AgentSession(transport, tier=self.name, grace=self.interrupt_grace,
                            output_limit=self.output_limit,
                            limit_hint=self.raise_hint("timeout"),
                            **self.channel_limits(self.output_limit))

    def limit_notes(self) -> list[str]:
        """The tier's own limits for the ``%tier`` table (``pids=256``), shown between the
        magic-line options' defaults and the output limit; none by default."""
        return []

    def _fail(self, sink: OutputSink, started: float, ename: str, evalue: str) -> ExecResult:
        """End a cell, before its interpreter ran it, with ``ename: evalue`` (the tier's own
        error: a usage error, a session that could not start)."""
        error = ExecError(ename, evalue, [f"{ename}: {evalue}"])
        sink.error(error.ename, error.evalue, error.traceback)
        return ExecResult(False, self.name, time.perf_counter() - started, error=error)

    def describe_limits(self) -> str:
        """The options' defaults, the tier's own limits, the languages its cells may be in
        (a tier that takes ``--lang``) and the output cap, for ``%tier``."""
        languages = [LANGUAGES_NOTE] if runs_js(self) else []
        return ", ".join([super().describe_limits(), *self.limit_notes(), *languages,
                          f"output={self.output_limit / 2**20:g}MiB"])


#: Applies a copy back (``after_cell`` of the tier's workspace copy): given the budget and the
#: function that says why to stop (None: go on); returns what was applied (None: nothing
#: changed). Raises CopyBudgetError or CopyStopped when it applied nothing.
ApplyCopy = Callable[[sync.Budget, Callable[[], str | None]], sync.Applied | None]


class WorkspaceCopyBackend(AgentBackend):
    """An agent tier whose agent works in a copy of the fsx workspace (the process tier's
    workspace folder, the sandbox's ``/workspace``): after a cell that changed it, the
    changes are copied back into fsx within the limits below and the cell's time, and the
    stop button ends that copy too."""

    copy_back_bytes = ByteSize(
        1536 * 2**20, help="Most bytes (tar archive) one copy back into the workspace (of the "
        "sandbox's /workspace, or of the process tier's workspace folder) may bring; over it "
        "the cell fails and nothing is copied."
    ).tag(config=True)
    copy_back_files = Int(
        150_000, help="Most files, folders and links one copy back into the workspace may "
        "bring; over it the cell fails and nothing is copied."
    ).tag(config=True)
    copy_back_seconds = Float(
        300.0, help="Most seconds one copy back into the workspace may take (it also ends "
        "with the cell's --timeout and the stop button)."
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: Set by the stop button: ends a copy back in progress.
        self._copy_stopped = threading.Event()

    def stop_copy(self) -> None:
        """End a copy back in progress (called by ``interrupt``, from any thread)."""
        self._copy_stopped.set()

    def copy_back(self, apply: ApplyCopy, sink: OutputSink, started: float,
                  timeout: float | None, *, source: str, kept: str,
                  version: str) -> ExecError | None:
        """Copy a cell's changes back into fsx with ``apply`` (blocking), within the copy
        budget and the cell's time: until its time limit (counted from ``started``), and at
        least ``interrupt_grace`` seconds from now, so that what a cell stopped at its limit
        wrote still arrives. Over the budget or stopped, nothing is copied and the error for
        the cell is returned; any other failure is told on the cell's stderr and never costs
        the cell its result.

        The words name the copy for the user: ``source`` what is copied ("/workspace"),
        ``kept`` where the files stay when nothing was copied, ``version`` whose version of a
        file that changed on both sides is kept beside it ("container's").
        """
        self._copy_stopped.clear()
        ends = (None if not timeout else
                max(started + timeout, time.monotonic()) + self.interrupt_grace)

        def stop() -> str | None:
            if self._copy_stopped.is_set():
                return "the cell was interrupted"
            if ends is not None and time.monotonic() > ends:
                return (f"the cell ran longer than its {timeout:g} s limit "
                        f"({self.raise_hint('timeout')})")
            return None

        budget = sync.Budget(self.copy_back_bytes, self.copy_back_files,
                             self.copy_back_seconds,
                             (self.setting("copy_back_bytes"), self.setting("copy_back_files"),
                              self.setting("copy_back_seconds")))
        try:
            applied = apply(budget, stop)
        except (CopyBudgetError, CopyStopped) as exc:
            log.info("a copy of %s back into fsx ended: %s", source, exc)
            ename = (WorkspaceCopyError.__name__ if isinstance(exc, CopyBudgetError)
                     else "TimeoutError" if "limit" in str(exc) else "KeyboardInterrupt")
            evalue = (f"{exc.strerror}. Nothing of it was copied into the workspace: {kept}.")
            return ExecError(ename, evalue, [f"{ename}: {evalue}"])
        except Exception as exc:
            # A workspace quota is the user's limit, told below, not a fault to log with a
            # traceback (the kernel's log reaches the cell's stderr too).
            quota = isinstance(exc, FsxQuotaError)
            log.log(logging.INFO if quota else logging.WARNING,
                    "copying %s back into fsx failed", source, exc_info=not quota)
            sink.stream("stderr", f"tierkernel: the cell's changes in {source} could not be "
                                  f"copied into the workspace: {exc}\n")
            return None
        if applied is not None and applied.conflicts:
            sink.stream("stderr", "tierkernel: changed in the workspace meanwhile, so the "
                        f"{version} version was saved beside it as NAME.sandbox-conflict: "
                        + ", ".join(applied.conflicts) + "\n")
        if applied is not None and applied.skipped:
            sink.stream("stderr", "tierkernel: not copied into the workspace (a folder on "
                        "the host): " + "; ".join(f"{rel}: {why}" for rel, why in
                                                 applied.skipped) + "\n")
        return None
