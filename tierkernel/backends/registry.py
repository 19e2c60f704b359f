"""Finding tiers: the entry-point group ``tierkernel.backends``.

Built-in tiers are registered through the same group as third-party ones (see pyproject.toml),
so adding a tier never means touching the kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import entry_points

from tierkernel.backends.base import Backend
from tierkernel.errors import TierUnavailableError as TierUnavailableError

GROUP = "tierkernel.backends"


@dataclass(frozen=True)
class BrokenTier:
    """A registered tier whose class could not be loaded; shown in ``%tier`` with the reason."""

    name: str
    reason: str


def discover() -> tuple[dict[str, type[Backend]], list[BrokenTier]]:
    """Load every registered tier class, keyed by tier name (new containers each call).

    An entry point that fails to import, or does not name a :class:`Backend` subclass, is
    reported as a :class:`BrokenTier` instead of breaking the kernel. The entry points are
    read once per process (the kernel's application, its router and the ``tierkernel``
    command all ask); each caller gets containers of its own.
    """
    found, broken = _discover()
    return dict(found), list(broken)


@functools.cache
def _discover() -> tuple[dict[str, type[Backend]], list[BrokenTier]]:
    found: dict[str, type[Backend]] = {}
    broken: list[BrokenTier] = []
    for ep in entry_points(group=GROUP):
        if ep.name in found:
            continue  # first registration wins: the same distribution seen twice on sys.path
        try:
            cls = ep.load()
        except Exception as exc:
            broken.append(BrokenTier(ep.name, f"cannot load {ep.value}: {exc}"))
            continue
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            broken.append(BrokenTier(ep.name, f"{ep.value} is not a tierkernel Backend"))
            continue
        found[ep.name] = cls
    return found, broken
