"""The certified_seg bundle end to end on tiny phantoms through ``python -m monai.bundle run``: train (base
and noise-trained), train_denoiser (DDPM + per-σ UNet denoiser), certify, certify_denoised, the binary
skin variant, plus the config checks. The statistics of certification are tested in tests/test_certify.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image
from scipy.stats import norm

from common.certify import ABSTAIN
from common.checkpoint import load_weights
from tests.bundle_run import BUNDLES, run_bundle

NAME = "certified_seg"
CONFIGS = BUNDLES / NAME / "configs"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    """Tiny chest demo: phantoms, a 1-epoch base model and 1-epoch denoisers."""
    demo = tmp_path_factory.mktemp("certified_seg") / "demo"
    tiny = {"demo_dir": str(demo), "max_epochs": 1, "diffusion_max_epochs": 1, "denoiser_max_epochs": 1}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # tiny networks: threads only contend on a shared machine
        run_bundle(NAME, ["train.json", "demo.json"], tiny)
        run_bundle(NAME, ["train.json", "train_denoiser.json", "demo.json"], tiny)
    return demo, tiny


def test_train_and_denoiser_checkpoints(chest):
    demo, _ = chest
    data = json.loads((demo / "data" / "chest" / "datalist.json").read_text())
    assert len(data["test"]) == 2
    lab = np.asanyarray(nib.load(demo / "data" / "chest" / data["training"][0]["label"]).dataobj)
    assert lab.shape == (32, 32) and set(np.unique(lab)) == {0, 1, 2, 3, 4}  # lungs, heart, clavicles
    assert data["target"] == "classes"  # the certification overlap rule (clavicles > heart > lungs)
    models = demo / "models" / "chest"
    net = load_weights(_parser(["train.json", "demo.json"], {}).get_parsed_content("network_def"),
                       models / "base" / "model.pt")  # the demo UNet given by network_def
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 4, 32, 32)  # background, lung, heart, clavicles
    for name in ("diffusion.pt", "unet_sigma0.25.pt"):
        ckpt = torch.load(models / "denoiser" / name, map_location="cpu", weights_only=True)
        assert ckpt["losses"].numel() >= 1 and torch.isfinite(ckpt["losses"]).all()
    log = json.loads((models / "denoiser" / "train_log.json").read_text())
    assert log["diffusion_iterations"] == 2  # 6 training images, batch 4, 1 epoch


def test_certify_any_network_certified_and_abstained(chest, tmp_path, monkeypatch):
    """A 1x1 conv with logits (0, 0, 10 + x, 0): at σ = 0.25 every pixel is class 2 (heart) with P ≈ 1
    (certified); at σ = 1e4 P(class 2) = P(x + δ > -10) ≈ 0.5 < τ, so every pixel abstains."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    demo, tiny = chest
    net = torch.nn.Conv2d(1, 4, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[2] = 1.0
        net.bias[2] = 10.0
    ckpt = tmp_path / "conv"
    ckpt.mkdir()
    torch.save({"model": net.state_dict()}, ckpt / "model.pt")
    out = tmp_path / "eval"
    run_bundle(NAME, ["train.json", "certify.json", "demo.json"], {
        **tiny, "network_def": "$torch.nn.Conv2d(1, 4, 1)", "ckpt_dir": str(ckpt), "output_dir": str(out),
        "sigmas": [0.25, 10000.0],
    })
    cert = out / "certify"
    rows = _rows(cert / "per_case.csv")
    data = json.loads((demo / "data" / "chest" / "datalist.json").read_text())
    cases = [Path(e["image"]).name.replace(".nii.gz", "") for e in data["test"]]
    assert len(rows) == len(cases) * 2 * 1  # cases × σ values × methods
    assert {(r["case"], float(r["sigma"])) for r in rows} == {(c, s) for c in cases for s in (0.25, 10000.0)}
    labels = torch.load(cert / "certified_labels.pt", weights_only=True)
    assert len(labels) == 4
    for row in rows:
        sigma = float(row["sigma"])
        assert float(row["radius"]) == pytest.approx(sigma * norm.ppf(0.75))
        lab = labels[f"smoothing_base/sigma={sigma:g}/{row['case']}"]
        assert lab.shape == (32, 32)
        if sigma == 0.25:
            assert bool((lab == 2).all()) and float(row["abstained_pct"]) == 0.0
            entry = next(e for e in data["test"] if row["case"] in e["image"])
            truth = np.asanyarray(nib.load(demo / "data" / "chest" / entry["label"]).dataobj)
            g2 = int((truth == 3).sum())  # file code 3 (heart) is the paper's class 2
            assert float(row["dice_heart"]) == pytest.approx(2 * g2 / (g2 + truth.size), rel=1e-5)
            assert float(row["dice_strict_lung"]) == 0.0
        else:
            assert bool((lab == ABSTAIN).all()) and float(row["abstained_pct"]) == 100.0
            # every pixel abstained: nothing left to score, empty in both -> 1.0 (common.metrics.EMPTY_CLASS_RULE)
            assert float(row["dice_strict_lung"]) == 0.0 and float(row["dice_lung"]) == 1.0
    summary = json.loads((cert / "summary.json").read_text())
    assert [(e["method"], e["sigma"]) for e in summary["entries"]] == [
        ("smoothing_base", 0.0), ("smoothing_base", 0.25), ("smoothing_base", 10000.0)]
    assert summary["params"] == {"sigmas": [0.25, 10000.0], "n0": 4, "n": 64, "alpha": 0.001, "tau": 0.75,
                                 "correction": "holm"}
    table = (cert / "summary.md").read_text()
    assert "| smoothing_base | 0.25 | 0.17 |" in table and "%⊘" in table and "clavicles Dice" in table
    assert (cert / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(cert / "figure.png").size[0] > Image.open(cert / "figure.png").size[1]


def test_certify_denoised(chest, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    demo, tiny = chest
    configs = ["train.json", "train_denoiser.json", "certify.json", "certify_denoised.json", "demo.json"]
    run_bundle(NAME, configs, {**tiny, "n0": 2, "n": 48})
    cert = demo / "eval" / "chest" / "base" / "certify_denoised"
    rows = _rows(cert / "per_case.csv")
    assert len(rows) == 2 * 1 * 2  # cases × σ values × methods
    assert {r["method"] for r in rows} == {"ours_diffusion", "unet_denoiser"}
    labels = torch.load(cert / "certified_labels.pt", weights_only=True)
    assert len(labels) == 4
    for lab in labels.values():
        assert lab.shape == (32, 32) and int(lab.min()) >= ABSTAIN and int(lab.max()) <= 3
    for row in rows:
        frac = float(row["abstained_pct"]) / 100
        key = f"{row['method']}/sigma=0.25/{row['case']}"
        assert frac == pytest.approx(float((labels[key] == ABSTAIN).double().mean()))


def test_skin_binary_png(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tiny = {"demo_dir": str(tmp_path / "demo"), "max_epochs": 1, "phantom_cases": 5, "n": 8}
    run_bundle(NAME, ["train.json", "skin.json", "demo.json"], tiny)
    data = tmp_path / "demo" / "data" / "skin"
    entry = json.loads((data / "datalist.json").read_text())["training"][0]
    assert entry["image"].endswith(".png")
    assert np.asarray(Image.open(data / entry["image"])).shape == (32, 32, 3)
    run_bundle(NAME, ["train.json", "skin.json", "certify.json", "demo.json"], tiny)
    cert = tmp_path / "demo" / "eval" / "skin" / "base" / "certify"
    rows = _rows(cert / "per_case.csv")
    assert len(rows) == 1 * 1 * 1 and "dice_lesion" in rows[0] and "dice_heart" not in rows[0]
    # n = 8: the smallest p-value τ^n = 0.75^8 ≈ 0.10 exceeds α = 0.001, so nothing can be certified.
    assert float(rows[0]["abstained_pct"]) == 100.0
    labels = torch.load(cert / "certified_labels.pt", weights_only=True)
    assert all(bool((v == ABSTAIN).all()) for v in labels.values())


def _parser(files: list[str], overrides: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update(overrides)
    return parser


@pytest.mark.parametrize(
    "overrides, key",
    [({"sigmas": [0.25, 0.0]}, "sigmas"), ({"sigmas": [-0.5]}, "sigmas"), ({"tau": 0.4}, "tau"),
     ({"n0": 0}, "n0"), ({"n": 0}, "n"), ({"alpha": 1.5}, "alpha")],
)
def test_bad_certify_config_names_key(overrides, key):
    parser = _parser(["train.json", "certify.json", "demo.json"], overrides)
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("run#0")  # the check the certify run performs first
    err = info.value
    while not isinstance(err, ValueError) and err.__cause__ is not None:
        err = err.__cause__
    assert isinstance(err, ValueError) and str(err).startswith(f"{key}:")


def test_noise_training_adds_gaussian_sigma():
    """train_noise.json: every training image gets N(0, 0.25²) noise (std not sampled); train.json none."""
    noisy = _parser(["train.json", "train_noise.json"], {}).get_parsed_content("train#random_transforms")
    assert _parser(["train.json"], {}).get_parsed_content("train#random_transforms") == []
    (noise,) = noisy
    noise.set_random_state(seed=0)
    out = noise({"image": torch.zeros(1, 128, 128)})["image"]
    assert float(out.std()) == pytest.approx(0.25, rel=0.03) and abs(float(out.mean())) < 0.01


def test_evaluate_and_inference(chest, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    demo, tiny = chest
    run_bundle(NAME, ["train.json", "evaluate.json", "demo.json"], tiny)
    metrics = demo / "eval" / "chest" / "base" / "evaluate" / "metrics.csv"
    name, value = metrics.read_text().strip().split(",")
    assert name == "val_mean_dice" and 0.0 <= float(value) <= 1.0
    run_bundle(NAME, ["inference.json", "inference_demo.json"], {"demo_dir": str(demo)})
    masks = sorted((demo / "eval" / "chest" / "base" / "inference").glob("*_seg.nii.gz"))
    assert len(masks) == 10  # every phantom image
    seg = np.asanyarray(nib.load(masks[0]).dataobj)
    assert seg.shape[:2] == (32, 32) and seg.max() <= 4 and seg.min() >= 0
