#!/usr/bin/env bash
# Set up (venv + Debian chromium for the browser test), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f tests/demo/install_browser.sh ]; then bash tests/demo/install_browser.sh; fi
.venv/bin/python -m pytest "$@"
