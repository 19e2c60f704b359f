"""Latency of trivial cells and of a new kernel: tierkernel against stock ipykernel, in one run.

Round trips: starts stock ipykernel (the ``python3`` kernelspec) and tierkernel side by side,
sends the same trivial cells to each through jupyter_client, alternating kernel by kernel so that
machine noise hits both alike, and prints medians and the ratio tierkernel / ipykernel. A round
trip is execute_request sent -> execute_reply received and ``status: idle`` seen on iopub.

Start-up: starts new kernels of each kind in turn (``--starts`` of each, alternating) and times
each from its launch to the execute_reply of its first cell (``1+1``), two ways: as a notebook
client does (jupyter_client's ``wait_for_ready``, then the cell: nbclient, papermill, ``jupyter
console``), which the target is for, and with the cell sent as soon as the client's channels
are open (the request waits in the socket until the kernel reads it). Each kernel is shut down
before the next one starts.

    .venv/bin/python benchmarks/latency.py [--rounds 300] [--starts 20] [--process]

``--process`` also measures ``%%tier process`` cells against native ones (the agent tier's
per-cell overhead); ``--rounds 0`` or ``--starts 0`` leaves that part out. Not part of CI:
wall-clock numbers are for people, not assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CELLS = ["pass", "1+1", "print('x')"]
#: Every kernel's working folder: empty, so that tierkernel's warm start copies no notebook
#: folder into its sandbox container (whatever folder the benchmark is run from).
KERNEL_CWD = tempfile.mkdtemp(prefix="tierkernel-bench-")


def round_trip(kc: BlockingKernelClient, code: str) -> float:
    """Seconds from sending ``code`` to having both its reply and its idle status."""
    start = time.perf_counter()
    msg_id = kc.execute(code)
    reply_seen = idle_seen = False
    while not (reply_seen and idle_seen):
        if not reply_seen:
            reply = kc.get_shell_msg(timeout=30)
            reply_seen = reply["parent_header"].get("msg_id") == msg_id
        while not idle_seen:
            msg = kc.get_iopub_msg(timeout=30)
            idle_seen = (msg["parent_header"].get("msg_id") == msg_id
                         and msg["msg_type"] == "status"
                         and msg["content"]["execution_state"] == "idle")
    return time.perf_counter() - start


def first_reply(kernel_name: str, wait_for_ready: bool, code: str = "1+1") -> float:
    """Seconds from launching a new ``kernel_name`` kernel to the execute_reply of its first
    cell (``code``), sent once the kernel answered ``kernel_info`` or at once; the kernel is
    shut down afterwards (not timed)."""
    km = KernelManager(kernel_name=kernel_name)
    begun = time.perf_counter()
    km.start_kernel(cwd=KERNEL_CWD)
    kc = km.client()
    try:
        kc.start_channels()
        if wait_for_ready:
            kc.wait_for_ready(timeout=60)
        msg_id = kc.execute(code)
        while True:
            reply = kc.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        took = time.perf_counter() - begun
        if reply["content"]["status"] != "ok":
            raise SystemExit(f"the first cell of {kernel_name} failed: {reply['content']}")
        return took
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def start(kernel_name: str) -> tuple[KernelManager, BlockingKernelClient]:
    km, kc = start_new_kernel(kernel_name=kernel_name, cwd=KERNEL_CWD)
    for code in CELLS * 5:  # warm up imports, caches, the zmq path
        round_trip(kc, code)
    return km, kc


def ensure_specs() -> None:
    """Make sure both kernelspecs exist (tierkernel's into this environment)."""
    from jupyter_client.kernelspec import KernelSpecManager

    names = KernelSpecManager().find_kernel_specs()
    if "tierkernel" not in names:
        from tierkernel.kernel.kernelspec import install

        install(prefix=sys.prefix)
    if "python3" not in names:
        raise SystemExit("the stock ipykernel kernelspec 'python3' is missing: "
                         "python -m ipykernel install --sys-prefix")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="cells per kind per kernel")
    parser.add_argument("--starts", type=int, default=20,
                        help="new kernels of each kind timed to their first reply")
    parser.add_argument("--process", action="store_true", help="also time %%tier process cells")
    parser.add_argument("--settle", type=float, default=5.0, metavar="SECONDS",
                        help="idle time before the round trips, in which tierkernel starts the "
                        "tiers it warms up (they are then running while the cells are timed)")
    args = parser.parse_args()
    ensure_specs()
    if args.rounds > 0:
        round_trips(args.rounds, args.process, args.settle)
    if args.starts > 0:
        start_up(args.starts)


def round_trips(rounds: int, process: bool, settle: float) -> None:
    """Time trivial cells in one kernel of each kind and print the ratios."""
    kernels = {name: start(name) for name in ("python3", "tierkernel")}
    times: dict[tuple[str, str], list[float]] = {}
    try:
        time.sleep(settle)
        if process:
            for code in CELLS:
                round_trip(kernels["tierkernel"][1], "%%tier process\n" + code)
        for _ in range(rounds):
            for code in CELLS:
                for name, (_, kc) in kernels.items():
                    times.setdefault((name, code), []).append(round_trip(kc, code))
                if process:
                    kc = kernels["tierkernel"][1]
                    times.setdefault(("process", code), []).append(
                        round_trip(kc, "%%tier process\n" + code))
    finally:
        for km, kc in kernels.values():
            kc.stop_channels()
            km.shutdown_kernel(now=True)

    def median_ms(name: str, code: str) -> float:
        return statistics.median(times[(name, code)]) * 1000

    print(f"round trip, median of {rounds} per cell (ms); alternating kernels")
    header = f"{'cell':<12}{'ipykernel':>11}{'tierkernel':>12}{'ratio':>8}"
    if process:
        header += f"{'process':>10}{'proc/native':>13}"
    print(header)
    ratios = []
    for code in CELLS:
        stock, tier = median_ms("python3", code), median_ms("tierkernel", code)
        ratios.append(tier / stock)
        line = f"{code:<12}{stock:>11.3f}{tier:>12.3f}{tier / stock:>8.3f}"
        if process:
            proc = median_ms("process", code)
            line += f"{proc:>10.3f}{proc / tier:>13.2f}"
        print(line)
    all_stock = statistics.median(t for c in CELLS for t in times[("python3", c)])
    all_tier = statistics.median(t for c in CELLS for t in times[("tierkernel", c)])
    print(f"overall native ratio tierkernel/ipykernel: {all_tier / all_stock:.3f} "
          f"(target <= 1.05); per-cell ratios {', '.join(f'{r:.3f}' for r in ratios)}")


def start_up(starts: int) -> None:
    """Time new kernels of each kind to their first reply, alternating, and print the ratios."""
    ways = {True: "client waits for kernel_info (as nbclient)", False: "cell sent at once"}
    took: dict[tuple[bool, str], list[float]] = {}
    for _ in range(starts):
        for ready in ways:
            for name in ("python3", "tierkernel"):
                took.setdefault((ready, name), []).append(first_reply(name, ready))
    print(f"new kernel to its first execute_reply, {starts} starts of each (s); alternating")
    print(f"{'':<46}{'ipykernel':>11}{'tierkernel':>12}{'ratio':>8}")
    for ready, way in ways.items():
        stock, tier = took[(ready, "python3")], took[(ready, "tierkernel")]
        for label, pick in (("median", statistics.median), ("min", min)):
            print(f"{way + ', ' + label:<46}{pick(stock):>11.3f}{pick(tier):>12.3f}"
                  f"{pick(tier) / pick(stock):>8.3f}")
    stock, tier = took[(True, "python3")], took[(True, "tierkernel")]
    print(f"start-up ratio tierkernel/ipykernel: "
          f"{statistics.median(tier) / statistics.median(stock):.3f} (target <= 1.1; client "
          "waits for kernel_info)")


if __name__ == "__main__":
    main()
