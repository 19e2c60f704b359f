#!/usr/bin/env bash
# The main job: set everything up, then run notebooks/tour.ipynb through every available tier
# with the tierkernel kernel, writing notebooks/tour.executed.ipynb and a per-cell summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
# The sandbox tier, when this machine can have it; the demo runs with whichever tiers are there.
if bash scripts/engine.sh; then
    .venv/bin/tierkernel image build || echo "==> no sandbox image; the sandbox tier stays off"
else
    echo "==> no Docker engine; the sandbox tier stays off"
fi
echo "==> preparing the wasm tier (compiles its runtime once per machine)"
.venv/bin/tierkernel warm || echo "(the wasm tier is not usable here; its cells will say why)"
echo "==> tiers on this machine"
.venv/bin/tierkernel tiers
echo "==> running notebooks/tour.ipynb"
exec .venv/bin/tierkernel run notebooks/tour.ipynb
