"""Config traits shared by the tiers' settings."""

from __future__ import annotations

from typing import Any

from traitlets import Int, TraitError

from tierkernel.magics.options import format_size, size_in_bytes


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
