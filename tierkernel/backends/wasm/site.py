"""The pure-Python packages the wasm guest imports from the host: IPython and its company.

The wasm runtime carries numpy, pandas, matplotlib and more, but not IPython (magics,
``IPython.display``, ``get_ipython()``) nor fsspec (``fsx://`` URLs). Those are pure Python, so
the host's installed copies run in the guest too: they are copied once, with their
``.dist-info`` (matplotlib and others find plugins through entry points), into a folder of the
wasm cache named after their versions, and mounted read-only into every session. Compiled
accelerators (``.so``) are left out: the guest cannot load them, and the packages fall back to
pure Python without them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

#: The distributions copied, when the host has them.
DISTRIBUTIONS = (
    "ipython", "traitlets", "pygments", "prompt_toolkit", "jedi", "parso", "matplotlib-inline",
    "stack_data", "executing", "asttokens", "pure_eval", "wcwidth", "pexpect", "ptyprocess",
    "ipython_pygments_lexers", "comm", "decorator", "fsspec",
)
#: Where the folder appears in the guest (appended to its sys.path by the wasm agent).
GUEST_SITE = "/opt/tierkernel-site"
#: Bumped when what is copied changes, so an older folder is not reused.
_LAYOUT = "1"
_SKIPPED_SUFFIXES = (".pyc", ".so", ".pyd", ".dll", ".dylib")

_lock = threading.Lock()


def _distributions() -> list[importlib.metadata.Distribution]:
    found = []
    for name in DISTRIBUTIONS:
        try:
            found.append(importlib.metadata.distribution(name))
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def site_folder(cache: Path) -> Path | None:
    """The folder of copied packages in ``cache`` (made on first use, ≈1-3 s), or None when
    the host has none of them or the copy fails (the guest then says IPython is missing)."""
    dists = _distributions()
    if not dists:
        return None
    key = hashlib.sha256(
        "\n".join([_LAYOUT, *sorted(f"{d.metadata['Name']}=={d.version}" for d in dists)])
        .encode()).hexdigest()[:16]
    target = cache / f"guest-site-{key}"
    if target.is_dir():
        return target
    with _lock:
        if target.is_dir():
            return target
        try:
            staging = Path(tempfile.mkdtemp(prefix=".guest-site-", dir=cache))
            try:
                for dist in dists:
                    _copy(dist, staging)
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        except OSError as exc:
            if target.is_dir():  # another kernel made it meanwhile
                return target
            log.warning("could not copy IPython's packages for the wasm tier: %s", exc)
            return None
    return target


def _copy(dist: importlib.metadata.Distribution, into: Path) -> None:
    """Copy the installed files of ``dist`` that live in its site-packages folder."""
    root = Path(str(dist.locate_file(""))).resolve()
    for entry in dist.files or ():
        if "__pycache__" in entry.parts or str(entry).endswith(_SKIPPED_SUFFIXES):
            continue
        source = Path(str(dist.locate_file(entry))).resolve()
        try:
            relative = source.relative_to(root)
        except ValueError:  # a script in bin/, outside site-packages
            continue
        if not source.is_file():
            continue
        destination = into / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
