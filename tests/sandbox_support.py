"""Shared by the sandbox tests: is an engine here, which runtimes, and the containers of a kernel.

Tests that need the engine fail (not skip) when it is missing in CI (``CI`` set) or when
``TIERKERNEL_REQUIRE_SANDBOX=1`` (scripts/test.sh exports it): CI has the engine, so a missing
one there is a failure. Elsewhere they skip with the reason.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import pytest

from tierkernel.backends.sandbox.labels import LABEL_KERNEL


def required() -> bool:
    """Whether a missing sandbox is a failure here (CI) rather than a reason to skip."""
    return bool(os.environ.get("CI")) or os.environ.get("TIERKERNEL_REQUIRE_SANDBOX") == "1"


@functools.cache
def status() -> tuple[bool, str]:
    """Whether the sandbox tier can run here (engine reachable, image built), and why not."""
    from tierkernel.backends.sandbox.backend import SandboxBackend

    backend = SandboxBackend()
    try:
        available = backend.availability()
    finally:
        backend.shutdown()
    return available.available, available.reason


def need_sandbox() -> None:
    """Fail (CI) or skip (elsewhere) the calling test when the sandbox tier cannot run."""
    ok, reason = status()
    if ok:
        return
    message = f"the sandbox tier is not available: {reason}"
    if required():
        pytest.fail(message + " (CI / TIERKERNEL_REQUIRE_SANDBOX=1: the engine must be there; "
                    "scripts/test.sh runs scripts/engine.sh and `tierkernel image build`)")
    pytest.skip(message)


@functools.cache
def client() -> Any:
    """A Docker SDK client for the tests' own checks."""
    import docker

    return docker.DockerClient(base_url=os.environ.get("DOCKER_HOST")
                               or "unix:///var/run/docker.sock", version="auto", timeout=60)


@functools.cache
def runtimes() -> list[str]:
    """The runtimes the engine has registered (``runc``, maybe ``runsc``)."""
    return sorted(client().info().get("Runtimes", {}))


def containers_of(kernel_pid: int) -> list[str]:
    """Ids of the sandbox containers owned by the kernel process ``kernel_pid`` (the one it
    created or the spare it claimed; not the spares it made for later kernels)."""
    from tierkernel.backends.sandbox.reaper import kernel_containers

    return kernel_containers(client(), kernel_pid)


def all_sandbox_containers() -> list[str]:
    """Ids of every tierkernel sandbox container on the engine."""
    return sorted(c.id for c in client().containers.list(
        all=True, ignore_removed=True, filters={"label": LABEL_KERNEL}))


def wait_for(predicate: Any, within: float, step: float = 0.2) -> bool:
    """Poll ``predicate`` until it is true or ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())
