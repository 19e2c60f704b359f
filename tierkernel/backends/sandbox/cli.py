"""The sandbox tier's ``tierkernel`` subcommands: ``tierkernel image`` (its container image)
and ``tierkernel spares`` (the spare containers kept ready for new kernels)."""

from __future__ import annotations

import argparse
import re
import sys

from tierkernel.backends.hooks import Command, CommandContext
from tierkernel.backends.sandbox import pool as sandbox_pool
from tierkernel.backends.sandbox import spares as sandbox_spares
from tierkernel.backends.sandbox.engine import connect
from tierkernel.backends.sandbox.extras import Extras
from tierkernel.backends.sandbox.head_start import MIN_TTL
from tierkernel.backends.sandbox.image import build_image, image_ref
from tierkernel.backends.sandbox.reaper import remove_spares
from tierkernel.errors import EngineError, ExtrasError, ImageBuildError


def _configure_image(parser: argparse.ArgumentParser) -> None:
    """``tierkernel image build|tag [--apt ...] [--pip ...]``."""
    image_sub = parser.add_subparsers(dest="image_command", required=True)
    b = image_sub.add_parser(
        "build", help="build the sandbox image from Debian packages (debootstrap, no registry) "
        "and import it into the Docker engine; a no-op when the recipe is unchanged")
    b.add_argument("--force", action="store_true", help="rebuild even if the tag exists")
    b.add_argument("--mirror", metavar="URL",
                   help="Debian mirror (default: the one apt uses, from /etc/apt/sources.list*)")
    t = image_sub.add_parser("tag", help="print the image reference this recipe builds (with "
                             "--apt/--pip: the custom image's)")
    for command in (b, t):
        command.add_argument(
            "--apt", nargs="+", metavar="NAME",
            help="extra Debian packages baked into a custom image (its tag says which; select "
            "it with c.SandboxBackend.image)")
        command.add_argument(
            "--pip", nargs="+", metavar="NAME",
            help="extra Python packages (NAME or NAME==VERSION) baked into a custom image: "
            "wheels fetched on the host, installed into /usr/local/lib/python3.X/dist-packages")
        command.add_argument("--index-url", metavar="URL",
                             help="package index for --pip (default: https://pypi.org/simple)")


def _image(args: argparse.Namespace, context: CommandContext) -> int:
    """Print the image's tag, or build it; 2 for bad extras, 1 when the build fails."""
    try:
        extras = Extras(tuple(args.apt or ()), tuple(args.pip or ()),
                        args.index_url or "https://pypi.org/simple")
    except ExtrasError as exc:
        print(f"tierkernel image {args.image_command}: {exc}", file=sys.stderr)
        return 2
    if args.image_command == "tag":
        print(image_ref(extras))
        return 0
    try:
        build_image(lambda line: print(line, flush=True), force=args.force, mirror=args.mirror,
                    extras=extras)
    except (ImageBuildError, EngineError) as exc:
        print(f"tierkernel image build: {exc}", file=sys.stderr)
        return 1
    return 0


def _configure_spares(parser: argparse.ArgumentParser) -> None:
    """``tierkernel spares [--remove | --make | --keep] [--count N] ...``."""
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--remove", action="store_true",
                        help="remove this user's unclaimed spares now")
    action.add_argument("--make", action="store_true",
                        help="make spares now until --count wait, then exit")
    action.add_argument("--keep", action="store_true",
                        help="keep --count spares waiting until stopped: replace each before "
                        "it expires, remove what dead kernels left (for a machine whose "
                        "kernels should never wait, e.g. a JupyterHub)")
    parser.add_argument("--count", type=int, default=1, metavar="N",
                        help="spares to keep waiting per runtime (default 1)")
    parser.add_argument("--runtime", action="append", metavar="NAME",
                        help="runc or runsc; repeat for both (default: the configured runtime)")
    parser.add_argument("--ttl", type=float, metavar="SECONDS",
                        help="how long each spare waits (default: c.SandboxBackend.spare_ttl)")
    parser.add_argument("--interval", type=float, default=10.0, metavar="SECONDS",
                        help="with --keep: seconds between rounds (default 10)")
    parser.add_argument("--set", action="append", default=[], dest="config_options",
                        metavar="CLASS.NAME=VALUE",
                        help="a kernel option, as the kernel's --CLASS.NAME=VALUE "
                        "(e.g. --set SandboxBackend.memory=1g); repeatable")


def _spares(args: argparse.Namespace, context: CommandContext) -> int:
    """List the spares, or remove, make or keep them; 1 when the engine fails."""
    if args.make or args.keep:
        return _make_or_keep_spares(args, context)
    try:
        client = connect(timeout=30)
        if args.remove:
            removed = remove_spares(client)
            print(f"removed {len(removed)} spare sandbox container(s)")
            return 0
        found = sandbox_spares.list_spares(client)
    except EngineError as exc:
        print(f"tierkernel spares: {exc}", file=sys.stderr)
        return 1
    if not found:
        print("no spare sandbox containers")
    for container in found:
        labels = container.labels or {}
        owner = sandbox_spares.claimer(sandbox_spares.folder_of(container))
        state = f"claimed by kernel pid {owner[0]}" if owner else "waiting for a kernel"
        print(f"{container.name}  runtime {labels.get('org.tierkernel.runtime', '?')}  "
              f"{state}")
    return 0


def _make_or_keep_spares(args: argparse.Namespace, context: CommandContext) -> int:
    """``--make`` and ``--keep``, with the configuration a kernel reads; 2 for bad options."""

    def say(text: str) -> None:
        print(f"tierkernel spares: {text}", flush=True)

    if args.count < 1 or args.interval <= 0 or (args.ttl is not None and args.ttl <= MIN_TTL):
        print(f"tierkernel spares: --count must be at least 1, --interval more than 0, and "
              f"--ttl more than {MIN_TTL:g} s (a kernel does not claim a spare about to "
              "expire)", file=sys.stderr)
        return 2
    options = [f"--{option.removeprefix('--')}" for option in args.config_options]
    bad = [o for o in options if not re.fullmatch(r"--\w+(\.\w+)+=.*", o, re.DOTALL)]
    if bad:
        print(f"tierkernel spares: --set takes CLASS.NAME=VALUE (as in "
              f"--set SandboxBackend.memory=1g), not {bad[0][2:]!r}", file=sys.stderr)
        return 2
    if args.ttl is not None:
        options.append(f"--SandboxBackend.spare_ttl={args.ttl}")
    try:
        config = context.kernel_config(options)
        backends = [sandbox_pool.backend_for(context.tier, config, runtime)
                    for runtime in (args.runtime or [None])]
    except Exception as exc:  # a bad option or config file: say which, not a traceback
        print(f"tierkernel spares: cannot use the kernel's configuration: {exc}",
              file=sys.stderr)
        return 2
    if args.keep:
        say(f"keeping {args.count} spare(s) per runtime "
            f"({', '.join(b.runtime for b in backends)}) ready; Ctrl-C or SIGTERM stops")
        sandbox_pool.keep(backends, args.count, args.interval, say)
        return 0
    made, failures = sandbox_pool.make(backends, args.count, 5.0, say)
    for failure in failures:
        print(f"tierkernel spares: {failure}", file=sys.stderr)
    if not made and not failures:
        say(f"{args.count} spare(s) per runtime already waiting; none made")
    return 1 if failures else 0


COMMANDS = (
    Command("image", help="the sandbox tier's container image", configure=_configure_image,
            run=_image),
    Command(
        "spares", help="list, make or keep the spare sandbox containers kept ready for new "
        "kernels",
        description="Each kernel keeps c.SandboxBackend.spares containers (default 1) ready, "
        "with their interpreter running, for the next kernel's first sandbox cell; an "
        "unclaimed one removes itself after c.SandboxBackend.spare_ttl seconds. --make and "
        "--keep make them with no kernel running, with the configuration a kernel reads "
        "(its config files, then any --set CLASS.NAME=VALUE given here).",
        configure=_configure_spares,
        run=_spares,
    ),
)
