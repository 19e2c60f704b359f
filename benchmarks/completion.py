"""Tab completion and inspection latency per tier, against the kernel's own (native) answers.

Starts one tierkernel, defines the same names natively and in each tier, then sends
complete_requests (a name prefix and an attribute) and inspect_requests for each tier's cells,
alternating tier by tier so that machine noise hits all alike, and prints the median and 90th
percentile of each and the ratio to native. A round trip is complete_request sent ->
complete_reply received. The first answer of each tier (its completer made) is left out: it is
printed apart as "first".

    .venv/bin/python benchmarks/completion.py [--rounds 100] [--tiers process,wasm,sandbox]

Not part of CI: wall-clock numbers are for people, not assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETUP = ("import os\nonly_here_xyz = 1\nclass Thing:\n    only_attr_qq = 1\nthing = Thing()\n"
         "def guest_fn(a, b=2):\n    '''Docstring.'''\n    return a\n")


def head(tier: str) -> str:
    return "" if tier == "native" else f"%%tier {tier}\n"


def timed(kc: BlockingKernelClient, kind: str, code: str) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    if kind == "inspect":
        reply = kc.inspect(code, reply=True, timeout=60)
    else:
        reply = kc.complete(code, reply=True, timeout=60)
    return time.perf_counter() - start, reply["content"]


def ran(kc: BlockingKernelClient, code: str) -> None:
    reply = kc.execute_interactive(code, timeout=300, output_hook=lambda msg: None)
    if reply["content"]["status"] != "ok":
        raise SystemExit(f"setup cell failed: {reply['content']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--tiers", default="process,wasm,sandbox")
    args = parser.parse_args()
    tiers = ["native", *[t for t in args.tiers.split(",") if t]]
    km, kc = start_new_kernel(kernel_name="tierkernel",
                              extra_arguments=["--TierKernel.completion_timeout=30"])
    probes = {"name": ("complete", "only_h"), "attribute": ("complete", "x = thing.only_at"),
              "inspect": ("inspect", "guest_fn")}
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for tier in tiers:
            ran(kc, head(tier) + SETUP)
            for probe, (kind, code) in probes.items():
                first, content = timed(kc, kind, head(tier) + code)
                ok = content.get("matches") or content.get("found")
                print(f"{tier:8} {probe:9} first: {first * 1000:8.1f} ms "
                      f"({'answered' if ok else 'no answer'})")
        for _ in range(args.rounds):
            for tier in tiers:
                for probe, (kind, code) in probes.items():
                    seconds, _content = timed(kc, kind, head(tier) + code)
                    times.setdefault((tier, probe), []).append(seconds)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

    print(f"\n{args.rounds} rounds; median and p90 in ms; ratio = median / native's median")
    print(f"{'tier':8} {'probe':9} {'median':>8} {'p90':>8} {'ratio':>6}")
    for tier in tiers:
        for probe in probes:
            samples = sorted(times[(tier, probe)])
            median = statistics.median(samples)
            p90 = samples[int(0.9 * (len(samples) - 1))]
            native = statistics.median(times[("native", probe)])
            print(f"{tier:8} {probe:9} {median * 1000:8.2f} {p90 * 1000:8.2f} "
                  f"{median / native:6.2f}")


if __name__ == "__main__":
    main()
