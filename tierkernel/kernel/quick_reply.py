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

A native cell keeps the flushes of the streams it wrote to. A flush of a stream it did not
write to is skipped when that is certain (:func:`_nothing_to_flush`: nothing in the stream,
nothing in the pipe of its file descriptor, the thread that reads that pipe waiting in its read),
and the streams skipped are looked at again after the pause (:func:`flush_skipped`), for text
that thread took from the pipe just as the cell ended: two round trips through the IOPub thread
that most cells never needed, some 0.3 ms of a 4 ms round trip.

A native cell keeps the pause, and the kernel puts it to use (:func:`pause_before_reply`):
work that must be done before the reply (committing the cell's audit record) is done at its
start, and the pause lasts only what is left of it. The output still has the whole pause to
reach the IOPub socket before the reply, and the cell's reply comes no later for that work.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import platform
import sys
import termios
import time
from collections.abc import Callable
from typing import Any

_OUTSIDE_IPYTHON: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tierkernel_outside_ipython", default=False)
#: The streams (with their flush) whose flush a native cell's request skipped as empty.
_SKIPPED: contextvars.ContextVar[tuple[tuple[Any, Callable[[], Any]], ...]] = \
    contextvars.ContextVar("tierkernel_skipped_flushes", default=())
#: What is left of the pause of the execute_request being answered, once its work is done.
_PAUSE_LEFT: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "tierkernel_pause_left", default=None)


def mark_cell(outside_ipython: bool) -> None:
    """Called by ``do_execute`` once it knows where the cell runs, and with False by
    ``finish_metadata``, which ipykernel calls after the flush and the sleep, before the
    reply: the mark never outlives its execute_request."""
    _OUTSIDE_IPYTHON.set(outside_ipython)
    _PAUSE_LEFT.set(None)
    _SKIPPED.set(())


def flush_skipped() -> None:
    """Flush, after the pause before a native cell's reply, each stream whose flush was
    skipped as empty and that has text now: what the stream's pipe-reading thread took from
    the pipe just as the cell ended, written to the stream during the pause. Called by
    ``finish_metadata``, right before the reply."""
    for stream, flush in _SKIPPED.get():
        with contextlib.suppress(Exception):
            if not _nothing_to_flush(stream):
                flush()


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
        stream.flush = _skipping(stream.flush, stream)  # type: ignore[method-assign]
        stream._tierkernel_flush_skip = True  # type: ignore[union-attr]


def _skipping(flush: Callable[[], Any], stream: Any) -> Callable[[], Any]:
    def flush_unless_outside() -> Any:
        if _OUTSIDE_IPYTHON.get():
            return None
        if _nothing_to_flush(stream):
            skipped = _SKIPPED.get()
            # Once per stream: a cell may call flush() in a loop, each one skipped.
            if all(entry[0] is not stream for entry in skipped):
                _SKIPPED.set((*skipped, (stream, flush)))
            return None
        return flush()

    return flush_unless_outside


#: The number of the read system call, as /proc/PID/task/TID/syscall shows it, where known.
_READ_SYSCALL = {"x86_64": b"0", "aarch64": b"63"}.get(platform.machine())
#: /proc/self/task/TID/syscall of each stream's pipe-reading thread, kept open (by thread id).
_SYSCALL_FILES: dict[int, int] = {}


def _nothing_to_flush(stream: Any) -> bool:
    """Whether flushing ipykernel's ``stream`` now would send nothing, for certain: nothing
    waits in the pipe that carries what the process writes to its file descriptor (C code,
    ``os.write``), the stream's thread that reads that pipe is blocked reading it (so it holds
    no text it has not written to the stream yet), and no text was written since the last
    flush (checked in that order: text on its way moves from the pipe to the thread to the
    stream). Anything uncertain, or another ipykernel, flushes as ipykernel does.

    The flush before a reply is two round trips through the IOPub thread each, some 0.3 ms of
    a 4 ms native cell, spent on streams most cells never wrote to."""
    try:
        fid = stream._fid
        if fid is not None:
            waiting = fcntl.ioctl(fid, termios.FIONREAD, b"\0\0\0\0")
            if (int.from_bytes(waiting, sys.byteorder)
                    or not _reading(stream.watch_fd_thread, fid)):
                return False
        return not (stream._buffers or stream.echo is not None or stream._flush_pending)
    except (AttributeError, OSError, ValueError):
        return False


def _reading(thread: Any, fid: int) -> bool:
    """Whether ``thread`` is blocked in a read of ``fid`` (Linux: its syscall file)."""
    tid = getattr(thread, "native_id", None)
    if _READ_SYSCALL is None or tid is None or not thread.is_alive():
        return False
    fd = _SYSCALL_FILES.get(tid)
    if fd is None:
        fd = _SYSCALL_FILES[tid] = os.open(f"/proc/self/task/{tid}/syscall",
                                           os.O_RDONLY | os.O_CLOEXEC)
    fields = os.pread(fd, 64, 0).split()
    return len(fields) > 1 and fields[0] == _READ_SYSCALL and int(fields[1], 16) == fid
