"""A cell that closes its stdout and stderr (the fds, or sys.stdout) leaves the next cell's
output working in every tier that runs an agent, as IPython keeps native cells' output working.

In wasm, fds 1 and 2 cannot be reopened (WASI has no dup2): there ``print`` and
``sys.stdout``/``sys.stderr`` work again, but a raw ``os.write(1, ...)`` keeps failing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import sandbox_support
from tests.kernel_session import KernelSession
from tierkernel.backends.wasm import runtime as wasm_runtime

TIERS = ["process", "wasm", "sandbox", "sandbox --runtime runsc"]


def _need(tier: str) -> None:
    if tier == "wasm" and (wasm_runtime.runtime_problem() is not None
                           or not wasm_runtime.is_compiled()):
        pytest.skip("the wasm runtime is not installed or not compiled: run 'tierkernel warm'")
    if tier.startswith("sandbox"):
        sandbox_support.need_sandbox()
        if "runsc" in tier and "runsc" not in sandbox_support.runtimes():
            pytest.skip("runsc is not registered with the engine")


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelSession]:
    session = KernelSession()
    yield session
    session.close()


@pytest.mark.parametrize("tier", TIERS)
def test_closed_fds_are_reopened_for_the_next_cell(kernel: KernelSession, tier: str) -> None:
    _need(tier)
    head = f"%%tier {tier}\n"
    kernel.run(head + "pass", timeout=120)  # started (a new runtime's notice is not the cell's)
    _settle(kernel, head, tier)
    closing = kernel.run(head + "import os, sys\nprint('before', flush=True)\n"
                                "os.close(1); os.close(2)\nprint('after close')\n"
                                "print('to stderr', file=sys.stderr)", timeout=120)
    # The closing cell itself ends normally, its prints after the close still shown.
    assert closing.status == "ok", closing.outputs
    assert closing.stdout == "before\nafter close\n", closing.outputs
    assert closing.stderr == "to stderr\n", closing.outputs
    raw = "" if tier == "wasm" else "os.write(1, b'fd ok\\n')\n"
    out = kernel.run(head + "import os, sys\nprint('out ok')\n"
                            "print('err ok', file=sys.stderr)\n" + raw +
                            "sys.stdout.flush()\n'value'", timeout=60)
    assert out.status == "ok", out.outputs
    assert "out ok" in out.stdout, out.outputs
    assert tier == "wasm" or "fd ok" in out.stdout, out.outputs
    assert "err ok" in out.stderr, out.outputs
    assert out.result["text/plain"] == "'value'"
    again = kernel.run(head + "x = 1\nprint('state kept', x)")
    assert again.stdout == "state kept 1\n", again.outputs


@pytest.mark.parametrize("tier", TIERS)
def test_a_replaced_or_closed_sys_stdout_is_restored(kernel: KernelSession, tier: str) -> None:
    _need(tier)
    head = f"%%tier {tier}\n"
    closing = kernel.run(head + "import io, sys\nsys.stdout = io.StringIO()\n"
                                "sys.stderr.close()", timeout=120)
    assert closing.status == "ok", closing.outputs
    out = kernel.run(head + "import sys\nprint('visible')\nprint('err', file=sys.stderr)")
    assert out.status == "ok", out.outputs
    assert out.stdout == "visible\n" and out.stderr == "err\n", out.outputs


def _settle(kernel: KernelSession, head: str, tier: str) -> None:
    """Wait for the agent's background import of IPython to end. A cell that closes fd 1 or
    2 frees their numbers, and a thread opening files meanwhile (the import reads .pyc
    files) may take one and later close it, after the agent put its pipe there: a race of
    the cell's own making that these tests are not about."""
    if tier != "wasm":
        assert kernel.run(head + "get_ipython() is not None").result["text/plain"] == "True"


#: Finds the agent's own descriptors of the fd 1 and fd 2 capture pipes (their read ends and
#: the saved write ends): every other descriptor of the same pipes.
_CAPTURE_FDS = (
    "import os, stat\n"
    "pipes = {os.fstat(1).st_ino, os.fstat(2).st_ino}\n"
    "capture = []\n"
    "for n in range(3, 1024):\n"
    "    try:\n        st = os.fstat(n)\n    except OSError:\n        continue\n"
    "    if stat.S_ISFIFO(st.st_mode) and st.st_ino in pipes:\n        capture.append(n)\n")


@pytest.mark.parametrize("how", ["close", "replace"])
@pytest.mark.parametrize("tier", [t for t in TIERS if t != "wasm"])
def test_a_cell_that_breaks_the_agent_s_capture_fds_does_not_break_later_cells(
        kernel: KernelSession, tier: str, how: str) -> None:
    """The agent's saved copies of the capture pipes are plain descriptors a cell can close
    (``os.closerange``) or overwrite (``dup2``); the next cell's fd-level output (a
    subprocess, ``os.write(1, ...)``) still reaches the notebook, not a file or nowhere."""
    _need(tier)
    head = f"%%tier {tier}\n"
    kernel.run(head + "pass", timeout=120)
    _settle(kernel, head, tier)
    breaking = (
        "for n in capture:\n    os.close(n)\n" if how == "close" else
        "target = os.open('/tmp/stolen-output', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\n"
        "for n in capture:\n    os.dup2(target, n)\n")
    out = kernel.run(head + _CAPTURE_FDS + "assert capture, 'no capture pipes found'\n"
                     + breaking + "os.close(1); os.close(2)", timeout=60)
    assert out.status == "ok", out.outputs
    for attempt in ("first", "second"):
        out = kernel.run(head + "import os, subprocess\n"
                         f"os.write(1, b'fd {attempt}\\n')\n"
                         f"subprocess.run(['echo', 'child {attempt}'])\n"
                         f"os.write(2, b'err {attempt}\\n')\n", timeout=60)
        assert out.status == "ok", out.outputs
        assert f"fd {attempt}\n" in out.stdout and f"child {attempt}\n" in out.stdout, \
            out.outputs
        assert f"err {attempt}\n" in out.stderr, out.outputs
