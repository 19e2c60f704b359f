"""A ``tierkernel serve`` process for the tests, on a free loopback port, with tokens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CLI = os.path.join(os.path.dirname(sys.executable), "tierkernel")
MAIN = "main-token-0123456789abcdef"  # $TIERKERNEL_TOKEN: the default ceiling
ADMIN = "admin-token-0123456789abcdef"  # may run native and process cells
NARROW = "narrow-token-0123456789abcdef"  # wasm only, console only, api.github.com only
CONFIG = f"""
c.Serve.tokens = {{
    {ADMIN!r}: {{"name": "admin", "tiers": ["native", "process", "wasm", "sandbox"]}},
    {NARROW!r}: {{"name": "narrow", "tiers": ["wasm"], "helpers": ["console"],
                 "domains": ["api.github.com"]}},
}}
c.Serve.max_sessions = 3
c.Serve.max_code_bytes = 2000
c.Serve.max_body_bytes = 64 * 1024
c.Serve.max_output_bytes = 64 * 1024
c.SandboxBackend.spares = 0
c.WasmBackend.timeout = 45
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """A ``tierkernel serve`` process and a client for it."""

    def __init__(self, tmp: Path, extra: str = "") -> None:
        config = tmp / "config"
        config.mkdir()
        self.requests = tmp / "requests.jsonl"
        (config / "tierkernel_config.py").write_text(
            CONFIG + f"c.Serve.request_log = {str(self.requests)!r}\n" + extra)
        self.port = free_port()
        self.env = {**os.environ, "TIERKERNEL_TOKEN": MAIN, "JUPYTER_CONFIG_DIR": str(config)}
        self.log = tmp / "serve.log"
        self.proc = subprocess.Popen([CLI, "serve", "--port", str(self.port)], env=self.env,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     cwd=tmp)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def client(self, token: str | None = MAIN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(60)
