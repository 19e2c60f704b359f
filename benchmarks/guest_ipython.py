"""What IPython semantics cost in the guest tiers: plain cells, magic cells, the first cell.

For each tier (process, wasm, sandbox) a fresh kernel is started and, through jupyter_client:

- first cell: the round trip of the kernel's first cell in that tier (the tier starting);
- plain cell: median round trip of a warm trivial cell (``1+1``), which never touches IPython
  (run this script on a checkout before the change to compare: the figure must not move);
- first magic: the round trip of the first ``%time`` cell (IPython imported, if the background
  import has not finished, and the shell made);
- magic cell: median round trip of a warm ``%time 1+1`` cell;
- guest cost: the agent's own time per plain cell for the IPython bookkeeping (In/Out/_N),
  measured inside the guest over many calls.

The peer, measured in the same run: the same cells in ``native`` (the kernel's own IPython);
each tier's plain and magic cells are also printed as a ratio to native's.

    .venv/bin/python benchmarks/guest_ipython.py [--rounds 100] [--tiers process wasm sandbox]

Not part of CI: wall-clock numbers are for people, not assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from jupyter_client.manager import start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.latency import round_trip

#: Inside the guest: the agent's per-cell In/Out bookkeeping, timed over many calls (absent
#: before the change: then the cell says so).
_GUEST_COST = """
import builtins, time
agent = builtins.__tierkernel_agent__
if hasattr(agent, '_store_input'):
    n = 2000
    start = time.perf_counter()
    for i in range(n):
        agent._store_input('1+1', '1+1')
        agent._store_output(2)
    print(f'{(time.perf_counter() - start) / n * 1e6:.1f}')
else:
    print('n/a')
"""


def measure(tier: str, rounds: int) -> dict[str, float | str]:
    """The figures of one tier, in a kernel of its own (seconds; the guest cost as text)."""
    km, kc = start_new_kernel(kernel_name="tierkernel")
    try:
        prefix = f"%%tier {tier}\n"
        first = round_trip(kc, prefix + "pass")
        for _ in range(5):
            round_trip(kc, prefix + "1+1")
        plain = statistics.median(round_trip(kc, prefix + "1+1") for _ in range(rounds))
        first_magic = round_trip(kc, prefix + "%time 1+1")
        magic = statistics.median(round_trip(kc, prefix + "%time 1+1") for _ in range(rounds))
        if tier == "native":
            return {"first": first, "plain": plain, "first magic": first_magic, "magic": magic,
                    "cost": "n/a"}
        msg_id = kc.execute(prefix + _GUEST_COST)
        cost = "?"
        while True:
            msg = kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                cost = msg["content"]["text"].strip()
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        return {"first": first, "plain": plain, "first magic": first_magic, "magic": magic,
                "cost": cost}
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--tiers", nargs="+", default=["process", "wasm", "sandbox"])
    args = parser.parse_args()
    peer = measure("native", args.rounds)
    for tier in ["native", *args.tiers]:
        started = time.perf_counter()
        row = peer if tier == "native" else measure(tier, args.rounds)
        plain, magic = float(row["plain"]), float(row["magic"])
        print(f"tier: {tier}  first cell: {float(row['first']) * 1e3:.0f} ms  "
              f"plain cell: {plain * 1e3:.2f} ms ({plain / float(peer['plain']):.2f}x native)  "
              f"first magic: {float(row['first magic']) * 1e3:.0f} ms  "
              f"magic cell: {magic * 1e3:.2f} ms ({magic / float(peer['magic']):.2f}x native)  "
              f"guest In/Out cost: {row['cost']} µs  ({time.perf_counter() - started:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
