"""Spare sandbox containers kept ready with no kernel running: ``tierkernel spares --make`` and
``tierkernel spares --keep``.

Kernels make spares for the kernels after them (``spares.py``), and a kernel that finds none
makes one while it starts (``head_start.py``). Neither helps the first kernel after boot,
or after ``spare_ttl`` with no kernel running: under gVisor its first cell, sent the moment the
kernel answers, still waits about 0.25 s for a container. A machine that runs kernels for
people who expect an instant first cell (a JupyterHub, a course platform, CI) can keep a pool:
``--keep`` tops the spares up, replaces each one before it expires, and removes what dead
kernels left, until it is stopped. The spares are made with the configuration a kernel of the
same user reads (its config files, and ``--SandboxBackend.*`` options given here), so kernels
claim them exactly as they claim each other's (the ``tierkernel spares`` command reads that
configuration through the kernel's application and hands it to :func:`backend_for`).
"""

from __future__ import annotations

import copy
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from traitlets.config import Config

from tierkernel.backends.sandbox.reaper import reap_orphans
from tierkernel.errors import EngineError


def backend_for(tier: type[Any], config: Config, runtime: str | None = None) -> Any:
    """A backend of the sandbox tier's class ``tier`` with ``config`` (and ``runtime`` as its
    default, when given) that makes spares only: it starts no container of its own."""
    if runtime:
        config = copy.deepcopy(config)
        config[tier.__name__].runtime = runtime
    return tier(config=config)


def make(backends: list[Any], count: int, fresh_for: float,
         say: Callable[[str], None]) -> tuple[int, list[str]]:
    """Top each backend's spares up to ``count`` waiting ones with at least ``fresh_for`` s
    left; return how many were made and, per runtime that failed, why (one runtime's
    trouble does not keep the others from their spares)."""
    made, failures = 0, []
    for backend in backends:
        try:
            for name in backend.keep_spares(count, fresh_for):
                made += 1
                say(f"made spare {name} (runtime {backend.runtime}); it waits "
                    f"{backend.spare_ttl:g} s for a kernel")
        except Exception as exc:  # EngineError says it in words; anything else, by name
            failures.append(f"runtime {backend.runtime}: {_in_words(exc)}")
    return made, failures


def _in_words(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"


def keep(backends: list[Any], count: int, interval: float,
         say: Callable[[str], None], stop: Callable[[], bool] | None = None) -> None:
    """Keep ``count`` spares per backend ready until ``stop()`` says so or SIGTERM/SIGINT
    arrives: every ``interval`` s, remove stale containers (dead kernels', expired spares)
    and top the spares up, replacing those that expire before the next round. Errors are
    said once per outage and the next round tries again: a service must not die of one."""
    # A plain flag, set by the handler: setting an Event there could wait on the lock the
    # interrupted wait holds.
    signalled: list[int] = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda number, _frame: signalled.append(number))

    def stopping() -> bool:
        return bool(signalled) or (stop is not None and stop())

    # A spare is replaced while it still has two rounds (and the time to make one) left, so
    # a kernel never finds only one about to expire.
    fresh_for = min(2 * interval + 30.0, min(b.spare_ttl for b in backends) / 2)
    said: list[str] = []
    while not stopping():
        try:
            for removed in reap_orphans(backends[0].engine()):
                say(f"removed stale sandbox container {removed[:12]}")
            _, failures = make(backends, count, fresh_for, say)
        except Exception as exc:
            failures = [_in_words(exc)]
        for failure in failures:
            if failure not in said:  # once per outage, not every round
                say(f"cannot keep spares now: {failure}; trying again every {interval:g} s")
        said = failures
        deadline = time.monotonic() + interval
        while not stopping() and time.monotonic() < deadline:
            time.sleep(min(0.2, interval))
    say("stopped; the spares made stay until a kernel claims them or they expire")
