"""``input()``/``getpass()`` in the process, wasm and sandbox tiers go through Jupyter's stdin
channel as in a native cell, and tracebacks show the user's frames only.

A real kernel and a client that allows stdin answer the kernel's ``input_request`` on the
stdin channel (``KernelSession.run(on_input=...)``), as JupyterLab does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests import sandbox_support as sb
from tests.kernel_session import KernelSession
from tierkernel.backends import wasm_runtime

TIERS = ["process", "wasm", "sandbox"]


def _need(tier: str) -> None:
    if tier == "sandbox":
        sb.need_sandbox()
    elif tier == "wasm" and (wasm_runtime.runtime_problem() is not None
                             or not wasm_runtime.is_compiled()):
        pytest.skip("the wasm runtime is not installed or not compiled: run 'tierkernel warm'")


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelSession]:
    """One kernel for every tier (sandbox cells under runc, the default runtime)."""
    session = KernelSession()
    yield session
    session.close()


@pytest.fixture(params=TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    _need(request.param)
    return str(request.param)


def cell(tier: str, code: str, options: str = "") -> str:
    return f"%%tier {tier}{options}\n{code}"


def plain(traceback: list[str]) -> str:
    """A traceback as the user reads it (IPython's colours removed)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(traceback))


# -- tracebacks show the user's frames only ---------------------------------------------------
OWN_FILES = ("agent.py", "helpers.py", "native.py", "<tierkernel", "wasm_agent", "<string>")


def frames_outside_the_cell(shown: str) -> list[str]:
    """The files of the frames a traceback shows that are not the cell's: Python's format
    (``File "name", line N``, the guests') and IPython's (``File /path:N``, native's)."""
    files = re.findall(r'File "([^"]+)", line \d+', shown)
    files += re.findall(r"File (\S+?):\d+", shown)
    return [name for name in files if not name.startswith("<cell In[")]


@pytest.mark.parametrize("where", ["native", *TIERS])
def test_a_helper_error_shows_the_users_line_and_the_error(kernel: KernelSession, where: str):
    if where != "native":
        _need(where)
    out = kernel.run(cell(where, "def fetch():\n    return api('http://example.invalid/x')\n"
                                 "fetch()"))
    assert out.status == "error"
    shown = plain(out.error["traceback"])
    assert out.error["ename"] in ("PermissionError", "ConnectionError"), shown
    assert "return api('http://example.invalid/x')" in shown
    assert "fetch()" in shown
    for own in OWN_FILES:
        assert own not in shown, shown
    assert frames_outside_the_cell(shown) == [], shown
    assert shown.rstrip().endswith(out.error["evalue"])


@pytest.mark.parametrize("where", ["native", "process", "sandbox"])
def test_a_timeout_shows_the_users_line_and_the_limit(kernel: KernelSession, where: str):
    if where != "native":
        _need(where)
    out = kernel.run(cell(where, "import time\ndef wait():\n    time.sleep(10)\nwait()",
                          " --timeout 1"))
    assert out.status == "error"
    shown = plain(out.error["traceback"])
    assert "time.sleep(10)" in shown
    assert "wait()" in shown
    for own in OWN_FILES:
        assert own not in shown, shown
    assert frames_outside_the_cell(shown) == [], shown
    assert "--timeout SECONDS" in shown.splitlines()[-1]
