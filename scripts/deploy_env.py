"""Create (or reuse) the MONAI Deploy virtualenv from the pinned ``requirements-deploy.txt``.

    python -m scripts.deploy_env                      # -> <repo>/.venv-deploy/bin/python

The MONAI Deploy App SDK installs into the ``monai`` namespace, so wherever it is installed every
``import monai`` imports Holoscan and CuPy and prints Holoscan's stack-size warning. It therefore lives in
its own venv, used by ``tests/test_deploy.py`` and by ``scripts/deploy_app.py`` (run it with
``.venv-deploy/bin/python -m scripts.deploy_app``, the repository on ``PYTHONPATH``).

The venv is a *layer* over the interpreter that builds it (the main ``.venv``): a ``.pth`` file puts that
interpreter's site-packages after the venv's own, so torch, ignite, nibabel, pytest ... come from the main
venv and only the SDK, its requirements and ``monai`` itself (the SDK's ``monai/deploy`` must sit in the
``monai`` directory that is found first) are installed here, with ``pip install --no-deps`` from exact pins.
Reuse, staleness (stamp = hash of the requirements and the base path) and locking are those of
:func:`scripts.monai_label_env.ensure_env`.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from scripts.monai_label_env import REPO, ensure_env

__all__ = ["DEFAULT_VENV", "DEFAULT_REQUIREMENTS", "base_site_packages", "ensure_deploy_env", "main"]

DEFAULT_VENV = REPO / ".venv-deploy"
DEFAULT_REQUIREMENTS = REPO / "requirements-deploy.txt"


def base_site_packages() -> Path:
    """The running interpreter's site-packages (purelib): the layer the Deploy venv sits on."""
    return Path(sysconfig.get_paths()["purelib"]).resolve()


def ensure_deploy_env(
    venv_dir: str | os.PathLike = DEFAULT_VENV,
    requirements: str | os.PathLike = DEFAULT_REQUIREMENTS,
    timeout: float = 1800.0,
    verbose: bool = False,
) -> Path:
    """Interpreter of an up-to-date Deploy venv at ``venv_dir`` over :func:`base_site_packages`, built
    first when missing or stale (the SDK's wheels unpacked: about 0.5 GB)."""
    return ensure_env(venv_dir, requirements, timeout=timeout, verbose=verbose, layer_over=base_site_packages())


def main(venv_dir: str = str(DEFAULT_VENV), requirements: str = str(DEFAULT_REQUIREMENTS)) -> str:
    """Command line: build or reuse the venv and print its interpreter."""
    return str(ensure_deploy_env(venv_dir, requirements, verbose=True))


if __name__ == "__main__":
    from scripts.cli import run

    run(main)
