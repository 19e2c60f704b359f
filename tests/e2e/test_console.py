"""``jupyter console --kernel tierkernel`` driven as a terminal program, keys in, screen out.

The console runs in a pseudo-terminal (pexpect) with its full prompt_toolkit interface, as a
person at a terminal uses it; the test types cells at the prompt and reads what the terminal
shows, with colour and cursor-control sequences removed.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from tests import sandbox_support

pytestmark = pytest.mark.timeout(300)

# ANSI/VT100 control sequences (CSI ..., OSC ... BEL, single ESC x) and carriage returns.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[@-Z\\-_]|\r")

# A kernel start, a first wasm session and a cold matplotlib import on a loaded machine.
SLOW = 120


class Terminal:
    """A program in a pseudo-terminal and the text it has shown so far."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log.open("w")
        self.child = pexpect.spawn(argv[0], argv[1:], env=env, dimensions=(50, 200),
                                   encoding="utf-8", codec_errors="replace", timeout=SLOW)
        self.child.logfile_read = self.log
        self.shown = ""  # everything shown, control sequences removed
        self.mark = 0  # where the next wait_for starts looking

    def _read(self) -> None:
        try:
            chunk = self.child.read_nonblocking(65536, timeout=0.1)
        except pexpect.TIMEOUT:
            return
        self.shown += _CONTROL.sub("", chunk)

    def wait_for(self, pattern: str, timeout: float = SLOW) -> re.Match[str]:
        """Wait until the screen shows ``pattern`` (a regex) after the last match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.shown, self.mark)
            if match:
                self.mark = match.end()
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"the console did not show {pattern!r} within {timeout}s;"
                                     f" it shows:\n{self.shown[-3000:]}")
            try:
                self._read()
            except pexpect.EOF:
                raise AssertionError(f"the console exited; it showed:\n{self.shown[-3000:]}"
                                     ) from None

    def type_cell(self, *lines: str) -> None:
        """Type a cell at the prompt, line by line, as a person does.

        A cell of several lines (a ``%%tier`` cell) is complete, for IPython, once it ends
        with an empty line: Enter on the last line and on one empty line only add lines, the
        next Enter runs it.
        """
        for line in lines:
            self.child.send(line + "\r")
            time.sleep(0.3)  # the console asks the kernel whether the input is complete
        if len(lines) > 1:
            for _ in range(2):
                self.child.send("\r")
                time.sleep(0.3)

    def since_mark(self) -> str:
        """What the screen showed after the last match."""
        return self.shown[self.mark:]

    def close(self) -> None:
        """Leave the console with Ctrl-D (it shuts its kernel down), else kill it."""
        if self.child.isalive():
            self.child.sendcontrol("d")
            time.sleep(0.5)
            if self.child.isalive():
                self.child.send("y\r")  # "Do you really want to exit ([y]/n)?"
            with contextlib.suppress(pexpect.TIMEOUT, pexpect.EOF):
                self.child.expect(pexpect.EOF, timeout=60)  # the console shuts its kernel down
        self.child.close(force=True)
        self.log.close()


@pytest.fixture()
def console(e2e_env: dict[str, str], artifacts: Path) -> Iterator[Terminal]:
    """``jupyter console --kernel tierkernel`` at its first prompt."""
    env = dict(e2e_env, TERM="xterm-256color",
               # No terminal answers prompt_toolkit's cursor-position query in a pty.
               PROMPT_TOOLKIT_NO_CPR="1")
    argv = [sys.executable, "-m", "jupyter_console", "--kernel", "tierkernel",
            # Enter asks the kernel whether the cell is complete and, if no answer comes within
            # this timeout (1 s by default), runs the cell as typed so far: on a loaded machine
            # that would run '%%tier wasm' without its body.
            "--ZMQTerminalInteractiveShell.kernel_is_complete_timeout=15"]
    term = Terminal(argv, env, artifacts / "console.log")
    try:
        term.wait_for(r"tierkernel \S+: cells run in the 'native' tier")
        term.wait_for(r"In \[1\]: ")
        yield term
    finally:
        term.close()


def test_tier_cells_at_the_prompt(console: Terminal) -> None:
    """``%%tier wasm``, ``%%tier process`` and ``%%tier sandbox`` cells typed at the prompt
    run and print."""
    console.type_cell("%%tier wasm",
                      "import sys; print('wasm says', sys.platform, 6 * 7)")
    console.wait_for(r"wasm says wasi 42")
    console.wait_for(r"In \[2\]: ")

    console.type_cell("%%tier process",
                      "import os; print('process says', os.getpid() != PARENT, 6 * 7)")
    # PARENT is not defined in the process tier: the error shows and the prompt comes back.
    console.wait_for(r"NameError")
    console.wait_for(r"In \[3\]: ")

    console.type_cell("import os; PARENT = os.getpid(); print('native pid', PARENT)")
    parent = console.wait_for(r"native pid (\d+)").group(1)
    console.wait_for(r"In \[4\]: ")
    console.type_cell("%%tier process",
                      "import os; print('process pid', os.getpid())")
    child = console.wait_for(r"process pid (\d+)").group(1)
    assert child != parent, "the process tier ran in the kernel's own process"
    console.wait_for(r"In \[5\]: ")

    sandbox_support.need_sandbox()
    console.type_cell("%%tier sandbox",
                      "import os; print('sandbox uid', os.getuid(), 6 * 7)")
    console.wait_for(r"sandbox uid 65534 42")
    console.wait_for(r"In \[6\]: ")


def test_tier_table(console: Terminal) -> None:
    """``%tier`` prints the table of tiers, each available here."""
    console.type_cell("%tier")
    console.wait_for(r"In \[2\]: ")
    table = console.shown[: console.mark]
    tiers = ["native", "process", "wasm"]
    if sandbox_support.status()[0] or sandbox_support.required():
        tiers.append("sandbox")
    for tier in tiers:
        assert re.search(rf"{tier}\s.*\byes\b", table), f"%tier shows no {tier!r} row:\n{table}"
    assert re.search(r"tier\s+available\s+isolation", table), table


def test_ctrl_c_interrupts_a_running_cell(console: Terminal) -> None:
    """Ctrl-C during a running wasm cell interrupts it; the prompt comes back and works."""
    console.type_cell("%%tier wasm --timeout 600",  # only Ctrl-C can end it
                      "import time",
                      "print('looping until Ctrl-C', flush=True)",
                      "while True: time.sleep(0.05)")
    console.wait_for(r"looping until Ctrl-C")
    time.sleep(0.5)
    console.child.sendintr()
    console.wait_for(r"KeyboardInterrupt", timeout=60)
    console.wait_for(r"In \[\d+\]: ")

    console.type_cell("print('after the interrupt', 6 * 7)")
    console.wait_for(r"after the interrupt 42")
