"""Tiers: the public API for writing one, the registry, and one module or package per tier.

A tier is a :class:`Backend` subclass registered in the entry-point group
``tierkernel.backends`` (``registry.py``); the contract it implements, with who calls each
method and when, is in ``base.py`` and exported here::

    from tierkernel.backends import Backend, CellRequest, ExecResult, OutputSink

    class MyBackend(Backend):
        isolation = "what stands between a cell and the host"

        async def execute(self, request: CellRequest, sink: OutputSink) -> ExecResult: ...

``tierkernel.testing.tier.TierContract`` is the suite every tier passes (the built-in ones
too); a third-party tier runs it from its own tests. The built-in tiers: ``native.py`` (the
kernel's IPython), ``process/``, ``wasm/`` and ``sandbox/``, which share ``agent/``.

The names below are loaded on first use: every backend module imports this package first,
and the sandbox tier's head start imports one while the kernel process is a few milliseconds
old, before traitlets is loaded (see ``sandbox/head_start.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AgentBackend",
    "Availability",
    "Backend",
    "CellRequest",
    "Command",
    "CommandContext",
    "Completion",
    "ConfigSources",
    "ExecError",
    "ExecResult",
    "InputCancelled",
    "InputNotAllowed",
    "Inspection",
    "KernelHandle",
    "LogEntry",
    "MimeBundle",
    "OptionSpec",
    "OutputSink",
    "ResourceUsage",
]

#: Where each exported name is defined.
_HOMES = dict.fromkeys(__all__, "tierkernel.backends.base") | dict.fromkeys(
    ("InputCancelled", "InputNotAllowed"), "tierkernel.errors") | dict.fromkeys(
    ("Command", "CommandContext", "ConfigSources"), "tierkernel.backends.hooks") | {
    "OptionSpec": "tierkernel.backends.options",
    "AgentBackend": "tierkernel.backends.agent.base"}

if TYPE_CHECKING:
    from tierkernel.backends.agent.base import AgentBackend
    from tierkernel.backends.base import (
        Availability,
        Backend,
        CellRequest,
        Completion,
        ExecError,
        ExecResult,
        Inspection,
        KernelHandle,
        LogEntry,
        MimeBundle,
        OutputSink,
        ResourceUsage,
    )
    from tierkernel.backends.hooks import Command, CommandContext, ConfigSources
    from tierkernel.backends.options import OptionSpec
    from tierkernel.errors import InputCancelled, InputNotAllowed
else:
    def __getattr__(name: str) -> Any:
        """An exported name, imported from its module on first use (PEP 562)."""
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
