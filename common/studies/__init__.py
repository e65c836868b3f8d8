"""Reproduction studies, one module per bundle: each trains the models its paper's experiments need on
phantoms, runs the experiments with the paper's attack and the worst-case attack, and states the paper's
findings with their evidence (``python -m scripts.reproduce BUNDLE``).

Each module has ``run(quick: bool, out_dir: Path, seed: int) -> dict`` returning ``clean_dice``,
``findings``, ``tables``, ``plots`` and ``settings``; :func:`run_study` adds timing and provenance and
writes ``results.json`` (:mod:`common.studies.report`).
"""

from __future__ import annotations

import datetime
import importlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["STUDIES", "BUNDLES_DIR", "run_study", "check_bundle"]

STUDIES = {
    "nlcen_lung": "common.studies.nlcen_lung",
    "unet3d_brats_distill": "common.studies.unet3d_brats_distill",
    "resdsn_c2f_pancreas": "common.studies.resdsn_c2f_pancreas",
    "unet_advaug": "common.studies.unet_advaug",
    "certified_seg": "common.studies.certified_seg",
}
BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"


def check_bundle(bundle: Any) -> str:
    if bundle not in STUDIES:
        raise ValueError(f"bundle: expected one of {sorted(STUDIES)}, got {bundle!r}")
    return bundle


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BUNDLES_DIR.parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_study(bundle: str, quick: bool = False, out_dir: str | Path | None = None, seed: int = 0,
              command: str | None = None) -> dict[str, Any]:
    """Run ``bundle``'s study, write ``out_dir/results.json`` (+ ``results.md``, plots); return the results."""
    from common.studies.report import write_results

    check_bundle(bundle)
    out = Path(out_dir) if out_dir is not None else Path("runs") / "reproduce" / bundle
    out.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(STUDIES[bundle])
    start, cpu_start = time.time(), time.process_time()
    results = module.run(quick=bool(quick), out_dir=out, seed=int(seed))
    results = {
        "bundle": bundle,
        "mode": "quick" if quick else "full",
        **results,
        "seconds": round(time.time() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "command": command or f"python -m scripts.reproduce {bundle}" + (" --quick" if quick else "") + (f" --seed {seed}" if seed else ""),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    value, keys = module.FLOOR
    keys = [k for k in results["clean_dice"] if keys is None or k in keys]
    results["clean_dice_floor"] = {"floor": value, "keys": keys,
                                   "met": all(results["clean_dice"][k] >= value for k in keys)}
    write_results(out, results)
    return results
