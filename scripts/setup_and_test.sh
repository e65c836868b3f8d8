#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them (CI runs exactly this: .ci/run).
#  - Debian's Chromium, for the robustness card's headless-browser check (needs root or sudo);
#  - .venv with the project and its test, deploy (MONAI Deploy SDK) and tracking (mlflow) extras;
#  - the MONAI Label test builds its own environment (.venv-label) the first time it runs.
# Extra arguments go to pytest, e.g. `bash scripts/setup_and_test.sh -k card`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test,deploy,tracking]'
# two workers, one test file each (module fixtures are built once): the bundle runs are single-threaded
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
