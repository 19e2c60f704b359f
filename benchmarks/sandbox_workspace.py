"""What the size of the workspace costs a sandbox cell, against the same cell in an empty one.

For each fsx backend (memory, sqlite, local folder), one kernel whose workspace holds
``--files`` small files in folders of 100, and one whose workspace is empty, measured
alternately in the same run:

- a cell that writes one small file: it must be copied back into fsx (only what changed, not
  the tree) before the reply;
- a cell that reads nothing (``1+1``) right after it: fsx changed (the copy back wrote it), so
  the host compares fsx with what the container has, which walks fsx's tree;
- the same cell once more: nothing changed on either side, and both find that out from
  inotify counts and change tokens, without a walk;

and, as the per-cell peer, ``docker exec CONTAINER tar -c -C /workspace .`` of the same tree
(what an implementation that copies the workspace out after every cell would pay).

    .venv/bin/python benchmarks/sandbox_workspace.py [--files 2000] [--rounds 30]

Not part of CI: wall-clock numbers are for people, not assertions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.latency import ensure_specs, round_trip
from benchmarks.sandbox_latency import HARDENING
from tierkernel.backends.sandbox.engine import connect
from tierkernel.backends.sandbox.image import image_ref
from tierkernel.fsx import Fsx

S = "%%tier sandbox\n"


def fill(url: str, files: int) -> None:
    """Put ``files`` small files, 100 per folder, into the workspace at ``url``."""
    fs = Fsx(url=url).facade()
    try:
        for i in range(files):
            folder = f"/data/d{i // 100}"
            if i % 100 == 0:
                fs.mkdir(folder, recursive=True)
            fs.write_file(f"{folder}/f{i}.txt", f"row {i}\n")
    finally:
        fs.close()


def urls(where: Path, backend: str) -> str:
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite://{where / 'ws.db'}"
    (where / "folder").mkdir(exist_ok=True)
    return (where / "folder").as_uri()


def kernel(url: str, files: int) -> tuple[KernelManager, BlockingKernelClient]:
    """A kernel on ``url``; a memory workspace is filled from inside it (it lives there)."""
    km, kc = start_new_kernel(kernel_name="tierkernel",
                              env={**os.environ, "TIERKERNEL_FSX_URL": url})
    if url == "memory://" and files:
        round_trip(kc, f"for i in range({files}):\n"
                       "    if i % 100 == 0: fs.mkdir(f'/data/d{i // 100}', recursive=True)\n"
                       "    fs.write_file(f'/data/d{i // 100}/f{i}.txt', f'row {i}\\n')")
    for _ in range(3):  # the container, its copy of the workspace, the agent's watch
        round_trip(kc, S + "1+1")
    return km, kc


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def bench(backend: str, files: int, rounds: int, client: Any, image: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as big_dir, tempfile.TemporaryDirectory() as empty_dir:
        big_url, empty_url = urls(Path(big_dir), backend), urls(Path(empty_dir), backend)
        if backend != "memory":
            fill(big_url, files)
        kernels = {"big": kernel(big_url, files), "empty": kernel(empty_url, 0)}
        peer = client.containers.run(image, ["sleep", "infinity"], detach=True,
                                     labels={"org.tierkernel.benchmark": "1"}, **HARDENING)
        try:
            # The peer's tree: the same files, made in its /tmp (its only writable place).
            peer.exec_run(["sh", "-c", f"mkdir -p /tmp/ws && cd /tmp/ws && for i in $(seq 0 "
                                       f"{files - 1}); do d=d$((i / 100)); mkdir -p $d; "
                                       "echo row $i > $d/f$i.txt; done"])
            times: dict[str, list[float]] = {}
            for i in range(rounds):
                for name, (_, kc) in kernels.items():
                    times.setdefault(f"write_{name}", []).append(
                        round_trip(kc, S + f"open('out.txt', 'w').write('{i}')"))
                    times.setdefault(f"after_{name}", []).append(round_trip(kc, S + "1+1"))
                    times.setdefault(f"read_{name}", []).append(round_trip(kc, S + "1+1"))
                t = time.perf_counter()
                peer.exec_run(["tar", "-c", "-C", "/tmp/ws", "."])
                times.setdefault("exec_tar", []).append(time.perf_counter() - t)
        finally:
            peer.remove(force=True)
            for km, kc in kernels.values():
                kc.stop_channels()
                km.shutdown_kernel(now=True)
    return {name: median_ms(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=2000, help="files in the big workspace")
    parser.add_argument("--rounds", type=int, default=30, help="cells of each kind")
    parser.add_argument("--backend", action="append", choices=["memory", "sqlite", "local"],
                        help="fsx backend(s) to measure (default: all three)")
    args = parser.parse_args()
    ensure_specs()
    client = connect(timeout=120)
    image = image_ref()
    for backend in args.backend or ["memory", "sqlite", "local"]:
        r = bench(backend, args.files, args.rounds, client, image)
        print(f"\n== {backend} workspace, {args.files} files against empty (medians, ms)")
        for key, what in (("write", "cell writing a file"), ("after", "1+1 right after it"),
                          ("read", "1+1 once more")):
            big, empty = r[f"{key}_big"], r[f"{key}_empty"]
            print(f"{what:<22}{big:8.2f} / {empty:8.2f}   ratio {big / empty:.2f}")
        print(f"docker exec tar -c of the same tree (per-cell copy-out peer): "
              f"{r['exec_tar']:.1f}; writing cell / it: {r['write_big'] / r['exec_tar']:.3f}")


if __name__ == "__main__":
    main()
