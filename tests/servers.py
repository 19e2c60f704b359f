"""Real servers for the runtime-helper tests, all on 127.0.0.1: HTTP, OpenAI-compatible,
PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

HUGE_BYTES = 3 * 1024 * 1024  # over the cap the tests configure (1 MiB), under the default


class _Handler(BaseHTTPRequestHandler):
    """``/json``, ``/text``, ``/redirect-in`` (same host), ``/redirect-out`` (to ``localhost``,
    another host name for the same server), ``/slow`` (answers after 5 s), ``/huge`` and
    ``/huge-chunked`` (3 MiB, with and without Content-Length), ``/status/N``, ``/echo``."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    def _send(self, status: int, body: bytes, kind: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        path = self.path.split("?")[0]
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        HITS.append(self.path)
        if path == "/set-cookie":
            self._send(200, b'"set"', headers={"Set-Cookie": f"tk={query.get('v', 'x')}; Path=/"})
        elif path == "/headers":
            self._send(200, json.dumps({k.lower(): v for k, v in self.headers.items()}).encode())
        elif path == "/redirect-to":
            self._send(302, b"", "text/plain", {"Location": query["u"]})
        elif path == "/json":
            self._send(200, json.dumps({"name": "tierkernel", "stars": 3}).encode(),
                       headers={"X-Test": "yes"})
        elif path == "/deep-json":  # valid JSON, nested deeper than Python decodes
            self._send(200, b"[" * 100_000 + b"]" * 100_000)
        elif path == "/text":
            self._send(200, b"plain words\n", "text/plain; charset=utf-8")
        elif path == "/redirect-in":
            self._send(302, b"", "text/plain", {"Location": "/json"})
        elif path == "/redirect-out":
            self._send(302, b"", "text/plain",
                       {"Location": f"http://localhost:{port}/json"})
        elif path == "/slow":
            time.sleep(5)
            self._send(200, b'"late"')
        elif path == "/huge":
            self._send(200, b"x" * HUGE_BYTES, "text/plain")
        elif path == "/huge-chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"y" * 65536
            try:
                for _ in range(HUGE_BYTES // len(chunk)):
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading at its cap, as it should
        elif path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]), b'{"error": "as asked"}')
        else:
            self._send(404, b'{"error": "no such path"}')

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        self._send(200, json.dumps({"method": "POST", "body": body,
                                    "type": self.headers.get("Content-Type"),
                                    "auth": self.headers.get("Authorization")}).encode())


#: The paths the test HTTP servers of this process were asked for, in order.
HITS: list[str] = []


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hung up at its time or size cap (as the tests make it) is expected;
        # socketserver would print a traceback to stderr, into other tests' captured output.
        pass


@contextlib.contextmanager
def http_server() -> Iterator[int]:
    """The test HTTP server in a thread; yields its port."""
    server = _QuietServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def https_server(folder: Path) -> Iterator[tuple[int, Path]]:
    """The test HTTP server behind TLS, with a certificate for the name ``localhost`` only,
    signed by a throwaway CA made in ``folder`` with the openssl CLI; yields its port and the
    CA's certificate file."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed to make the test certificates (Debian: "
                    "apt-get install openssl)")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60,
                       cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout",
        "leaf.key", "-out", "leaf.csr")
    (folder / "san.ext").write_text("subjectAltName = DNS:localhost\n")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "leaf.pem")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "leaf.pem", folder / "leaf.key")
    server = _QuietServer(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], folder / "ca.pem"
    finally:
        server.shutdown()
        server.server_close()


# -- an OpenAI-compatible server, as its own process ------------------------------------------
OPENAI_KEY = "sk-test-0123456789-secret"

_OPENAI_SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = sys.argv[1]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != "Bearer " + KEY:
            return self.reply(401, {"error": {"message": "Incorrect API key provided: "
                                              + str(self.headers.get("Authorization"))}})
        if self.path == "/v1/chat/completions":
            last = req["messages"][-1]["content"]
            if req["model"] == "missing-model":
                return self.reply(404, {"error": {"message": "model 'missing-model' not found"}})
            text = "echo from " + req["model"] + ": " + last
            if "temperature" in req:
                text += " (t=" + str(req["temperature"]) + ")"
            return self.reply(200, {"id": "chat-1", "object": "chat.completion",
                                    "model": req["model"],
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant",
                                                             "content": text}}],
                                    "usage": {"prompt_tokens": 3, "completion_tokens": 5}})
        if self.path == "/v1/embeddings":
            texts = req["input"] if isinstance(req["input"], list) else [req["input"]]
            return self.reply(200, {"object": "list", "model": req["model"],
                                    "data": [{"index": i, "embedding": [float(len(t)), 0.5, i]}
                                             for i, t in enumerate(texts)],
                                    "usage": {"prompt_tokens": 2}})
        self.reply(404, {"error": {"message": "no route " + self.path}})

server = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(server.server_address[1], flush=True)
server.serve_forever()
'''


@contextlib.contextmanager
def openai_server() -> Iterator[str]:
    """A local OpenAI-compatible server process (chat and embeddings); yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-c", _OPENAI_SERVER, OPENAI_KEY],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.kill()
        proc.wait(10)


# -- PostgreSQL ----------------------------------------------------------------------------
PG_PASSWORD = "pg-Secr3t-pass"


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server (initdb + pg_ctl in a temp dir, a free port, password
    auth); yields its URL. Skips when PostgreSQL is not installed, unless $CI or
    $TIERKERNEL_REQUIRE_POSTGRES=1 is set: then the test fails."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        message = ("PostgreSQL server binaries (initdb, pg_ctl) not found in PATH or "
                   "/usr/lib/postgresql/*/bin; install Debian's postgresql package "
                   "(scripts/test.sh does so when run as root)")
        if os.environ.get("CI") or os.environ.get("TIERKERNEL_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="tierkernel-pg-"))
    as_user: list[str] = []
    if os.getuid() == 0:  # initdb refuses to run as root: run the server as 'postgres'
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    pwfile = root / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if as_user:
        shutil.chown(pwfile, "postgres", "postgres")

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {done.stdout}\n{done.stderr}")

    try:
        run(initdb, "-D", str(data), "-U", "tk", "--auth=scram-sha-256",
            f"--pwfile={pwfile}", "--no-sync")
        run(pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        yield f"postgresql://tk:{PG_PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
