"""The ``native`` tier: the kernel's own IPython, at ipykernel's speed, with no isolation.

Native cells go through IPython exactly as in a stock ipykernel (execution count, history,
display, ``?`` help, completion, async cells), so output is published by IPython's own display
machinery rather than through the sink. The one thing this tier adds is ``--timeout``.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time
from types import FrameType
from typing import Any, Protocol

from traitlets import Float

from tierkernel.backends.base import (
    Availability,
    Backend,
    CellRequest,
    ExecError,
    ExecResult,
    OutputSink,
)


class IPythonHost(Protocol):
    """The kernel side the native tier runs cells through (implemented by TierKernel)."""

    async def run_ipython_cell(self, request: CellRequest) -> dict[str, Any]:
        """Run ``request.code`` through IPython and return ipykernel's reply content."""
        ...


class CellTimeoutError(TimeoutError):
    """Raised inside a native cell that ran past its ``--timeout``."""


class _Watchdog:
    """Interrupts the main thread once ``seconds`` have passed, unless disarmed first.

    The interrupt is delivered as SIGINT (``_thread.interrupt_main``) because that is the only
    way to break out of a blocking call such as ``time.sleep`` in the main thread; the SIGINT
    handler installed for the cell then raises :class:`CellTimeoutError` instead of
    ``KeyboardInterrupt``.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.fired = False
        self.armed = True
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if not self.armed:
                return
            self.fired = True
            _thread.interrupt_main(signal.SIGINT)

    def disarm(self) -> None:
        with self._lock:
            self.armed = False
        self._timer.cancel()


class NativeBackend(Backend):
    """Runs cells in the kernel's own IPython. Always available."""

    isolation = "none: the kernel's own IPython process (trusted code only)"
    in_kernel = True
    #: --allow/--domains/--db-readonly set the runtime helpers' policy for the cell.
    accepted_options = frozenset({"timeout", "allow", "domains", "db-readonly"})

    timeout = Float(
        None,
        allow_none=True,
        help="Default wall-clock limit of a native cell in seconds (None: no limit, as in "
        "IPython). Overridden per cell with --timeout.",
    ).tag(config=True)

    #: Set by the kernel when it registers the tier.
    host: IPythonHost | None = None

    def availability(self) -> Availability:
        """Native cells can always run: they are plain IPython."""
        return Availability.yes()

    async def execute(self, request: CellRequest, sink: OutputSink) -> ExecResult:
        """Run the cell through IPython; enforce ``--timeout`` with a SIGINT watchdog."""
        if self.host is None:
            raise RuntimeError("the native tier is not attached to a kernel")
        start = time.perf_counter()
        seconds = request.options.get("timeout")
        on_main = threading.current_thread() is threading.main_thread()
        if not seconds or not on_main:
            reply = await self.host.run_ipython_cell(request)
            return self._result(reply, time.perf_counter() - start)

        watchdog = _Watchdog(float(seconds))

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            if watchdog.fired and watchdog.armed:
                raise CellTimeoutError(
                    f"the cell ran longer than its {seconds:g} s limit; raise it with "
                    f"'%%tier native --timeout SECONDS' or c.NativeBackend.timeout"
                )
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_sigint)
        watchdog.start()
        try:
            reply = await self.host.run_ipython_cell(request)
        finally:
            # A SIGINT already pending when the cell ended must not escape into the kernel.
            for _ in range(2):
                try:
                    watchdog.disarm()
                    break
                except (CellTimeoutError, KeyboardInterrupt):
                    continue
            signal.signal(signal.SIGINT, previous)
        return self._result(reply, time.perf_counter() - start)

    def _result(self, reply: dict[str, Any], duration: float) -> ExecResult:
        ok = reply.get("status") == "ok"
        error = None
        if not ok:
            error = ExecError(
                str(reply.get("ename", "Error")),
                str(reply.get("evalue", "")),
                list(reply.get("traceback", [])),
            )
        return ExecResult(
            success=ok,
            tier=self.name,
            duration=duration,
            error=error,
            payload=list(reply.get("payload", [])),
            user_expressions=dict(reply.get("user_expressions", {})),
        )
