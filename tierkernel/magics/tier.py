"""The ``%tier`` line magic (and the IPython side of ``%%tier``).

The kernel routes ``%%tier`` cells itself before IPython sees them; IPython only ever runs the
``%%tier native`` line, which the input transformer here blanks out, and a ``%%tier`` line that
asks for help. These magics only parse and call the kernel's router (handed in as a
:class:`Tiers`): they never execute a tier themselves.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display

from tierkernel.backends.base import Backend
from tierkernel.backends.options import OptionSpec
from tierkernel.backends.registry import BrokenTier
from tierkernel.errors import TierUnavailableError, TierUsageError
from tierkernel.magics.parsing import HELP_WORDS

_NATIVE_LINE = re.compile(r"^\s*%%tier\s+(native|auto)(\s|$)")


class Tiers(Protocol):
    """The kernel's tiers as the ``%tier`` magic sees them (the kernel's router)."""

    @property
    def names(self) -> list[str]:
        """Every registered tier that works, sorted."""
        ...

    @property
    def default(self) -> str:
        """The tier of cells without ``%%tier``."""
        ...

    @property
    def backends(self) -> Mapping[str, Backend]:
        """The working tiers by name."""
        ...

    @property
    def broken(self) -> Sequence[BrokenTier]:
        """The registered tiers that cannot be used, with why."""
        ...

    def table(self) -> Any:
        """What ``%tier`` displays: every tier, available or not and why."""
        ...

    def set_default(self, name: str, args: list[str]) -> str:
        """``%tier NAME [options]``: make ``name`` the default; the confirmation to print.
        Raises :class:`TierUsageError` or :class:`TierUnavailableError` with what is wrong."""
        ...


def strip_native_line(lines: list[str]) -> list[str]:
    """IPython cleanup transformer: drop a leading ``%%tier native ...`` line (or ``%%tier auto
    ...``, when auto chose the native tier).

    The line is replaced by an empty one so IPython's tracebacks keep the cell's line numbers,
    unless another cell magic follows (``%%tier native`` then ``%%time``), which IPython only
    recognises on the first line.
    """
    if lines and _NATIVE_LINE.match(lines[0]) and not HELP_WORDS.intersection(lines[0].split()):
        rest = lines[1:]
        if rest and rest[0].lstrip().startswith("%%"):
            return rest
        return ["\n", *rest]
    return lines


@magics_class
class TierMagics(Magics):
    """``%tier`` shows the tiers or sets the default one."""

    def __init__(self, shell: Any, router: Tiers) -> None:
        super().__init__(shell)
        self.router = router

    @line_cell_magic
    def tier(self, line: str, cell: str | None = None) -> None:
        """Choose where cells run.

        %tier                       show every tier: available or not (and why), isolation,
                                    limits; * marks the default
        %tier NAME [--opt value]    run cells without %%tier in NAME from now on (options
                                    become that tier's defaults for this session)
        %%tier NAME [--opt value]   (first line of a cell) run this cell in NAME
        %tier [NAME] --help         the tiers and the options each takes (NAME: that one's)
        """
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise UsageError(f"cannot read the %tier line: {exc}") from None
        if HELP_WORDS.intersection(words):
            print(self._help([w for w in words if w not in HELP_WORDS]))
            return
        if cell is not None:
            raise UsageError(
                "%%tier must be the first line of a notebook cell run by the tierkernel kernel; "
                "it cannot be called from inside another cell"
            )
        if not words:
            display(self.router.table())
            return
        if words[0].startswith("-"):
            names = ", ".join(self.router.names)
            raise UsageError(f"usage: %tier [NAME [options]]; tiers: {names}")
        try:
            message = self.router.set_default(words[0], words[1:])
        except (TierUsageError, TierUnavailableError) as exc:
            raise UsageError(str(exc)) from None
        print(message)

    def _help(self, words: list[str]) -> str:
        """``%tier --help``: how the magics are used, then each tier (or the one named) with
        the options its line takes."""
        if words:
            named = words[0]
            if named not in self.router.backends and all(b.name != named
                                                          for b in self.router.broken):
                raise UsageError(f"unknown tier {named!r}; valid tiers: "
                                 f"{', '.join(self.router.names)}")
        else:
            named = None
        sections = [tier_help(name, backend, name == self.router.default)
                    for name, backend in sorted(self.router.backends.items())
                    if named in (None, name)]
        sections += [f"  {broken.name}: broken ({broken.reason})" for broken in self.router.broken
                     if named in (None, broken.name)]
        if named is not None:
            return "\n".join(sections)
        return "\n".join([USAGE, "", "Tiers (* = the default), each with the options its line "
                          "takes:", "", *sections])


USAGE = """\
%tier                      show every tier: available or not (and why), isolation, limits
%tier NAME [options]       run cells without %%tier in NAME from now on (the options become
                           that tier's defaults for this session)
%%tier NAME [options]      (first line of a cell) run this cell in NAME
%tier [NAME] --help        this help (with NAME: that tier's part)"""


def tier_help(name: str, backend: Backend, default: bool) -> str:
    """One tier's part of ``%tier --help``: its name and isolation, then its options."""
    lines = textwrap.wrap(f"{'* ' if default else '  '}{name}: {backend.isolation}", 92,
                          subsequent_indent="    ")
    specs: Sequence[OptionSpec] = sorted(backend.magic_options, key=lambda spec: spec.name)
    width = max((len(spec.usage) for spec in specs), default=0)
    for spec in specs:
        body = textwrap.wrap(spec.help, max(30, 92 - 8 - width)) or [""]
        lines.append(f"      {spec.usage.ljust(width)}  {body[0]}")
        lines.extend(f"      {' ' * width}  {more}" for more in body[1:])
    if not specs:
        lines.append("      (no options)")
    return "\n".join(lines)
