"""Fixtures for the end-to-end tests: the browser they need, and what must happen without it.

Every test under tests/e2e/ is marked ``e2e``. Tests that drive Chromium ask for the
``chromium`` fixture: when Debian's /usr/bin/chromium or the Python playwright package is
missing they FAIL under CI (``CI`` set) or when ``TIERKERNEL_REQUIRE_BROWSER=1`` (what
scripts/test.sh exports), and are skipped with the reason only on a developer's machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("TIERKERNEL_CHROMIUM", "/usr/bin/chromium"))

#: Chromium flags measured on these machines (shared/notes/browser-e2e.md): without the
#: background-networking ones Chromium keeps dialling out and the closed network refuses it.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: Screenshots and logs of e2e runs (gitignored), at the top of the checkout.
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test in this folder ``e2e`` so ``-m 'not e2e'`` leaves them out."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def browser_required() -> bool:
    """True when a missing browser is a failure (CI, or scripts/test.sh), not a skip."""
    return bool(os.environ.get("CI")) or os.environ.get("TIERKERNEL_REQUIRE_BROWSER") == "1"


def _browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return (f"Chromium is not installed at {CHROMIUM} (Debian: apt-get install chromium; "
                "scripts/test.sh does it as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python playwright package is missing (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="session")
def chromium() -> Path:
    """The Chromium executable; fails (CI) or skips (elsewhere) when it is missing."""
    reason = _browser_missing()
    if reason is not None:
        if browser_required():
            pytest.fail(f"browser tests are required here (CI or TIERKERNEL_REQUIRE_BROWSER=1) "
                        f"but cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """The folder for screenshots, created on first use."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture()
def e2e_env(tmp_path: Path) -> dict[str, str]:
    """An environment for a client process whose Jupyter/IPython state stays in tmp_path.

    JUPYTER_PATH is inherited from the root conftest, so the kernelspec is this checkout's.
    """
    env = dict(os.environ)
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR"):
        folder = tmp_path / name.lower()
        folder.mkdir()
        env[name] = str(folder)
    return env


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the test item, so fixtures can tell that a test failed
    (and leave a screenshot of the page behind)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)
