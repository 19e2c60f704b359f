"""Talking to the Docker Engine: connecting, and turning its errors into advice.

A user never sees a raw Docker traceback (DESIGN.md, convention 4): every engine call of the
sandbox tier and of ``tierkernel image build`` goes through :func:`connect` and
:func:`explain`, which say what went wrong and what to do.
"""

from __future__ import annotations

import os
from typing import Any

from tierkernel.errors import EngineError

IMAGE_REPO = "tierkernel-sandbox"
#: The label every tierkernel container carries; its value is the kernel's id.
LABEL_KERNEL = "org.tierkernel.kernel"
#: The pid of the kernel process that owns a container (for orphan reaping).
LABEL_OWNER_PID = "org.tierkernel.owner-pid"
#: The host that owner pid belongs to (pids mean nothing on another host).
LABEL_OWNER_HOST = "org.tierkernel.owner-host"


def engine_url() -> str:
    """Where the engine is expected: ``$DOCKER_HOST`` or the default local socket."""
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def connect(timeout: float = 60.0) -> Any:
    """A ``docker.DockerClient`` for :func:`engine_url`, or :class:`EngineError` saying why not.

    The client negotiates the API version with the engine, so an old engine (Debian's 20.10)
    and a new SDK work together.
    """
    import docker
    import docker.errors

    try:
        client = docker.DockerClient(base_url=engine_url(), timeout=int(timeout), version="auto")
    except docker.errors.DockerException as exc:
        raise EngineError(unreachable_message(exc)) from exc
    return client


def unreachable_message(exc: BaseException) -> str:
    """The advice given when the engine does not answer."""
    detail = _short(exc)
    return (
        f"docker engine not reachable at {engine_url()}: {detail}. Start it (as root on Debian: "
        "scripts/engine.sh installs docker.io and runsc and starts dockerd), or point "
        "DOCKER_HOST at a running engine"
    )


def explain(exc: BaseException, doing: str) -> EngineError:
    """Map an exception from the Docker SDK to an :class:`EngineError` a user can act on.

    ``doing`` says what the tier was doing (``"creating the sandbox container"``).
    """
    import docker.errors
    import requests.exceptions

    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, requests.exceptions.ConnectionError | ConnectionError | FileNotFoundError):
        return EngineError(unreachable_message(exc))
    if isinstance(exc, requests.exceptions.ReadTimeout | TimeoutError):
        return EngineError(
            f"the docker engine at {engine_url()} did not answer in time while {doing}; it may "
            "be overloaded or stuck (check `docker ps` and the dockerd log)"
        )
    if isinstance(exc, docker.errors.ImageNotFound):
        return EngineError(f"{doing}: the sandbox image is missing; run `tierkernel image build`")
    if isinstance(exc, docker.errors.APIError):
        text = _short(exc)
        if "unknown or invalid runtime" in text or "unknown runtime" in text:
            return EngineError(
                f"{doing}: the engine has no such runtime ({text}). runsc (gVisor) must be "
                "registered in /etc/docker/daemon.json; scripts/engine.sh does that"
            )
        if "Minimum memory limit" in text or "memory limit" in text.lower():
            return EngineError(f"{doing}: the engine refused the memory limit ({text})")
        return EngineError(f"{doing}: the docker engine refused: {text}")
    if isinstance(exc, docker.errors.DockerException):
        return EngineError(f"{doing}: {_short(exc)}")
    return EngineError(f"{doing}: {type(exc).__name__}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    """One line of an exception's text: Docker's messages embed whole HTTP responses."""
    explanation = getattr(exc, "explanation", None)
    text = str(explanation or exc).strip().replace("\n", " ")
    return text[:300] + ("..." if len(text) > 300 else "")
