"""Why a tierkernel kernel never loads debugpy, and how.

The kernelspec declares no debugger (``metadata.debugger: false``): a debugger attached to the
kernel's process could step through native cells only, never a cell of another tier, and
JupyterLab would offer it on every cell. Yet ipykernel imports debugpy while every kernel
starts (``IPythonKernel.__init__`` imports ``ipykernel.debugger``, which imports debugpy), and
that import is 60-70 ms of CPU between the sockets being bound and the first reply. So the
kernel is made with debugpy held out of ``ipykernel.debugger``'s import: ipykernel then takes
debugpy to be missing, makes no ``Debugger``, and ``kernel_info`` no longer lists the
``debugger`` feature, which now agrees with the kernelspec. Afterwards debugpy is importable
again, so a native cell can still ``import debugpy`` for its own use.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def without_debugpy() -> Iterator[None]:
    """Within the block, ``import debugpy`` fails (``None`` in ``sys.modules``, the import
    system's documented way to stop an import) unless debugpy is imported already; the entry
    is taken out again on the way out."""
    if "debugpy" in sys.modules:
        yield
        return
    sys.modules["debugpy"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("debugpy", ...) is None:
            del sys.modules["debugpy"]
