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
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable
from typing import Any

_OUTSIDE_IPYTHON: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tierkernel_outside_ipython", default=False)


def mark_cell(outside_ipython: bool) -> None:
    """Called by ``do_execute`` once it knows where the cell runs, and with False by
    ``finish_metadata``, which ipykernel calls after the flush and the sleep, before the
    reply: the mark never outlives its execute_request."""
    _OUTSIDE_IPYTHON.set(outside_ipython)


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
