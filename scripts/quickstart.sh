#!/usr/bin/env bash
# Set up, then train a tiny student on the embedded synthetic data, export ONNX, classify a sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/quickstart.py "$@"
