"""Installing the ``tierkernel`` kernelspec where Jupyter clients find it."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

KERNEL_NAME = "tierkernel"
DISPLAY_NAME = "Python (tierkernel)"


def install(
    *,
    user: bool = False,
    prefix: str | None = None,
    name: str = KERNEL_NAME,
    display_name: str = DISPLAY_NAME,
    default_tier: str | None = None,
    python: str | None = None,
) -> str:
    """Write and install the kernelspec; return the directory it was installed to.

    ``language`` stays ``python`` so papermill and nbval treat the kernel as Python;
    ``interrupt_mode`` is ``signal`` because the kernel turns SIGINT into tier interrupts.
    ``default_tier`` is written into the spec's environment (``TIERKERNEL_DEFAULT_TIER``).

    The interpreter runs with ``-Xfrozen_modules=off``, as stock ipykernel's kernelspec does:
    ipykernel imports debugpy when the kernel starts, and with frozen modules debugpy warns on
    stderr, which the kernel publishes as a ``stream`` message that can come before the
    ``iopub_welcome`` (JEP 65) a client waits for.
    """
    # Imported here, for the start-up time of the tierkernel command (which reads this module
    # on every run, for the names above): jupyter_client's takes 30 ms.
    from jupyter_client.kernelspec import KernelSpecManager

    staging = Path(tempfile.mkdtemp(prefix="tierkernel-spec-"))
    try:
        path = write_spec(staging / name, display_name, default_tier, python)
        return str(
            KernelSpecManager().install_kernel_spec(
                path, kernel_name=name, user=user, prefix=prefix
            )
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_spec(folder: Path, display_name: str = DISPLAY_NAME,
               default_tier: str | None = None, python: str | None = None) -> str:
    """Write the kernelspec into ``folder`` (made if missing), without installing it (see
    :func:`install`); return the folder."""
    overrides: dict[str, object] = {
        "argv": kernel_argv(python),
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"debugger": False, "tierkernel": {"version": _version()}},
    }
    if default_tier:
        overrides["env"] = {"TIERKERNEL_DEFAULT_TIER": default_tier}
    from ipykernel.kernelspec import write_kernel_spec

    return str(write_kernel_spec(str(folder), overrides=overrides))


def kernel_argv(python: str | None = None) -> list[str]:
    """The command that starts a tierkernel kernel with ``python`` (default: this one)."""
    return [python or sys.executable, *PYTHON_ARGUMENTS, "-m", "tierkernel", "-f",
            "{connection_file}"]


#: Interpreter options of the kernel (see :func:`install`).
PYTHON_ARGUMENTS = ("-Xfrozen_modules=off",)


def _version() -> str:
    from tierkernel import __version__

    return __version__
