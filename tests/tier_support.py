"""Shared by the tests that run a cell in each tier: skip (or fail, for the sandbox in CI) a
test whose tier cannot run here."""

from __future__ import annotations

import pytest

from tests import sandbox_support
from tierkernel.backends.wasm import runtime as wasm_runtime


def need_tier(tier: str) -> None:
    """Skip the calling test when ``tier`` cannot run here: ``wasm`` without its compiled
    runtime (``tierkernel warm``), ``sandbox`` as :func:`sandbox_support.need_sandbox` says
    (a failure in CI), and a sandbox under ``runsc`` (``"sandbox --runtime runsc"``) when the
    engine has no gVisor runtime. ``process`` always runs."""
    if tier.startswith("sandbox"):
        sandbox_support.need_sandbox()
        if "runsc" in tier and "runsc" not in sandbox_support.runtimes():
            pytest.skip("the engine has no runsc (gVisor) runtime: scripts/engine.sh registers "
                        f"it (it has {sandbox_support.runtimes()})")
    elif tier == "wasm" and (wasm_runtime.runtime_problem() is not None
                             or not wasm_runtime.is_compiled()):
        pytest.skip("the wasm runtime is not installed or not compiled: run 'tierkernel warm'")
