"""A head start for the first sandbox cell: a spare container made while the kernel starts.

A kernel's warm start (``SandboxBackend.start``) can only begin once ipykernel has set the
whole kernel up and its event loop runs, about 0.45 s into the process; creating a container
and starting its agent then takes 0.3 s (runc) to 0.6 s (runsc) more. A client that sends its
first cell the moment the kernel answers (papermill, nbclient, an AI agent) waits for most of
that. Spares left by an earlier kernel hide it, but not for the first kernel after boot, or
after ``spare_ttl`` with no kernel running.

So as soon as the kernel's configuration is final (before its sockets, shell and event loop
exist), the tier's ``config_loaded`` hook calls :func:`begin`: it forks a helper process that
makes one spare container with that configuration (see ``spares.py``) and exits. The helper
works on the other core while the kernel finishes starting, and the kernel's warm start then
claims that spare like any other (:meth:`HeadStart.wait` first waits for it to be ready). It is
a spare, keyed by its exact create arguments, so nothing is lost or wrong when the kernel ends
up wanting another spec: it stays for the next kernel, or expires.

The configuration is final only once ipykernel is imported, 0.19 s into the process, and a
helper forked then spends another 0.08 s importing the sandbox tier and the Docker SDK before
it can create anything. So ``python -m tierkernel`` forks the helper first of all
(:func:`fork_early`, 15 ms in, through ``tierkernel.backends.early``): it imports on the other
core while the kernel imports ipykernel and connects to the engine, then waits for
:func:`begin` to hand it the configuration (pickled, over a pipe). Or it does not wait: when
the settings an earlier kernel learned still hold (``learned.py``), it makes the spare with
them at once. A kernel started some other way (its app in a test, say) forks at :func:`begin`
instead.

This module knows the tier's backend class only as its callers hand it over (:data:`TierClass`):
the backend waits for the head start (:func:`pending`), so it is the one that imports this.

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
import pickle
import select
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from tierkernel.backends.hooks import ConfigSources
from tierkernel.backends.sandbox.learned import learn, recall
from tierkernel.backends.tier_use import TierUse

log = logging.getLogger(__name__)

#: The sandbox tier's backend class (``SandboxBackend``): called with ``config=`` a traitlets
#: config, it makes a backend with those settings, whose ``make_head_start(report)`` makes the
#: spare, and whose ``warm_engine()`` and ``adopt_engine(other)`` share an engine connection.
TierClass = Callable[..., Any]

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


#: The name the sandbox tier is registered under: what ``tier_use.py`` records its cells by.
TIER = "sandbox"

#: A spare must wait longer than this for a head start: a kernel does not claim one that
#: is about to expire (spares.candidates), so a shorter one would be made for nothing.
MIN_TTL = 15.0


def fork_early(load_tier: Callable[[], TierClass]) -> None:
    """Fork the helper before the kernel imports anything else (``python -m tierkernel``
    calls this first): it imports the sandbox tier meanwhile (``load_tier()``, called in the
    helper only) and waits for :func:`begin`. Never raises; without it :func:`begin` forks a
    helper itself."""
    global _early
    if _early is not None or not hasattr(os, "fork") or threading.active_count() > 1:
        return
    try:
        config_read, config_write = os.pipe()
    except OSError:  # out of descriptors: begin() forks a helper itself, if it can
        return
    try:
        read_fd = _spawn(lambda report_fd: _early_helper(load_tier, config_read, report_fd),
                         keep_out=config_write, keep=(config_read,))
    finally:
        os.close(config_read)
    if read_fd is None:
        os.close(config_write)
    else:
        _early = (config_write, read_fd)


_early: tuple[int, int] | None = None  # (the config pipe's write end, the report pipe's read end)


def begin(config: Any, sources: ConfigSources | None, tier: TierClass) -> None:
    """Start the helper that makes a spare with ``config`` (the kernel's final traitlets
    config) and the backend class ``tier``: hand the config to the helper :func:`fork_early`
    made, or fork one now; return at once. ``sources`` (or None) says
    where the config came from: the sandbox settings are then remembered for the next
    kernel's early helper.

    Does nothing when the config turns it off (``head_start``, ``warm_start``, a
    ``spare_ttl`` under MIN_TTL), when the last ``warm_start_unused`` kernels started this
    way ran no sandbox cell (``tier_use.py``), where the process cannot fork safely (another thread
    already runs: a fork would copy its locks mid-use), or when it has begun one already.
    Never raises: the kernel starts without a head start instead."""
    global _early
    if _pending is not None:
        return
    early, _early = _early, None
    try:
        backend: Any = tier(config=config)  # the config's values, typed and checked
        wanted = (_wants(backend.head_start, backend.warm_start, backend.spare_ttl)
                  and _in_use(backend.warm_start_unused,
                              sources.argv if sources is not None else sys.argv[1:]))
    except Exception as exc:  # a bad config value: the kernel reports it where it is used
        log.warning("no sandbox head start: %s", exc)
        backend, wanted = None, False
    _start_helper(early, config, backend if wanted else None)
    if backend is not None and sources is not None:
        # Only now: the helper is already at work while this reads and writes the cache.
        learn(sources, {name: getattr(backend, name)
                        for name in backend.trait_names(config=True)})


def _start_helper(early: tuple[int, int] | None, config: Any, backend: Any) -> None:
    """Hand ``config`` to the early helper, or fork a helper for ``backend`` when there is
    none (or it is gone); with ``backend`` None (no head start wanted) tell the early helper
    so."""
    global _pending
    if early is not None:
        config_fd, early_fd = early
        if backend is None:
            os.close(config_fd)  # the helper reads no config and ends
        elif _hand_over(config_fd, config):
            _pending = HeadStart(early_fd)
            return
        os.close(early_fd)
    if backend is not None and hasattr(os, "fork") and threading.active_count() == 1:
        read_fd = _spawn(lambda report_fd: _helper(backend, report_fd))
        if read_fd is not None:
            _pending = HeadStart(read_fd)


def _wants(head_start: Any, warm_start: Any, spare_ttl: Any) -> bool:
    """Whether these settings ask for a head start (from a backend, or learned ones)."""
    return bool(head_start and warm_start and float(spare_ttl or 0) > MIN_TTL)


def _in_use(unused_limit: Any, argv: list[str]) -> bool:
    """Whether kernels started this way ran sandbox cells lately enough to warm the tier
    (``Backend.warm_start_unused``, see ``tier_use.py``); True when that cannot be told."""
    try:
        return TierUse(argv, os.getcwd()).wants_warm(TIER, int(unused_limit))
    except Exception:
        return True


def _hand_over(fd: int, config: Any) -> bool:
    """Write the pickled ``config`` to the early helper and close the pipe; False when it
    cannot be pickled or the helper is gone (the pipe is closed either way)."""
    try:
        data = memoryview(pickle.dumps(config))
        while data:
            data = data[os.write(fd, data):]
        return True
    except Exception as exc:  # an unpicklable value in a config file; a dead helper
        log.info("sandbox head start: cannot hand the config over (%s)", exc)
        return False
    finally:
        os.close(fd)


def _spawn(work: Callable[[int], None], keep_out: int = -1,
           keep: tuple[int, ...] = ()) -> int | None:
    """Run ``work(report_fd)`` in a grandchild in a session of its own; return the read end
    of its report pipe (None when the process cannot fork). The grandchild holds only its
    stdio, that pipe and the descriptors in ``keep`` (see :func:`_close_inherited`);
    ``keep_out`` is one the first child must close before it forks (the config pipe's write
    end: the grandchild's read of that pipe would never end)."""
    try:
        read_fd, write_fd = os.pipe()
    except OSError:
        log.info("sandbox head start: no pipe", exc_info=True)
        return None
    try:
        pid = os.fork()
    except Exception:  # OSError; a fork warning made an error (-W error, Python 3.12+)
        os.close(read_fd)
        os.close(write_fd)
        log.info("sandbox head start: cannot fork", exc_info=True)
        return None
    if pid == 0:  # the first child: hand the work to a grandchild and end at once
        os.close(read_fd)
        code = 0
        try:
            if keep_out >= 0:
                os.close(keep_out)
            os.setsid()
            if os.fork() == 0:
                _close_inherited(keep=(write_fd, *keep))
                work(write_fd)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write_fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # the first child ends right after its fork: no zombie
    return read_fd


def _close_inherited(keep: tuple[int, ...]) -> None:
    """Close every socket the helper inherited but ``keep``: it may outlive the kernel, and
    must not hold the kernel's listening sockets once they are bound (a kernel restarted on
    the same ports could not bind them while the helper works). Other descriptors stay:
    objects of the kernel still own them, and one closing its number later would close
    whatever this process opened under that number meanwhile."""
    try:
        numbers = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: nothing to look through
        return
    for fd in numbers:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):  # listdir's own descriptor, closed already
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.close(fd)


def _quiet() -> None:
    """Stay off the kernel's stdio (a kernel manager may wait for it to close) and keep the
    log quiet (the kernel logs the outcome when it reads it)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(devnull, target)


def _early_helper(load_tier: Callable[[], TierClass], config_fd: int, fd: int) -> None:
    """The early grandchild: import while the kernel starts, then work as :func:`_helper`
    with the settings learned for this situation, or else with the config :func:`begin`
    hands over; end quietly when none comes."""
    code = 0
    try:
        _quiet()
        # The config is read from the start, in a thread: the kernel's write of it must never
        # wait for this process, whatever the engine makes it wait for below.
        config = _ConfigReader(config_fd)
        values = recall(sys.argv[1:])
        learned_off = values is not None and not (
            _wants(values.get("head_start"), values.get("warm_start"), values.get("spare_ttl"))
            and _in_use(values.get("warm_start_unused", 3), sys.argv[1:]))
        # Learned: no head start for such a kernel. None of the imports below on the kernel's
        # other core, then, unless the kernel hands a config over after all (it does only
        # when it wants a head start).
        if learned_off and not config.wait():
            os._exit(0)
        # Imported here, not at the top: the kernel imports this module before it forks the
        # helper, and must not wait for traitlets then.
        from traitlets.config import Config

        tier = load_tier()
        # Connected, and the engine's runtimes known, before the config comes. The engine's
        # address comes from the environment, not the config: the connection stays good.
        warm = tier()
        warm.warm_engine()
        guess = None
        if values is not None and not config.done.is_set():
            with contextlib.suppress(Exception):  # values this version does not take
                guess = tier(config=Config({tier.__name__: values}))
        if guess is not None and _wants(guess.head_start, guess.warm_start, guess.spare_ttl):
            guess.adopt_engine(warm)
            _helper(guess, fd)  # does not return
        data = config.wait()
        if data:
            backend = tier(config=pickle.loads(data))
            backend.adopt_engine(warm)
            _helper(backend, fd)
    except BaseException:
        code = 1
    os._exit(code)


class _ConfigReader:
    """Reads what :func:`begin` writes to the config pipe, in a thread, to its end."""

    def __init__(self, fd: int) -> None:
        self._chunks: list[bytes] = []
        self.done = threading.Event()
        threading.Thread(target=self._read, args=(fd,), daemon=True, name="config").start()

    def _read(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(fd, 1 << 16):
                self._chunks.append(chunk)
        with contextlib.suppress(OSError):
            os.close(fd)
        self.done.set()

    def wait(self) -> bytes:
        """The whole config once the pipe is closed (b"": none was handed over)."""
        self.done.wait()
        return b"".join(self._chunks)


def _helper(backend: Any, fd: int) -> None:
    """The grandchild: make the spare, report over ``fd``, end without running the
    kernel's exit handlers (it is a copy of the kernel's process)."""
    code = 0

    def report(line: str) -> None:
        os.write(fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))

    try:
        _quiet()
        backend.make_head_start(report)
    except BaseException as exc:
        code = 1
        with contextlib.suppress(Exception):
            report(f"failed {type(exc).__name__}: {exc}")
    os._exit(code)
