"""Issue 15, reviewed as a hostile guest would use it: each new way a wasm or sandbox cell can
make the host do work is held to a host-side limit, and the kernel goes on (DESIGN.md,
convention 9)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import sandbox_support as sb
from tests.kernel_session import KernelSession


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelSession]:
    session = KernelSession()
    yield session
    session.close()


def _need(tier: str) -> None:
    if tier == "sandbox":
        sb.need_sandbox()


# -- input(): a request the cell leaves unanswered ends with the cell -------------------------
#: A cell that writes an input_request line itself (as any code in the guest can) and ends
#: without waiting for the answer.
ASK_AND_LEAVE = (
    "import time\n"
    "a = __tierkernel_agent__\n"
    "a.channel.send({'type': 'input_request', 'id': a.cell_id, 'seq': -7,\n"
    "                'prompt': 'left behind: ', 'password': False})\n"
    "time.sleep(1)\n"
)

#: Counts the host threads still waiting for a user's answer (a native cell sees the kernel).
WAITING = (
    "import threading, time\n"
    "time.sleep(0.5)\n"
    "sorted(t.name for t in threading.enumerate() if t.name.endswith('-input'))"
)


@pytest.mark.parametrize("guest", ["process", "sandbox"])
def test_an_input_request_left_by_an_ended_cell_stops_waiting(kernel: KernelSession,
                                                               guest: str):
    _need(guest)
    for _ in range(3):
        left = kernel.run(f"%%tier {guest}\n{ASK_AND_LEAVE}", on_input=lambda asked: None)
        assert left.status == "ok", left.outputs
    # No host thread keeps waiting on the stdin channel for cells that are over: each would
    # take the user's next answer from whoever asks next (one per cell, without end).
    waiting = kernel.run("%%tier native\n" + WAITING)
    assert waiting.status == "ok", waiting.outputs
    assert waiting.result["text/plain"] == "[]"
    # And a native cell's input() gets its own answer.
    asked = kernel.run("%%tier native\ninput('native: ')", on_input=lambda asked: "mine",
                       timeout=20)
    assert asked.status == "ok", asked.outputs
    assert asked.result["text/plain"] == "'mine'"

