"""A head start for the first sandbox cell: a spare container made while the kernel starts.

A kernel's warm start (``SandboxBackend.start``) can only begin once ipykernel has set the
whole kernel up and its event loop runs, about 0.45 s into the process; creating a container
and starting its agent then takes 0.3 s (runc) to 0.6 s (runsc) more. A client that sends its
first cell the moment the kernel answers (papermill, nbclient, an AI agent) waits for most of
that. Spares left by an earlier kernel hide it, but not for the first kernel after boot, or
after ``spare_ttl`` with no kernel running.

So as soon as the kernel's configuration is final (before its sockets, shell and event loop
exist), the app calls :func:`begin`: it forks a helper process that makes one spare container
with that configuration (see sandbox_spares.py) and exits. The helper works on the other core
while the kernel finishes starting, and the kernel's warm start then claims that spare like
any other (:meth:`HeadStart.wait` first waits for it to be ready). It is a spare, keyed by its
exact create arguments, so nothing is lost or wrong when the kernel ends up wanting another
spec: it stays for the next kernel, or expires.

The helper is forked twice and in a session of its own, so it is never left a zombie and an
interrupt sent to the kernel's process group does not cut a container creation short. It
reports over a pipe, one line at a time: ``key KEY`` (the spare key it works for), then one of
``ready`` (its spare's agent is waiting), ``have`` (an unclaimed spare was already there),
``off REASON`` or ``failed REASON``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

_DONE = ("ready", "have", "off", "failed")


class HeadStart:
    """The kernel's end of a helper that is making a spare container (see the module)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""
        self.key: str | None = None
        #: The helper's last word ("ready", "have", "off ...", "failed ..."), once it said it.
        self.outcome: str | None = None
        self._lock = threading.Lock()

    def wait(self, key: str, timeout: float) -> str | None:
        """Wait, at most ``timeout`` s, until the helper is done with a spare for ``key``;
        return its outcome (None: it works for another key, or it took too long)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.outcome is None:
                if self.key is not None and self.key != key:
                    return None  # made for other settings: a spare for a later kernel
                left = deadline - time.monotonic()
                if left <= 0 or not self._read(left):
                    break
            if self.outcome is None:  # given up: later starts must not wait for it again
                self._close()
                self.outcome = "failed it took longer than the kernel would wait"
            return self.outcome if self.key == key else None

    def _read(self, within: float) -> bool:
        """Read what the helper wrote within ``within`` s; False when it will say no more."""
        if self._fd < 0:
            return False
        ready, _, _ = select.select([self._fd], [], [], within)
        if not ready:
            return False
        chunk = os.read(self._fd, 4096)
        if not chunk:  # the helper ended (or died) without a last word
            self._close()
            self.outcome = self.outcome or "failed the helper ended without saying why"
            return False
        self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            text = line.decode("utf-8", "replace")
            if text.startswith("key "):
                self.key = text[4:]
            elif text.split(" ", 1)[0] in _DONE:
                self.outcome = text
                self._close()
                log.info("sandbox head start: %s", text)
        return True

    def _close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


_pending: HeadStart | None = None


def pending() -> HeadStart | None:
    """This kernel's head start, if it began one."""
    return _pending


#: A spare must wait longer than this for a head start: a kernel does not claim one that
#: is about to expire (sandbox_spares.candidates), so a shorter one would be made for nothing.
MIN_TTL = 15.0


def begin(config: Any) -> None:
    """Fork the helper that makes a spare with ``config`` (the kernel's final traitlets
    config); return at once. Does nothing when the config turns it off (``head_start``,
    ``warm_start``, a ``spare_ttl`` under MIN_TTL), where the process cannot fork safely
    (another thread already runs: a fork would copy its locks mid-use), or when it has
    begun one already. Never raises: the kernel starts without a head start instead."""
    if _pending is not None or not hasattr(os, "fork") or threading.active_count() > 1:
        return
    try:
        from tierkernel.backends.sandbox import SandboxBackend

        backend = SandboxBackend(config=config)  # the config's values, typed and checked
        if not (backend.head_start and backend.warm_start and backend.spare_ttl > MIN_TTL):
            return
        _fork(backend)
    except Exception as exc:  # a bad config value: the kernel reports it where it is used
        log.warning("no sandbox head start: %s", exc)


def _fork(backend: Any) -> None:
    global _pending
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        log.info("sandbox head start: cannot fork", exc_info=True)
        return
    if pid == 0:  # the first child: hand the work to a grandchild and end at once
        os.close(read_fd)
        code = 0
        try:
            os.setsid()
            if os.fork() == 0:
                _helper(backend, write_fd)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write_fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # the first child ends right after its fork: no zombie
    _pending = HeadStart(read_fd)


def _helper(backend: Any, fd: int) -> None:
    """The grandchild: make the spare, report over ``fd``, end without running the
    kernel's exit handlers (it is a copy of the kernel's process)."""
    code = 0

    def report(line: str) -> None:
        os.write(fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))

    try:
        # Stay out of the kernel's signals and terminal; keep the log quiet (the kernel
        # logs the outcome when it reads it).
        devnull = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(devnull, target)
        backend.make_head_start(report)
    except BaseException as exc:
        code = 1
        with contextlib.suppress(Exception):
            report(f"failed {type(exc).__name__}: {exc}")
    os._exit(code)
