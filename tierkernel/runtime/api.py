"""``api(url, ...)``: HTTP requests made by the host on a cell's behalf, under its policy.

Redirects are followed here, one hop at a time, so that every host a request reaches is checked
against the cell's allowed domains; the client's transport checks every address it connects to
(see :mod:`~tierkernel.runtime.network`); the body is read in chunks so the size cap holds
however large the response, and one deadline covers the whole call.

The result is ``{"status": int, "headers": {lowercase name: value}, "body": the JSON value when
the response is JSON, else text, "ok": 200 <= status < 300, "url": the final URL}``. Cookies a
server sets are kept for the rest of the cell (its own jar) and never reach another cell.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from tierkernel.errors import AddressRefused
from tierkernel.runtime import network
from tierkernel.runtime.policy import CellPolicy

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

#: Request headers a cell may not set, and why. ``Host`` would let a request for an allowed
#: name reach another virtual host on the same address (the policy checks the URL's host);
#: the others frame the request on the connection or address a proxy, which api() does itself.
_FORBIDDEN_HEADERS = {
    "host": "api() sets it from the URL, so that a request reaches only the host the policy "
            "checked; put the host you want in the URL (and in --domains)",
    "content-length": "api() frames the body itself",
    "transfer-encoding": "api() frames the body itself",
    "connection": "api() manages its connections itself",
    "keep-alive": "api() manages its connections itself",
    "upgrade": "api() does not switch protocols",
    "http2-settings": "api() does not switch protocols",
    "te": "api() frames the response itself",
    "trailer": "api() frames the body itself",
    "expect": "api() sends the body at once",
}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


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
    try:
        host = url.host  # decodes IDNA ("xn--..."), which refuses some names
    except UnicodeError as exc:  # idna's errors are UnicodeErrors
        raise ValueError(f"api(): {str(url)!r} does not have a valid host name: {exc}"
                         ) from None
    if not host:
        raise ValueError(f"api() needs an absolute URL with a host, got {str(url)!r}")
    return host


#: How many times the body cap the host may spend decoding one JSON body. Decoded JSON can
#: take ~24x its text (``[{},{},...]``: a 64-byte dict per 3 bytes), so a body under the cap
#: could still cost the kernel hundreds of megabytes per call.
DECODE_FACTOR = 8
#: What decoding one ``{`` or ``[`` costs at most (an empty dict, plus its slot in a list).
_CONTAINER_COST = 80


def decoded_size(raw: bytes) -> int:
    """An upper estimate of the memory ``json.loads(raw)`` takes, from one pass over the text:
    containers dominate (numbers and strings cost a small multiple of their text)."""
    return _CONTAINER_COST * (raw.count(b"{") + raw.count(b"[")) + 4 * len(raw)


def _decode(response: httpx.Response, raw: bytes, max_bytes: int, url: str) -> Any:
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    text = raw.decode(response.encoding or "utf-8", errors="replace")
    if kind == "application/json" or kind.endswith("+json"):
        estimate = decoded_size(raw)
        if estimate > DECODE_FACTOR * max_bytes:
            raise ValueError(
                f"api() {url} returned {len(raw)} bytes of JSON that would take about "
                f"{estimate >> 20} MiB to decode on the host, over {DECODE_FACTOR}x the "
                f"{max_bytes}-byte limit (c.Runtime.api_max_response_bytes); ask the server "
                "for less (paging, fewer fields), or raise that setting")
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            # A server that mislabels its body, or JSON nested deeper than Python decodes:
            # still show what came back.
            return text
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
    for name, value in (headers or {}).items():
        if not _TOKEN.fullmatch(name) or any(c in value for c in "\r\n\0"):
            raise ValueError(f"api(): {name!r}: {value[:80]!r} is not a valid header (names are "
                             "letters, digits and -; values hold no line breaks)")
        if not value.isascii():
            raise ValueError(f"api(): the {name} header's value {value[:80]!r} is not ASCII, "
                             "which HTTP headers must be; encode it first (e.g. "
                             "urllib.parse.quote, or base64)")
        lowered = name.lower()
        why = _FORBIDDEN_HEADERS.get(lowered) or (
            "it is meant for a proxy, and api() uses none" if lowered.startswith("proxy-")
            else None)
        if why is not None:
            raise PermissionError(f"api() may not set the {name} header: {why}")
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
    cookies: httpx.Cookies | None = None,
) -> ApiOutcome:
    """Make one request for a cell; raise ``PermissionError`` for a host it may not reach
    (by name, or by the address the name resolves to) or a header it may not set.

    ``client`` is the cell's trust level's client (see :func:`network.checked_client`);
    ``cookies`` is the cell's jar: cookies the server sets go there and are sent on later
    requests of the same cell (redirects included), never to another cell. Raises
    ``TimeoutError`` past the deadline (the smaller of ``timeout`` and the configured cap),
    ``ValueError`` for a bad URL or a body over the size cap, ``ConnectionError`` when the
    server cannot be reached.
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
    jar = cookies if cookies is not None else httpx.Cookies()
    req = client.build_request(verb, parsed, headers=dict(headers or {}), json=json_body,
                               content=content, data=form, cookies=jar)
    hops = 0
    # Every read and write of the call keeps to the deadline (see network.deadline).
    with network.deadline(deadline):
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"api() {verb} {url} took longer than {seconds:g} s")
                req.extensions["timeout"] = httpx.Timeout(left).as_dict()
                try:
                    response = client.send(req, stream=True)
                except AddressRefused as exc:
                    via = "" if req.url == parsed else f" (redirected to {req.url})"
                    raise PermissionError(f"api() {url}{via}: {exc}") from None
                try:
                    jar.extract_cookies(response)
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
                        jar.set_cookie_header(next_req)
                        req = next_req
                        continue
                    body = read_capped(response, limits.max_bytes, deadline, seconds, url)
                finally:
                    response.close()
                final = response.url
                value = {
                    "status": response.status_code,
                    "headers": {k: v for k, v in response.headers.items()},
                    "body": _decode(response, body, limits.max_bytes, url),
                    "ok": 200 <= response.status_code < 300,
                    "url": str(final),
                }
                return ApiOutcome(value, f"{verb} {final.copy_with(query=None)}")
        except httpx.TimeoutException:
            raise TimeoutError(f"api() {verb} {url} took longer than {seconds:g} s") from None
        except httpx.TransportError as exc:
            raise ConnectionError(f"api() {verb} {url} failed: {exc or type(exc).__name__}"
                                  ) from None


def read_capped(response: httpx.Response, cap: int, deadline: float, seconds: float,
                 url: str, helper: str = "api", setting: str = "api_max_response_bytes"
                 ) -> bytes:
    """The body of ``response``, refused past ``cap`` bytes or past ``deadline``.

    ``helper`` and ``setting`` name the caller and the setting that raises the cap, for the
    errors.
    """
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise ValueError(f"{helper}() {url} returned {int(declared)} bytes, over the "
                         f"{cap}-byte limit (c.Runtime.{setting})")
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > cap:
            raise ValueError(f"{helper}() {url} returned more than {cap} bytes, the limit "
                             f"(c.Runtime.{setting})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{helper}() {url} took longer than {seconds:g} s")
        chunks.append(chunk)
    return b"".join(chunks)
