"""``api(url, ...)``: HTTP requests made by the host on a cell's behalf, under its policy.

Redirects are followed here, one hop at a time, so that every host a request reaches is checked
against the cell's allowed domains; the body is read in chunks so the size cap holds however
large the response, and one deadline covers the whole call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from tierkernel.runtime.policy import CellPolicy

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class ApiLimits:
    """The caps every api() call runs under (from ``c.Runtime``)."""

    timeout: float
    max_bytes: int
    max_redirects: int


@dataclass(frozen=True)
class ApiOutcome:
    """A finished api() call: the JSON-able value for the cell, and what the audit records."""

    value: dict[str, Any]
    target: str


def _host_of(url: httpx.URL) -> str:
    if url.scheme not in ("http", "https"):
        raise ValueError(f"api() only fetches http:// and https:// URLs, got {str(url)!r}")
    if not url.host:
        raise ValueError(f"api() needs an absolute URL with a host, got {str(url)!r}")
    return url.host


def _decode(response: httpx.Response, raw: bytes) -> Any:
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    text = raw.decode(response.encoding or "utf-8", errors="replace")
    if kind == "application/json" or kind.endswith("+json"):
        try:
            return json.loads(text)
        except ValueError:
            return text  # a server that mislabels its body: still show what came back
    return text


def _check_args(method: str, headers: Any, json_body: Any, data: Any) -> str:
    verb = str(method).upper()
    if verb not in _METHODS:
        raise ValueError(f"api() method must be one of {', '.join(sorted(_METHODS))}, "
                         f"got {method!r}")
    if headers is not None and not (
        isinstance(headers, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
    ):
        raise TypeError("api() headers must be a dict of str to str")
    if json_body is not None and data is not None:
        raise ValueError("api() takes json= or data=, not both")
    if data is not None and not isinstance(data, (str, Mapping)):
        raise TypeError("api() data must be a str (sent as is) or a dict (sent as a form)")
    return verb


def request(
    client: httpx.Client,
    policy: CellPolicy,
    limits: ApiLimits,
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    json_body: Any = None,
    data: str | Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> ApiOutcome:
    """Make one request for a cell; raise ``PermissionError`` for a host it may not reach.

    Raises ``TimeoutError`` past the deadline (the smaller of ``timeout`` and the configured
    cap), ``ValueError`` for a bad URL or a body over the size cap, ``ConnectionError`` when
    the server cannot be reached.
    """
    if not isinstance(url, str):
        raise TypeError(f"api() url must be a str, got {type(url).__name__}")
    verb = _check_args(method, headers, json_body, data)
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"api() timeout must be a positive number of seconds, got {timeout!r}")
    seconds = min(float(timeout), limits.timeout) if timeout is not None else limits.timeout
    deadline = time.monotonic() + seconds
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"api() cannot parse the URL {url!r}: {exc}") from None
    policy.check_domain(_host_of(parsed))

    content = data if isinstance(data, str) else None
    form = dict(data) if isinstance(data, Mapping) else None
    req = client.build_request(verb, parsed, headers=dict(headers or {}), json=json_body,
                               content=content, data=form)
    hops = 0
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"api() {verb} {url} took longer than {seconds:g} s")
            req.extensions["timeout"] = httpx.Timeout(left).as_dict()
            response = client.send(req, stream=True)
            try:
                next_req = response.next_request
                if next_req is not None:
                    hops += 1
                    if hops > limits.max_redirects:
                        raise ValueError(f"api() {url} redirected more than "
                                         f"{limits.max_redirects} times; giving up")
                    # Checked before following: a redirect must not lead where the cell may
                    # not go directly.
                    try:
                        policy.check_domain(_host_of(next_req.url))
                    except PermissionError as exc:
                        raise PermissionError(f"api() {url} redirected to {next_req.url}: "
                                              f"{exc}") from None
                    req = next_req
                    continue
                body = read_capped(response, limits.max_bytes, deadline, seconds, url)
            finally:
                response.close()
            final = response.url
            value = {
                "status": response.status_code,
                "headers": {k: v for k, v in response.headers.items()},
                "body": _decode(response, body),
                "ok": 200 <= response.status_code < 300,
                "url": str(final),
            }
            return ApiOutcome(value, f"{verb} {final.copy_with(query=None)}")
    except httpx.TimeoutException:
        raise TimeoutError(f"api() {verb} {url} took longer than {seconds:g} s") from None
    except httpx.TransportError as exc:
        raise ConnectionError(f"api() {verb} {url} failed: {exc or type(exc).__name__}") from None


def read_capped(response: httpx.Response, cap: int, deadline: float, seconds: float,
                 url: str) -> bytes:
    """The body of ``response``, refused past ``cap`` bytes or past ``deadline``."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise ValueError(f"api() {url} returned {int(declared)} bytes, over the {cap}-byte "
                         "limit (c.Runtime.api_max_response_bytes)")
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > cap:
            raise ValueError(f"api() {url} returned more than {cap} bytes, the limit "
                             "(c.Runtime.api_max_response_bytes)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"api() {url} took longer than {seconds:g} s")
        chunks.append(chunk)
    return b"".join(chunks)
