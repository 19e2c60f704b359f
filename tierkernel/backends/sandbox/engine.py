"""Talking to the Docker Engine: connecting, and turning its errors into advice.

A user never sees a raw Docker traceback: every engine call of the sandbox tier and of
``tierkernel image build`` goes through :func:`connect` (or an :class:`EngineLink`) and
:func:`explain`, which say what went wrong and what to do.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from tierkernel.errors import EngineError

IMAGE_REPO = "tierkernel-sandbox"


def engine_url() -> str:
    """Where the engine is expected: ``$DOCKER_HOST`` or the default local socket."""
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def connect(timeout: float = 60.0) -> Any:
    """A ``docker.DockerClient`` for :func:`engine_url`, or :class:`EngineError` saying why not.

    The client negotiates the API version with the engine, so an old engine (Debian's 20.10)
    and a new SDK work together.
    """
    # The Docker SDK is imported when the engine is first needed, not with this module: it
    # takes a while to import, and a kernel that runs no sandbox cell never needs it.
    import docker
    import docker.errors

    try:
        client = docker.DockerClient(base_url=engine_url(), timeout=int(timeout), version="auto")
    except docker.errors.DockerException as exc:
        raise EngineError(unreachable_message(exc)) from exc
    return client


class EngineLink:
    """One backend's connections to the engine, each made on first use: a client for its
    work (requests wait up to ``timeout`` s), a quick one for availability probes, and the
    engine's runtimes, asked once."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._client: Any = None
        self._probe: Any = None
        self._runtimes: dict[str, Any] | None = None

    def client(self) -> Any:
        """The client for the backend's work; EngineError when the engine cannot be reached."""
        if self._client is None:
            self._client = connect(self.timeout)
        return self._client

    def probe(self) -> Any:
        """The client for quick questions (is the engine up, is the image there)."""
        if self._probe is None:
            self._probe = connect(timeout=5)
        return self._probe

    def forget_probe(self) -> None:
        """The probe failed: the next :meth:`probe` connects again."""
        self._probe = None

    def runtimes(self, client: Any = None) -> dict[str, Any]:
        """The engine's runtimes by name, each with its path and runtimeArgs, asked through
        ``client`` (the work client by default) the first time."""
        if self._runtimes is None:
            try:
                info = (client or self.client()).info()
            except Exception as exc:
                raise explain(exc, "asking the engine for its runtimes") from exc
            self._runtimes = dict(info.get("Runtimes") or {"runc": {}})
        return self._runtimes

    def require_runtime(self, runtime: str, client: Any = None) -> None:
        """EngineError, saying how to register it, unless ``runtime`` is registered."""
        runtimes = self.runtimes(client)
        if runtime not in runtimes:
            raise EngineError(no_runtime_message(runtime, runtimes))

    def warm(self) -> None:
        """Connect and learn the runtimes now, for :meth:`adopt` (a head start's helper does
        this while it waits for the kernel's configuration). An error is left for the calls
        that need the engine to report."""
        with contextlib.suppress(Exception):
            self.runtimes(self.probe())
            self.client()

    def adopt(self, warm: EngineLink) -> None:
        """Use what ``warm`` has already got: its probe and runtimes, and its client when it
        was made with this link's timeout."""
        self._probe = self._probe or warm._probe
        self._runtimes = self._runtimes or warm._runtimes
        if self._client is None and warm.timeout == self.timeout:
            self._client = warm._client

    def close(self) -> None:
        """Close both clients; never raises."""
        for client in (self._client, self._probe):
            with contextlib.suppress(Exception):
                if client is not None:
                    client.close()
        self._client = self._probe = None


def no_runtime_message(runtime: str, runtimes: dict[str, Any]) -> str:
    """The advice given when ``runtime`` is not among the engine's ``runtimes``."""
    hint = (" (install runsc and register it: scripts/engine.sh does both)"
            if runtime == "runsc" else "")
    return (f"runtime {runtime!r} is not registered with the docker engine at "
            f"{engine_url()} (it has: {', '.join(sorted(runtimes))}){hint}")


def unreachable_message(exc: BaseException) -> str:
    """The advice given when the engine does not answer (``exc`` already an EngineError: its
    message, which says it)."""
    if isinstance(exc, EngineError):
        return str(exc)
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
