"""fsx I/O throughput per backend, as a ratio to plain local files measured in the same run.

    .venv/bin/python benchmarks/fsx_io.py [--small 1000] [--big-mb 100]

For each backend (memory, sqlite with synchronous=full (the default) and =normal, local dir):
write then read 1,000 small files (1 KiB), and write then read one 100 MB file. The baseline is
the same work with open()/write()/read() on a temporary host directory. Ratios > 1 mean slower
than plain files. Timings are wall-clock on a shared machine: compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tierkernel.fsx import Fsx, FsxFacade

SMALL = b"x" * 1024
BLOCK = os.urandom(1 << 20)


class _Big:
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = min(self.left, len(BLOCK) if n < 0 else n, len(BLOCK))
        self.left -= n
        return BLOCK[:n]


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain(root: Path, small: int, big: int) -> dict[str, float]:
    d = root / "small"
    d.mkdir()

    def write_small() -> None:
        for i in range(small):
            with open(d / f"f{i}", "wb") as f:
                f.write(SMALL)

    def read_small() -> None:
        for i in range(small):
            with open(d / f"f{i}", "rb") as f:
                f.read()

    def write_big() -> None:
        src = _Big(big)
        with open(root / "big.bin", "wb") as f:
            while chunk := src.read(1 << 20):
                f.write(chunk)

    def read_big() -> None:
        with open(root / "big.bin", "rb") as f:
            while f.read(1 << 20):
                pass

    return {"small write": timed(write_small), "small read": timed(read_small),
            "big write": timed(write_big), "big read": timed(read_big)}


def fsx(fs: FsxFacade, small: int, big: int) -> dict[str, float]:
    fs.mkdir("/small")

    def write_small() -> None:
        for i in range(small):
            fs.write_file(f"/small/f{i}", SMALL)

    def read_small() -> None:
        for i in range(small):
            fs.read_file(f"/small/f{i}", encoding=None)

    def write_big() -> None:
        fs.write_file("/big.bin", _Big(big))  # type: ignore[arg-type]

    def read_big() -> None:
        with fs.open("/big.bin", "rb") as f:
            while f.read(1 << 20):
                pass

    return {"small write": timed(write_small), "small read": timed(read_small),
            "big write": timed(write_big), "big read": timed(read_big)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000, help="number of small files")
    parser.add_argument("--big-mb", type=int, default=100, help="size of the big file in MB")
    args = parser.parse_args()
    big = args.big_mb * 1000 * 1000
    with tempfile.TemporaryDirectory(prefix="fsx-bench-") as tmp:
        base = Path(tmp)
        (base / "plain").mkdir()
        baseline = plain(base / "plain", args.small, big)
        (base / "local").mkdir()
        backends = {
            "memory": "memory://",
            "sqlite (synchronous=full)": f"sqlite://{base}/full.db",
            "sqlite (synchronous=normal)": f"sqlite://{base}/normal.db?synchronous=normal",
            "local": (base / "local").as_uri(),
        }
        print(f"{args.small} files of 1 KiB, one file of {args.big_mb} MB; "
              f"ratio = backend time / plain host files time (lower is better)\n")
        header = f"{'backend':30}" + "".join(f"{k:>22}" for k in baseline)
        print(header)
        print(f"{'plain files (seconds)':30}" + "".join(f"{v:>21.3f}s" for v in
                                                          baseline.values()))
        for name, url in backends.items():
            fs = Fsx(url=url).facade()
            try:
                result = fsx(fs, args.small, big)
            finally:
                fs.close()
            print(f"{name:30}" + "".join(
                f"{result[k] / baseline[k]:>14.1f}x ({result[k]:5.2f}s)" for k in baseline))


if __name__ == "__main__":
    main()
