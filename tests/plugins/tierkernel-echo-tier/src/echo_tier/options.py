"""The echo tier's own magic-line options: ``--shout`` and ``--repeat N``."""

from __future__ import annotations

from tierkernel.backends.options import OptionSpec, TierUsageError

MAX_REPEAT = 5


def parse_repeat(text: str) -> int:
    """``--repeat N``: print everything N times, 1 to 5."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_REPEAT:
        raise TierUsageError(
            f"--repeat expects a whole number from 1 to {MAX_REPEAT}, got {text!r}")
    return value


SHOUT = OptionSpec("shout", "", "print in capitals", lambda text: True, flag=True)
REPEAT = OptionSpec("repeat", "N", f"print everything N times (1 to {MAX_REPEAT})", parse_repeat)
