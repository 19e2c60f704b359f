"""Every option a ``%%tier`` line can carry, parsed and validated in this one place.

A tier says which of these it accepts (``Backend.accepted_options``); a new kind of option is
added here, with its parser and help, so that every tier reports bad values the same way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Sizes are read in tierkernel.sizes (below fsx, which reads them too); named here as well,
# for the callers that take every option helper from this module.
from tierkernel.errors import TierUsageError
from tierkernel.sizes import format_size as format_size
from tierkernel.sizes import size_in_bytes as size_in_bytes


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


#: The least memory a tier accepts (``--memory`` and the tiers' memory settings).
MIN_MEMORY = 16 << 20


def parse_size(text: str) -> int:
    """Parse a memory size in bytes (see :func:`size_in_bytes`); at least 16m."""
    value = size_in_bytes(text)
    if value is None:
        raise TierUsageError(
            f"--memory expects a size such as 512m, 1g or 1.5GiB, got {text!r}"
        )
    if value < MIN_MEMORY:
        raise TierUsageError(f"--memory must be at least 16m, got {text!r}")
    return value


def parse_cpus(text: str) -> float:
    """Parse a CPU share: ``1``, ``0.5``, ``2`` (as Docker's ``--cpus``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or value > 1024:
        raise TierUsageError(
            f"--cpus expects a positive number of CPUs (e.g. 0.5, 2), got {text!r}"
        )
    return value


#: The runtime helpers a cell can be allowed to call (``--allow``).
HELPERS = ("ai", "api", "db", "console")

_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def parse_allow(text: str) -> frozenset[str]:
    """Parse ``--allow api,db``: the helpers this cell may call (``none`` for no helper)."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if names == ["none"]:
        return frozenset()
    bad = [name for name in names if name not in HELPERS]
    if bad or not names:
        raise TierUsageError(
            f"--allow expects a comma-separated list of helpers from {', '.join(HELPERS)} "
            f"(or 'none'), got {text!r}"
        )
    return frozenset(names)


def parse_domains(text: str) -> tuple[str, ...]:
    """Parse ``--domains api.github.com,*.example.org``: the hosts ``api()`` may reach.

    Each entry is an exact host name or IP address, ``*.example.org`` (any subdomain of
    example.org, not example.org itself), or ``*`` (any host).
    """
    domains: list[str] = []
    for part in text.split(","):
        domain = part.strip().lower().rstrip(".")
        if not domain:
            continue
        if not is_domain_pattern(domain):
            raise TierUsageError(
                f"--domains expects host names such as api.github.com, *.example.org or *, "
                f"separated by commas; {part.strip()!r} is not one"
            )
        domains.append(domain)
    if not domains:
        raise TierUsageError(f"--domains needs at least one host name, got {text!r}")
    return tuple(dict.fromkeys(domains))


def is_domain_pattern(domain: str) -> bool:
    """Whether ``domain`` is ``*``, a host name, an IP address or ``*.`` + a host name."""
    if domain == "*":
        return True
    if domain.startswith("[") and domain.endswith("]"):  # an IPv6 literal, as URLs write it
        return all(c in "0123456789abcdef:." for c in domain[1:-1]) and ":" in domain
    name = domain[2:] if domain.startswith("*.") else domain
    return all(_DOMAIN_LABEL.match(label) for label in name.split("."))


_RUNTIME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_RUNTIME_ALIASES = {"gvisor": "runsc"}


def parse_runtime(text: str) -> str:
    """Parse a container runtime name: ``runc``, ``runsc`` (``gvisor`` is taken as ``runsc``).

    Only the spelling is checked here; the tier checks that its engine has the runtime.
    """
    name = text.strip().lower()
    if not _RUNTIME.match(name):
        raise TierUsageError(
            f"--runtime expects a container runtime name such as runc or runsc, got {text!r}"
        )
    return _RUNTIME_ALIASES.get(name, name)


OPTIONS: dict[str, OptionSpec] = {
    spec.name: spec
    for spec in [
        OptionSpec(
            "timeout",
            "SECONDS",
            "stop the cell after this long (e.g. 30, 1.5, 2m)",
            parse_seconds,
        ),
        OptionSpec(
            "memory",
            "SIZE",
            "memory limit of the tier's session (e.g. 512m, 1g)",
            parse_size,
        ),
        OptionSpec(
            "cpus",
            "N",
            "CPU share of the tier's session (e.g. 0.5, 2)",
            parse_cpus,
        ),
        OptionSpec(
            "allow",
            "HELPERS",
            "runtime helpers this cell may call, from ai,api,db,console (or none)",
            parse_allow,
        ),
        OptionSpec(
            "domains",
            "HOSTS",
            "hosts api() may reach from this cell (e.g. api.github.com,*.example.org)",
            parse_domains,
        ),
        OptionSpec(
            "db-readonly",
            "",
            "db() may only read in this cell",
            lambda text: True,
            flag=True,
        ),
        OptionSpec(
            "runtime",
            "NAME",
            "container runtime of the tier's session: runc, or runsc for gVisor",
            parse_runtime,
        ),
    ]
}


def option_usage(names: frozenset[str] | set[str]) -> str:
    """The usage of the named options, in a stable order, for error messages and help."""
    specs = [OPTIONS[name] for name in sorted(names) if name in OPTIONS]
    return " ".join(f"[{spec.usage}]" for spec in specs) if specs else "(no options)"
