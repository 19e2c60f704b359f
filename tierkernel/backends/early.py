"""Work the built-in tiers begin the moment ``python -m tierkernel`` starts, before the kernel
imports anything else: the sandbox tier forks the helper of its head start here
(``sandbox/head_start.py``), which then imports on the other core while the kernel imports
ipykernel.

The built-in tiers' work is named here rather than found through the tier registry: reading
the entry points (``importlib.metadata`` and a scan of every installed distribution, about
50 ms) would delay the very work that is begun this early to win time. A tier from another
distribution begins its early work in ``Backend.config_loaded``, which the kernel also calls
while its process has one thread.
"""

from __future__ import annotations

from typing import Any

from tierkernel.backends.sandbox import head_start


def _sandbox_tier() -> Any:
    """The sandbox tier's backend class, imported in the head start's helper only (this
    process goes on importing ipykernel meanwhile)."""
    from tierkernel.backends.sandbox.backend import SandboxBackend

    return SandboxBackend


def begin() -> None:
    """Begin each built-in tier's early work; called first thing by ``python -m tierkernel``,
    while the process has one thread. Returns at once and never raises."""
    head_start.fork_early(_sandbox_tier)
