"""JavaScript cells of the wasm and sandbox tiers, against peers measured in the same run.

    .venv/bin/python benchmarks/js.py [--rounds 200] [--node-rounds 30] [--starts 5]
                                      [--tiers wasm,sandbox]

1. Trivial cell round trip: ``%%tier TIER --lang js`` cells against native Python cells in the
   same kernel, alternating.
2. The same JavaScript run the naive sandboxed way: a fresh ``node -e`` process per cell
   (wasm: on the host, skipped when node is not installed; sandbox: ``docker exec`` in a
   container of the sandbox image).
3. First JavaScript cell of a new kernel: from asking for a kernel to its first JS cell's
   reply (the context is made then), against a first native cell.

Not part of CI: numbers are for people.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from jupyter_client.manager import start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.latency import KERNEL_CWD, ensure_specs, first_reply, round_trip


def fresh_node(tier: str, rounds: int) -> float | None:
    """Median seconds of a fresh ``node -e`` per cell: on the host for wasm, by ``docker
    exec`` in a running container of the sandbox image for sandbox; None when there is no
    node to run."""
    if tier == "wasm":
        node = shutil.which("node")
        if node is None:
            return None
        argv = [node, "-e", "console.log(1 + 1)"]
        container = None
    else:
        from tierkernel.backends.sandbox.image import image_ref

        container = subprocess.run(["docker", "run", "-d", "--rm", "--network", "none",
                                    image_ref(), "sleep", "infinity"], check=True,
                                   capture_output=True, text=True).stdout.strip()
        argv = ["docker", "exec", container, "node", "-e", "console.log(1 + 1)"]
    try:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        if container:
            subprocess.run(["docker", "rm", "-f", container], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--node-rounds", type=int, default=30)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--tiers", default="wasm,sandbox")
    args = parser.parse_args()
    ensure_specs()
    for tier in args.tiers.split(","):
        line = f"%%tier {tier} --lang js\n"
        km, kc = start_new_kernel(kernel_name="tierkernel", cwd=KERNEL_CWD)
        try:
            kc.execute_interactive(line + "1", timeout=120, output_hook=lambda msg: None)
            js, native = [], []
            for _ in range(args.rounds):
                js.append(round_trip(kc, line + "1 + 1"))
                native.append(round_trip(kc, "1 + 1"))
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
        j, n = statistics.median(js) * 1000, statistics.median(native) * 1000
        print(f"{tier}: trivial cell, median of {args.rounds} alternating (ms): js {j:.3f}, "
              f"native python {n:.3f}, ratio {j / n:.3f}")
        fresh = fresh_node(tier, args.node_rounds) if args.node_rounds else None
        if fresh is not None:
            how = "`node -e`" if tier == "wasm" else "`docker exec CONTAINER node -e`"
            print(f"{tier}: a fresh {how} per cell (ms): {fresh * 1000:.1f}; the kernel's JS "
                  f"cell takes {j / (fresh * 1000):.3f} of it")
        if args.starts:
            first_js = statistics.median(first_reply("tierkernel", True, line + "1 + 1")
                                         for _ in range(args.starts))
            first_py = statistics.median(first_reply("tierkernel", True, "1 + 1")
                                         for _ in range(args.starts))
            print(f"{tier}: new kernel to its first cell's reply, median of {args.starts} (s):"
                  f" js {first_js:.3f}, native python {first_py:.3f}")


if __name__ == "__main__":
    main()
