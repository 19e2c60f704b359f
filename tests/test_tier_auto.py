"""%tier auto in a real kernel: each cell in the fastest tier at or above the floor that can run
it, with the reason in the reply's metadata and %executions; one run again one tier up after a
capability failure; variables follow the cells."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kernel_session import KernelSession, Outcome
from tests.tier_support import need_tier


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelSession]:
    need_tier("wasm")
    need_tier("sandbox")
    session = KernelSession()
    yield session
    session.close()


def auto(outcome: Outcome) -> dict:
    return outcome.metadata["tierkernel"]["auto"]


SELECTION = [
    ("pure Python", "squares = [i * i for i in range(5)]\nprint(sum(squares))", "wasm",
     "fastest tier"),
    ("numpy and pandas", "import numpy as np, pandas as pd\nprint(pd.Series(np.ones(3)).sum())",
     "wasm", "fastest tier"),
    ("a network package", "import requests", "sandbox", "requests: no network"),
    ("a shell line", "!echo from-a-shell", "sandbox", "shell commands need a container"),
    ("a process", "import subprocess\nprint(subprocess.run(['true']).returncode)", "sandbox",
     "subprocess.run needs processes"),
    ("os.system", "import os\nos.system('true')", "sandbox", "os.system needs processes"),
    ("a package wasm lacks", "import psutil", "sandbox", "no package 'psutil'"),
]


@pytest.mark.parametrize("what, code, tier, why", SELECTION, ids=[s[0] for s in SELECTION])
def test_each_cell_runs_in_the_fastest_tier_that_can_run_it(kernel: KernelSession, what: str,
                                                            code: str, tier: str, why: str):
    out = kernel.run("%%tier auto\n" + code, timeout=120)
    assert auto(out)["tier"] == tier and why in auto(out)["reason"], auto(out)
    assert out.metadata["tierkernel"]["tier"] == tier
    record = kernel.run(f"%executions {out.reply['execution_count']}")
    shown = "".join(o.content["data"]["text/plain"] for o in record.of_type("display_data"))
    assert f"tier:            {tier}" in shown and f"%tier auto ran it in {tier}" in shown


def test_the_floor_is_respected_and_native_only_when_asked(kernel: KernelSession):
    assert auto(kernel.run("%%tier auto --floor sandbox\nx = 1"))["tier"] == "sandbox"
    assert auto(kernel.run("%%tier auto --floor process\nx = 1"))["tier"] == "process"
    native = kernel.run("%%tier auto --floor native\nprint('here')")
    assert auto(native)["tier"] == "native" and native.stdout == "here\n"
    refused = kernel.run("%%tier auto --floor cloud\nx = 1")
    assert refused.error["ename"] == "TierUsageError" and "--floor expects" in \
        refused.error["evalue"]


def test_a_capability_failure_runs_once_more_one_tier_up_with_a_note(kernel: KernelSession):
    # wasm has the ssl module's Python half but not _ssl: the import fails there, not in the
    # sandbox. Built from strings, so the static look cannot tell.
    out = kernel.run("%%tier auto\nimport importlib\n"
                     "m = importlib.import_module('ss' + 'l')\nprint(m.__name__)", timeout=120)
    assert out.status == "ok" and out.stdout == "ssl\n"
    assert auto(out) == {"tier": "sandbox", "floor": "wasm", "escalated_from": "wasm",
                         "reason": "wasm failed with ModuleNotFoundError"}
    assert "wasm could not run this cell" in out.stderr and out.of_type("error") == []
    # Once: the sandbox lacks it too, so the cell fails with the sandbox's error alone.
    out = kernel.run("%%tier auto\nimport importlib\nimportlib.import_module('no_' + 'such')")
    assert auto(out)["tier"] == "sandbox" and out.error["ename"] == "ModuleNotFoundError"
    # Output before the failure: not run again.
    out = kernel.run("%%tier auto\nprint('half')\nimport importlib\n"
                     "importlib.import_module('ss' + 'l')")
    assert auto(out)["tier"] == "wasm" and out.stdout == "half\n"
    assert out.error["ename"] == "ModuleNotFoundError"
    # A bug in the cell is not a capability: no run again.
    out = kernel.run("%%tier auto\nprint(undefined_here)")
    assert auto(out)["tier"] == "wasm" and out.error["ename"] == "NameError"


def test_variables_follow_the_cells_between_tiers(kernel: KernelSession):
    assert kernel.run("import pandas as pd\nframe = pd.DataFrame({'v': [1, 2, 3]})").status == "ok"
    assert kernel.run("%tier auto").status == "ok"
    try:
        table = kernel.run("%tier").of_type("display_data")[0].content["data"]["text/plain"]
        assert "default: auto: each cell without %%tier runs in the fastest tier" in table
        made = kernel.run("doubled = frame.v * 2\nprint(int(doubled.sum()))")
        assert auto(made)["tier"] == "wasm" and made.stdout == "12\n"
        # Read in the sandbox: fetched from wasm, where it was made, through the kernel.
        used = kernel.run("import subprocess\nprint(list(doubled))")
        assert auto(used)["tier"] == "sandbox" and used.stdout == "[2, 4, 6]\n", used.outputs
    finally:
        kernel.run("%tier native")


def test_the_note_shows_only_when_the_tier_changes(kernel: KernelSession):
    kernel.run("%%tier auto --floor sandbox\nx = 1")
    first = kernel.run("%%tier auto\nx = 1")
    again = kernel.run("%%tier auto\nx = 2")
    assert "[tier auto] wasm" in first.stderr
    assert again.stderr == ""


def test_a_cell_goes_where_its_variables_live(kernel: KernelSession):
    # A value that cannot move (a function) made in the sandbox: a later cell that reads it,
    # which wasm could run, runs in the sandbox, where it is.
    made = kernel.run("%%tier auto\nimport subprocess\nscale = lambda v: v * 3")
    assert auto(made)["tier"] == "sandbox"
    used = kernel.run("%%tier auto\nprint(scale(2))")
    assert auto(used)["tier"] == "sandbox" and auto(used)["reason"] == "scale live there"
    assert used.stdout == "6\n"


def test_a_cell_that_changed_the_workspace_is_not_run_again(kernel: KernelSession):
    wrote = kernel.run("%%tier auto --floor process\nopen('auto-wrote.txt', 'w').write('x')\n"
                       "import importlib\nimportlib.import_module('no_' + 'such')")
    assert auto(wrote)["tier"] == "process" and "escalated_from" not in auto(wrote)
    assert wrote.error["ename"] == "ModuleNotFoundError"
    clean = kernel.run("%%tier auto --floor process\nimport importlib\n"
                       "importlib.import_module('no_' + 'such')")
    assert auto(clean)["tier"] == "wasm" and auto(clean)["escalated_from"] == "process"


def test_only_names_the_cell_reads_from_the_kernel_go_with_it(kernel: KernelSession):
    assert kernel.run("token = 'kernel-secret'").status == "ok"
    out = kernel.run("%%tier auto\ndef echo(token):\n    return token\n"
                     "print(echo('x'), 'token' in globals())")
    assert auto(out)["tier"] == "wasm" and out.stdout == "x False\n", out.outputs


def test_a_kernel_value_assigned_unseen_is_not_overwritten_by_a_tier(kernel: KernelSession):
    assert auto(kernel.run("%%tier auto\nlevel = 1"))["tier"] == "wasm"
    # Assigned where no static look sees it: the kernel's object is newer than wasm's.
    assert kernel.run("globals()['level'] = 2").status == "ok"
    out = kernel.run("%%tier auto\nimport subprocess\nprint(level)")
    assert auto(out)["tier"] == "sandbox" and out.stdout == "2\n", out.outputs
    assert kernel.run("print(level)").stdout == "2\n"
