"""What the tier contract's hooks hand a tier besides cells (see ``Backend`` in base.py): where
the kernel's configuration came from, and the ``tierkernel`` subcommands a tier adds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    # Annotations only: the sandbox tier's head start reads this module first thing in the
    # kernel's process (before it forks its helper), where traitlets would cost 20 ms.
    import argparse

    from traitlets.config import Config


@dataclass(frozen=True)
class ConfigSources:
    """Where a kernel's configuration came from: its command line (``sys.argv[1:]``), every
    config file it looked for (found or not), and whether its working folder was one of the
    places it looked in. A tier that remembers something of one kernel's configuration for the
    next (the sandbox tier's head start) can tell from these whether it still holds."""

    argv: list[str]
    files: list[str]
    cwd_matters: bool


class CommandContext(Protocol):
    """What the ``tierkernel`` command gives a tier's subcommand when it runs it."""

    #: The tier class whose ``commands()`` declared the running command: a command that
    #: makes the tier's backends takes the class from here rather than importing it, so the
    #: tier's backend module can import its commands module without a cycle.
    tier: type[Any]

    def kernel_config(self, argv: Sequence[str]) -> Config:
        """The configuration a kernel of this user reads (``ipython_kernel_config.py`` and
        ``tierkernel_config.py`` in its config folders), then ``argv`` on top, as a kernel's
        ``--CLASS.NAME=VALUE`` options. Raises on a bad option or config file."""
        ...


@dataclass(frozen=True)
class Command:
    """One ``tierkernel NAME`` subcommand a tier adds (see ``Backend.commands``).

    ``help`` is its line in ``tierkernel --help``, ``description`` the text of ``tierkernel
    NAME --help`` (``help`` when empty). ``configure`` adds its arguments to the parser it is
    given, each time the ``tierkernel`` command builds its parser (``--help`` included), so it
    must be cheap; ``run`` does the work once the command line is parsed, and returns the exit
    status. Heavy imports belong inside ``run``.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, CommandContext], int]
    description: str = ""
