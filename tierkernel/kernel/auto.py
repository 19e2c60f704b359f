"""``%tier auto``: each cell in the fastest tier, at or above a trust floor, that can run it.

Tiers are tried from the fastest (the least isolated) up: native, process, wasm, sandbox; only
those at or above the floor (``--floor``, default wasm) and never native unless the floor is
native. Each is asked ``Backend.can_run`` (a static look: imports, shell lines, process starts)
and whether it is available; the first that can is chosen, and the reason is kept: the reply's
``metadata.tierkernel.auto``, the cell's log in ``%executions``, and a one-line note when the
chosen tier differs from the previous auto cell's.

The variables the cell reads that the kernel has (or a tier sent last) go with it, as ``--in``
would send them; what it assigns is recorded as living in that tier, so a later cell elsewhere
that reads it gets it from there. A cell that fails for a capability (a module the tier lacks,
an operating-system call it cannot make) before it printed anything or changed the workspace
(where its tier can tell: process and sandbox watch their working folder, wasm writes straight
to the workspace) runs again one tier up, once, with a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tierkernel.backends import cell_look
from tierkernel.backends.base import Backend
from tierkernel.errors import TierUnavailableError, TierUsageError

#: From the fastest to the most isolated.
ORDER = ("native", "process", "wasm", "sandbox")
DEFAULT_FLOOR = "wasm"
#: Errors that say the tier lacked something, not that the code is wrong.
CAPABILITY_ERRORS = frozenset({"ModuleNotFoundError", "ImportError"})
#: Operating-system errors a cell gets where it cannot start processes or open sockets.
SYSTEM_ERRORS = frozenset({"OSError", "PermissionError", "NotImplementedError",
                           "BlockingIOError", "ConnectionError"})
_MOVABLE = (type(None), bool, int, float, complex, str, bytes, list, tuple, dict)


@dataclass
class Choice:
    """The tier an auto cell runs in, why, and the stronger tiers left to escalate to."""

    tier: str
    reason: str
    floor: str
    higher: list[str] = field(default_factory=list)
    escalated_from: str | None = None

    def metadata(self) -> dict[str, Any]:
        """For the reply's ``metadata.tierkernel.auto``."""
        out = {"tier": self.tier, "reason": self.reason, "floor": self.floor}
        if self.escalated_from:
            out["escalated_from"] = self.escalated_from
        return out


def split_floor(args: list[str]) -> tuple[str, list[str]]:
    """``--floor TIER`` out of a ``%%tier auto`` / ``%tier auto`` line's words; the rest are
    options for the chosen tier."""
    floor, rest, words = DEFAULT_FLOOR, [], iter(args)
    for word in words:
        if word == "--floor" or word.startswith("--floor="):
            value = word.partition("=")[2] or next(words, "")
            if value not in ORDER:
                raise TierUsageError(f"--floor expects one of {', '.join(ORDER)}, got "
                                     f"{value!r}: the least isolated tier auto may choose")
            floor = value
        else:
            rest.append(word)
    return floor, rest


class AutoTier:
    """Chooses the tier of each auto cell (see the module)."""

    def __init__(self, backends: dict[str, Backend]) -> None:
        self._backends = backends
        self.last: str | None = None

    def candidates(self, floor: str) -> list[str]:
        """The tiers auto may use at this floor, fastest first."""
        lowest = ORDER.index(floor)
        return [name for name in ORDER[lowest:] if name in self._backends
                and (name != "native" or floor == "native")]

    def choose(self, code: str, floor: str,
               living: dict[str, set[str]] | None = None) -> Choice:
        """The fastest tier at or above ``floor`` that can run ``code``, or a slower one that
        can where every variable the cell reads that lives outside the kernel already is
        (``living``: name -> the tiers holding its latest value): its data does not move, and
        a value that cannot move is where the cell needs it.
        :class:`TierUnavailableError` with each tier's reason when no tier can."""
        skipped: list[str] = []
        tiers = self.candidates(floor)
        homes = set.intersection(*living.values()) if living else set()
        first: Choice | None = None
        for position, name in enumerate(tiers):
            backend = self._backends[name]
            why = backend.can_run(code)
            if why is None:
                status = backend.availability()
                if not status.available:
                    why = f"not available ({status.reason})"
            if why is not None:
                skipped.append(f"{name}: {why}")
                continue
            reason = ("; ".join(skipped) if skipped
                      else f"the fastest tier at or above the floor ({floor})")
            if first is None:
                first = Choice(name, reason, floor, tiers[position + 1:])
            if not homes or name in homes:
                if first.tier != name and living:
                    return Choice(name, f"{', '.join(sorted(living))} live there", floor,
                                  tiers[position + 1:])
                return first
        if first is not None:
            return first
        raise TierUnavailableError(
            f"%tier auto: no tier at or above the floor {floor!r} can run this cell ("
            + "; ".join(skipped or ["no tier at or above it is registered"]) + ")")

    def escalation(self, choice: Choice, ename: str) -> Choice | None:
        """The next tier up for a cell that failed with ``ename`` in ``choice.tier`` for a
        capability reason, or None (not such a failure, or no tier left, or escalated once)."""
        if choice.escalated_from is not None or not choice.higher:
            return None
        lacking = ename in CAPABILITY_ERRORS or (
            ename in SYSTEM_ERRORS and choice.tier == "wasm")
        if not lacking:
            return None
        return Choice(choice.higher[0], f"{choice.tier} failed with {ename}", choice.floor,
                      choice.higher[1:], escalated_from=choice.tier)

    def note(self, choice: Choice, when: str) -> str | None:
        """The line shown to the user: always, on change, or never (``when``)."""
        changed = choice.tier != self.last
        self.last = choice.tier
        if when == "never" or (when == "changes" and not changed and not choice.escalated_from):
            return None
        if choice.escalated_from:
            return (f"[tier auto] {choice.escalated_from} could not run this cell "
                    f"({choice.reason}): running it again in {choice.tier}")
        return f"[tier auto] {choice.tier}: {choice.reason}"


def reads_to_send(code: str, namespace: dict[str, Any], hidden: set[str],
                  moved: dict[str, Any], tier: str) -> tuple[str, ...]:
    """The names ``code`` reads that the cell's tier should get: those the kernel has, of a type
    that moves (plain values, numpy, pandas), and those a tier other than ``tier`` sent last."""
    read, _ = cell_look.names(code)
    out = []
    for name in sorted(read):
        held = moved.get(name)
        if held is not None and "native" not in held.tiers:
            if tier not in held.tiers:
                out.append(name)  # it lives in another tier: fetched from there, sent here
            continue
        if name in hidden or name not in namespace or name.startswith("_"):
            continue
        value = namespace[name]
        module = type(value).__module__ or ""
        if isinstance(value, _MOVABLE) or module.startswith(("numpy", "pandas")):
            out.append(name)
    return tuple(out)


def assigned(code: str) -> frozenset[str]:
    """The names ``code`` assigns at its top level."""
    return cell_look.names(code)[1]
