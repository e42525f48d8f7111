#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian/Ubuntu machine: Chromium for the browser tests
# (Debian's package; Playwright drives /usr/bin/chromium) and the Python packages. CPU-only torch here.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
python3 -m pip install -q torch==2.13.0 -r requirements.txt -r requirements-dev.txt
