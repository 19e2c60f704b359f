"""The execution API's overhead against its peers, measured in one run.

- ``POST /execute`` of a trivial cell in a warm session (wasm and sandbox), against the same
  cell sent through jupyter_client to a local tierkernel kernel (the server's own path minus
  HTTP), alternating. Target (issue 17): <= 1.5x + 2 ms.
- create a session, then its first sandbox cell, with a spare container waiting (the usual case
  on a server that has run a session before), against ``docker run --rm IMAGE python3 -c``
  measured here and E2B's published ~150 ms sandbox start. Target: under 0.15 s.

    .venv/bin/python benchmarks/serve.py [--rounds 100]

Starts its own ``tierkernel serve`` on a free loopback port. Not part of CI.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from jupyter_client.manager import start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.latency import round_trip
from tierkernel.backends.sandbox.engine import connect
from tierkernel.backends.sandbox.image import image_ref

TOKEN = "benchmark-token-0123456789abcdef"
CLI = os.path.join(os.path.dirname(sys.executable), "tierkernel")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="tierkernel-bench-")
    port = free_port()
    env = {**os.environ, "TIERKERNEL_TOKEN": TOKEN}
    server = subprocess.Popen([CLI, "serve", "--port", str(port), "--log-level", "warning"],
                              env=env, cwd=folder, stdout=subprocess.DEVNULL)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                       headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                api.get("/languages").raise_for_status()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        print("trivial cell (1+1), warm session, median of", args.rounds, "(ms); alternating")
        print(f"{'tier':8s} {'HTTP /execute':>14s} {'jupyter_client':>15s} {'ratio':>7s}  "
              "target <= 1.5x + 2 ms")
        for tier in ("wasm", "sandbox"):
            sid = api.post("/sessions", json={"tier": tier}).json()["id"]
            km, kc = start_new_kernel(kernel_name="tierkernel", cwd=folder,
                                      extra_arguments=[f"--TierKernel.default_tier={tier}"])
            try:
                cell = f"%%tier {tier}\n1+1"
                for _ in range(5):
                    api.post("/execute", json={"code": "1+1", "session": sid})
                    round_trip(kc, cell)
                http: list[float] = []
                local: list[float] = []
                for _ in range(args.rounds):
                    started = time.perf_counter()
                    answer = api.post("/execute", json={"code": "1+1", "session": sid})
                    http.append(time.perf_counter() - started)
                    assert answer.json()["success"], answer.text
                    local.append(round_trip(kc, cell))
                h, j = median_ms(http), median_ms(local)
                verdict = "ok" if h <= 1.5 * j + 2 else "over"
                print(f"{tier:8s} {h:14.2f} {j:15.2f} {h / j:7.2f}  ({verdict}: "
                      f"limit {1.5 * j + 2:.2f})")
            finally:
                api.delete(f"/sessions/{sid}")
                kc.stop_channels()
                km.shutdown_kernel(now=False)

        # The server keeps a kernel started ahead for the next session (c.Serve.spare_sessions),
        # whose sandbox tier starts with it.
        firsts: list[float] = []
        for _ in range(5):
            time.sleep(4)  # the last session's spare is made after its spare_delay
            started = time.perf_counter()
            sid = api.post("/sessions", json={"tier": "sandbox"}).json()["id"]
            answer = api.post("/execute", json={"code": "1+1", "session": sid})
            firsts.append(time.perf_counter() - started)
            assert answer.json()["success"], answer.text
            api.delete(f"/sessions/{sid}")
        client = connect()
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            client.containers.run(image_ref(), ["python3", "-c", "print(1+1)"], remove=True,
                                  network_mode="none")
            runs.append(time.perf_counter() - started)
        first, run = median_ms(firsts), median_ms(runs)
        print(f"\ncreate session + first sandbox cell (kernel ahead)   {first:8.1f} ms")
        print(f"docker run --rm IMAGE python3 -c                      {run:8.1f} ms")
        print("E2B's published sandbox start                         ~150 ms")
        print(f"ratio to docker run {first / run:.2f}; target under 150 ms: "
              f"{'ok' if first < 150 else 'over'}")
    finally:
        api.close()
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
