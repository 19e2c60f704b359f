"""The ``remote`` tier: ``%%tier remote [--to NAME] [--on TIER]`` runs the cell on a
configured ``tierkernel serve`` (its HTTP execution API), streaming the output back into the
notebook as the local tiers do.

Each server gets one remote session, made at the first cell sent there and ended with the
kernel, so variables persist from cell to cell as in any tier. The stop button interrupts
the remote execution; a cell's ``--timeout`` is the server's to enforce, and the kernel stops
waiting 30 s past it. How far the cell is trusted is the server's tier (``--on``, default
``c.RemoteBackend.tier``) under the server's token ceiling.

httpx is imported where a cell or the stop button first needs it, not with this module: every
kernel imports the tier classes as it starts, and most never run a remote cell.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from traitlets import Dict, Float, Unicode, validate

from tierkernel.backends.base import (
    Availability,
    Backend,
    CellRequest,
    ExecError,
    ExecResult,
    OutputSink,
)
from tierkernel.backends.options import TIMEOUT, OptionSpec
from tierkernel.backends.remote.stream import events
from tierkernel.errors import (
    RemoteSessionGone,
    RemoteStreamError,
    TierUnavailableError,
    TierUsageError,
)
from tierkernel.sizes import ByteSize


def _name(text: str) -> str:
    word = text.strip()
    if not word:
        raise TierUsageError("--to needs the name of a server from c.RemoteBackend.servers")
    return word


TO = OptionSpec("to", "NAME", "the server to run on (a name from c.RemoteBackend.servers)",
                _name)
ON = OptionSpec("on", "TIER", "the server's tier to run in (e.g. wasm, sandbox)", _name)
#: Seconds the kernel waits past a cell's timeout for the server to end it.
GRACE = 30.0


class RemoteBackend(Backend):
    """Runs cells on a ``tierkernel serve`` elsewhere, through its HTTP API."""

    isolation: ClassVar[str] = ("another machine: the server's tier (--on) under its token's "
                                "ceiling")
    magic_options: ClassVar[Sequence[OptionSpec]] = (TIMEOUT, TO, ON)

    servers = Dict(
        help="The servers cells may run on: {'NAME': {'url': 'http://host:8765', 'token': "
        "'SECRET'}}; a token may instead come from an environment variable named by "
        "'token_env'. The first is the default (--to NAME picks another).",
    ).tag(config=True)
    tier = Unicode("sandbox", help="The server's tier cells run in unless --on says.").tag(
        config=True)
    connect_timeout = Float(10.0, min=0.1, help="Seconds to reach a server.").tag(config=True)
    max_response_bytes = ByteSize(
        64 * 1024 * 1024, minimum=1024,
        help="Most bytes a server may send for one cell (its output and result); past it the "
        "cell ends with an error and the kernel keeps nothing more.").tag(config=True)

    @validate("servers")
    def _check_servers(self, proposal: Any) -> dict[str, Any]:
        value = dict(proposal["value"])
        for name, spec in value.items():
            if not isinstance(spec, dict) or not str(spec.get("url", "")).startswith(
                    ("http://", "https://")):
                raise ValueError(f"c.RemoteBackend.servers[{name!r}] needs a 'url' "
                                 "(http://host:port or https://...) and a 'token'")
        return value

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: The remote session id, by server name.
        self._sessions: dict[str, str] = {}
        #: The running cell's (server name, session id), for the stop button.
        self._running: tuple[str, str] | None = None
        self._lock = threading.Lock()

    # -- the contract ---------------------------------------------------------------------
    def availability(self) -> Availability:
        """Available when a server is configured (it is reached at the first cell)."""
        if not self.servers:
            return Availability.no(
                "no server configured: set c.RemoteBackend.servers = {'NAME': {'url': "
                "'http://host:8765', 'token': '...'}} (a `tierkernel serve` there)")
        return Availability.yes(", ".join(f"{name}: {spec['url']}"
                                          for name, spec in self.servers.items()))

    def defaults(self) -> dict[str, Any]:
        """Timeout, server and remote tier, as configured."""
        return {"timeout": self.timeout, "to": next(iter(self.servers), None), "on": self.tier}

    async def execute(self, request: CellRequest, sink: OutputSink) -> ExecResult:
        """Run the cell in the server's session for this kernel, streaming its output."""
        started = time.perf_counter()
        name = str(request.options.get("to") or next(iter(self.servers), ""))
        try:
            spec = self._server(name)
            result = await self._run(name, spec, request, sink, started)
        except (TierUsageError, TierUnavailableError, RemoteStreamError) as exc:
            return self._fail(sink, started, type(exc).__name__, str(exc))
        return result

    def interrupt(self) -> None:
        """Ask the server to interrupt the running cell (in a thread: never blocks)."""
        running = self._running
        if running is None:
            return
        name, session = running
        spec = self.servers.get(name, {})

        def send() -> None:
            import httpx

            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{spec['url'].rstrip('/')}/sessions/{session}/interrupt",
                           headers=self._headers(spec), timeout=self.connect_timeout)

        threading.Thread(target=send, daemon=True, name="remote-interrupt").start()

    def shutdown(self) -> None:
        """End this kernel's remote sessions (best effort: a server that cannot be reached
        ends them itself once they are idle)."""
        with self._lock:
            sessions, self._sessions = self._sessions, {}
        if not sessions:
            return
        import httpx

        for name, session in sessions.items():
            spec = self.servers.get(name)
            if spec is None:
                continue
            with contextlib.suppress(httpx.HTTPError):
                httpx.delete(f"{spec['url'].rstrip('/')}/sessions/{session}",
                             headers=self._headers(spec), timeout=5.0)

    # -- helpers --------------------------------------------------------------------------
    def _server(self, name: str) -> dict[str, Any]:
        spec = self.servers.get(name)
        if spec is None:
            raise TierUsageError(f"no remote server {name!r}; configured: "
                                 f"{', '.join(self.servers) or 'none'} (c.RemoteBackend.servers)")
        return dict(spec)

    def _headers(self, spec: dict[str, Any]) -> dict[str, str]:
        token = str(spec.get("token") or os.environ.get(str(spec.get("token_env") or ""), ""))
        return {"Authorization": f"Bearer {token}"}

    async def _run(self, name: str, spec: dict[str, Any], request: CellRequest,
                   sink: OutputSink, started: float) -> ExecResult:
        import httpx

        base = spec["url"].rstrip("/")
        timeout = request.options.get("timeout")
        tier = str(request.options.get("on") or self.tier)
        body: dict[str, Any] = {"code": request.body, "tier": tier}
        if timeout:
            body["config"] = {"timeout": float(timeout)}
        limits = httpx.Timeout(connect=self.connect_timeout, read=(
            float(timeout) + GRACE if timeout else None), write=30.0, pool=30.0)
        async with httpx.AsyncClient(headers=self._headers(spec), timeout=limits) as client:
            for attempt in range(2):
                session = await self._session(client, name, base, tier)
                body["session"] = session
                self._running = (name, session)
                try:
                    outcome = await self._stream(client, base, body, sink, started)
                except RemoteSessionGone:
                    with self._lock:
                        self._sessions.pop(name, None)
                    if attempt == 0:
                        sink.stream("stderr", f"tierkernel: the remote session on {name!r} "
                                    "had ended (idle too long, or the server restarted); a "
                                    "new one started, without its variables.\n")
                        continue
                    raise TierUnavailableError(f"the server {name!r} ended the session "
                                               "again") from None
                except httpx.TimeoutException:
                    self.interrupt()
                    return self._fail(sink, started, "TimeoutError",
                                      f"the server {name!r} did not end the cell within its "
                                      f"{timeout} s timeout and {GRACE:g} s more")
                except httpx.HTTPError as exc:
                    raise TierUnavailableError(
                        f"cannot reach the server {name!r} at {base}: {exc or type(exc)}; is "
                        "`tierkernel serve` running there?") from None
                finally:
                    self._running = None
                return outcome
        raise AssertionError("unreachable")

    async def _session(self, client: Any, name: str, base: str, tier: str) -> str:
        """This kernel's session on server ``name``, made if it has none."""
        session = self._sessions.get(name)
        if session is not None:
            return session
        import httpx

        try:
            answer = await client.post(f"{base}/sessions", json={"tier": tier})
        except httpx.HTTPError as exc:
            raise TierUnavailableError(
                f"cannot reach the server {name!r} at {base}: {exc or type(exc)}; is "
                "`tierkernel serve` running there?") from None
        if answer.status_code != 201:
            raise _refusal(name, answer)
        session = str(answer.json()["id"])
        with self._lock:
            self._sessions[name] = session
        return session

    async def _stream(self, client: Any, base: str, body: dict[str, Any], sink: OutputSink,
                      started: float) -> ExecResult:
        async with client.stream("POST", f"{base}/execute/stream", json=body) as answer:
            if answer.status_code == 404:
                raise RemoteSessionGone
            if answer.status_code != 200:
                await answer.aread()
                raise _refusal(str(body.get("session")), answer)
            async for kind, data in events(answer.aiter_bytes(), self.max_response_bytes):
                if kind == "stream" and data.get("name") in ("stdout", "stderr"):
                    sink.stream(str(data["name"]), str(data.get("text", "")))
                elif kind == "display":
                    sink.display(dict(data.get("data") or {}), dict(data.get("metadata") or {}))
                elif kind == "result":
                    sink.result(dict(data.get("data") or {}), dict(data.get("metadata") or {}))
                elif kind == "error":
                    sink.error(str(data.get("ename", "")), str(data.get("evalue", "")),
                               [str(line) for line in data.get("traceback") or []])
                elif kind == "clear":
                    sink.clear_output(bool(data.get("wait")))
                elif kind == "done":
                    return _result(data, self.name, time.perf_counter() - started)
                elif kind == "failed":
                    return self._fail(sink, started, "TierError",
                                      f"the server could not run the cell: "
                                      f"{data.get('message', data)}")
        raise RemoteStreamError("the server ended the stream before the cell's result")

    def _fail(self, sink: OutputSink, started: float, ename: str, evalue: str) -> ExecResult:
        sink.error(ename, evalue, [f"{ename}: {evalue}"])
        return ExecResult(False, self.name, time.perf_counter() - started,
                          error=ExecError(ename, evalue, [f"{ename}: {evalue}"]))


def _refusal(name: str, answer: Any) -> Exception:
    """The server's 4xx/5xx answer as the error a user reads."""
    try:
        message = str(answer.json().get("message") or answer.text)
    except ValueError:
        message = answer.text[:500]
    if answer.status_code == 401:
        return TierUnavailableError(f"the server refused the token ({message}); check "
                                    "c.RemoteBackend.servers")
    if answer.status_code in (400, 403, 409, 413, 422, 429):
        return TierUsageError(f"the server said: {message}")
    return TierUnavailableError(f"the server answered {answer.status_code}: {message}")


def _result(data: dict[str, Any], tier: str, took: float) -> ExecResult:
    """The server's ExecResult as this kernel's."""
    error = data.get("error")
    last = next((o for o in reversed(data.get("output") or [])
                 if o.get("output_type") == "execute_result"), None)
    return ExecResult(
        bool(data.get("success")), tier, took,
        output=dict(last.get("data") or {}) if last else None,
        error=ExecError(str(error.get("ename", "")), str(error.get("evalue", "")),
                        [str(t) for t in error.get("traceback") or []]) if error else None)

