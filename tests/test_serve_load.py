"""``tierkernel serve`` under load: 20 sessions at once (wasm and sandbox), 20 cells each,
every result correct and attributed to its session, and nothing left when the server stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests import sandbox_support as sb
from tests.serve_support import MAIN, Server

SESSIONS = 20
CELLS = 20


def test_twenty_sessions_of_twenty_cells_each_get_their_own_results(tmp_path: Path):
    sb.need_sandbox()
    server = Server(tmp_path, extra="c.Serve.max_sessions = 24\n"
                                     "c.Serve.max_sessions_per_token = 24\n")
    failures: list[str] = []

    async def one(client: httpx.AsyncClient, number: int) -> list[str]:
        tier = "wasm" if number % 2 else "sandbox"
        made = await client.post("/sessions", json={"tier": tier})
        assert made.status_code == 201, made.text
        sid = made.json()["id"]
        seen = []
        for cell in range(CELLS):
            code = (f"total = globals().get('total', 0) + {cell}\n"
                    f"print('{sid}', {cell})\n(total, {number})")
            answer = await client.post("/execute", json={"code": code, "session": sid})
            result = answer.json()
            expected = f"({sum(range(cell + 1))}, {number})"
            if not (answer.status_code == 200 and result["success"]
                    and result["session"] == sid and result["tier"] == tier
                    and result["stdout"] == f"{sid} {cell}\n"
                    and result["output"][-1]["data"]["text/plain"] == expected):
                seen.append(f"session {number} cell {cell}: {answer.status_code} "
                            f"{answer.text[:300]}")
        return seen

    async def everyone() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                     headers={"Authorization": f"Bearer {MAIN}"}) as client:
            for found in await asyncio.gather(*(one(client, n) for n in range(SESSIONS))):
                failures.extend(found)

    try:
        asyncio.run(everyone())
    finally:
        assert server.stop() == 0
    assert failures == [], failures[:5]

    def only_waiting_spares() -> bool:
        from tierkernel.backends.sandbox import spares

        waiting = {c.id for c in spares.list_spares(sb.client())
                   if spares.claimer(spares.folder_of(c)) is None}
        return set(sb.all_sandbox_containers()) <= waiting

    assert sb.wait_for(only_waiting_spares, 60), sb.all_sandbox_containers()
