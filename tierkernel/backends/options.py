"""Magic-line options: how a tier declares what its ``%%tier NAME --opt VALUE`` line takes.

Each tier lists its options in ``Backend.magic_options``: an :class:`OptionSpec` carries the
option's name, its help and the parser that turns the word on the line into a value (raising
:class:`TierUsageError` with what was wrong and what to write instead). The options several
tiers share are defined here once (:data:`STANDARD`), so every tier reports a bad value the same
way; a tier adds an option of its own by declaring another spec (the sandbox tier's
``--runtime`` is one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tierkernel.errors import TierUsageError
from tierkernel.guest.js_node import LANGS
from tierkernel.runtime.grants import HELPERS, is_domain_pattern
from tierkernel.sizes import size_in_bytes


@dataclass(frozen=True)
class OptionSpec:
    """One magic-line option: ``--name METAVAR``, or a flag when ``flag`` is true.

    ``parse`` turns the word given on the line into the option's value and raises
    :class:`TierUsageError` when it is not one; a flag's value is True when given.
    ``help`` is one line, shown by ``%tier --help``.
    """

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
    """Parse a memory size in bytes (see :func:`tierkernel.sizes.size_in_bytes`); at least
    16m."""
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


def parse_names(text: str) -> tuple[str, ...]:
    """Parse ``--in df,model``: names of variables (Python identifiers), comma-separated."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    bad = [name for name in names if not name.isidentifier()]
    if bad or not names:
        raise TierUsageError(f"--in and --out expect variable names separated by commas "
                             f"(e.g. df,model), got {text!r}")
    return names


def parse_lang(text: str) -> str:
    """Parse ``--lang js``: the cell's language (``python``, ``js`` or ``ts``; ``javascript``
    and ``typescript`` too)."""
    name = {"javascript": "js", "typescript": "ts", "py": "python"}.get(text.lower(), text.lower())
    if name not in LANGS:
        raise TierUsageError(f"--lang expects python, js or ts, got {text!r}")
    return name


def _given(text: str) -> bool:
    return True


TIMEOUT = OptionSpec("timeout", "SECONDS", "stop the cell after this long (e.g. 30, 1.5, 2m)",
                     parse_seconds)
MEMORY = OptionSpec("memory", "SIZE", "memory limit of the tier's session (e.g. 512m, 1g)",
                    parse_size)
CPUS = OptionSpec("cpus", "N", "CPU share of the tier's session (e.g. 0.5, 2)", parse_cpus)
ALLOW = OptionSpec("allow", "HELPERS",
                   "runtime helpers this cell may call, from ai,api,db,console (or none)",
                   parse_allow)
DOMAINS = OptionSpec("domains", "HOSTS",
                     "hosts api() may reach from this cell (e.g. api.github.com,*.example.org)",
                     parse_domains)
DB_READONLY = OptionSpec("db-readonly", "", "db() may only read in this cell", _given, flag=True)
IN = OptionSpec("in", "NAMES", "variables of the kernel (or of the tier holding them) given to "
                "this cell's tier before it runs (e.g. df,model)", parse_names)
OUT = OptionSpec("out", "NAMES", "variables this cell's tier sends back to the kernel's own "
                 "namespace after it ran (e.g. result)", parse_names)

#: The options defined here, by name. A tier takes those it lists in its ``magic_options``.
STANDARD: Mapping[str, OptionSpec] = {
    spec.name: spec for spec in (TIMEOUT, MEMORY, CPUS, ALLOW, DOMAINS, DB_READONLY, IN, OUT)
}
#: The options through which a cell narrows what the runtime helpers may do (every tier
#: whose cells can call them takes these).
HELPER_POLICY = (ALLOW, DOMAINS, DB_READONLY)
STRICT = OptionSpec("strict", "", "a JavaScript cell may not use eval, Function, import(), "
                    "require or process", _given, flag=True)
LANG = OptionSpec("lang", "LANG", "the cell's language: python (the default), js or ts "
                  "(TypeScript, its types stripped)", parse_lang)
#: The options that move variables between a tier and the kernel (``kernel/values.py``): every
#: agent tier takes both; the native tier, whose variables are the kernel's, takes ``--in``.
VALUE_OPTIONS = (IN, OUT)


def option_usage(specs: Iterable[OptionSpec]) -> str:
    """The usage of ``specs``, by name, for error messages and help."""
    ordered = sorted(specs, key=lambda spec: spec.name)
    return " ".join(f"[{spec.usage}]" for spec in ordered) if ordered else "(no options)"
