#!/usr/bin/env bash
# Shared set-up for the two README commands: a virtual environment in .venv with tierkernel
# installed (editable) and its kernelspec installed into that environment.
#   scripts/setup.sh [EXTRAS]      EXTRAS: demo (default) or test
# Works on a fresh Debian 12 machine with Python 3.11; as root it installs python3-venv if the
# interpreter cannot make virtual environments.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "tierkernel needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $("$PYTHON" --version 2>&1)"
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        rm -rf .venv
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "==> installing python3-venv (apt)"
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            "$PYTHON" -m venv .venv
        else
            echo "cannot create a virtual environment: install python3-venv (apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
fi

echo "==> installing tierkernel[$extras] into .venv"
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install --quiet --editable ".[$extras]" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import tierkernel' || { echo "tierkernel did not install" >&2; exit 1; }

echo "==> installing the tierkernel kernelspec into .venv"
.venv/bin/tierkernel install --sys-prefix
