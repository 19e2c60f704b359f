"""Server-Sent Events from a ``tierkernel serve``, read as data within a byte budget.

The server is configured by the user, yet what it sends is counted here as any guest's
output is: a server that sends more than ``limit`` bytes for one cell, or an event line longer
than that, ends the read with :class:`RemoteStreamError` (the kernel never holds more), and
every event is decoded as JSON, nothing else.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from tierkernel.errors import RemoteStreamError


async def events(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[tuple[str,
                                                                                   Any]]:
    """``(event name, decoded data)`` of each event in ``chunks`` (an SSE body)."""
    buffer = b""
    seen = 0
    name, data = "message", list[str]()
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise RemoteStreamError(f"the server sent more than {limit} bytes for one cell")
        buffer += chunk
        while b"\n" in buffer:
            raw, buffer = buffer.split(b"\n", 1)
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                if data:
                    try:
                        yield name, json.loads("\n".join(data))
                    except ValueError as exc:
                        raise RemoteStreamError(f"the server sent an event that is not "
                                                f"JSON: {exc}") from None
                name, data = "message", list[str]()
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
