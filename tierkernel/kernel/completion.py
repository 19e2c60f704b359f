"""Tab completion and inspection (``obj?``, Shift-Tab) of cells that run outside the kernel.

A complete_request or inspect_request is about a cell the user is editing. When that cell
runs in a tier other than native (by its ``%%tier`` line, or the default set with ``%tier
NAME``), its names live in that tier's interpreter, not the kernel's: the request goes to the
tier's backend (``Backend.complete``/``Backend.inspect``) with the ``%%tier`` line taken off
and the cursor moved to match, and the answer's positions are moved back. Native cells, a
cursor on the ``%%tier`` line itself, and ``%tier`` control cells keep IPython's answers.

The rules, whatever the tier: a tier that is not running is not started to answer (no
matches); a tier running a cell is not asked (no matches); an answer that does not come within
``c.TierKernel.completion_timeout`` seconds is no answer. No answer is an empty one, never
the kernel's own names.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from tierkernel.backends.base import Backend
from tierkernel.backends.options import TierUsageError
from tierkernel.kernel.router import TierRouter
from tierkernel.magics.parsing import split_cell

log = logging.getLogger(__name__)

#: What is sent of the cell around the cursor: completers and inspectors look at the token
#: there (and the line), and a request must stay small whatever the cell's size.
WINDOW_BEFORE = 8192
WINDOW_AFTER = 1024


@dataclass(frozen=True)
class GuestRequest:
    """The part of a cell a tier is asked about: ``code`` starts at ``offset`` in the cell,
    and ``cursor`` is the cursor's position in ``code``. No ``backend``: the cell names a tier
    this kernel does not have, so nobody is asked (and the kernel's names are no answer)."""

    backend: Backend | None
    code: str
    cursor: int
    offset: int


def guest_request(router: TierRouter, code: str, cursor_pos: int | None) -> GuestRequest | None:
    """Where a completion or inspection at ``cursor_pos`` in ``code`` is to be answered: a
    request for a tier outside the kernel, or None for IPython's own answer (a native cell, a
    cursor on the ``%%tier`` line, a ``%tier`` line, a cell whose tier line is unusable)."""
    if cursor_pos is None or not 0 <= cursor_pos <= len(code):
        cursor_pos = len(code)
    try:
        directive = split_cell(code)
    except TierUsageError:
        return None
    if directive.control:
        return None
    start = 0
    if directive.has_magic:
        if directive.tier is None:
            return None
        # The body is what follows the magic line (first_line is its 1-based line number).
        lines = code.split("\n")
        start = sum(len(line) + 1 for line in lines[: directive.first_line - 1])
        if cursor_pos < start:
            return None  # on the %%tier line: IPython completes the magic and tier names
    backend = router.backends.get(directive.tier or router.default)
    if backend is not None and backend.in_kernel:
        return None
    cursor = cursor_pos - start
    body = code[start:]
    line_start = body.rfind("\n", 0, cursor) + 1
    line_end = body.find("\n", cursor)
    if line_end == -1:
        line_end = len(body)
    low = max(0, cursor - WINDOW_BEFORE)
    if low > 0:  # from a line's start where one is in reach: no half tokens
        newline = body.find("\n", low, line_start)
        low = newline + 1 if newline != -1 else low
    high = min(line_end, cursor + WINDOW_AFTER)
    return GuestRequest(backend, body[low:high], cursor - low, start + low)


async def complete(request: GuestRequest, running: set[str], timeout: float,
                   cursor_pos: int) -> dict[str, Any]:
    """The complete_reply content for ``request``: the tier's matches, or none."""
    empty: dict[str, Any] = {"matches": [], "cursor_start": cursor_pos,
                             "cursor_end": cursor_pos, "metadata": {}, "status": "ok"}
    backend = request.backend
    if backend is None or backend.name in running:
        return empty
    try:
        answer = await asyncio.wait_for(
            backend.complete(request.code, request.cursor, timeout), timeout)
    except Exception:  # a tier's failure (or its timeout) is no answer, never a broken reply
        log.debug("completion in tier %r failed", backend.name, exc_info=True)
        return empty
    if answer is None:
        return empty
    return {"matches": list(answer.matches),
            "cursor_start": answer.cursor_start + request.offset,
            "cursor_end": answer.cursor_end + request.offset,
            "metadata": dict(answer.metadata), "status": "ok"}


async def inspect(request: GuestRequest, running: set[str], timeout: float,
                  detail_level: int) -> dict[str, Any]:
    """The inspect_reply content for ``request``: the tier's help on the name, or not found."""
    empty: dict[str, Any] = {"status": "ok", "data": {}, "metadata": {}, "found": False}
    backend = request.backend
    if backend is None or backend.name in running:
        return empty
    try:
        answer = await asyncio.wait_for(
            backend.inspect(request.code, request.cursor, detail_level, timeout), timeout)
    except Exception:
        log.debug("inspection in tier %r failed", backend.name, exc_info=True)
        return empty
    if answer is None or not answer.found:
        return empty
    return {"status": "ok", "data": dict(answer.data), "metadata": dict(answer.metadata),
            "found": True}
