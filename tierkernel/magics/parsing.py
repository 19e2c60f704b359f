"""Reading a cell's first line: which tier it asks for and with which options.

These functions only parse; they never run a tier. The kernel calls :func:`split_cell` for every
execute_request, so the common case (a cell with no magic) must cost next to nothing. The options
a line may carry are the named tier's own (``Backend.magic_options``), handed in by the caller.
"""

from __future__ import annotations

import shlex
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tierkernel.backends.options import STANDARD, OptionSpec, option_usage
from tierkernel.errors import TierUsageError

CELL_MAGIC = "%%tier"
LINE_MAGIC = "%tier"
#: Words that make a tier line ask for help instead of choosing a tier.
HELP_WORDS = frozenset({"--help", "-h"})


@dataclass(frozen=True)
class CellDirective:
    """What a cell's ``%%tier`` line says, before validation against the registered tiers.

    ``body`` is the rest of the cell and ``first_line`` the cell line number it starts at.
    ``control`` marks a cell that starts with the ``%tier`` line magic, or a ``%%tier`` line
    asking for help (``--help``, ``-h``): such a cell always runs in the kernel's own IPython,
    whatever the default tier, so ``%tier native`` can always get back from a sandbox, and the
    ``%tier`` magic answers the help.
    """

    tier: str | None
    args: list[str] = field(default_factory=list)
    body: str = ""
    first_line: int = 1
    control: bool = False
    has_magic: bool = False


def split_cell(code: str) -> CellDirective:
    """Find a ``%%tier`` (or ``%tier``) line at the top of a cell.

    Leading blank lines are skipped, as IPython does for cell magics. Raises
    :class:`TierUsageError` when the line cannot be tokenised (unbalanced quotes).
    """
    if "%tier" not in code:  # fast path: nearly every cell
        return CellDirective(tier=None, body=code)
    lines = code.split("\n")
    index = 0
    while index < len(lines) and not lines[index].strip():
        index += 1
    if index == len(lines):
        return CellDirective(tier=None, body=code)
    head = lines[index].strip()
    if head.startswith(CELL_MAGIC) and (len(head) == len(CELL_MAGIC) or head[6].isspace()):
        try:
            words = shlex.split(head[len(CELL_MAGIC) :], comments=True)
        except ValueError as exc:
            raise TierUsageError(f"cannot read the %%tier line: {exc}") from None
        if HELP_WORDS.intersection(words):
            return CellDirective(tier=None, body=code, control=True)
        tier = words[0] if words and not words[0].startswith("-") else None
        args = words[1:] if tier is not None else words
        return CellDirective(
            tier=tier,
            args=args,
            body="\n".join(lines[index + 1 :]),
            first_line=index + 2,
            has_magic=True,
        )
    if head.startswith(LINE_MAGIC) and (len(head) == len(LINE_MAGIC) or head[5].isspace()):
        return CellDirective(tier=None, body=code, control=True)
    return CellDirective(tier=None, body=code)


def usage(tiers: Iterable[str], options: Iterable[OptionSpec] = STANDARD.values()) -> str:
    """The one-line usage of ``%%tier``, naming the registered tiers and ``options`` (those
    the tiers take)."""
    names = ", ".join(sorted(tiers))
    return (f"usage: %%tier NAME {option_usage(options)} (first line of the cell); "
            f"tiers: {names}")


def parse_options(
    tier: str,
    args: list[str],
    accepted: Mapping[str, OptionSpec] | Collection[str],
    defaults: Mapping[str, Any],
    known: Collection[str] = STANDARD.keys(),
) -> dict[str, Any]:
    """Parse ``--name value`` / ``--name=value`` / ``--flag`` words for ``tier``.

    ``accepted`` is what the tier takes: its options by name, or just names of the shared
    options (``tierkernel.backends.options.STANDARD``). ``known`` names every option some tier
    takes, so that one the tier lacks is told apart from a misspelt one. Returns ``defaults``
    updated with the given options. Raises :class:`TierUsageError` naming the bad word and
    what the tier takes.
    """
    options = dict(defaults)
    if not args:  # nearly every cell: nothing to parse
        return options
    specs: Mapping[str, OptionSpec] = (
        accepted if isinstance(accepted, Mapping) else {name: STANDARD[name] for name in accepted})
    given: set[str] = set()

    def takes() -> str:
        return f"tier {tier!r} takes: {option_usage(specs.values())}"

    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--") or len(word) == 2:
            raise TierUsageError(f"unexpected {word!r} on the %%tier line; {takes()}")
        name, eq, inline = word[2:].partition("=")
        spec = specs.get(name)
        if spec is None:
            if name in known:
                raise TierUsageError(f"tier {tier!r} does not take --{name}; it takes: "
                                     f"{option_usage(specs.values())}")
            raise TierUsageError(f"unknown option --{name}; {takes()}")
        if name in given:
            raise TierUsageError(f"--{name} is given twice on the %%tier line")
        given.add(name)
        if spec.flag:
            if eq:
                raise TierUsageError(f"--{name} is a flag and takes no value")
            options[name] = True
            i += 1
            continue
        if eq:
            value = inline
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            raise TierUsageError(f"--{name} needs a value ({spec.metavar}): {spec.help}")
        options[name] = spec.parse(value)
    return options
