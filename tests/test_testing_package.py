"""tierkernel.testing as a third party uses it: the suites run from a test module of their own,
say clearly what is wrong with a subclass, and stay out of the kernel's imports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_pytest(folder: Path, module: str) -> subprocess.CompletedProcess:
    (folder / "test_third_party.py").write_text(textwrap.dedent(module))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(folder / "test_third_party.py")],
        capture_output=True, text=True, timeout=300, cwd=folder,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)})


def test_a_tier_missing_from_the_registry_is_named_with_the_registered_ones(tmp_path):
    done = run_pytest(tmp_path, """
        from tierkernel.testing.tier import TierContract


        class NoSuchTier(TierContract):
            tier = "nosuch"
        """)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no tier 'nosuch' in the registry" in done.stdout, done.stdout
    assert "native" in done.stdout and "Is the package that declares it installed" in done.stdout
    # The base class imported by name is not collected: only the subclass's tests ran.
    assert "TierContract::" not in done.stdout


def test_a_store_subclass_without_make_says_so(tmp_path):
    done = run_pytest(tmp_path, """
        from tierkernel.testing.fsx import FsxContract


        class TestHalfDone(FsxContract):
            backend_name = "half"
        """)
    assert done.returncode == 1
    assert "TestHalfDone must define make()" in done.stdout, done.stdout


def test_the_kernel_never_imports_the_test_suites():
    probe = ("import sys\n"
             "import tierkernel.cli, tierkernel.kernel.app, tierkernel.runner\n"
             "import tierkernel.backends.process.backend, tierkernel.backends.wasm.backend\n"
             "import tierkernel.backends.sandbox.backend\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('pytest', '_pytest', 'jupyter_kernel_test') or m.startswith('tierkernel.testing')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
