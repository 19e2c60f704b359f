#!/usr/bin/env bash
# The main job: set everything up, then run notebooks/tour.ipynb through every available tier
# with the tierkernel kernel, writing notebooks/tour.executed.ipynb and a per-cell summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
echo "==> tiers on this machine"
.venv/bin/tierkernel tiers
echo "==> running notebooks/tour.ipynb"
exec .venv/bin/tierkernel run notebooks/tour.ipynb
