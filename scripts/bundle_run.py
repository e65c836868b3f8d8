"""Run a bundle's configs as a user would: ``python -m monai.bundle run`` in a subprocess, or
``monai.bundle.run`` in this process. The one helper that scripts (demo, studies) and tests use.

    from scripts.bundle_run import run_bundle
    run_bundle("nlcen_lung", ["train.json", "demo.json"], {"max_epochs": 1})
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"

__all__ = ["REPO", "BUNDLES", "BundleRunError", "bundle_root", "bundle_command", "run_bundle"]


class BundleRunError(AssertionError):
    """A bundle run exited non-zero; the message holds the command and the end of its output. (An
    ``AssertionError`` so that pytest shows the message as a test failure.)"""


def bundle_root(bundle: str | os.PathLike) -> Path:
    """A bundle's folder: a name under ``bundles/`` or a path."""
    root = BUNDLES / bundle if isinstance(bundle, str) and os.sep not in bundle else Path(bundle)
    if not (root / "configs").is_dir():
        raise FileNotFoundError(f"bundle: no configs/ folder in {root}")
    return root


def bundle_command(bundle: str | os.PathLike, configs: Sequence[str], overrides: Mapping[str, Any] | None = None
                   ) -> list[str]:
    """The arguments after ``python``: ``-m monai.bundle run --config_file [...] --meta_file ...
    --logging_file ... --bundle_root ... --key value``; values other than strings are passed as JSON."""
    root = bundle_root(bundle)
    cmd = ["-m", "monai.bundle", "run", "--config_file", json.dumps([str(root / "configs" / c) for c in configs]),
           "--meta_file", str(root / "configs" / "metadata.json"),
           "--logging_file", str(root / "configs" / "logging.conf"), "--bundle_root", str(root)]
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return cmd


def run_bundle(
    bundle: str | os.PathLike,
    configs: Sequence[str],
    overrides: Mapping[str, Any] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float | None = 900,
    capture: bool = True,
    in_process: bool = False,
) -> subprocess.CompletedProcess | None:
    """Run ``configs`` (file names in the bundle's ``configs/``) with ``overrides``.

    Subprocess (default): ``python -m monai.bundle run`` with the repository on ``PYTHONPATH``, in ``cwd``
    (default the bundle's folder); returns the completed process (output captured unless ``capture`` is
    False) and raises :class:`BundleRunError` on a non-zero exit. ``in_process``: ``monai.bundle.run`` in
    this process (shares its threads and imports; returns None).
    """
    root = bundle_root(bundle)
    if in_process:
        from monai.bundle import run

        run(run_id="run", config_file=[str(root / "configs" / c) for c in configs],
            meta_file=str(root / "configs" / "metadata.json"), logging_file=str(root / "configs" / "logging.conf"),
            bundle_root=str(root), **dict(overrides or {}))
        return None
    cmd = [sys.executable, *bundle_command(root, configs, overrides)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=cwd or root, env=env, capture_output=capture, text=True, timeout=timeout)
    if proc.returncode != 0:
        out = f"\n{(proc.stdout or '')[-4000:]}\n{(proc.stderr or '')[-8000:]}" if capture else ""
        raise BundleRunError(f"bundle run failed ({proc.returncode}): {' '.join(cmd)}{out}")
    return proc
