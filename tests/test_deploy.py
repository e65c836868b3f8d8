"""MONAI Deploy runs in its own venv; the main venv stays free of it.

``.venv-deploy`` (``scripts/deploy_env.py``, from the pinned ``requirements-deploy.txt``) is built on first
use — the SDK's wheels unpacked over the main venv's packages — and reused while its stamp matches. The
Deploy test cases (``tests/deploy_sdk_cases.py``: export, segmentation against ``monai.bundle run``,
refused checkpoints and inputs) run there in one pytest process. In the main venv ``import monai`` must
not load the SDK (Holoscan, CuPy) nor print anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bundle_run import REPO
from scripts.deploy_env import DEFAULT_REQUIREMENTS, base_site_packages, ensure_deploy_env
from scripts.monai_label_env import STAMP_NAME, is_current, stamp_value

BUILD_TIMEOUT = 1800  # s; the build took 14-29 s here (wheels on local disk), about 0.45 GB
pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT + 1200)]
SDK_CASES = 12  # tests in tests/deploy_sdk_cases.py (parametrized cases counted)


@pytest.fixture(scope="module")
def deploy_python() -> Path:
    return ensure_deploy_env(timeout=BUILD_TIMEOUT)


def test_sdk_cases_pass_in_the_deploy_env(deploy_python):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [str(deploy_python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(REPO / "tests" / "deploy_sdk_cases.py")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert f"{SDK_CASES} passed" in summary and "skipped" not in summary, summary


def test_deploy_env_is_a_layer_with_its_own_sdk(deploy_python):
    """The SDK, and the ``monai`` it extends, come from the Deploy venv; torch from the main venv."""
    probe = "import monai, monai.deploy, torch; print(monai.__file__); print(monai.deploy.__file__); print(torch.__file__)"
    proc = subprocess.run([str(deploy_python), "-c", probe], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    monai_file, deploy_file, torch_file = proc.stdout.split()
    venv = deploy_python.parent.parent.resolve()
    assert Path(monai_file).resolve().is_relative_to(venv) and Path(deploy_file).resolve().is_relative_to(venv)
    assert Path(torch_file).resolve().is_relative_to(base_site_packages())
    assert is_current(venv, DEFAULT_REQUIREMENTS, base_site_packages())
    assert (venv / STAMP_NAME).read_text().strip() == stamp_value(DEFAULT_REQUIREMENTS, base_site_packages())
    assert not is_current(venv, DEFAULT_REQUIREMENTS, None)  # another base (none) makes it stale
    start = time.perf_counter()
    assert ensure_deploy_env() == deploy_python
    assert time.perf_counter() - start < 5.0  # reuse installs nothing


def test_main_env_import_monai_is_quiet_and_without_the_sdk():
    """Holoscan prints a stack-size warning and costs ~1.3 s on every ``import monai`` where the SDK is
    installed; the main venv must not have it."""
    probe = ("import importlib.util, sys, monai; "
             "assert importlib.util.find_spec('monai.deploy') is None, 'monai.deploy is installed'; "
             "assert 'holoscan' not in sys.modules and 'cupy' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "" and proc.stderr == "", (proc.stdout + proc.stderr)[-2000:]


def test_requirements_are_exact_pins_and_the_main_install_has_no_deploy():
    lines = [ln.strip() for ln in DEFAULT_REQUIREMENTS.read_text().splitlines()]
    pins = [ln for ln in lines if ln and not ln.startswith("#")]
    assert pins and all(ln.count("==") == 1 and not any(c in ln for c in "<>~;@ ") for ln in pins)
    names = {ln.split("==")[0].lower() for ln in pins}
    assert {"monai-deploy-app-sdk", "holoscan-cu13", "pydicom", "highdicom", "monai"} <= names
    assert "torch" not in names  # torch comes from the main venv (the layer), not a second copy
    setup = (REPO / "scripts" / "setup_test_env.sh").read_text()
    install = [ln for ln in setup.splitlines() if "pip install" in ln and "-e" in ln]
    assert install and all("deploy" not in ln for ln in install), install
