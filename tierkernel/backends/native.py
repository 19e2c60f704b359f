"""The ``native`` tier: the kernel's own IPython, at ipykernel's speed, with no isolation.

Native cells go through IPython exactly as in a stock ipykernel (execution count, history,
display, ``?`` help, completion, async cells), so output is published by IPython's own display
machinery rather than through the sink. The one thing this tier adds is ``--timeout``.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from traitlets import Float

from tierkernel.backends.base import (
    Availability,
    Backend,
    CellRequest,
    ExecError,
    ExecResult,
    KernelHandle,
    OutputSink,
)
from tierkernel.backends.options import HELPER_POLICY, IN, TIMEOUT
from tierkernel.backends.usage import SelfUsage
from tierkernel.errors import CellTimeoutError

#: Once the deadline has passed, the signal is sent again this often until the cell ends, so
#: a cell that caught it (a bare ``except``) is stopped at its next blocking call.
REPEAT_SECONDS = 1.0


class _Watchdog:
    """Sends SIGINT to the main thread once ``seconds`` have passed, unless disarmed first.

    A real signal to the thread (``pthread_kill``), as the stop button's SIGINT is: it breaks
    a blocking call (``time.sleep``, a socket read) with EINTR, and Python then runs the
    SIGINT handler installed for the cell, which raises :class:`CellTimeoutError` instead of
    ``KeyboardInterrupt``. (``_thread.interrupt_main`` only marks the signal as tripped: a
    blocking call in C would run to its end before the handler ran.)
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.fired = False
        self.armed = True
        self._main = threading.main_thread().ident
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def _fire(self) -> None:
        while True:
            with self._lock:
                if not self.armed or self._main is None:
                    return
                self.fired = True
                signal.pthread_kill(self._main, signal.SIGINT)
            if self._stop.wait(REPEAT_SECONDS):
                return

    def disarm(self) -> None:
        """No signal is sent from now on (one already sent may still be on its way)."""
        with self._lock:
            self.armed = False
        self._stop.set()
        self._timer.cancel()

    def join(self) -> None:
        """Wait for the timer thread: once it is gone, a signal it sent has been delivered
        to this thread (signals are taken on every return from the kernel)."""
        self._timer.join()


def _post_execute_callbacks(host: object) -> list[Any] | None:
    """The list of IPython's ``post_execute`` callbacks of the kernel's shell, if it has one
    (they run first thing once a cell's code has ended, whatever happened in it)."""
    events = getattr(getattr(host, "shell", None), "events", None)
    callbacks = getattr(events, "callbacks", None)
    found = callbacks.get("post_execute") if isinstance(callbacks, dict) else None
    return found if isinstance(found, list) else None


def _run_pending_handlers() -> None:
    """A Python call: CPython runs pending signal handlers when a function starts."""


class NativeBackend(Backend):
    """Runs cells in the kernel's own IPython. Always available."""

    isolation = "none: the kernel's own IPython process (trusted code only)"
    in_kernel = True
    #: --allow/--domains/--db-readonly set the runtime helpers' policy for the cell.
    magic_options = (TIMEOUT, *HELPER_POLICY, IN)

    timeout = Float(
        None,
        allow_none=True,
        help="Default wall-clock limit of a native cell in seconds (None: no limit, as in "
        "IPython). Overridden per cell with --timeout.",
    ).tag(config=True)

    #: The kernel this tier runs cells in (see :meth:`attach`).
    host: KernelHandle | None = None
    #: Measures each cell's CPU time and the kernel's peak RSS (made on the first cell).
    _usage: SelfUsage | None = None

    def attach(self, kernel: KernelHandle) -> None:
        """Run cells through the kernel's own IPython."""
        self.host = kernel

    def availability(self) -> Availability:
        """Native cells can always run: they are plain IPython."""
        return Availability.yes()

    async def execute(self, request: CellRequest, sink: OutputSink) -> ExecResult:
        """Run the cell through IPython; enforce ``--timeout`` with a SIGINT watchdog."""
        if self.host is None:
            raise RuntimeError("the native tier is not attached to a kernel")
        usage = self._usage
        if usage is None:
            usage = self._usage = SelfUsage()
        usage.begin()
        start = time.perf_counter()
        seconds = request.options.get("timeout")
        on_main = threading.current_thread() is threading.main_thread()
        if not seconds or not on_main:
            reply = await self.host.run_ipython_cell(request)
            return self._result(reply, time.perf_counter() - start, usage)

        watchdog = _Watchdog(float(seconds))

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            __tracebackhide__ = True  # read by CellTimeoutError._render_traceback_
            if not watchdog.armed:
                return  # the cell is over: a late timer (or a click) must not reach the kernel
            if watchdog.fired:
                raise CellTimeoutError(
                    f"the cell ran longer than its {seconds:g} s limit; raise it with "
                    f"'%%tier native --timeout SECONDS' or c.NativeBackend.timeout"
                )
            raise KeyboardInterrupt

        # The cell's time ends with its code: IPython's own work after it (post_execute and
        # post_run_cell hooks, the reply) is never interrupted by the timer.
        post_execute = _post_execute_callbacks(self.host)

        def code_ended() -> None:
            watchdog.disarm()

        previous = signal.signal(signal.SIGINT, on_sigint)
        if post_execute is not None:
            post_execute.insert(0, code_ended)
        watchdog.start()
        try:
            reply = await self.host.run_ipython_cell(request)
        finally:
            if post_execute is not None and code_ended in post_execute:
                post_execute.remove(code_ended)
            # Until the watchdog is disarmed its signal may still interrupt this cleanup; once
            # it is, the handler ignores it. Our handler stays until a signal the timer sent
            # has been delivered and handled, so none is left for the kernel's own handler.
            while True:
                try:
                    watchdog.disarm()
                    break
                except (CellTimeoutError, KeyboardInterrupt):
                    continue
            watchdog.join()
            _run_pending_handlers()
            taken = signal.getsignal(signal.SIGINT) is not on_sigint
            signal.signal(signal.SIGINT, previous)
        if watchdog.fired and reply.get("ename") == "CancelledError":
            # A cell awaiting at top level: ipykernel turned the SIGINT into cancelling it.
            print(f"the cell was cancelled at its {seconds:g} s limit; raise it with "
                  "'%%tier native --timeout SECONDS' or c.NativeBackend.timeout",
                  file=sys.stderr, flush=True)
        elif watchdog.fired and taken and reply.get("status") == "ok":
            # The cell took SIGINT for itself (SIG_IGN or its own handler), so the timeout
            # could not stop it: trusted native code can, as it can ignore the stop button.
            # Say so on the cell's stderr (still this cell's: the reply is not sent yet).
            print(f"the cell ran past its {seconds:g} s limit: it had replaced the SIGINT "
                  "handler the timeout works through, so it was not stopped",
                  file=sys.stderr, flush=True)
        return self._result(reply, time.perf_counter() - start, usage)

    def _result(self, reply: dict[str, Any], duration: float, usage: SelfUsage) -> ExecResult:
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
            usage=usage.end(),
        )
