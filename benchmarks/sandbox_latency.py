"""Sandbox tier latency against its peers, all measured in one run, per runtime.

For each runtime (runc, and runsc where the engine has it):

- first sandbox cell of a new kernel, sent as soon as the kernel answers: when an earlier kernel
  left a spare container (the usual case after the first kernel on a machine; see
  tierkernel/backends/sandbox/spares.py), and with no spare (the kernel's head start makes one
  while the kernel starts, see sandbox_head_start.py; and with the head start off, the warm
  start creates the container), at once and after a 2 s pause (a person typing); against
  ``docker run --rm IMAGE python3 -c CELL`` (a fresh, equally hardened container per cell);
- warm trivial cell (``%%tier sandbox`` + ``1+1``) round trip through the kernel, against a
  native cell in the same kernel and ``docker exec CONTAINER python3 -c CELL`` (per-cell exec),
  interleaved so that each kind follows each kind equally often, and also shown by whether a
  docker exec ran just before (its aftermath in the engine slows whatever comes next);
- first streamed line of ``print(); sleep(0.5); print()`` against the same via ``docker exec``.

A first cell "sent at once" is timed from the moment the client sends it, after the kernel
answered; the head start's container is made from the kernel's launch on, so a kernel that
answers sooner leaves more of it to that cell. The launch-to-reply lines time the whole (the
wait a client that starts a kernel to run one sandbox cell sees), and are the ones to compare
across versions. Every kernel runs in an empty folder of its own: the sandbox copies the
notebook's folder (the kernel's working folder) into the container, and would otherwise copy
whatever the folder the benchmark runs in holds, again whenever it changes.

``docker exec``/``docker run`` are timed through the Docker SDK (what a per-cell implementation
in the kernel would do) and through the docker CLI (what a person would type). Targets from
issue 4: warm cell <= 0.1 x docker exec; first cell <= 0.3 x docker run.

    .venv/bin/python benchmarks/sandbox_latency.py [--rounds 100] [--runtime runc]

Not part of CI: wall-clock numbers are for people, not assertions.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.latency import ensure_specs, round_trip
from tierkernel.backends.sandbox import spares as sandbox_spares
from tierkernel.backends.sandbox.engine import connect
from tierkernel.backends.sandbox.image import image_ref
from tierkernel.backends.sandbox.reaper import remove_spares

STREAM_CELL = "import time\nprint('first', flush=True)\ntime.sleep(0.5)\nprint('second')"
#: The kernels' working folder (the notebook folder the sandbox copies): empty and quiet.
KERNEL_CWD = tempfile.mkdtemp(prefix="tierkernel-bench-")
HARDENING: dict[str, Any] = {
    "network_mode": "none", "read_only": True, "tmpfs": {"/tmp": "size=64m"},
    "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"], "user": "65534:65534",
    "mem_limit": 512 * 2**20, "init": True,
}


def first_stream(kc: BlockingKernelClient, code: str) -> float:
    """Seconds from sending ``code`` to its first stream message (then waits for idle)."""
    start = time.perf_counter()
    msg_id = kc.execute(code)
    first = None
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream" and first is None:
            first = time.perf_counter() - start
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    kc.get_shell_msg(timeout=60)
    assert first is not None
    return first


def new_kernel_first_cell(runtime: str, pause: float, spare: bool, client: Any,
                          head_start: bool = True) -> tuple[float, float]:
    """A new kernel whose default sandbox runtime is ``runtime``: its first sandbox cell,
    timed from the moment it is sent and from the kernel's launch.

    ``spare``: an earlier kernel left a spare container for it, and this kernel leaves one for
    the next measurement before it shuts down (after its usual spare_delay, so making it does
    not overlap the measured cell). Otherwise there is no spare to claim and this kernel makes
    none for later kernels; its head start (sandbox_head_start.py) makes one for itself while
    it starts, unless ``head_start`` is off (then only the warm start creates its container).
    """
    args = [f"--SandboxBackend.runtime={runtime}"]
    if not spare:
        remove_spares(client)
        args.append("--SandboxBackend.spares=0")
    if not head_start:
        args.append("--SandboxBackend.head_start=False")
    launched = time.perf_counter()
    km, kc = start_new_kernel(kernel_name="tierkernel", extra_arguments=args, cwd=KERNEL_CWD)
    try:
        time.sleep(pause)
        cell = round_trip(kc, "%%tier sandbox\n1+1")
        return cell, time.perf_counter() - launched
    finally:
        if spare:
            wait_for_spare(client, runtime)
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def wait_for_spare(client: Any, runtime: str, within: float = 60) -> None:
    """Wait until a spare container of ``runtime`` waits for a kernel."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for container in sandbox_spares.list_spares(client):
            labels = container.labels or {}
            if (labels.get("org.tierkernel.runtime") == runtime and container.status == "running"
                    and sandbox_spares.claimer(sandbox_spares.folder_of(container)) is None):
                return
        time.sleep(0.2)
    raise TimeoutError(f"no spare {runtime} container appeared within {within:g} s")


#: The order of the warm measurements, cycled: a de Bruijn sequence, in which each of the three
#: kinds follows each kind (itself included) exactly once per cycle. (A rotation of the three per
#: round puts the same kind after a docker exec in two rounds of three.)
_ORDER = ("sandbox", "sandbox", "native", "sandbox", "exec", "native", "native", "exec", "exec")


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def bench_runtime(runtime: str, rounds: int, client: Any, image: str,
                  settle: float) -> dict[str, float]:
    cli = shutil.which("docker")
    res: dict[str, float] = {}
    # First cells of new kernels (3 each), then docker run per cell.
    now = [new_kernel_first_cell(runtime, 0.0, False, client) for _ in range(5)]
    res["first_cell_now"] = median_ms([cell for cell, _ in now])
    res["launch_now"] = median_ms([launch for _, launch in now])
    res["first_cell_no_head"] = median_ms(
        [new_kernel_first_cell(runtime, 0.0, False, client, head_start=False)[0]
         for _ in range(3)])
    res["first_cell_2s"] = median_ms(
        [new_kernel_first_cell(runtime, 2.0, False, client)[0] for _ in range(3)])
    new_kernel_first_cell(runtime, 0.0, True, client)  # leaves the first spare
    spare = [new_kernel_first_cell(runtime, 0.0, True, client) for _ in range(5)]
    res["first_cell_spare"] = median_ms([cell for cell, _ in spare])
    res["launch_spare"] = median_ms([launch for _, launch in spare])
    remove_spares(client)
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        client.containers.run(image, ["python3", "-c", "print(1+1)"], remove=True,
                              runtime=runtime, **HARDENING)
        runs.append(time.perf_counter() - t)
    res["docker_run_sdk"] = median_ms(runs)
    if cli:
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            subprocess.run([cli, "run", "--rm", "--network", "none", "--read-only",
                            "--cap-drop", "ALL", "--user", "65534:65534", "--init",
                            "--runtime", runtime, image, "python3", "-c", "print(1+1)"],
                           check=True, capture_output=True)
            runs.append(time.perf_counter() - t)
        res["docker_run_cli"] = median_ms(runs)

    # Warm cells through one kernel, alternating with the docker exec peers.
    km, kc = start_new_kernel(kernel_name="tierkernel", cwd=KERNEL_CWD,
                              extra_arguments=[f"--SandboxBackend.runtime={runtime}"])
    peer = client.containers.run(image, ["sleep", "infinity"], detach=True, runtime=runtime,
                                 labels={"org.tierkernel.benchmark": "1"}, **HARDENING)
    try:
        for _ in range(10):
            round_trip(kc, "%%tier sandbox\n1+1")
            round_trip(kc, "1+1")
        times: dict[str, list[float]] = {"sandbox": [], "native": [], "exec": []}
        # Each warm cell also by what ran just before it: a docker exec leaves dockerd and
        # containerd busy tidying up for a few ms after it returns, and whatever comes right
        # after it pays for that on a 2-core machine.
        after: dict[tuple[str, str], list[float]] = {}
        ex_cli: list[float] = []
        st_sandbox: list[float] = []
        st_exec: list[float] = []

        def exec_once() -> float:
            t = time.perf_counter()
            peer.exec_run(["python3", "-c", "print(1+1)"])
            return time.perf_counter() - t

        measures: dict[str, Callable[[], float]] = {
            "sandbox": lambda: round_trip(kc, "%%tier sandbox\n1+1"),
            "native": lambda: round_trip(kc, "1+1"),
            "exec": exec_once,
        }
        previous = "native"  # the warm-up ended with a native cell
        for i in range(3 * rounds):
            kind = _ORDER[i % len(_ORDER)]
            if settle:
                time.sleep(settle)
            took = measures[kind]()
            times[kind].append(took)
            after.setdefault((kind, previous), []).append(took)
            previous = kind
        # The CLI exec and the streamed line, apart from the balanced order above.
        for i in range(max(rounds // 5, 1)):
            if cli:
                t = time.perf_counter()
                subprocess.run([cli, "exec", peer.id, "python3", "-c", "print(1+1)"],
                               check=True, capture_output=True)
                ex_cli.append(time.perf_counter() - t)
            if i % 2 == 0:
                st_sandbox.append(first_stream(kc, "%%tier sandbox\n" + STREAM_CELL))
                t = time.perf_counter()
                _, stream = peer.exec_run(["python3", "-c", STREAM_CELL], stream=True)
                next(iter(stream))
                st_exec.append(time.perf_counter() - t)
                for _chunk in stream:
                    pass
        for kind in ("sandbox", "native"):
            res[f"warm_{kind}_after_exec"] = median_ms(after[(kind, "exec")])
            res[f"warm_{kind}_after_cell"] = median_ms(
                after[(kind, "sandbox")] + after[(kind, "native")])
        sandbox, native, ex_sdk = times["sandbox"], times["native"], times["exec"]
        res.update(warm_sandbox=median_ms(sandbox), warm_native=median_ms(native),
                   exec_sdk=median_ms(ex_sdk), stream_sandbox=median_ms(st_sandbox),
                   stream_exec=median_ms(st_exec))
        if ex_cli:
            res["exec_cli"] = median_ms(ex_cli)
    finally:
        peer.remove(force=True)
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    return res


def report(runtime: str, r: dict[str, float]) -> None:
    print(f"\n== runtime {runtime} (medians, ms)")
    print(f"first sandbox cell of a new kernel, spare left       {r['first_cell_spare']:9.1f}")
    print(f"first sandbox cell, no spare, sent at once           {r['first_cell_now']:9.1f}")
    print(f"first sandbox cell, no spare, no head start, at once {r['first_cell_no_head']:9.1f}")
    print(f"first sandbox cell, no spare, after 2 s              {r['first_cell_2s']:9.1f}")
    print(f"kernel launch to first sandbox reply, spare left     {r['launch_spare']:9.1f}")
    print(f"kernel launch to first sandbox reply, no spare       {r['launch_now']:9.1f}")
    print(f"docker run --rm IMAGE python3 -c (SDK)               {r['docker_run_sdk']:9.1f}")
    if "docker_run_cli" in r:
        print(f"docker run --rm IMAGE python3 -c (CLI)               {r['docker_run_cli']:9.1f}")
    print(f"warm sandbox cell 1+1 through the kernel             {r['warm_sandbox']:9.2f}")
    print(f"native cell 1+1 through the kernel                   {r['warm_native']:9.2f}")
    for kind in ("sandbox", "native"):
        print(f"  {kind} cell right after a docker exec / a cell     "
              f"{r[f'warm_{kind}_after_exec']:6.2f} / {r[f'warm_{kind}_after_cell']:.2f}")
    print(f"docker exec CONTAINER python3 -c (SDK)               {r['exec_sdk']:9.1f}")
    if "exec_cli" in r:
        print(f"docker exec CONTAINER python3 -c (CLI)               {r['exec_cli']:9.1f}")
    print(f"first streamed line: sandbox cell                    {r['stream_sandbox']:9.2f}")
    print(f"first streamed line: docker exec (SDK)               {r['stream_exec']:9.1f}")
    print("ratios:")
    print(f"  warm cell / docker exec (SDK)       {r['warm_sandbox'] / r['exec_sdk']:.3f}"
          "  (target <= 0.1)")
    if "exec_cli" in r:
        print(f"  warm cell / docker exec (CLI)       {r['warm_sandbox'] / r['exec_cli']:.3f}")
    print(f"  warm cell / native cell             {r['warm_sandbox'] / r['warm_native']:.2f}")
    run = r["docker_run_sdk"]
    print(f"  first cell (spare) / docker run     {r['first_cell_spare'] / run:.3f}"
          "  (target <= 0.3)")
    print(f"  first cell (no spare) / docker run  {r['first_cell_now'] / run:.3f}")
    print(f"  same, head start off / docker run   {r['first_cell_no_head'] / run:.3f}")
    print(f"  first cell (no spare, 2 s) / run    {r['first_cell_2s'] / run:.3f}")
    print(f"  launch to reply (spare) / docker run  {r['launch_spare'] / run:.2f}")
    print(f"  launch to reply (no spare) / run      {r['launch_now'] / run:.2f}")
    print(f"  first line / docker exec first line {r['stream_sandbox'] / r['stream_exec']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=100, help="warm cells per kind")
    parser.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                        help="pause before each warm measurement (a person between cells; "
                        "lets the engine finish tidying up after the previous docker exec)")
    parser.add_argument("--runtime", action="append",
                        help="runtime(s) to measure (default: runc and, if registered, runsc)")
    args = parser.parse_args()
    ensure_specs()
    client = connect(timeout=120)
    image = image_ref()
    runtimes = args.runtime or [r for r in ("runc", "runsc")
                                if r in (client.info().get("Runtimes") or {})]
    results = {rt: bench_runtime(rt, args.rounds, client, image, args.settle)
               for rt in runtimes}
    for runtime, res in results.items():
        report(runtime, res)


if __name__ == "__main__":
    main()
