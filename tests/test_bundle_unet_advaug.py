"""The unet_advaug bundle end to end on tiny abdominal CT phantoms: every config through
``python -m monai.bundle run`` (train, augment offline with FGSM + InvFGSM, augment online, evaluate,
robustness, inference)."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np

from tests.bundle_run import run_bundle

NAME = "unet_advaug"
VARIANT = "advaug_fgsm+invfgsm_eps0.1"


def test_bundle_unet_advaug_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny networks: threads only contend on a shared machine
    demo = tmp_path / "demo"
    tiny = {"demo_dir": str(demo), "phantom_cases": 6, "max_epochs": 1}

    run_bundle(NAME, ["train.json", "demo.json"], tiny)
    data = demo / "data"
    base = json.loads((data / "datalist.json").read_text())
    assert base["training"] and base["test"]
    img = nib.load(data / base["training"][0]["image"])
    lab = np.asanyarray(nib.load(data / base["training"][0]["label"]).dataobj)
    assert img.shape == (32, 32) and set(np.unique(lab)) <= {0, 1} and lab.any()
    assert (demo / "models" / "baseline" / "model.pt").is_file()

    both = {**tiny, "augment#methods": ["fgsm", "invfgsm"]}
    run_bundle(NAME, ["train.json", "augment.json", "demo.json"], both)
    aug = json.loads((data / f"{VARIANT}.json").read_text())
    n = len(base["training"])
    assert len(aug["training"]) == 3 * n
    assert [e["label"] for e in aug["training"][n:]] == [e["label"] for e in base["training"]] * 2
    assert aug["augmentation"]["methods"] == ["fgsm", "invfgsm"] and aug["augmentation"]["eps"] == 0.1
    for e in aug["training"][n:]:
        assert (data / e["image"]).is_file()
    with open(demo / "eval" / VARIANT / "iou_history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1"] and math.isfinite(float(rows[0]["val_mean_iou"]))

    run_bundle(NAME, ["train.json", "augment_online.json", "demo.json"], {**tiny, "augment#interval": 1})
    assert (demo / "models" / "online_advaug_fgsm_eps0.1" / "model.pt").is_file()

    run_bundle(NAME, ["train.json", "evaluate.json", "demo.json"], tiny)
    table = (demo / "eval" / "iou_over_epochs.md").read_text()
    assert "| baseline |" in table and f"| {VARIANT} |" in table
    metrics = json.loads((demo / "eval" / "baseline" / "test_metrics.json").read_text())
    assert math.isfinite(metrics["val_mean_iou"])  # behaviour (IoU, attacks) is tested in test_behaviour_unet_advaug.py

    sweep = {**tiny, "variant": VARIANT, "robustness#eps_values": [0.0, 0.1]}
    run_bundle(NAME, ["train.json", "robustness.json", "demo.json"], sweep)
    summary = json.loads((demo / "eval" / VARIANT / "robustness" / "summary.json").read_text())
    settings = {(e["attack"], e["eps"]) for e in summary["entries"]}
    assert settings == {("clean", 0.0), ("fgsm", 0.1), ("invfgsm", 0.1)}

    run_bundle(
        NAME, ["inference.json"],
        {"models_dir": str(demo / "models"), "dataset_dir": str(data), "output_dir": str(tmp_path / "pred"),
         "network_def#features": [8, 8, 16, 32, 64, 8]},
    )
    preds = sorted((tmp_path / "pred").glob("*_seg.nii.gz"))
    assert len(preds) == len(base["test"])
    assert set(np.unique(np.asanyarray(nib.load(preds[0]).dataobj))) <= {0, 1}
