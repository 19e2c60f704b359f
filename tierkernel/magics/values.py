"""``%tiervars``, and ``%get`` / ``%put`` where they cannot run.

The kernel runs a cell made only of ``%get``, ``%put`` and ``%tiervars`` lines itself
(``tierkernel/kernel/values.py``): moving a variable waits for a tier, which a line magic,
running inside the kernel's event loop, cannot do. These magics answer the other cases:
``%tiervars`` anywhere, and a ``%get`` or ``%put`` among other code with what to write instead.
"""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class


@magics_class
class ValueMagics(Magics):
    """Line magics about variables moved between tiers."""

    def __init__(self, shell: Any, table: Any) -> None:
        super().__init__(shell)
        self._table = table

    @line_magic
    def tiervars(self, line: str) -> None:
        """%tiervars: each variable moved between tiers, the tiers holding its last value,
        its type and size."""
        print(self._table())

    @line_magic
    def get(self, line: str) -> None:
        """%get TIER NAME [NAME ...]: copy variables of a tier into the kernel's namespace.
        Put it in a cell of its own (with other %get, %put, %tiervars lines only)."""
        raise UsageError(f"%get {line}: put %get in a cell of its own (with only %get, %put "
                         "and %tiervars lines), or use --out NAMES on the tier's %%tier line")

    @line_magic
    def put(self, line: str) -> None:
        """%put TIER NAME [NAME ...]: copy variables of the kernel into a tier. Put it in a
        cell of its own (with other %get, %put, %tiervars lines only)."""
        raise UsageError(f"%put {line}: put %put in a cell of its own (with only %get, %put "
                         "and %tiervars lines), or use --in NAMES on the tier's %%tier line")
