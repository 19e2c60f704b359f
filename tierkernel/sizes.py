"""Sizes in bytes as people write them (``512m``, ``1g``, ``1.5GiB``), and the ``ByteSize``
config trait that takes them.

A leaf module: the magics, the tiers and fsx all read sizes the same way, and fsx sits below
the other two (imports go kernel -> magics/backends -> fsx), so this lives beneath all of them.
"""

from __future__ import annotations

import re
from typing import Any

from traitlets import Int, TraitError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$")


def size_in_bytes(text: str) -> int | None:
    """``512m``, ``1g``, ``1.5GiB``, ``256MB``, ``1048576`` in bytes; None when it is no size.

    Units are binary (``1m`` is 1 MiB), as Docker's ``--memory`` reads them.
    """
    match = _SIZE.match(text.lower())
    factor = _SIZE_UNITS.get(match.group(2)) if match else None
    if match is None or factor is None:
        return None
    return int(float(match.group(1)) * factor)


def format_size(value: int) -> str:
    """Render a byte count the way ``--memory`` accepts it: ``1g``, ``512m``, ``1536k``."""
    for unit, factor in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if value >= factor and value % factor == 0:
            return f"{value // factor}{unit}"
    if value >= 1 << 20:
        return f"{value / (1 << 20):.1f}m"
    return str(value)


class ByteSize(Int):  # type: ignore[type-arg]
    """A size in bytes, also given the way ``--memory`` takes it: ``512m``, ``1g``, ``1.5GiB``.

    So ``c.SandboxBackend.memory = "1g"`` and ``--SandboxBackend.memory=1g`` mean what the magic
    line's ``--memory 1g`` means, and a plain number is still bytes. The value is always an
    int. ``minimum`` is the least size accepted.
    """

    def __init__(self, default_value: Any = 0, *, minimum: int = 0, **kwargs: Any) -> None:
        self.minimum = minimum
        super().__init__(default_value, **kwargs)

    def validate(self, obj: Any, value: Any) -> int:
        """Accept an int, or a string that is a size; refuse anything else with its name."""
        size: object = value
        if isinstance(value, str):
            size = size_in_bytes(value)
        elif isinstance(value, float) and value.is_integer():
            size = int(value)  # 4e9, as traitlets' Int takes it
        if isinstance(size, bool) or not isinstance(size, int):
            raise TraitError(f"{self._where(obj)} expects a size such as 512m, 1g or 1.5GiB "
                             f"(or a number of bytes), got {value!r}")
        if size < self.minimum:
            raise TraitError(f"{self._where(obj)} must be at least "
                             f"{format_size(self.minimum)}, got {format_size(size)}")
        return size

    def from_string(self, s: str) -> Any:
        """The command line's ``--Class.name=1g``: parsed by :meth:`validate`."""
        return s

    def _where(self, obj: Any) -> str:
        return f"c.{type(obj).__name__}.{self.name}"
