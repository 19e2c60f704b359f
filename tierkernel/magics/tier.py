"""The ``%tier`` line magic (and the IPython side of ``%%tier``).

The kernel routes ``%%tier`` cells itself before IPython sees them; IPython only ever runs the
``%%tier native`` line, which the input transformer here blanks out. These magics only parse and
call the router: they never execute a tier themselves.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display

from tierkernel.errors import TierUnavailableError, TierUsageError
from tierkernel.kernel.router import TierRouter

_NATIVE_LINE = re.compile(r"^\s*%%tier\s+native(\s|$)")


def strip_native_line(lines: list[str]) -> list[str]:
    """IPython cleanup transformer: drop a leading ``%%tier native ...`` line.

    The line is replaced by an empty one so IPython's tracebacks keep the cell's line numbers,
    unless another cell magic follows (``%%tier native`` then ``%%time``), which IPython only
    recognises on the first line.
    """
    if lines and _NATIVE_LINE.match(lines[0]):
        rest = lines[1:]
        if rest and rest[0].lstrip().startswith("%%"):
            return rest
        return ["\n", *rest]
    return lines


@magics_class
class TierMagics(Magics):
    """``%tier`` shows the tiers or sets the default one."""

    def __init__(self, shell: Any, router: TierRouter) -> None:
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

        Options: --timeout SECONDS (and what each tier adds; see %tier).
        """
        if cell is not None:
            raise UsageError(
                "%%tier must be the first line of a notebook cell run by the tierkernel kernel; "
                "it cannot be called from inside another cell"
            )
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise UsageError(f"cannot read the %tier line: {exc}") from None
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
