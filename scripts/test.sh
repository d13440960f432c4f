#!/usr/bin/env bash
# Set up .venv, install Debian's chromium for the demo's browser test, then run the whole test suite
# and list the slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f tests/demo/install_browser.sh ]; then
  echo "installing Debian's chromium (apt-get) for the demo's browser test; without it that test is skipped"
  bash tests/demo/install_browser.sh || echo "chromium could not be installed: the browser test will be skipped"
fi
.venv/bin/python -m pytest --durations=15 "$@"
