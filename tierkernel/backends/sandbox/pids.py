"""The fork-bomb check after a sandbox cell: whether the container's processes fill its
process limit and keep it full, so that the container is no use to the next cell.

The cap a bomb meets: under runc the container's pids cgroup (``pids_limit``), read from the
host's cgroup files in microseconds; under runsc the host cgroup counts gVisor's own threads,
so the cap is ``ulimit nproc`` inside the sandbox and the agent counts the processes. A cell
that failed on that cap gets an error that names it; a container that stays full after the
cell is replaced (the backend does that, on :func:`after_cell`'s word).
"""

from __future__ import annotations

import contextlib
import os
import time

from tierkernel.backends.agent.session import AgentSession
from tierkernel.backends.base import ExecError
from tierkernel.backends.sandbox.container import Container
from tierkernel.errors import ProcessLimitError

#: Seconds a process count must stay low after a fork bomb before the container is kept.
SETTLED_FOR = 1.0
#: Containers' pids cgroup folders, once found (asked after every cell; they never move).
_cgroup_dirs: dict[str, str] = {}


def after_cell(container: Container, session: AgentSession | None, nproc: int,
               error: ExecError | None) -> tuple[ExecError | None, bool]:
    """The cell's error with the process limit behind it named, and whether the container
    must be replaced: its processes filled the limit (in the cell, or left running in the
    background) and did not fall back within 3 s. ``session`` is the container's agent (None
    when it has none now); ``nproc`` is runsc's ``ulimit nproc``. Blocking."""
    limited = error is not None and is_process_limit(error)
    # A dying bomb frees its slots within a moment; a live one keeps churning near the
    # limit, and then the container is no use to the next cell.
    suspicious = at_limit(container, session, nproc) or limited
    if suspicious and not settles(container, session, nproc, within=3.0):
        evalue = (f"the cell's processes filled the sandbox's limit of "
                  f"{limit_text(container, nproc)} and kept it full, so the container was "
                  "removed; its variables and files are gone and the next sandbox cell starts "
                  "a new one")
        ename = ProcessLimitError.__name__
        return ExecError(ename, evalue, [f"{ename}: {evalue}"]), True
    if error is not None and limited:
        evalue = f"{error.evalue} -- the sandbox allows at most {limit_text(container, nproc)}"
        return ExecError(error.ename, evalue, [*error.traceback[:-1],
                                               f"{error.ename}: {evalue}"]), False
    return error, False


def at_limit(container: Container, session: AgentSession | None, nproc: int) -> bool:
    """Whether the container's processes at the cell's end look like a fork bomb's.

    runc: 90% of the pids limit, from the host's pids cgroup (microseconds to read).
    runsc: the agent's count at the cell's end; a bomb in gVisor holds 60-70% of ``ulimit
    nproc``, so half of it is enough to look closer.
    """
    if container.spec.runtime == "runc":
        current = _pids_current(container.id)
        return current is not None and current >= int(container.pids_limit * 0.9)
    procs = session.procs if session is not None else None
    return procs is not None and procs >= nproc // 2


def settles(container: Container, session: AgentSession | None, nproc: int,
            within: float) -> bool:
    """Wait up to ``within`` s for the container's processes to fall back to a quarter of
    their limit and stay there; True when they did (or cannot be counted), or when at the
    end the count is below 90% of the limit and nothing is still forking at a furious
    rate (a pool of workers: under runsc, half the limit is only 32 processes).

    One low sample is not enough: a bomb whose processes die in a burst dips below a
    quarter for a moment, and its survivors fill the limit again within milliseconds
    (seen on a loaded CI machine). A count that stays low for ``SETTLED_FOR`` s with
    its churn marker still (no new pid under runsc; under runc, where only refused forks
    are counted, just low) has no forking loop left in it, unless the wait so far shows
    a bomb's churn (a bomb quiet for longer than that is caught after a later cell).
    At the end, a count that was full again in the second half of the wait is a bomb
    that pauses between rounds, and churn tells one sampled at, say, 80%:
    under runc the pids cgroup counts the forks it refused (in the last second), under
    runsc the agent reports the highest pid it has seen (over the whole wait).
    """
    start = time.monotonic()
    runc = container.spec.runtime == "runc"
    limit = container.pids_limit if runc else nproc
    samples: list[tuple[float, int, int]] = []
    low_since: float | None = None
    low_mark = 0
    while True:
        sample = _count(container, session, runc)
        now = time.monotonic()
        if sample is None:
            return True
        samples.append((now, *sample))
        if sample[0] >= limit // 4:
            low_since = None
        elif low_since is None or sample[1] != low_mark:
            # Low, but processes are still being made (or refused): a refill may be
            # under way, so the quiet stretch starts again.
            low_since, low_mark = now, sample[1]
        elif now - low_since >= SETTLED_FOR and not _churning(samples, runc, limit):
            return True
        if now - start >= within:
            # Full again at any time in the second half of the wait: something keeps
            # filling the limit (a bomb that pauses between rounds is full in each).
            peak = max(n for t, n, _ in samples if t >= now - within / 2)
            return not (peak >= int(limit * 0.9) or _churning(samples, runc, limit))
        time.sleep(0.05)


def limit_text(container: Container, nproc: int) -> str:
    """The limit a fork bomb meets in ``container``, for messages."""
    return (f"{nproc} processes (ulimit nproc)" if container.spec.runtime == "runsc"
            else f"{container.pids_limit} processes (pids limit)")


def is_process_limit(error: ExecError) -> bool:
    """Whether a cell's error is a process start refused at the limit."""
    text = f"{error.ename}: {error.evalue}"
    return error.ename == "BlockingIOError" or "Resource temporarily unavailable" in text


def _count(container: Container, session: AgentSession | None,
           runc: bool) -> tuple[int, int] | None:
    """(processes, churn marker) in the container now, or None when it cannot be told.

    The marker grows while processes keep being made: under runc the forks the pids
    cgroup refused so far, under runsc the highest pid seen so far.
    """
    if runc:
        return _pids_cgroup(container.id)
    return session.count_processes() if session is not None else None


def _pids_cgroup_dir(container_id: str) -> str | None:
    """The container's pids cgroup folder on this host (cgroup v1 or v2), or None when it is
    not visible here (a remote engine, another cgroup layout, not made yet)."""
    found = _cgroup_dirs.get(container_id)
    if found is not None:
        return found
    if len(_cgroup_dirs) > 256:  # containers come and go: forget the old ones
        _cgroup_dirs.clear()
    for path in (f"/sys/fs/cgroup/pids/docker/{container_id}",
                 f"/sys/fs/cgroup/docker/{container_id}",
                 f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope"):
        if os.path.exists(f"{path}/pids.current"):
            _cgroup_dirs[container_id] = path
            return path
    return None


def _pids_current(container_id: str) -> int | None:
    """How many tasks the container's pids cgroup holds, read from the host's cgroup files
    (microseconds, unlike an engine stats call); None when they are not visible here."""
    path = _pids_cgroup_dir(container_id)
    if path is None:
        return None
    try:
        with open(f"{path}/pids.current") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _pids_cgroup(container_id: str) -> tuple[int, int] | None:
    """(tasks in the container's pids cgroup, forks it has refused at the limit so far), or
    None when the cgroup is not visible here."""
    current = _pids_current(container_id)
    path = _pids_cgroup_dir(container_id)
    if current is None or path is None:
        return None
    refused = 0
    with contextlib.suppress(OSError, ValueError), open(f"{path}/pids.events") as handle:
        for line in handle:
            key, _, value = line.partition(" ")
            if key == "max":
                refused = int(value)
    return current, refused


def _churning(samples: list[tuple[float, int, int]], runc: bool, limit: int) -> bool:
    """Whether the (time, processes, marker) samples show processes still being made at a
    bomb's rate. runc: forks refused at the limit in the last second (a pool of workers
    below the limit never has one refused). runsc: pids advancing by the limit or more over
    the whole wait (a steady pool reuses few)."""
    if runc:
        last_t, _, last_refused = samples[-1]
        earlier = [s for s in samples if s[0] <= last_t - 1.0] or samples[:1]
        return last_refused > earlier[-1][2]
    return samples[-1][2] - samples[0][2] >= limit
