#!/usr/bin/env bash
# Create/refresh the CPU virtual environment at .venv/ (idempotent: a no-op when up to date).
#   bash scripts/setup.sh          # runtime deps
#   bash scripts/setup.sh --dev    # + test deps
# Torch is pinned here only (the CPU set-up path); pyproject.toml declares ranges for users.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
stamp=".venv/.sra-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)${extras:+-dev}"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip show torch 2>/dev/null | grep -q '^Version: 2.14.1' \
  || .venv/bin/python -m pip install -q "${TORCH_PINS[@]}"
.venv/bin/python -m pip install -q -e ".${extras}" "${TORCH_PINS[@]}"
rm -f .venv/.sra-setup-*
touch "$stamp"
# A dev stamp also satisfies the plain set-up.
[ -n "$extras" ] && touch "${stamp%-dev}"
echo "sra: environment ready at .venv/"
