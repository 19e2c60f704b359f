"""Variables between tiers, against moving the same data by hand in the same run.

    .venv/bin/python benchmarks/values.py [--rows 1000000] [--rounds 3] [--auto-rounds 200]

1. A DataFrame of ``--rows`` rows and 5 columns (int64, float64, bool, datetime64, category)
   from the sandbox tier to the kernel (``--out``), and from the kernel to the wasm tier
   (``--in``), each against writing it to a file of the fsx workspace in one tier and reading
   it back in the other by hand. Parquet is what the issue names, but neither the wasm
   runtime nor the sandbox image (Debian's pandas) nor this host has a parquet engine
   (pyarrow), so the by-hand way is CSV, which every tier reads.
2. ``%%tier auto`` against ``%%tier wasm`` on a trivial cell, alternating: the cost of choosing
   (target: under 1 ms per cell).

Needs the wasm runtime and the sandbox engine. Not part of CI: numbers are for people.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.latency import KERNEL_CWD, ensure_specs, round_trip

MAKE = """\
import numpy as np, pandas as pd
rng = np.random.default_rng(0)
big = pd.DataFrame({{
    "id": np.arange({rows}, dtype="int64"),
    "x": rng.normal(size={rows}),
    "flag": rng.random({rows}) > 0.5,
    "when": pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange({rows}), unit="s"),
    "kind": pd.Categorical(rng.choice(["a", "b", "c"], size={rows})),
}})
"""


def timed(kc: BlockingKernelClient, code: str) -> float:
    """Seconds for one cell that must succeed."""
    start = time.perf_counter()
    reply = kc.execute_interactive(code, timeout=600, output_hook=lambda msg: None)
    took = time.perf_counter() - start
    if reply["content"]["status"] != "ok":
        raise SystemExit(f"a cell failed: {code[:60]!r}: {reply['content'].get('evalue')}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--auto-rounds", type=int, default=200)
    args = parser.parse_args()
    ensure_specs()
    km, kc = start_new_kernel(kernel_name="tierkernel", cwd=KERNEL_CWD,
                              extra_arguments=["--TierKernel.value_limit=1g",
                                               "--SandboxBackend.memory=2g",
                                               "--WasmBackend.memory=2g"])
    try:
        timed(kc, MAKE.format(rows=args.rows))
        timed(kc, "%%tier sandbox\n" + MAKE.format(rows=args.rows))
        timed(kc, "%%tier wasm\nimport pandas as pd")
        rows: dict[str, list[float]] = {k: [] for k in (
            "sandbox -> kernel, --out", "sandbox -> kernel, CSV through fsx",
            "kernel -> wasm, --in", "kernel -> wasm, CSV through fsx")}
        for _ in range(args.rounds):
            rows["sandbox -> kernel, --out"].append(timed(kc, "%%tier sandbox --out big\npass"))
            rows["sandbox -> kernel, CSV through fsx"].append(
                timed(kc, "%%tier sandbox\nbig.to_csv('big.csv', index=False)")
                + timed(kc, "import pandas as pd\nby_hand = pd.read_csv('fsx://big.csv')"))
            rows["kernel -> wasm, --in"].append(timed(kc, "%%tier wasm --in big\npass"))
            rows["kernel -> wasm, CSV through fsx"].append(
                timed(kc, "big.to_csv('fsx://big2.csv', index=False)")
                + timed(kc, "%%tier wasm\nby_hand = pd.read_csv('big2.csv')"))
        print(f"a DataFrame of {args.rows} rows x 5 columns, median of {args.rounds} (s)")
        for name, values in rows.items():
            print(f"  {name:<38} {statistics.median(values):8.3f}")
        for where in ("sandbox -> kernel", "kernel -> wasm"):
            mine = statistics.median(rows[f"{where}, --{'out' if 'sandbox' in where else 'in'}"])
            hand = statistics.median(rows[f"{where}, CSV through fsx"])
            print(f"  {where}: --{'out' if 'sandbox' in where else 'in'} / by hand = "
                  f"{mine / hand:.3f}")
        timed(kc, "%%tier auto\npass")
        auto, explicit = [], []
        for _ in range(args.auto_rounds):
            auto.append(round_trip(kc, "%%tier auto\npass"))
            explicit.append(round_trip(kc, "%%tier wasm\npass"))
        a, e = statistics.median(auto) * 1000, statistics.median(explicit) * 1000
        print(f"trivial cell, {args.auto_rounds} rounds alternating (ms): %%tier auto {a:.3f}, "
              f"%%tier wasm {e:.3f}; auto's cost {a - e:+.3f} ms per cell (target < 1 ms)")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


if __name__ == "__main__":
    main()
