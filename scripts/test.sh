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

# db() is tested against a real PostgreSQL server that the tests start (initdb + pg_ctl in a
# temp dir); those tests fail rather than skip when it is missing.
export TIERKERNEL_REQUIRE_POSTGRES=1
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing postgresql (apt) for the db() tests"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "PostgreSQL is missing: install it (apt-get install postgresql) for the db() tests" >&2
    fi
fi
# The sandbox tier's tests need a Docker engine and the sandbox image: get both (quiet and quick
# when they are there), and make those tests fail rather than skip if they still are not.
# A failure here is not fatal: the other tests still run, and the sandbox ones fail saying why.
bash scripts/engine.sh || echo "==> no Docker engine: the sandbox tests will fail" >&2
echo "==> sandbox image"
tierkernel image build || echo "==> no sandbox image: the sandbox tests will fail" >&2
export TIERKERNEL_REQUIRE_SANDBOX=1

echo "==> ruff"
ruff check tierkernel tests benchmarks conftest.py
echo "==> mypy (strict on tierkernel/)"
mypy
echo "==> wasm runtime (compiled once per machine into its cache; later runs reuse it)"
tierkernel warm
echo "==> pytest"
exec python -m pytest tests notebooks --nbval-lax --nbval-kernel-name tierkernel "$@"
