#!/usr/bin/env bash
# Create .venv and install hierfg with every extra. torch is pinned to 2.13.0 (the CPU wheel this
# machine has on disk); it is installed first so nothing can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
echo "hierfg installed in $(pwd)/.venv"
