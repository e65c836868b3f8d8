"""Run a bundle config end to end with ``python -m monai.bundle run``, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"


def run_bundle(name: str, configs: list[str], overrides: dict | None = None, cwd: Path | None = None, timeout: int = 900):
    """``python -m monai.bundle run --config_file [configs...] --bundle_root bundles/<name> --k v ...``.

    ``overrides`` values are passed as JSON (MONAI parses them with ``ast.literal_eval``-like rules for
    lists and numbers; strings are passed as they are). Returns the completed process; raises with the
    captured output on a non-zero exit.
    """
    bundle = BUNDLES / name
    files = [str(bundle / "configs" / c) for c in configs]
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", json.dumps(files),
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--logging_file", str(bundle / "configs" / "logging.conf"),
        "--bundle_root", str(bundle),
    ]
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=cwd or bundle, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc
