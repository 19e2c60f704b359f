"""Where ``api()`` may connect: the address rules, and an HTTP transport that keeps to them.

A host name is only a name: ``--domains '*'`` (or ``*.example.org``, or a name an attacker
controls) can resolve to the host's loopback, to the cloud metadata service at
169.254.169.254, or to a private network behind the host. So the address is checked too, on
the host, and the connection goes to the very address that was checked: the check happens
inside the transport's ``connect_tcp``, which resolves the name once, refuses every address
outside the public internet (unless a configured network allows it) and connects to an allowed
address of that same answer. A resolver that answers one address to a check and another to the
connection (DNS rebinding) therefore has nothing to exploit: there is no second lookup. TLS
still verifies the certificate against the name, and the ``Host`` header still names it.
Redirects make new connections through the same transport, so every hop is checked.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpcore
import httpx

from tierkernel.errors import AddressRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Addresses that run the cloud providers' instance metadata services.
_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"),
                       ipaddress.ip_address("fd00:ec2::254"),
                       ipaddress.ip_address("100.100.100.200")})
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, when it is one of the forms that reach an
    IPv4 host: IPv4-mapped (``::ffff:127.0.0.1``), IPv4-compatible (``::127.0.0.1``), 6to4
    (``2002::/16``), Teredo (``2001::/32``) or NAT64 (``64:ff9b::/96``)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    packed = address.packed
    if any(address in net for net in _NAT64) or (packed[:12] == bytes(12) and
                                                   int(address) > 0xFFFF):
        return ipaddress.IPv4Address(packed[12:])
    return None


def refusal(address: IPAddress) -> str | None:
    """Why ``api()`` does not connect to ``address`` by default (``'loopback'``, ...); None for
    an address of the public internet."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            why = refusal(inner)
            if why is not None:
                return f"{why}: {inner} written as IPv6"
            if address.ipv4_mapped is not None:  # a socket to it reaches that IPv4 host
                return None
    if address in _METADATA:
        return "the cloud metadata service"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "shared (carrier-grade NAT)"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "not a public internet address"
    return None


def is_allowed(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    """Whether ``api()`` may connect to ``address``: a public one, or one in ``networks``.

    An IPv6 form of an IPv4 address is allowed when either form is in ``networks``.
    """
    forms: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            forms.append(inner)
    if any(form in net for form in forms for net in networks if form.version == net.version):
        return True
    return refusal(address) is None


_deadlines = threading.local()


@contextlib.contextmanager
def deadline(when: float) -> Iterator[None]:
    """Within this block, every read, write and TLS handshake of an api() connection made by
    this thread ends by ``when`` (a ``time.monotonic()`` value).

    httpcore gives each socket operation the whole timeout afresh, so a server that sends its
    response a byte at a time, each byte in time, would hold the call for as long as it liked.
    The deadline is the thread's, not the connection's, because a connection kept alive serves
    later calls with deadlines of their own.
    """
    previous = getattr(_deadlines, "when", None)
    _deadlines.when = when
    try:
        yield
    finally:
        _deadlines.when = previous


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` shortened to what is left of this thread's deadline; ``error`` past it."""
    when: float | None = getattr(_deadlines, "when", None)
    if when is None:
        return timeout
    left = when - time.monotonic()
    if left <= 0:
        raise error("the api() call's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection's stream whose every operation keeps to the calling thread's deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(
            ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class CheckingBackend(httpcore.NetworkBackend):
    """httpcore's synchronous network backend, connecting only to addresses it checked.

    ``setting`` names the configuration that allows more networks, for the refusal message.
    """

    def __init__(self, networks: Sequence[IPNetwork], setting: str) -> None:
        self.networks = tuple(networks)
        self.setting = setting
        self._inner = httpcore.SyncBackend()

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address ``host`` has for a TCP connection, in the resolver's order."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from None
        found: list[IPAddress] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            # A scoped IPv6 address (fe80::1%eth0) keeps its zone apart.
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if address not in found:
                found.append(address)
        return found

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        """Resolve ``host`` once; connect to the first allowed address that answers.

        ``timeout`` bounds the whole attempt, every address together: a name with many
        addresses that never answer costs the call's deadline once, not once per address.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        addresses = self.resolve(host, port)
        allowed = [a for a in addresses if is_allowed(a, self.networks)]
        if not allowed:
            refused = ", ".join(f"{a} ({refusal(a)})" for a in addresses)
            # Just the refused address: its family's full prefix (an IPv4-mapped IPv6
            # address can be written with dots, and a /32 of IPv6 would hold ::1).
            example = (f"{addresses[0]}/{addresses[0].max_prefixlen}" if addresses
                       else "ADDRESS/32")
            raise AddressRefused(
                f"{host!r} resolves to {refused}: api() connects only to public internet "
                f"addresses unless a network is allowed explicitly, e.g. "
                f"c.Runtime.{self.setting} = ['{example}'] in a jupyter config file")
        last: Exception | None = None
        for address in allowed:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                return _DeadlineStream(self._inner.connect_tcp(
                    str(address), port, left, local_address, socket_options))
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        if last is None:  # the deadline passed before any address was tried
            raise httpcore.ConnectTimeout(f"connecting to {host!r} timed out")
        raise last

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None
                            ) -> httpcore.NetworkStream:
        """Never: api() reaches hosts by address only."""
        raise AddressRefused("api() does not connect to Unix sockets")

    def sleep(self, seconds: float) -> None:
        """As httpcore's own backend (used between connection retries)."""
        self._inner.sleep(seconds)


class _NoCookies(DefaultCookiePolicy):
    """A cookie policy that keeps no cookie: a client's own jar stays empty."""

    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False

    def return_ok(self, cookie: Any, request: Any) -> bool:
        return False


def checked_client(networks: Sequence[IPNetwork], setting: str,
                   verify: ssl.SSLContext) -> httpx.Client:
    """An HTTP client for ``api()`` that connects only to allowed addresses (see the module
    docstring) and keeps no cookies of its own (each cell has a jar; see ``api.request``).

    It ignores ``$HTTP_PROXY`` and the like (``trust_env=False``): a proxy resolves names
    itself, past the address check. ``verify`` is the TLS context, made once per kernel.
    """
    transport = httpx.HTTPTransport(verify=verify, trust_env=False)
    # httpx builds its httpcore pool with no way to pass a network backend; the same pool,
    # with the checking backend, replaces it. tests/test_runtime_network.py fails if a new
    # httpx stops sending connections through it.
    limits = httpx.Limits()
    transport._pool = httpcore.ConnectionPool(
        ssl_context=verify,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=CheckingBackend(networks, setting),
    )
    return httpx.Client(transport=transport, follow_redirects=False, trust_env=False,
                        cookies=CookieJar(policy=_NoCookies()))


def tls_context() -> ssl.SSLContext:
    """The TLS context of the api() clients: httpx's defaults, honouring $SSL_CERT_FILE and
    $SSL_CERT_DIR (the clients themselves ignore the environment, see :func:`checked_client`)."""
    return httpx.create_ssl_context(trust_env=True)
