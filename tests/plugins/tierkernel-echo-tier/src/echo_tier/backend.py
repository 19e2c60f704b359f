"""The echo tier: a cell runs with ``exec()`` in a namespace of the tier's own, in the kernel's
process (no isolation at all: a toy that shows what a tier from another distribution can add).
"""

from __future__ import annotations

import ast
import contextlib
import io
import time
import traceback
from collections.abc import Sequence
from typing import Any, ClassVar

from traitlets import Int
from traitlets.config import Config

from echo_tier import cli
from echo_tier.options import REPEAT, SHOUT
from tierkernel.backends.base import (
    Availability,
    Backend,
    CellRequest,
    ExecError,
    ExecResult,
    KernelHandle,
    OutputSink,
)
from tierkernel.backends.hooks import Command, ConfigSources
from tierkernel.backends.options import OptionSpec


class EchoBackend(Backend):
    """``%%tier echo [--shout] [--repeat N]``."""

    isolation = "none: exec() in a namespace of the echo tier's own (a toy tier)"
    magic_options: ClassVar[Sequence[OptionSpec]] = (SHOUT, REPEAT)

    repeat = Int(1, help="How many times each printed line is repeated; per cell: "
                 "--repeat N.").tag(config=True)

    #: The command line of the kernel, as the config_loaded hook saw it.
    config_argv: ClassVar[list[str] | None] = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.namespace: dict[str, Any] = {"__name__": "__echo__"}
        #: Every cell this tier ran, also given to native cells as ``echo_history``.
        self.history: list[str] = []

    @classmethod
    def config_loaded(cls, config: Config, sources: ConfigSources) -> None:
        """Remember the kernel's command line (cells can read it as ``CONFIG_ARGV``)."""
        cls.config_argv = list(sources.argv)

    @classmethod
    def commands(cls) -> Sequence[Command]:
        """``tierkernel echo-status``."""
        return cli.COMMANDS

    def attach(self, kernel: KernelHandle) -> None:
        """Show native cells what this tier ran, as ``echo_history``."""
        kernel.shell.push({"echo_history": self.history}, interactive=False)

    def availability(self) -> Availability:
        """Always: it needs nothing."""
        return Availability.yes("exec() in the kernel's process")

    def defaults(self) -> dict[str, Any]:
        """``--repeat`` as configured (``--shout`` is off unless given)."""
        return {"repeat": self.repeat}

    async def execute(self, request: CellRequest, sink: OutputSink) -> ExecResult:
        """Run the body; print what it printed (shouted, repeated); show the last
        expression's value."""
        started = time.perf_counter()
        self.history.append(request.body)
        self.namespace["CONFIG_ARGV"] = self.config_argv
        tree = ast.parse(request.body, request.filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        printed = io.StringIO()
        value = None
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(tree, request.filename, "exec"), self.namespace)
                if last is not None:
                    value = eval(compile(ast.Expression(last.value), request.filename, "eval"),
                                 self.namespace)
        except Exception as exc:
            self._print(printed.getvalue(), request.options, sink)
            lines = traceback.format_exception_only(exc)
            error = ExecError(type(exc).__name__, str(exc), lines)
            sink.error(error.ename, error.evalue, error.traceback)
            return ExecResult(False, self.name, time.perf_counter() - started, error=error)
        self._print(printed.getvalue(), request.options, sink)
        output = None
        if value is not None:
            output = {"text/plain": repr(value)}
            sink.result(output)
        return ExecResult(True, self.name, time.perf_counter() - started, output=output)

    def _print(self, text: str, options: dict[str, Any], sink: OutputSink) -> None:
        if not text:
            return
        if options.get("shout"):
            text = text.upper()
        sink.stream("stdout", text * int(options.get("repeat", 1)))
