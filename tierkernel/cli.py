"""The ``tierkernel`` command: install the kernelspec, run notebooks, launch the kernel, and
whatever subcommands the registered tiers add (``Backend.commands``)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from traitlets.config import Config

from tierkernel import __version__
from tierkernel.backends.hooks import Command
from tierkernel.backends.registry import discover
from tierkernel.kernel.kernelspec import DISPLAY_NAME, KERNEL_NAME, install
from tierkernel.serve import command as serve_command

if TYPE_CHECKING:
    from tierkernel.kernel.router import TierRow

#: The commands of tierkernel itself; a tier's command of the same name is left out.
BUILT_IN = frozenset({"install", "run", "tiers", "kernel", "serve", "mcp"})


def _cmd_install(args: argparse.Namespace) -> int:
    path = install(
        user=args.user,
        prefix=sys.prefix if args.sys_prefix else args.prefix,
        name=args.name,
        display_name=args.display_name,
        default_tier=args.default_tier,
    )
    print(f"Installed kernelspec {args.name!r} in {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from tierkernel.runner import run_notebook

    return run_notebook(
        args.notebook,
        output=args.output,
        kernel_name=args.kernel,
        timeout=args.timeout,
        allow_errors=args.allow_errors,
    )


def _cmd_tiers(args: argparse.Namespace) -> int:
    from tierkernel.kernel.router import TierRouter

    table = TierRouter(None, "native").table()
    width = _terminal_width()
    try:
        print(repr(table) if width is None else fit_tier_table(table.rows, width), flush=True)
    except BrokenPipeError:
        # The reader left early (`tierkernel tiers | head`): not an error. Point stdout at
        # nothing so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _terminal_width() -> int | None:
    """The columns to fit: ``$COLUMNS`` when set, else the terminal's; None when stdout is no
    terminal (a pipe or a file gets whole lines, which ``grep`` can search)."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def fit_tier_table(rows: Sequence[TierRow], width: int) -> str:
    """The ``tierkernel tiers`` table in ``width`` columns: the isolation and the limits or
    reason columns wrapped to share what the tier and available columns leave; below 60
    columns for those two (an 80-column terminal), one block per tier with both on lines of
    their own, which reads better than two narrow columns."""
    header = ("  tier", "available", "isolation", "limits / reason")
    body = [(("* " if r.default else "  ") + r.name, "yes" if r.available else "no",
             r.isolation, r.detail) for r in rows]
    fixed = [max(len(row[i]) for row in [header, *body]) for i in range(2)]
    room = width - sum(fixed) - 6  # three gaps of two spaces
    natural = [max(len(row[i]) for row in [header, *body]) for i in (2, 3)]
    note = "(* = default tier for cells without %%tier; change it with %tier NAME)"
    if sum(natural) <= room:
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, [*fixed, *natural],
                                                             strict=True)).rstrip()
                 for row in [header, *body]]
        return "\n".join([*lines, *textwrap.wrap(note, max(width, 20))])
    if room < 60:
        out = []
        for row, r in zip(body, rows, strict=True):
            out.append(f"{row[0].ljust(fixed[0])}  {row[1]}")
            for label, text in (("isolation", r.isolation),
                                ("limits" if r.available else "reason", r.detail)):
                out += textwrap.wrap(f"{label}: {text}", max(width - 4, 20),
                                     initial_indent="    ", subsequent_indent="      ",
                                     break_on_hyphens=False)
        return "\n".join([*out, *textwrap.wrap(note, max(width, 20))])
    isolation = min(natural[0], max(16, room * 2 // 5))
    widths = [*fixed, isolation, room - isolation]
    lines = []
    for row in [header, *body]:
        wrapped = [[row[0]], [row[1]],
                   *(textwrap.wrap(text, w, break_on_hyphens=False) or [""]
                     for text, w in zip(row[2:], widths[2:], strict=True))]
        for i in range(max(len(cell) for cell in wrapped)):
            parts = [cell[i] if i < len(cell) else "" for cell in wrapped]
            lines.append("  ".join(part.ljust(w) for part, w in zip(parts, widths,
                                                                     strict=True)).rstrip())
    return "\n".join([*lines, *textwrap.wrap(note, width)])


def _cmd_kernel(args: argparse.Namespace) -> int:
    from tierkernel.kernel import early_sockets

    early_sockets.bind(args.kernel_args)  # before the kernel's imports, as python -m tierkernel
    from tierkernel.kernel.app import main as kernel_main

    sys.argv = [sys.argv[0], *args.kernel_args]
    kernel_main()
    return 0


class _Context:
    """What a tier's command is given to run (``tierkernel.backends.hooks.CommandContext``)."""

    def __init__(self, tier: type[Any]) -> None:
        self.tier = tier

    def kernel_config(self, argv: Sequence[str]) -> Config:
        """The configuration a kernel of this user reads, then ``argv``."""
        # Imported when a command asks: the kernel's application (ipykernel's) is not needed
        # to print help or run the other commands.
        from tierkernel.kernel.app import kernel_config

        return kernel_config(argv)


def _warn(text: str) -> None:
    print(f"tierkernel: {text}", file=sys.stderr)


def tier_commands() -> list[tuple[str, type[Any], Command]]:
    """Every registered tier's commands, as ``(tier, class, command)``, by tier name. A tier that
    cannot be loaded, or whose commands cannot be read or clash with another's, is left out
    with a warning on stderr: one broken tier must not take the command down."""
    classes, broken = discover()
    for tier in broken:
        _warn(f"tier {tier.name!r} is broken ({tier.reason}); its commands are left out")
    found: list[tuple[str, type[Any], Command]] = []
    taken = set(BUILT_IN)
    for name, cls in sorted(classes.items()):
        try:
            commands = list(cls.commands())
            if not all(isinstance(command, Command) for command in commands):
                raise TypeError("commands() must give tierkernel.backends.hooks.Command objects")
        except Exception as exc:
            _warn(f"tier {name!r}: cannot read its commands ({exc}); they are left out")
            continue
        for command in commands:
            if command.name in taken:
                _warn(f"tier {name!r}: command {command.name!r} is taken already; left out")
                continue
            taken.add(command.name)
            found.append((name, cls, command))
    return found


def _add_tier_commands(sub: Any) -> None:
    """Add each tier's commands to ``sub``, the ``tierkernel`` parser's subcommands."""
    for tier, cls, command in tier_commands():
        try:  # on a parser of its own first: a failure must leave no half-made command behind
            command.configure(argparse.ArgumentParser(prog=f"tierkernel {command.name}"))
        except Exception as exc:
            _warn(f"tier {tier!r}: cannot set up command {command.name!r} ({exc}); left out")
            continue
        p = sub.add_parser(command.name, help=command.help,
                           description=command.description or None)
        command.configure(p)
        p.set_defaults(func=_runner(tier, cls, command))


def _runner(tier: str, cls: type[Any],
            command: Command) -> Callable[[argparse.Namespace], int]:
    """What ``main`` calls for ``command``: its run function, given the context; a failure
    it did not handle itself is said in one line, with the tier it came from."""
    def run(args: argparse.Namespace) -> int:
        try:
            return int(command.run(args, _Context(cls)))
        except Exception as exc:
            print(f"tierkernel {command.name}: failed ({type(exc).__name__}: {exc}); the "
                  f"command comes from the {tier!r} tier", file=sys.stderr)
            return 1
    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tierkernel`` command."""
    parser = argparse.ArgumentParser(
        prog="tierkernel", description="A Jupyter kernel for Python with per-cell trust tiers."
    )
    parser.add_argument("--version", action="version", version=f"tierkernel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("install", help="install the kernelspec so Jupyter clients can start it")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--sys-prefix", action="store_true",
                       help="install into this Python environment (sys.prefix)")
    where.add_argument("--prefix", metavar="P", help="install under prefix P")
    p.add_argument("--name", default=KERNEL_NAME, help=f"kernelspec name (default {KERNEL_NAME})")
    p.add_argument("--display-name", default=DISPLAY_NAME, help="name shown in the launcher")
    p.add_argument("--default-tier", metavar="TIER",
                   help="tier for cells without %%%%tier (written to the spec's environment)")
    p.set_defaults(func=_cmd_install)

    p = sub.add_parser(
        "run", help="execute a notebook and print a per-cell summary",
        description="Execute a notebook with nbclient, write the executed copy and print one "
        "line per code cell (its tier, duration and outcome). Cells whose tier cannot run "
        "here are skipped, with the reason.",
        epilog="exit status: 0 every cell succeeded, failed as the notebook expects (tagged "
        "raises-exception) or was skipped; 1 a cell failed otherwise or ran out of time "
        "(the run stops at it, or with --allow-errors goes on to the end and still exits 1); "
        "2 the notebook could not be read or the kernel could not start.")
    p.add_argument("notebook", help="the .ipynb file to run")
    p.add_argument("-o", "--output", help="where to write the executed notebook "
                   "(default: NAME.executed.ipynb next to it)")
    p.add_argument("--kernel", default=KERNEL_NAME, help="kernelspec to run it with")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per cell")
    p.add_argument("--allow-errors", action="store_true",
                   help="run every cell even after one fails unexpectedly (not tagged "
                   "raises-exception); the exit status is still 1 if one did")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("tiers", help="show every installed tier, available or not, and why")
    p.set_defaults(func=_cmd_tiers)

    p = sub.add_parser("serve", help=serve_command.HELP, description=serve_command.DESCRIPTION)
    serve_command.configure(p)
    p.set_defaults(func=serve_command.run)
    p = sub.add_parser("mcp", help=serve_command.MCP_HELP,
                       description=serve_command.MCP_DESCRIPTION)
    serve_command.configure_mcp(p)
    p.set_defaults(func=serve_command.run_mcp)

    _add_tier_commands(sub)

    p = sub.add_parser("kernel", help="launch the kernel (what the kernelspec runs)")
    p.add_argument("kernel_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_kernel)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tierkernel`` command."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
