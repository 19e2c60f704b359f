"""Launching the kernel: ``python -m tierkernel -f CONNECTION_FILE``."""

from __future__ import annotations

import os
import sys

from ipykernel.kernelapp import IPKernelApp
from ipykernel.zmqshell import ZMQInteractiveShell
from IPython.core.profiledir import ProfileDir
from jupyter_client.session import Session
from jupyter_core.paths import jupyter_config_path
from traitlets import Type, Unicode, default

from tierkernel.backends.agent.notebook_folder import NotebookFolder
from tierkernel.backends.registry import discover
from tierkernel.fsx import Fsx
from tierkernel.kernel.kernel import TierKernel
from tierkernel.runtime.packages import Packages
from tierkernel.runtime.policy import Runtime


class TierKernelApp(IPKernelApp):
    """ipykernel's application running :class:`TierKernel`.

    Configuration is read from ``ipython_kernel_config.py`` (as for any IPython kernel) and then
    ``tierkernel_config.py``, in IPython's profile directory and in every Jupyter config
    directory (``jupyter --paths``), so ``c.TierKernel.default_tier`` or
    ``c.ProcessBackend.timeout`` can live in ``~/.jupyter/tierkernel_config.py``.
    """

    name = Unicode("tierkernel")
    description = "tierkernel: a Jupyter kernel for Python in which each cell picks its tier."
    kernel_class = Type(TierKernel)
    classes = [  # type: ignore[assignment]  # noqa: RUF012 - traitlets reads it as is
        TierKernel, *discover()[0].values(), Fsx, NotebookFolder, Runtime, Packages,
        ZMQInteractiveShell, ProfileDir, Session,
    ]

    def init_pdb(self) -> None:
        """The first step of ``IPKernelApp.initialize`` once the configuration is final:
        begin the sandbox tier's head start here, before the sockets, the shell and the
        event loop exist (the fork it takes must happen while this is the only thread)."""
        from tierkernel.backends.sandbox import head_start as sandbox_head_start
        from tierkernel.backends.sandbox.backend import SandboxBackend
        from tierkernel.backends.sandbox.learned import Sources

        # Every config file looked for, found or not: the next kernel's head start trusts
        # what this one learned only while none of them has changed (learned.py).
        names = ["ipython_config", *(os.path.splitext(name)[0] for name in self.config_files)]
        paths = [os.path.abspath(folder) for folder in self.config_file_paths]
        files = [os.path.join(folder, name + ext)
                 for folder in paths for name in names for ext in (".py", ".json")]
        sources = Sources(argv=sys.argv[1:], files=files, cwd_matters=os.getcwd() in paths)
        sandbox_head_start.begin(self.config, sources, SandboxBackend)
        super().init_pdb()  # type: ignore[no-untyped-call]

    @default("config_files")
    def _tierkernel_config_files(self) -> list[str]:
        return ["ipython_kernel_config.py", "tierkernel_config.py"]

    @default("config_file_paths")
    def _jupyter_config_dirs(self) -> list[str]:
        return list(jupyter_config_path())


def main() -> None:
    """Start TierKernel (what the kernelspec runs)."""
    quiet_debugger_check()
    TierKernelApp.launch_instance()


def quiet_debugger_check() -> None:
    """Keep debugpy's frozen-modules warning off the kernel's stderr when the interpreter
    was started without ``-Xfrozen_modules=off`` (``tierkernel kernel``, a hand-written
    kernelspec): ipykernel imports debugpy while the kernel starts, and that warning would be
    published as a ``stream`` message ahead of everything else. Stock ipykernel sets the same
    variable for a kernelspec installed with frozen modules on."""
    if sys._xoptions.get("frozen_modules", "on") != "off":
        os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
