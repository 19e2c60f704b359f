"""Completion and inspection answered by an agent tier's interpreter (process, sandbox, wasm).

The kernel asks (see ``tierkernel/kernel/completion.py``); a backend mixing in
:class:`AgentQueries` passes the request to its live :class:`AgentSession` (never starting one)
and turns the agent's answer into a :class:`Completion` or :class:`Inspection`. Everything in
that answer is the guest's: its bytes were capped by the session before it was decoded (as
JSON, never anything else), and here it is checked field by field and cut down to the tier's
``completion_limit`` matches; anything of the wrong shape makes it no answer at all.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tierkernel.backends.agent.session import AgentSession
from tierkernel.backends.base import Completion, Inspection
from tierkernel.guest import protocol

#: A match longer than this is no name a user would pick from a list: dropped.
MATCH_CHARS = 1000


class AgentQueries:
    """``complete``/``inspect`` for a backend whose cells run in an :class:`AgentSession`.

    The backend provides :meth:`_query_session` (its live session, or None) and the
    ``completion_limit`` trait (see ``ChannelLimits``).
    """

    completion_limit: int

    def _query_session(self) -> AgentSession | None:
        """The tier's running session, or None when it has none (never starts one)."""
        raise NotImplementedError

    async def complete(self, code: str, cursor_pos: int, timeout: float) -> Completion | None:
        """Ask the tier's agent to complete at ``cursor_pos`` (see ``Backend.complete``)."""
        session = self._query_session()
        if session is None:
            return None
        msg = {"type": protocol.COMPLETE, "code": code, "cursor_pos": cursor_pos,
               "budget": timeout}
        answer = await asyncio.to_thread(session.query, msg, "completed", timeout)
        return completion_from(answer, len(code), self.completion_limit)

    async def inspect(self, code: str, cursor_pos: int, detail_level: int,
                      timeout: float) -> Inspection | None:
        """Ask the tier's agent for help on the name at ``cursor_pos``."""
        session = self._query_session()
        if session is None:
            return None
        msg = {"type": protocol.INSPECT, "code": code, "cursor_pos": cursor_pos,
               "detail_level": detail_level, "budget": timeout}
        answer = await asyncio.to_thread(session.query, msg, "inspected", timeout)
        return inspection_from(answer)


def completion_from(answer: dict[str, Any] | None, code_len: int,
                    limit: int) -> Completion | None:
    """The agent's ``completed`` answer checked: positions within the code, at most ``limit``
    matches, each a string of at most :data:`MATCH_CHARS` characters; None otherwise."""
    if answer is None:
        return None
    start, end, matches = answer.get("cursor_start"), answer.get("cursor_end"), \
        answer.get("matches")
    if (type(start) is not int or type(end) is not int or not 0 <= start <= end <= code_len
            or not isinstance(matches, list)):
        return None
    kept: list[str] = []
    for match in matches:
        if len(kept) >= limit:
            break
        if isinstance(match, str) and 0 < len(match) <= MATCH_CHARS and match not in kept[-1:]:
            kept.append(match)
    # The guest's metadata is not passed on: nothing a client needs, and unbounded in shape.
    return Completion(kept, start, end)


def inspection_from(answer: dict[str, Any] | None) -> Inspection | None:
    """The agent's ``inspected`` answer checked: a mime bundle of text (mime type to string);
    None when it found nothing or said it in the wrong shape."""
    if answer is None or answer.get("found") is not True:
        return None
    data = answer.get("data")
    if not isinstance(data, dict):
        return None
    bundle = {key: value for key, value in data.items()
              if isinstance(key, str) and "/" in key and isinstance(value, str)}
    if not bundle:
        return None
    return Inspection(True, bundle)
