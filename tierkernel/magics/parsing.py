"""Reading a cell's first line: which tier it asks for and with which options.

These functions only parse; they never run a tier. The kernel calls :func:`split_cell` for every
execute_request, so the common case (a cell with no magic) must cost next to nothing.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tierkernel.errors import TierUsageError
from tierkernel.magics.options import OPTIONS, option_usage

CELL_MAGIC = "%%tier"
LINE_MAGIC = "%tier"


@dataclass(frozen=True)
class CellDirective:
    """What a cell's ``%%tier`` line says, before validation against the registered tiers.

    ``body`` is the rest of the cell and ``first_line`` the cell line number it starts at.
    ``control`` marks a cell that starts with the ``%tier`` line magic: such a cell always runs
    in the kernel's own IPython, whatever the default tier, so ``%tier native`` can always get
    back from a sandbox.
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


def usage(tiers: Iterable[str], accepted: frozenset[str] | None = None) -> str:
    """The one-line usage of ``%%tier``, naming the registered tiers."""
    names = ", ".join(sorted(tiers))
    opts = option_usage(accepted if accepted is not None else frozenset(OPTIONS))
    return f"usage: %%tier NAME {opts} (first line of the cell); tiers: {names}"


def parse_options(
    tier: str,
    args: list[str],
    accepted: frozenset[str],
    defaults: Mapping[str, Any],
) -> dict[str, Any]:
    """Parse ``--name value`` / ``--name=value`` / ``--flag`` words for ``tier``.

    Returns ``defaults`` updated with the given options. Raises :class:`TierUsageError` naming
    the bad word and what the tier takes.
    """
    options = dict(defaults)
    given: set[str] = set()
    takes = f"tier {tier!r} takes: {option_usage(accepted)}"
    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--") or len(word) == 2:
            raise TierUsageError(f"unexpected {word!r} on the %%tier line; {takes}")
        name, eq, inline = word[2:].partition("=")
        spec = OPTIONS.get(name)
        if spec is None:
            raise TierUsageError(f"unknown option --{name}; {takes}")
        if name not in accepted:
            raise TierUsageError(f"tier {tier!r} does not take --{name}; it takes: "
                                 f"{option_usage(accepted)}")
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
