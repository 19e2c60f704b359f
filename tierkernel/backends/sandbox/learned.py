"""The sandbox settings a kernel ended up with, remembered for the next kernel's head start.

A kernel's configuration is final only once ipykernel is imported and has read its command
line and config files, 0.2 s into the process. The head start's early helper
(``head_start.py``) is ready 0.07 s before that. When everything the configuration came
from is as it was when a kernel last learned it (the same command line but for the connection
file, the same environment variables that choose the config folders, every config file the
kernel looked for unchanged, present or not), the helper makes its spare with the learned
settings at once instead of waiting.

A wrong guess costs only time: the spare is keyed by its create arguments, and a kernel claims
a spare only for the key its own configuration gives (``spares.py``), so one made with
stale settings is left for a later kernel or expires. Only the values of the SandboxBackend's
traits are kept, as JSON in the user's cache folder (``cache_files.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tierkernel.backends.cache_files import (
    CONFIG_ENV,
    folder,
    read_json,
    without_connection_file,
    write_json,
)
from tierkernel.backends.hooks import ConfigSources

log = logging.getLogger(__name__)

#: Kernels of this many different set-ups (command lines, folders) are remembered.
_KEPT = 8
#: The code that holds the settings' defaults (backend.py) and turns them into a container
#: (settings.py): another version of it (an upgrade, an edited checkout) voids what an
#: earlier one learned.
_CODE = tuple(str(Path(__file__).with_name(name)) for name in ("backend.py", "settings.py"))


def path() -> Path:
    """The cache file: ``$XDG_CACHE_HOME/tierkernel/head-start.json`` (``~/.cache``)."""
    return folder() / "head-start.json"


def learn(sources: ConfigSources, values: dict[str, Any]) -> None:
    """Remember ``values`` (the SandboxBackend's trait values) for kernels whose configuration
    comes from the same ``sources``. Never raises: the next head start only waits longer."""
    try:
        entry = {"situation": _situation(sources.argv, sources.files, sources.cwd_matters),
                 "values": values}
        entry = json.loads(json.dumps(entry))  # only JSON values; as the file will hold it
        known = _entries()
        if known and known[0] == entry:
            return  # learned already (most kernel starts): no write
        _write([entry, *[e for e in known if e.get("situation") != entry["situation"]]][:_KEPT])
    except Exception as exc:
        log.debug("could not remember the sandbox settings: %s", exc)


def recall(argv: list[str]) -> dict[str, Any] | None:
    """The SandboxBackend trait values learned for a kernel started with ``argv`` in the
    present situation, or None when nothing learned still holds."""
    for entry in _entries():
        with contextlib.suppress(Exception):
            known = entry["situation"]
            if _situation(argv, list(known["files"]), known["cwd"] is not None) == known:
                return dict(entry["values"])
    return None


def _situation(argv: list[str], files: list[str], cwd_matters: bool) -> dict[str, Any]:
    return {
        "argv": without_connection_file(argv),
        "env": {name: os.environ.get(name) for name in CONFIG_ENV},
        "cwd": os.getcwd() if cwd_matters else None,
        "files": {name: _stat(name) for name in sorted(set(files))},
        "code": [sys.executable, *[[name, _stat(name)] for name in _CODE]],
    }


def _stat(name: str) -> list[int] | None:
    try:
        info = os.stat(name)
    except OSError:
        return None
    return [info.st_mtime_ns, info.st_size]


def _entries() -> list[dict[str, Any]]:
    entries = read_json(path())
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _write(entries: list[dict[str, Any]]) -> None:
    write_json(path(), entries)
