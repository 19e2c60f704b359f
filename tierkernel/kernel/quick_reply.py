"""A faster execute_reply for cells that ran outside the kernel's IPython.

After ``do_execute`` returns, ipykernel's ``execute_request`` flushes the kernel's own
``sys.stdout`` and ``sys.stderr`` (each flush waits for a round trip through the IOPub thread)
and then sleeps ``_execute_sleep`` (0.5 ms) before it sends the reply. That is there for output a
native cell wrote to those streams. A cell of another tier never writes to them: its output is
published through an :class:`~tierkernel.kernel.iopub.IopubSink` as it happens, and every
message of it is queued on the IOPub socket before the reply (and before ``status: idle``). For
such cells the flushes and the sleep cost ≈1 ms of a 3 ms round trip and buy nothing, so the
kernel marks the cell's context and both are skipped; native cells keep ipykernel's behaviour.

The mark is a context variable, set by ``do_execute`` and cleared by ``finish_metadata`` (both
called by ipykernel's ``execute_request``): it is seen only by the task that handles that one
execute_request, and only between the two, never by other handlers or threads that flush the
same streams.

A native cell keeps the pause, and the kernel puts it to use (:func:`pause_before_reply`):
work that must be done before the reply (committing the cell's audit record) is done at its
start, and the pause lasts only what is left of it. The output still has the whole pause to
reach the IOPub socket before the reply, and the cell's reply comes no later for that work.
"""

from __future__ import annotations

import contextvars
import sys
import time
from collections.abc import Callable
from typing import Any

_OUTSIDE_IPYTHON: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tierkernel_outside_ipython", default=False)
#: What is left of the pause of the execute_request being answered, once its work is done.
_PAUSE_LEFT: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "tierkernel_pause_left", default=None)


def mark_cell(outside_ipython: bool) -> None:
    """Called by ``do_execute`` once it knows where the cell runs, and with False by
    ``finish_metadata``, which ipykernel calls after the flush and the sleep, before the
    reply: the mark never outlives its execute_request."""
    _OUTSIDE_IPYTHON.set(outside_ipython)
    _PAUSE_LEFT.set(None)


def pause_before_reply(pause: float, work: Callable[[], object]) -> float:
    """ipykernel's pause before a native cell's reply (``pause`` seconds), with ``work``
    done in it: the first call (ipykernel reads ``_execute_sleep`` right before it sleeps)
    does ``work`` and returns what is left of the pause; later calls for the same
    execute_request return the same."""
    left = _PAUSE_LEFT.get()
    if left is None:
        started = time.perf_counter()
        work()
        left = max(0.0, pause - (time.perf_counter() - started))
        _PAUSE_LEFT.set(left)
    return left


def cell_ran_outside() -> bool:
    """Whether the execute_request being answered ran its cell outside IPython."""
    return _OUTSIDE_IPYTHON.get()


def install_flush_skip() -> None:
    """Make the kernel's ``sys.stdout``/``sys.stderr`` skip the pre-reply flush of marked cells.

    Called once when the kernel starts; streams that are not ipykernel's are left alone.
    """
    for stream in (sys.stdout, sys.stderr):
        if stream is None or getattr(stream, "_tierkernel_flush_skip", False):
            continue
        if type(stream).__module__ != "ipykernel.iostream":
            continue
        stream.flush = _skipping(stream.flush)  # type: ignore[method-assign]
        stream._tierkernel_flush_skip = True  # type: ignore[union-attr]


def _skipping(flush: Callable[[], Any]) -> Callable[[], Any]:
    def flush_unless_outside() -> Any:
        if _OUTSIDE_IPYTHON.get():
            return None
        return flush()

    return flush_unless_outside
