"""Launching the kernel: ``python -m tierkernel -f CONNECTION_FILE``."""

from __future__ import annotations

import atexit
import copy
import os
import sys
from collections.abc import Sequence
from typing import Any

import zmq
from ipykernel.iostream import IOPubThread
from ipykernel.kernelapp import IPKernelApp, kernel_aliases, kernel_flags
from ipykernel.zmqshell import ZMQInteractiveShell
from IPython.core.profiledir import ProfileDir
from jupyter_client.session import Session
from jupyter_core.paths import jupyter_config_path
from traitlets import Dict, Type, Unicode, default
from traitlets.config import Config

from tierkernel.backends.agent.notebook_folder import NotebookFolder
from tierkernel.backends.hooks import ConfigSources
from tierkernel.backends.registry import discover
from tierkernel.fsx import Fsx
from tierkernel.kernel import early_sockets
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
    # The tiers' classes are not listed: traitlets makes an argparse option of every trait of
    # every class listed here each time a kernel parses its command line, and a
    # ``--SandboxBackend.memory=...`` option works without that (traitlets converts it with
    # the trait's own parser once the tier is made). The help and the generated config file
    # list them (``_with_tiers``).
    classes = [  # type: ignore[assignment]  # noqa: RUF012 - traitlets reads it as is
        TierKernel, Fsx, NotebookFolder, Runtime, Packages, ZMQInteractiveShell, ProfileDir,
        Session,
    ]
    # ipykernel's command-line flags and aliases, less those that make no sense here:
    # --pylab star-imports numpy and matplotlib into the native tier's namespace only, so a
    # notebook relying on it breaks once a cell moves to another tier (IPython itself advises
    # %matplotlib and explicit imports); --trio-loop would run the kernel on trio while the
    # tiers run on asyncio (and ipykernel 7's flag sets a trait its shell does not have);
    # --autoindent, --no-autoindent and --nosep set up a terminal's prompt, which a kernel
    # has not. --matplotlib and --gui stay: they set up the native tier as %matplotlib and
    # %gui do in a native cell.
    flags = Dict({name: flag for name, flag in kernel_flags.items()
                  if name not in ("pylab", "trio-loop", "autoindent", "no-autoindent", "nosep")})
    aliases = Dict({name: trait for name, trait in kernel_aliases.items() if name != "pylab"})

    def init_pdb(self) -> None:
        """The first step of ``IPKernelApp.initialize`` once the configuration is final:
        hand it to every tier (``Backend.config_loaded``) here, before ipykernel's threads,
        the shell and the event loop exist, so a tier may fork while this is the only Python
        thread."""
        # Every config file looked for, found or not: a tier that remembers settings for the
        # next kernel can tell whether they still hold.
        names = ["ipython_config", *(os.path.splitext(name)[0] for name in self.config_files)]
        paths = [os.path.abspath(folder) for folder in self.config_file_paths]
        files = [os.path.join(folder, name + ext)
                 for folder in paths for name in names for ext in (".py", ".json")]
        sources = ConfigSources(argv=sys.argv[1:], files=files,
                                cwd_matters=os.getcwd() in paths)
        for name, tier in discover()[0].items():
            try:
                tier.config_loaded(self.config, sources)
            except Exception:  # one tier's hook must not keep the kernel from starting
                self.log.exception("tier %r failed to take the configuration", name)
        super().init_pdb()  # type: ignore[no-untyped-call]

    def init_sockets(self) -> None:
        """ipykernel's sockets, with the shell and iopub sockets ``python -m tierkernel``
        bound as it started (``early_sockets.py``) when they are bound for these settings.
        The rest is ``IPKernelApp.init_sockets`` and ``init_iopub`` of ipykernel 7.4 as they
        are (``tests/test_kernel_start.py`` holds their source: a new ipykernel fails it until
        this is checked against it)."""
        early = early_sockets.claim(self)
        if early is None:
            super().init_sockets()  # type: ignore[no-untyped-call]
            return
        self.log.info("Starting the kernel at pid: %i", os.getpid())
        assert self.context is None, "init_sockets cannot be called twice!"
        self.context = context = early.context
        atexit.register(self.close)
        if self.curve_secretkey is not None:
            self.log.info("Detected CurveZMQ secret key; using transport encryption")
        else:  # early sockets are TCP ones
            self.log.warning(
                "Kernel is running over TCP without encryption. All communication (including "
                "code and outputs) is sent in plain text and is susceptible to eavesdropping. "
                "Use IPC transport or launch with kernel manager-provisioned CurveZMQ keys to "
                "enable transport encryption.")
        self.shell_socket = early.shell  # its router_handover is set (early_sockets._bind)
        self.log.debug("shell ROUTER Channel on port: %i", self.shell_port)
        self.stdin_socket = context.socket(zmq.ROUTER)
        self.stdin_socket.linger = 1000
        self._apply_curve_server_options(self.stdin_socket)
        self.stdin_port = self._bind_socket(  # type: ignore[no-untyped-call]
            self.stdin_socket, self.stdin_port)
        self.log.debug("stdin ROUTER Channel on port: %i", self.stdin_port)
        if hasattr(zmq, "ROUTER_HANDOVER"):  # ipykernel's zeromq work-around (ipykernel#270)
            self.stdin_socket.router_handover = 1
        self.init_control(context)  # type: ignore[no-untyped-call]
        # IPKernelApp.init_iopub, with the socket bound already
        self.iopub_socket = early.iopub
        self.log.debug("iopub PUB Channel on port: %i", self.iopub_port)
        self.configure_tornado_logger()  # type: ignore[no-untyped-call]
        self.iopub_thread = IOPubThread(self.iopub_socket, pipe=True, session=self.session)
        self.iopub_thread.start()
        self.iopub_socket = self.iopub_thread.background_socket

    def _with_tiers(self) -> None:
        """List every registered tier's class in :attr:`classes`, after the kernel's own."""
        tiers = [cls for cls in discover()[0].values() if cls not in self.classes]
        self.classes = [*self.classes[:1], *tiers, *self.classes[1:]]

    def emit_help(self, classes: bool = False) -> Any:
        """ipykernel's ``--help`` / ``--help-all``, with every tier's settings."""
        self._with_tiers()
        return super().emit_help(classes)

    def generate_config_file(self, classes: Any = None) -> str:
        """A config file template naming every setting, the tiers' included."""
        self._with_tiers()
        return str(super().generate_config_file(classes))

    def document_config_options(self) -> str:
        """Every setting in reStructuredText, the tiers' included."""
        self._with_tiers()
        return str(super().document_config_options())

    @default("config_files")
    def _tierkernel_config_files(self) -> list[str]:
        return ["ipython_kernel_config.py", "tierkernel_config.py"]

    @default("config_file_paths")
    def _jupyter_config_dirs(self) -> list[str]:
        return list(jupyter_config_path())


def kernel_config(argv: Sequence[str]) -> Config:
    """The configuration a kernel of this user reads: ``ipython_kernel_config.py`` and
    ``tierkernel_config.py`` in its config directories, then ``argv``
    (``--CLASS.NAME=VALUE`` options, as a kernel takes them), the steps ipykernel's application
    takes before it sets the kernel up. For commands that act as a kernel would (``tierkernel
    spares --make``) with no kernel running."""
    app_class: Any = TierKernelApp  # IPython's application methods carry no annotations
    app = app_class()
    app.parse_command_line(list(argv))
    from_command_line = copy.deepcopy(app.config)
    app.init_profile_dir()
    app.init_config_files()
    app.load_config_file()
    app.update_config(from_command_line)  # the command line wins, as in the kernel
    config: Config = app.config
    return config


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
