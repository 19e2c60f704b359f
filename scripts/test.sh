#!/usr/bin/env bash
# The whole test suite: set up what the tests need, then lint (ruff), type-check (mypy strict
# on the package) and run pytest: unit, protocol conformance, per-tier, nbclient, and nbval
# over every notebook in notebooks/. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export PATH="$PWD/.venv/bin:$PATH"

echo "==> ruff"
ruff check tierkernel tests benchmarks conftest.py
echo "==> mypy (strict on tierkernel/)"
mypy
echo "==> wasm runtime (compiled once per machine into its cache; later runs reuse it)"
tierkernel warm
echo "==> pytest"
exec python -m pytest tests notebooks --nbval-lax --nbval-kernel-name tierkernel "$@"
