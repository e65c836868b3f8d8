"""Phantom study of the ``unet_advaug`` bundle (Pervin et al., arXiv:2105.12106): baseline U-Net vs FGSM, InvFGSM, FGSM + InvFGSM
augmentation, IoU over epochs (Table 1 in shape) and IoU under FGSM / InvFGSM for ε ∈ [0, 0.2] (Table 2).

Runs the bundle's configs in this process through ``monai.bundle.run`` (the same code path as
``python -m monai.bundle run``) on abdominal CT phantoms with a liver lesion, then writes
``<out_dir>/tables.md`` and ``<out_dir>/tables.json``::

    .venv/bin/python scripts/study_unet_advaug.py --out_dir bundles/unet_advaug/demo/study

Also trains the baseline once with the paper's optimiser (SGD, lr 0.1, momentum 0.99) to measure whether
it trains on this small set (the reason for the bundle's Adam default).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from common.defenses.advaug import augmented_name
from common.reporting.advaug_tables import iou_over_epochs_table, robustness_table
from common.io import atomic_write_json, atomic_write_text
from scripts.bundle_run import run_bundle

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "unet_advaug"
METHOD_SETS = (("fgsm",), ("invfgsm",), ("fgsm", "invfgsm"))


def _run(configs: list[str], **overrides) -> None:
    run_bundle(BUNDLE, configs, overrides, in_process=True)


def main(
    out_dir: str = str(BUNDLE / "demo" / "study"),
    cases: int = 40,
    volume_size: tuple[int, int, int] = (64, 64, 64),
    crop_size: tuple[int, int] | None = (32, 32),
    epochs: int = 30,
    batch_size: int = 16,
    features: tuple[int, ...] = (8, 8, 16, 32, 64, 8),
    eps: float = 0.1,
    seed: int = 0,
    threads: int = 1,
    paper_optimizer: bool = True,
) -> None:
    """Train every variant, sweep its robustness, write ``tables.md`` / ``tables.json`` and print the tables.

    Table 1 shows epoch 1 and every 5th epoch (all epochs when ``epochs`` < 5)."""
    torch.set_num_threads(int(threads))
    out = Path(out_dir)
    common = {
        "demo_dir": str(out),
        "phantom_cases": int(cases),
        "volume_size": list(volume_size),
        "slice_crop_size": list(crop_size) if crop_size else None,
        "max_epochs": int(epochs),
        "batch_size": int(batch_size),
        "network_def#features": list(features),
        "seed": int(seed),
    }
    timings: dict[str, float] = {}
    start = time.time()
    _run(["train.json", "demo.json"], **common)
    timings["baseline"] = time.time() - start
    variants = {"UNet": "baseline"}
    for methods in METHOD_SETS:
        name = augmented_name(methods, eps)
        t = time.time()
        augment = {"augment#methods": list(methods), "augment#eps": eps}
        _run(["train.json", "augment.json", "demo.json"], **common, **augment)
        timings[name] = time.time() - t
        variants["UNet + " + " + ".join({"fgsm": "FGSM", "invfgsm": "InvFGSM"}[m] for m in methods)] = name
    if paper_optimizer:
        t = time.time()
        _run(["train.json", "demo.json"], **common, use_paper_optimizer=True, variant="baseline_paper_sgd")
        timings["baseline_paper_sgd"] = time.time() - t
    summaries = {}
    for label, variant in variants.items():
        t = time.time()
        _run(["train.json", "robustness.json", "demo.json"], **common, variant=variant)
        timings[f"robustness {variant}"] = time.time() - t
        summaries[label] = json.loads((out / "eval" / variant / "robustness" / "summary.json").read_text())
    eval_dir = out / "eval"
    histories = {label: eval_dir / v / "iou_history.csv" for label, v in variants.items()}
    if paper_optimizer:
        sgd = eval_dir / "baseline_paper_sgd" / "iou_history.csv"
        histories["UNet, paper SGD (lr 0.1, momentum 0.99)"] = sgd
    shown = sorted({1, *range(5, int(epochs) + 1, 5)}) if epochs >= 5 else None
    table1 = iou_over_epochs_table(histories, shown)
    table2 = {a: robustness_table(summaries, a) for a in ("fgsm", "invfgsm")}
    timings["total"] = time.time() - start
    text = (
        f"# Phantom study: {cases} abdominal CT phantoms {list(volume_size)}, lesion slices cropped to "
        f"{list(crop_size) if crop_size else 'none'}, {epochs} epochs, batch {batch_size}, "
        f"features {list(features)}, "
        f"ε = {eps}, seed {seed}\n\n## Validation IoU (lesion) over epochs (Table 1 in shape)\n\n{table1}\n"
        "## Test IoU (lesion) under FGSM (Table 2 in shape; ε = 0 is clean)\n\n" + table2["fgsm"]
        + "\n## Test IoU (lesion) under InvFGSM\n\n" + table2["invfgsm"]
        + "\n## Wall time (s)\n\n" + "\n".join(f"- {k}: {v:.0f}" for k, v in timings.items()) + "\n"
    )
    atomic_write_text(out / "tables.md", text)
    result = {"table1": table1, "table2": table2, "timings": timings}
    atomic_write_json(out / "tables.json", result)
    print(text)


if __name__ == "__main__":
    from scripts.cli import run

    run(main, ranges={"eps": (0.0, 1.0)})  # inputs scaled to [0, 1]
