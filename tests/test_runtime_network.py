"""api()'s network rules, through the broker as any guest sees them: the address a name resolves
to is checked on the host, the connection goes to that address (no second lookup for a
rebinding resolver to answer differently), redirects are checked hop by hop, a cell cannot set
its own Host header, and native and isolated cells share no client or cookie."""

from __future__ import annotations

import ipaddress
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import HITS, https_server
from tests.test_runtime_broker import Guest
from tierkernel.runtime.broker import CallContext
from tierkernel.runtime.network import is_allowed, refusal

API_ANYWHERE = {"allow": frozenset({"api"}), "domains": ("*",)}


@pytest.fixture()
def make(tmp_path: Any) -> Iterator[Any]:
    made: list[Guest] = []

    def factory(**kwargs: Any) -> Guest:
        guest = Guest(tmp_path, **kwargs)
        made.append(guest)
        return guest

    yield factory
    for guest in made:
        guest.close()


@pytest.mark.parametrize("address, why", [
    ("169.254.169.254", "the cloud metadata service"),
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("fd12::1", "private"), ("100.64.0.1", "shared (carrier-grade NAT)"),
    ("224.0.0.251", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "reserved"),
    ("::ffff:127.0.0.1", "loopback: 127.0.0.1 written as IPv6"),
    ("::ffff:169.254.169.254", "the cloud metadata service: 169.254.169.254 written as IPv6"),
    ("2002:a00:1::", "private: 10.0.0.1 written as IPv6"),  # 6to4
    ("64:ff9b::a9fe:a9fe", "the cloud metadata service: 169.254.169.254 written as IPv6"),
])
def test_addresses_outside_the_public_internet_are_refused(address, why):
    ip = ipaddress.ip_address(address)
    assert refusal(ip) == why
    assert not is_allowed(ip, [])


def test_public_addresses_and_allowed_networks_pass():
    for address in ("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
                    "::ffff:93.184.215.14"):
        assert refusal(ipaddress.ip_address(address)) is None
    loop = [ipaddress.ip_network("127.0.0.1/32")]
    assert is_allowed(ipaddress.ip_address("127.0.0.1"), loop)
    assert is_allowed(ipaddress.ip_address("::ffff:127.0.0.1"), loop)  # the same host
    assert not is_allowed(ipaddress.ip_address("127.0.0.2"), loop)


def test_the_metadata_address_is_refused_even_with_any_domain(make):
    g = make(options=API_ANYWHERE)
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[::ffff:a9fe:a9fe]/",
                "http://0xa9fea9fe/"):
        with pytest.raises(PermissionError) as refused:
            g.api(url, timeout=2)
        assert "169.254.169.254" in str(refused.value)
        assert "c.Runtime.api_allowed_networks" in str(refused.value)
    assert g.calls()[-1][3] == 0  # audited as refused by the policy


def test_loopback_needs_the_setting_in_each_trust_level(make, port):
    url = f"http://127.0.0.1:{port}/json"
    isolated = make(options=API_ANYWHERE, api_allowed_networks=[])
    with pytest.raises(PermissionError, match=r"127\.0\.0\.1 \(loopback\).*api_allowed_net"):
        isolated.api(url)
    native = make(tier="native", trusted=True, native_api_allowed_networks=[],
                  api_allowed_networks=["127.0.0.0/8"])
    with pytest.raises(PermissionError, match=r"c\.Runtime\.native_api_allowed_networks"):
        native.api(url)
    # Allowed explicitly (as every other test of api() here does): reached.
    assert make(options=API_ANYWHERE).api(url).body["name"] == "tierkernel"
    # "localhost" may also resolve to ::1, which is not allowed: 127.0.0.1 is used.
    assert make(options=API_ANYWHERE).api(f"http://localhost:{port}/json").ok


def test_every_redirect_hop_is_checked(make, port):
    g = make(options=API_ANYWHERE)
    with pytest.raises(PermissionError) as refused:
        g.api(f"http://127.0.0.1:{port}/redirect-to?u=http://169.254.169.254/x", timeout=2)
    assert "redirected to http://169.254.169.254/x" in str(refused.value)
    assert "the cloud metadata service" in str(refused.value)


def test_dns_rebinding_cannot_reach_a_refused_address(make, port, monkeypatch):
    """A resolver that answers a public address first and 127.0.0.1 afterwards: the first
    call connects to the public address it checked (and fails: nothing there), never to the
    loopback answer; the next call sees loopback and is refused."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.create_connection
    lookups: list[str] = []
    connects: list[tuple[Any, ...]] = []

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.test":
            lookups.append(host)
            host = "93.184.215.14" if len(lookups) == 1 else "127.0.0.1"
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(address: Any, *args: Any, **kwargs: Any) -> Any:
        connects.append(address)
        if address[0] == "93.184.215.14":  # no network in the tests: as a refused connect
            raise ConnectionRefusedError(111, "Connection refused")
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(socket, "create_connection", connect)
    g = make(options=API_ANYWHERE, api_allowed_networks=[])
    before = len(HITS)
    with pytest.raises(ConnectionError):
        g.api(f"http://rebind.test:{port}/json")
    assert connects == [("93.184.215.14", port)]
    with pytest.raises(PermissionError, match=r"'rebind\.test' resolves to 127\.0\.0\.1"):
        g.api(f"http://rebind.test:{port}/json")
    assert len(HITS) == before  # the server on 127.0.0.1 was never reached
    assert connects == [("93.184.215.14", port)]


@pytest.mark.parametrize("name", ["Host", "host", "Transfer-Encoding", "Content-Length",
                                  "Connection", "Upgrade", "Proxy-Authorization"])
def test_a_cell_may_not_set_framing_or_routing_headers(make, port, name):
    g = make(options=API_ANYWHERE)
    with pytest.raises(PermissionError, match=f"may not set the {name} header"):
        g.api(f"http://127.0.0.1:{port}/headers", headers={name: "internal.example"})
    with pytest.raises(ValueError, match="not a valid header"):
        g.api(f"http://127.0.0.1:{port}/headers", headers={"X-A": "1\r\nHost: evil"})
    sent = g.api(f"http://127.0.0.1:{port}/headers", headers={"X-Fine": "yes"}).body
    assert sent["x-fine"] == "yes" and sent["host"] == f"127.0.0.1:{port}"


def test_cookies_stay_with_the_cell_that_got_them(make, port):
    native = make(tier="native", trusted=True)
    native.api(f"http://127.0.0.1:{port}/set-cookie?v=native-secret")
    assert native.api(f"http://127.0.0.1:{port}/headers").body["cookie"] == "tk=native-secret"
    wasm = make(options=API_ANYWHERE)
    assert "cookie" not in wasm.api(f"http://127.0.0.1:{port}/headers").body
    # The same broker, the next cell of the same tier: a jar of its own.
    native.context = CallContext("exec-2", native.context.policy)
    assert "cookie" not in native.api(f"http://127.0.0.1:{port}/headers").body
    # Native and isolated cells never share a client (so no connection or jar either).
    assert native.broker.api_client(True) is not native.broker.api_client(False)


def test_https_is_verified_against_the_name_while_connecting_to_the_checked_address(
        make, tmp_path, monkeypatch):
    with https_server(tmp_path) as (port, ca):
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the clients' TLS context honours it
        g = make(options=API_ANYWHERE)
        assert g.api(f"https://localhost:{port}/json").body["name"] == "tierkernel"
        # The certificate names localhost only: reached by address, verification fails.
        with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            g.api(f"https://127.0.0.1:{port}/json")


def test_one_deadline_covers_every_address_of_a_name(make, monkeypatch):
    """A name that resolves to many allowed addresses none of which answers (an attacker's DNS
    can list dozens): the connect attempts share the call's deadline instead of each getting
    all of it, so the call ends when its timeout says."""
    real_getaddrinfo = socket.getaddrinfo
    given: list[float] = []

    def many(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "blackhole.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"10.9.9.{i}", port))
                    for i in range(1, 6)]
        return real_getaddrinfo(host, port, *args, **kwargs)

    def unanswered(address: Any, timeout: float | None = None, *args: Any, **kw: Any) -> Any:
        assert timeout is not None
        given.append(timeout)
        time.sleep(min(timeout, 0.4))  # as a SYN nobody answers, until its timeout
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "getaddrinfo", many)
    monkeypatch.setattr(socket, "create_connection", unanswered)
    g = make(options=API_ANYWHERE, api_allowed_networks=["10.9.9.0/24"])
    with pytest.raises(TimeoutError, match="took longer than 1 s"):
        g.api("http://blackhole.test/", timeout=1)
    assert given and given[0] <= 1
    # Each attempt is given only what is left of the one deadline.
    assert all(later < earlier for earlier, later in itertools.pairwise(given))
    assert sum(min(t, 0.4) for t in given) <= 1.2


@pytest.mark.parametrize("url, message", [
    # punycode of code points IDNA refuses
    ("http://xn--ocalhost-ie3c/", "does not have a valid host name"),
    ("http://xn--a/", "does not have a valid host name"),
])
def test_a_host_name_that_is_not_valid_idna_is_a_clear_value_error(make, url, message):
    g = make(options=API_ANYWHERE)
    with pytest.raises(ValueError, match=message):
        g.api(url, timeout=2)


def test_a_header_value_that_is_not_ascii_is_a_clear_value_error(make, port):
    g = make(options=API_ANYWHERE)
    with pytest.raises(ValueError, match=r"X-Name.*ASCII"):
        g.api(f"http://127.0.0.1:{port}/headers", headers={"X-Name": "café"})


def test_json_nested_too_deep_to_decode_comes_back_as_text(make, port):
    """Valid JSON nested deeper than Python decodes: shown as text (as mislabelled JSON is),
    not a RuntimeError that blames api()."""
    g = make(options=API_ANYWHERE)
    r = g.api(f"http://127.0.0.1:{port}/deep-json")
    assert r.status == 200 and r.body == "[" * 100_000 + "]" * 100_000


def test_a_server_trickling_its_headers_is_cut_off_at_the_deadline(make):
    """Each read of the response waited up to the whole timeout, and a server that sends one
    header line at a time, each within it, held the call (and a host thread) as long as it
    liked: 100 lines at 0.2 s made api(timeout=1) last 20 s. The deadline now bounds every
    read and write of the call."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    sent: list[int] = []

    def trickle() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                for i in range(100):
                    conn.sendall(b"X-Slow: yes\r\n")
                    sent.append(i)
                    time.sleep(0.2)
            except OSError:
                pass  # the client gave up, as it should

    worker = threading.Thread(target=trickle, daemon=True)
    worker.start()
    g = make(options=API_ANYWHERE)
    with pytest.raises(TimeoutError, match="took longer than 1 s"):
        g.api(f"http://127.0.0.1:{server.getsockname()[1]}/", timeout=1)
    worker.join(30)
    server.close()
    assert len(sent) < 50, f"the server sent {len(sent)} header lines before the client left"


def test_the_suggested_setting_names_just_the_refused_address(make):
    """The refusal suggests an allowed_networks entry: for an IPv4-mapped IPv6 address it said
    '::ffff:127.0.0.1/32' (the written form has dots), a /32 of IPv6, which holds ::1 and
    every IPv4-mapped address: copying it would have allowed loopback and the metadata
    service."""
    g = make(options=API_ANYWHERE, api_allowed_networks=[])
    with pytest.raises(PermissionError) as refused:
        g.api("http://[::ffff:127.0.0.1]:9/", timeout=2)
    # Python 3.13 writes this address '::ffff:127.0.0.1' (dotted): where the /32 came from.
    assert f"['{ipaddress.ip_address('::ffff:127.0.0.1')}/128']" in str(refused.value)
    with pytest.raises(PermissionError) as refused:
        g.api("http://127.0.0.1:9/", timeout=2)
    assert "['127.0.0.1/32']" in str(refused.value)
