"""Repository-wide pytest set-up: the kernelspec under test, before any plugin looks for it.

The kernelspec is installed into a temporary prefix that is put first on JUPYTER_PATH, so the
tests (and nbval, and the kernels they start) always run this checkout's code, whatever else is
installed on the machine.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

# Executed copies of the demo notebooks are outputs, not notebooks to validate.
# tests/notebooks/ holds notebooks that tests run themselves, tier by tier.
collect_ignore_glob = ["notebooks/*.executed.ipynb", ".venv/*", "tests/notebooks/*"]

_SPEC_PREFIX = Path(tempfile.mkdtemp(prefix="tierkernel-test-spec-"))


def pytest_configure(config: object) -> None:
    from tierkernel.kernel.kernelspec import install

    install(prefix=str(_SPEC_PREFIX), python=sys.executable)
    install(prefix=str(_SPEC_PREFIX), python=sys.executable, name="tierkernel-process",
            display_name="Python (tierkernel, process tier)", default_tier="process")
    install(prefix=str(_SPEC_PREFIX), python=sys.executable, name="tierkernel-wasm",
            display_name="Python (tierkernel, wasm tier)", default_tier="wasm")
    path = str(_SPEC_PREFIX / "share" / "jupyter")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (path, os.environ.get("JUPYTER_PATH", "")) if p)
    # Keep kernels' runtime files and IPython's profile out of the user's home directory.
    os.environ.setdefault("JUPYTER_RUNTIME_DIR", str(_SPEC_PREFIX / "runtime"))
    os.environ.setdefault("IPYTHONDIR", str(_SPEC_PREFIX / "ipython"))
    # Test kernels get a scratch fsx workspace, not the user's persistent default one.
    os.environ.setdefault("TIERKERNEL_FSX_URL", "memory://")
    # Likewise the audit log and db()'s SQLite file (tests that look at them set their own).
    os.environ.setdefault("TIERKERNEL_AUDIT_LOG", str(_SPEC_PREFIX / "executions.sqlite3"))
    os.environ.setdefault("TIERKERNEL_DB_PATH", str(_SPEC_PREFIX / "db.sqlite3"))
    # Test kernels warm their tiers as configured whatever earlier kernels of the run used
    # (tier_use.py); tests of that memory turn it back on with --Backend.warm_start_unused.
    config = _SPEC_PREFIX / "config"
    config.mkdir(exist_ok=True)
    (config / "tierkernel_config.py").write_text("c.Backend.warm_start_unused = 0\n")
    os.environ["JUPYTER_CONFIG_PATH"] = os.pathsep.join(
        p for p in (str(config), os.environ.get("JUPYTER_CONFIG_PATH", "")) if p)


def pytest_unconfigure(config: object) -> None:
    shutil.rmtree(_SPEC_PREFIX, ignore_errors=True)
