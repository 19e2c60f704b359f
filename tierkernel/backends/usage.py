"""Per-cell resource use, measured on the host: CPU seconds, peak memory and processes.

A guest's own account of what it used is never taken: a hostile cell could report anything.
Each tier reads what the host kernel already keeps about the guest's processes:

- :class:`SelfUsage` (``native``): the CPU time of the kernel's main thread, which runs the
  cell, and the kernel's peak RSS (``VmHWM``), reset before the cell through
  ``/proc/self/clear_refs``.
- :class:`ProcessUsage` (``process``): the agent's CPU time and that of the children it waited
  for (``/proc/PID/stat``), and its peak RSS, reset the same way.
- :class:`ContainerUsage` (``sandbox``): the container's cgroups: CPU time (``cpuacct``), peak
  memory (``memory.max_usage_in_bytes``, reset before the cell where the host may write it)
  and the most tasks it held (``pids.peak``, under runc only: under gVisor the host counts
  the sandbox's own threads, not the guest's processes).

The ``wasm`` tier measures its turns itself (``wasm/transport.py``): the CPU time of the threads
that ran the turn and the guest's linear memory. Every read is a few microseconds; a value
the host cannot read here is None (a remote engine, another cgroup layout), never a guess.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import stat
import time
from typing import Protocol

from tierkernel.backends.base import ResourceUsage

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class UsageProbe(Protocol):
    """Measures one cell at a time: :meth:`begin` right before it starts, :meth:`end` after."""

    def begin(self) -> None:
        """Take the starting marks (and reset the peaks) before the cell starts."""

    def end(self) -> ResourceUsage | None:
        """What the cell used since :meth:`begin`; None when nothing could be measured."""
        ...


def human_size(value: int) -> str:
    """A byte count for people: ``212.4 MiB``, ``1.50 GiB``."""
    if value >= 1 << 30:
        return f"{value / (1 << 30):.2f} GiB"
    return f"{value / (1 << 20):.1f} MiB"


def _hwm(status: bytes) -> int | None:
    """``VmHWM`` of a ``/proc/PID/status`` text, in bytes."""
    at = status.find(b"VmHWM:")
    if at < 0:
        return None
    end = status.find(b"kB", at)
    try:
        return int(status[at + 6 : end]) * 1024
    except ValueError:
        return None


class SelfUsage:
    """The kernel's own cells (the native tier): main-thread CPU time and peak RSS.

    On the native tier's hot path, so the peak is read the cheap way where it can be: after
    the reset, ``getrusage``'s ``ru_maxrss`` is the larger of the peak RSS and the peak kept
    from the kernel's exited threads (which the reset does not clear). While that kept peak
    is below the RSS the cell starts at, ``ru_maxrss`` at the end is exactly the cell's peak
    (≈5 µs a cell); otherwise so is any new high it shows, and only a cell that stayed below
    it reads ``VmHWM`` from ``/proc/self/status`` (≈20 µs). The /proc files stay open.
    """

    def __init__(self) -> None:
        self._cpu0 = 0.0
        self._reset = False
        self._max0 = 0
        self._kept_above = False
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._files: dict[str, int] = {}
        for name, flags in (("clear_refs", os.O_WRONLY), ("status", os.O_RDONLY),
                            ("statm", os.O_RDONLY)):
            with contextlib.suppress(OSError):  # no /proc here: CPU time is still measured
                self._files[name] = os.open(f"/proc/self/{name}", flags | os.O_CLOEXEC)

    def begin(self) -> None:
        """Reset the peak RSS to the current RSS; note the thread's CPU time."""
        self._reset = False
        clear = self._files.get("clear_refs")
        if clear is not None:
            try:
                os.write(clear, b"5")  # 5: reset the peak RSS (proc(5), clear_refs)
                self._reset = True
            except OSError:
                pass
        if self._reset:
            rss = self._rss()
            self._max0 = _maxrss()
            self._kept_above = rss is None or self._max0 > rss
        self._cpu0 = time.thread_time()

    def _rss(self) -> int | None:
        statm = self._files.get("statm")
        if statm is None:
            return None
        try:
            return int(os.pread(statm, 256, 0).split()[1]) * self._page
        except (OSError, IndexError, ValueError):
            return None

    def end(self) -> ResourceUsage:
        """The thread's CPU time since :meth:`begin` and the peak RSS since the reset."""
        cpu = time.thread_time() - self._cpu0
        peak = None
        if self._reset:
            high = _maxrss()
            if high > self._max0 or not self._kept_above:
                peak = high
            elif "status" in self._files:
                with contextlib.suppress(OSError):
                    peak = _hwm(os.pread(self._files["status"], 8192, 0))
        return ResourceUsage(cpu_seconds=cpu, peak_memory_bytes=peak)


def _maxrss() -> int:
    """``ru_maxrss`` of this process, in bytes (Linux counts it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ProcessUsage:
    """An agent process on this host (the process tier): its CPU time with that of the
    children it has waited for, and its peak RSS (a child's memory is its own)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._cpu0: float | None = None
        self._reset = False

    def _cpu(self) -> float | None:
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            # utime, stime, cutime, cstime: fields 14-17 of proc(5), counted from the state.
            return sum(int(value) for value in fields[11:15]) / _TICK
        except (OSError, IndexError, ValueError):
            return None

    def begin(self) -> None:
        """Note the CPU time and reset the peak RSS."""
        self._cpu0 = self._cpu()
        try:
            with open(f"/proc/{self.pid}/clear_refs", "wb", buffering=0) as handle:
                handle.write(b"5")
            self._reset = True
        except OSError:
            self._reset = False

    def end(self) -> ResourceUsage | None:
        """CPU seconds and peak RSS since :meth:`begin` (None once the process is gone)."""
        cpu = self._cpu()
        peak = None
        if self._reset:
            try:
                with open(f"/proc/{self.pid}/status", "rb") as handle:
                    peak = _hwm(handle.read())
            except OSError:
                peak = None
        if cpu is None or self._cpu0 is None:
            return ResourceUsage(peak_memory_bytes=peak) if peak is not None else None
        return ResourceUsage(cpu_seconds=max(0.0, cpu - self._cpu0), peak_memory_bytes=peak)


_CGROUP = "/sys/fs/cgroup"

#: A container id as the engine gives it: 64 lowercase hex digits, nothing else. Anything
#: else (an empty id, a short one, a path) never names a cgroup folder: with an empty id the
#: container's folder would be the engine's own (``.../memory/docker``), whose peak is every
#: container's.
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


def _own_folder(parent: str, name: str) -> str | None:
    """``parent/name`` resolved, if it is a real folder directly inside ``parent`` (resolved
    too), reached through no symbolic link; None otherwise."""
    base = os.path.realpath(parent)
    folder = os.path.join(base, name)
    if os.path.realpath(folder) != folder or os.path.dirname(folder) != base:
        return None
    return folder if os.path.isdir(folder) else None


def container_cgroups(container_id: str) -> dict[str, str]:
    """The container's cgroup folders on this host, by what they hold (``cpu``, ``memory``,
    ``pids``), for cgroup v1 (one hierarchy per controller) or v2 (one folder); empty when
    the host does not show them (a remote engine, another layout) or ``container_id`` is not
    an engine's container id. Each folder is the container's own: directly inside the
    engine's cgroup folder, reached through no symbolic link."""
    if not _CONTAINER_ID.fullmatch(container_id):
        return {}
    found: dict[str, str] = {}
    for kind, hierarchy in (("cpu", "cpuacct"), ("memory", "memory"), ("pids", "pids")):
        folder = _own_folder(f"{_CGROUP}/{hierarchy}/docker", container_id)
        if folder is not None:
            found[kind] = folder
    if found:
        return found
    for parent, name in ((f"{_CGROUP}/docker", container_id),
                         (f"{_CGROUP}/system.slice", f"docker-{container_id}.scope")):
        folder = _own_folder(parent, name)
        if folder is not None and os.path.exists(f"{folder}/cgroup.controllers"):
            return {"cpu": folder, "memory": folder, "pids": folder, "v2": folder}
    return {}


def _open_file(path: str, flags: int) -> int:
    """Open an existing regular file, never through a symbolic link, never creating one."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return fd


def _read_int(path: str, key: str | None = None) -> int | None:
    """An integer cgroup file, or the value of ``key`` in a ``key value`` one."""
    try:
        fd = _open_file(path, os.O_RDONLY)
        try:
            text = os.read(fd, 65536)
        finally:
            os.close(fd)
        if key is None:
            return int(text.strip())
        for line in text.splitlines():
            name, _, value = line.partition(b" ")
            if name.decode() == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


class ContainerUsage:
    """A sandbox container, from its cgroups on this host (see the module docstring).

    Where the peaks cannot be reset (not root, cgroup v2), a peak is reported only when the
    cell raised it above the container's earlier peak: then it is exactly the cell's.
    """

    def __init__(self, container_id: str, count_processes: bool) -> None:
        self.container_id = container_id
        self.count_processes = count_processes
        self._dirs: dict[str, str] | None = None
        self._cpu0: int | None = None
        self._mem0: int | None = None
        self._mem_reset = False
        self._pids0: int | None = None
        self._tasks0: int | None = None

    def _dir(self, kind: str) -> str | None:
        if self._dirs is None:  # looked for once (begin looks again while none is found)
            self._dirs = container_cgroups(self.container_id)
        return self._dirs.get(kind)

    def _cpu_ns(self) -> int | None:
        path = self._dir("cpu")
        if path is None:
            return None
        if self._dirs and "v2" in self._dirs:
            usec = _read_int(f"{path}/cpu.stat", "usage_usec")
            return None if usec is None else usec * 1000
        return _read_int(f"{path}/cpuacct.usage")

    def peak_memory(self) -> int | None:
        """The memory peak the container's cgroup holds now (since the last reset, or since
        the container started), in bytes."""
        path = self._dir("memory")
        if path is None:
            return None
        if self._dirs and "v2" in self._dirs:
            return _read_int(f"{path}/memory.peak")
        return _read_int(f"{path}/memory.max_usage_in_bytes")

    def _pids(self) -> tuple[int | None, int | None]:
        path = self._dir("pids")
        if path is None:
            return None, None
        return _read_int(f"{path}/pids.peak"), _read_int(f"{path}/pids.current")

    def begin(self) -> None:
        """Note the CPU time; reset the memory peak (or note it); note the task counts."""
        if not self._dirs:
            self._dirs = None  # not found yet: a cgroup made late, or none to find
        self._cpu0 = self._cpu_ns()
        self._mem_reset = False
        path = self._dir("memory")
        if path is not None and not (self._dirs and "v2" in self._dirs):
            try:
                # The container's own file only (see container_cgroups): never created,
                # never reached through a link.
                fd = _open_file(f"{path}/memory.max_usage_in_bytes", os.O_WRONLY)
                try:
                    os.write(fd, b"0")  # v1: the peak restarts from the current usage
                finally:
                    os.close(fd)
                self._mem_reset = True
            except OSError:
                pass
        self._mem0 = None if self._mem_reset else self.peak_memory()
        if self.count_processes:
            self._pids0, self._tasks0 = self._pids()

    def end(self) -> ResourceUsage | None:
        """What the container used since :meth:`begin`."""
        cpu_ns = self._cpu_ns()
        cpu = (None if cpu_ns is None or self._cpu0 is None
               else max(0, cpu_ns - self._cpu0) / 1e9)
        peak = self.peak_memory()
        if peak is not None and not self._mem_reset and (
                self._mem0 is None or peak <= self._mem0):
            peak = None  # not reset and not raised: the cell's own peak is unknown
        processes = None
        if self.count_processes:
            pids_peak, tasks = self._pids()
            if pids_peak is not None and self._pids0 is not None and pids_peak > self._pids0:
                processes = pids_peak  # a new peak: reached during this cell
            else:
                # Not resettable (cgroup v1): at least as many as at either end of the cell.
                counts = [n for n in (self._tasks0, tasks) if n is not None]
                processes = max(counts) if counts else None
        if cpu is None and peak is None and processes is None:
            return None
        return ResourceUsage(cpu_seconds=cpu, peak_memory_bytes=peak, processes=processes)
