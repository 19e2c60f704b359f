"""Every option a ``%%tier`` line can carry, parsed and validated in this one place.

A tier says which of these it accepts (``Backend.accepted_options``); a new kind of option is
added here, with its parser and help, so that every tier reports bad values the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class TierUsageError(ValueError):
    """A ``%%tier``/``%tier`` line the kernel cannot act on; the message says how to fix it."""


@dataclass(frozen=True)
class OptionSpec:
    """One magic-line option: ``--name METAVAR``, or a flag when ``flag`` is true."""

    name: str
    metavar: str
    help: str
    parse: Callable[[str], Any]
    flag: bool = False

    @property
    def usage(self) -> str:
        """``--timeout SECONDS`` or ``--flag``."""
        return f"--{self.name}" if self.flag else f"--{self.name} {self.metavar}"


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_seconds(text: str) -> float:
    """Parse a positive duration: ``30``, ``1.5``, ``500ms``, ``30s``, ``2m``, ``1h``."""
    raw = text.strip().lower()
    factor = 1.0
    for unit in sorted(_DURATION_UNITS, key=len, reverse=True):
        if raw.endswith(unit) and raw[: -len(unit)].strip():
            factor = _DURATION_UNITS[unit]
            raw = raw[: -len(unit)]
            break
    try:
        value = float(raw) * factor
    except ValueError:
        raise TierUsageError(
            f"--timeout expects a positive number of seconds (e.g. 30, 1.5, 2m), got {text!r}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise TierUsageError(
            f"--timeout expects a positive number of seconds (e.g. 30, 1.5, 2m), got {text!r}"
        )
    return value


OPTIONS: dict[str, OptionSpec] = {
    spec.name: spec
    for spec in [
        OptionSpec(
            "timeout",
            "SECONDS",
            "stop the cell after this long (e.g. 30, 1.5, 2m)",
            parse_seconds,
        ),
    ]
}


def option_usage(names: frozenset[str] | set[str]) -> str:
    """The usage of the named options, in a stable order, for error messages and help."""
    specs = [OPTIONS[name] for name in sorted(names) if name in OPTIONS]
    return " ".join(f"[{spec.usage}]" for spec in specs) if specs else "(no options)"
