"""Phantom study of the ``resdsn_c2f_pancreas`` bundle: train coarse, fine and PGD-adversarially trained
coarse ResDSN on abdomen phantoms, then Table 6 (coarse / fine / C2F DSC and time per case) and Table 8
(clean, FGSM, I-FGSM Dice and the maximum drop for the coarse model, the C2F pipeline and the
adversarially trained coarse model), all through the bundle's configs (``python -m monai.bundle run``).

    python -m scripts.study_resdsn_c2f --out_dir runs/resdsn_study --iterations 60 --adv_iterations 15

Every setting except sizes, widths and iteration counts is the paper's (configs/train.json, attack.json,
adv_train.json). Trained models are reused on a rerun. Writes ``<out_dir>/study.md`` (both tables) and ``<out_dir>/study.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fire

from common.c2f_eval import drop_table
from common.data.synthetic import write_phantom_dataset
from common.io import atomic_write_json, atomic_write_text
from common.report import markdown_table

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "resdsn_c2f_pancreas"


def run_config(configs: list[str], overrides: dict) -> float:
    """``python -m monai.bundle run`` of the bundle's ``configs`` with ``overrides``; returns seconds."""
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", json.dumps([str(BUNDLE / "configs" / c) for c in configs]),
           "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
           "--logging_file", str(BUNDLE / "configs" / "logging.conf"), "--bundle_root", str(BUNDLE)]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(configs)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return time.perf_counter() - start


def main(
    out_dir: str = "runs/resdsn_study",
    num_cases: int = 8,
    size: tuple = (48, 48, 32),
    roi: int = 32,
    channels: tuple = (4, 8, 16, 32),
    iterations: int = 60,
    adv_iterations: int | None = 15,
    patches_per_case: int = 2,
    batch_size: int = 4,
    n_coarse: int = 1,
    n_fine: int = 3,
    margin: int = 6,
    learning_rate: float = 0.01,
    adv_learning_rate: float = 0.01,
    seed: int = 0,
) -> dict:
    out = Path(out_dir).resolve()
    datalist = out / "data" / "datalist.json"
    if not datalist.exists():
        write_phantom_dataset(
            "abdomen", out / "data", num_cases=num_cases, size=list(size), seed=seed, fractions=[0.6, 0.1, 0.3]
        )
    common = {
        "demo_dir": str(out), "image_size": list(size), "reference_size": list(size), "roi_size": [roi] * 3,
        "channels": list(channels), "n_coarse": n_coarse, "n_fine": n_fine, "fine_margin": margin,
        "seed": seed,
    }
    train = {**common, "max_iterations": iterations, "epoch_length": max(1, iterations // 2),
             "val_interval": 2,
             "batch_size": batch_size, "patches_per_case": patches_per_case, "learning_rate": learning_rate}
    adv = {**train, "max_iterations": adv_iterations or iterations, "learning_rate": adv_learning_rate,
           "epoch_length": max(1, (adv_iterations or iterations) // 2)}
    def train_once(stage: str, configs: list[str], overrides: dict) -> float:
        """Train unless ``models/<stage>/model.pt`` exists (a rerun resumes the study)."""
        if (out / "models" / stage / "model.pt").exists():
            return 0.0
        return run_config(configs, overrides)

    seconds = {
        "train_coarse": train_once("coarse", ["train.json", "train_coarse.json", "demo.json"], train),
        "train_fine": train_once("fine", ["train.json", "train_fine.json", "demo.json"], train),
        "train_adv_coarse": train_once("adv_coarse", ["train.json", "adv_train.json", "demo.json"], adv),
        "table6": run_config(["inference.json", "evaluate.json", "demo.json"], common),
        "attack": run_config(["inference.json", "attack.json", "demo.json"], common),
        "attack_adv": run_config(["inference.json", "attack.json", "demo.json"], {
            **common, "coarse_checkpoint": str(out / "models" / "adv_coarse" / "model.pt"),
            "output_dir": str(out / "eval_adv")}),
    }
    table6 = json.loads((out / "eval" / "table6" / "summary.json").read_text())
    attacks = ["FGSM", "I-FGSM"]
    rows = drop_table({
        "ResDSN Coarse": out / "eval" / "attack" / "coarse" / "summary.json",
        "ResDSN C2F": out / "eval" / "attack" / "c2f" / "summary.json",
        "Adversarially-trained ResDSN Coarse": out / "eval_adv" / "attack" / "coarse" / "summary.json",
    }, attacks, "dice_pancreas")
    t6 = [{"method": e["pipeline"], "dice": f"{e['dice_mean_mean']:.3f} ± {e['dice_mean_sd'] or 0:.3f}",
           "n": str(e["n"]), "seconds": e["seconds_mean"]} for e in table6["entries"]]
    text = (
        f"# ResDSN C2F phantom study\n\n{num_cases} abdomen phantoms of {list(size)} voxels, "
        f"{roi}^3 patches, "
        f"channels {list(channels)}, {iterations} iterations (adversarial: {adv_iterations or iterations}), "
        f"n = {n_coarse} / {n_fine}, margin {margin}; test cases: {table6['n_cases']}.\n\n## Table 6\n\n"
        + markdown_table(
            t6, ["method", "dice", "n", "seconds"], headers=["Method", "Mean DSC", "n", "Time (s / case)"]
        )
        + "\n## Table 8 (eps = 0.03 Λ = 10.2 HU; I-FGSM N = 5, α = 0.01 Λ)\n\n"
        + markdown_table(
            rows, ["model", "clean", *attacks, "drop"], headers=["Model", "Clean", *attacks, "Max drop"]
        )
        + f"\nWall-clock seconds per stage: {json.dumps({k: round(v) for k, v in seconds.items()})}\n"
    )
    result = {"table6": table6, "table8": rows, "seconds": seconds}
    atomic_write_json(out / "study.json", result)
    atomic_write_text(out / "study.md", text)
    print(text)
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
