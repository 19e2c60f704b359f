"""The public API for writing a tier: ``tierkernel.backends`` exports the contract."""

from __future__ import annotations

import importlib
import subprocess
import sys

import tierkernel.backends


def test_the_package_exports_the_contract_of_base():
    assert {"Backend", "CellRequest", "ExecResult", "ExecError", "OutputSink", "Availability",
            "Completion", "Inspection"} <= set(tierkernel.backends.__all__)
    for name in tierkernel.backends.__all__:
        home = importlib.import_module(tierkernel.backends._HOMES[name])
        assert getattr(tierkernel.backends, name) is getattr(home, name), name
    assert set(tierkernel.backends.__all__) <= set(dir(tierkernel.backends))


def test_importing_the_package_loads_none_of_it():
    # Every backend module imports the package first, the sandbox head start included, which
    # runs a few milliseconds into the kernel process.
    probe = ("import sys, tierkernel.backends\n"
             "print('traitlets' in sys.modules, 'tierkernel.backends.base' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stdout + done.stderr
