#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine (the README's test command runs this, then pytest):
#  - Debian's Chromium, for the robustness card's headless-browser check (needs root or sudo);
#  - .venv with the project and its test and tracking (mlflow) extras;
#  - .venv-deploy, the MONAI Deploy SDK's own venv (a layer over .venv, requirements-deploy.txt; seconds);
#  - the MONAI Label test builds its own environment (.venv-label) the first time it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test,tracking]'
# a .venv made when the SDK was an extra of it: remove the SDK, or every `import monai` loads Holoscan
.venv/bin/pip uninstall -y -q monai-deploy-app-sdk holoscan-cu13 holoscan-cli cupy-cuda13x 2>/dev/null || true
.venv/bin/python -m scripts.deploy_env >/dev/null
