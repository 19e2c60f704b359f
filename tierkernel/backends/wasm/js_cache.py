"""The compiled code of the JS cells' engine, kept on disk so that a kernel's first JS cell
does not compile it again.

quickjs-rs compiles its QuickJS build (0.7 MB of WebAssembly, some 0.7 s) and its TypeScript
stripper (1.2 MB, some 1 s) in every process that makes a context. Here each is compiled once
per wasmtime and engine build, serialized into this user's cache folder
(``~/.cache/tierkernel/quickjs``, private to the user), and loaded from there in a
millisecond; ``tierkernel warm`` fills it. quickjs-rs keeps its compiled modules in a
process-wide table with no public hook, so they are put there directly, which is why the
version is pinned (``js.py``'s ``_harden`` says the same of its limits).

A serialized module is native code that wasmtime runs as it is: it is read through folders
opened one by one from the cache base, none a link and none that another user may write, from a
file this user owns that nobody else may write; it is written whole under a new name and then
renamed, and named by the hash of the WebAssembly it came from and the wasmtime version, so a
changed engine or a changed wasmtime never loads a stale one. A file that fails to load is
compiled again and replaced. A ``file://`` fsx workspace may not hold this folder (see
``fsx.config.host_state``): cells write there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

#: The modules quickjs-rs compiles, by the key of its table: the engine, and the TS stripper.
ENGINE = "quickjs"
TRANSFORM = "transform"

_lock = threading.Lock()


def folder() -> Path:
    """The cache folder of the compiled JS engine: ``$XDG_CACHE_HOME/tierkernel/quickjs``,
    else ``~/.cache/tierkernel/quickjs``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tierkernel" / "quickjs"


def prime(keys: tuple[str, ...] = (ENGINE,),
          progress: Callable[[str], None] | None = None) -> None:
    """Put the compiled modules ``keys`` into quickjs-rs's table: from the cache when there,
    else compiled and stored for the next process. Raises RuntimeError when quickjs-rs is not
    the version this knows."""
    try:
        from quickjs_rs import _engine, _transform
        from quickjs_rs import _wasmtime as shared
        sources: dict[str, tuple[Callable[[], bytes], Any]] = {
            ENGINE: (_engine._read_guest_wasm, _engine._build_shared_linker),
            TRANSFORM: (_transform._read_transform_wasm, shared.default_wasi_linker),
        }
        table = shared._SHARED_ARTIFACTS
        make = shared.SharedWasmArtifact
        engine = shared.shared_wasmtime_engine()
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"quickjs-rs is not the version tierkernel knows ({exc})") from None
    with _lock:
        for key in keys:
            if key in table:
                continue
            read, build_linker = sources[key]
            data = read()
            digest = hashlib.sha256(data).digest()
            path = folder() / f"{key}-{digest.hex()[:24]}-wasmtime{version('wasmtime')}.cwasm"
            module = _load(engine, path)
            if module is None:
                if progress is not None:
                    what = "engine" if key == ENGINE else "TypeScript stripper"
                    progress(f"compiling the JavaScript {what} into {path.parent}")
                module = _compile(engine, data, path)
            with shared._SHARED_ARTIFACTS_LOCK:
                table.setdefault(key, make(module=module, linker=build_linker(engine),
                                           build_id=digest))


def _load(engine: Any, path: Path) -> Any:
    """The module serialized at ``path``, or None when there is none this user may trust."""
    import wasmtime

    fd = _open_trusted(path)
    if fd is None:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return wasmtime.Module.deserialize(engine, data)
    except Exception:  # damaged, or of another build: compiled again
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def _open_trusted(path: Path) -> int | None:
    """``path`` opened for reading, each folder from the cache base down and the file itself
    opened without following a link and checked as opened (owned by this user or root, no
    one else may write it): nothing can be swapped in between the check and the read. None
    when any of them fails that."""
    base = path.parent.parent.parent  # .../<base>/tierkernel/quickjs/<file>
    parts = [path.parent.parent.name, path.parent.name, path.name]
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for index, name in enumerate(parts):
            if not _trusted(os.fstat(fd)):
                return None
            last = index == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
            child = os.open(name, flags, dir_fd=fd)
            os.close(fd)
            fd = child
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or not _trusted(info) or info.st_uid != os.getuid():
            return None
        opened, fd = fd, -1
        return opened
    except OSError:
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def _trusted(info: os.stat_result) -> bool:
    return info.st_uid in (os.getuid(), 0) and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _compile(engine: Any, data: bytes, path: Path) -> Any:
    """Compile ``data`` and store it at ``path`` when its folder is this user's own (best
    effort: a full disk or a shared folder still runs, uncached)."""
    import wasmtime

    module = wasmtime.Module(engine, data)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = path.parent.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return module  # a link or another user's folder: not written
        os.chmod(path.parent, 0o700, follow_symlinks=False)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".compiling-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(module.serialize())
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
    return module
