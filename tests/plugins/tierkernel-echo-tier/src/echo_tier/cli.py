"""The echo tier's ``tierkernel echo-status`` command."""

from __future__ import annotations

import argparse
import sys

from echo_tier.options import parse_repeat
from tierkernel.backends.hooks import Command, CommandContext
from tierkernel.backends.options import TierUsageError


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="CLASS.NAME=VALUE",
                        help="a kernel option, as the kernel's --CLASS.NAME=VALUE")


def _status(args: argparse.Namespace, context: CommandContext) -> int:
    """Print the echo tier's settings as a kernel of this user would have them."""
    config = context.kernel_config([f"--{option}" for option in args.set])
    repeat = config.EchoBackend.get("repeat", 1)
    try:
        parse_repeat(str(repeat))
    except TierUsageError as exc:
        print(f"tierkernel echo-status: c.EchoBackend.repeat: {exc}", file=sys.stderr)
        return 2
    print(f"echo tier ready: cells run with exec(); repeat={repeat}")
    return 0


COMMANDS = (Command("echo-status", help="show the echo tier's settings", configure=_configure,
                    run=_status),)
