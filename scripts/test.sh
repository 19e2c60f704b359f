#!/usr/bin/env bash
# The whole test suite: set up what the tests need, then lint (ruff), type-check (mypy strict
# on the package) and run pytest: unit, protocol conformance, per-tier, nbclient, and nbval
# over every notebook in notebooks/. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test

# The end-to-end tests (tests/e2e/) drive JupyterLab in Debian's Chromium through the Python
# playwright package. Playwright's own browser download (`playwright install`) cannot work on
# these machines, so the system package is installed instead, when missing and when we can.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing chromium (apt)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        >/dev/null 2>&1 || echo "(apt-get could not install chromium)" >&2
fi
# This run is meant to include the browser tests: without Chromium they fail instead of skipping.
export TIERKERNEL_REQUIRE_BROWSER=1
export PATH="$PWD/.venv/bin:$PATH"

echo "==> ruff"
ruff check tierkernel tests benchmarks conftest.py
echo "==> mypy (strict on tierkernel/)"
mypy
echo "==> wasm runtime (compiled once per machine into its cache; later runs reuse it)"
tierkernel warm
echo "==> pytest"
exec python -m pytest tests notebooks --nbval-lax --nbval-kernel-name tierkernel "$@"
