"""Robustness card runner (issue #9): a plain model-zoo bundle written here, every bundle of this project on
tiny phantoms, resume from the cache, and bad input.

Oracles: the card's numbers are recomputed with direct calls of ``common.attacks``, ``common.certify``
and ``common.sliding_window`` on the same cases, Dice by its formula in numpy, the Wilcoxon p-values with
``scipy.stats.wilcoxon`` and the Holm adjustment with ``statsmodels``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import norm, wilcoxon
from statsmodels.stats.multitest import multipletests

from common.attacks import FGSM, IFGSM, WorstCase, inverted_target
from helpers import browser_check
from common.card.bundle_reader import input_range_of, read_bundle
from common.card.cases import CaseRef, load_case, read_datalist
from common.card.parts import BUDGETS, cert_part, part_generator
from common.card.runner import run_card
from common.certify import certify
from common.checkpoint import save_weights
from common.io import read_manifest
from common.data.datalist import write_datalist
from common.data.synthetic import write_phantom_dataset
from common.sliding_window import SlidingWindowForward

REPO = Path(__file__).resolve().parents[1]
SIZE = 20
ROI = [16, 16, 16]
HU = (-57.0, 164.0)  # the spleen bundle's window
UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2], "num_res_units": 0}
FAST = {"eps": [0.02, 0.08], "sigmas": [0.25], "n0": 4, "n": 64, "steps": 2, "seed": 3, "progress": False,
        "ensemble_steps": 2}
CARD_FILES = ("card.json", "examples.npz", "card.md", "card.html")


# ------------------------------------------------------------------------------------ a zoo-style bundle
def _zoo_config() -> dict:
    """configs/inference.json in the style of the model zoo's spleen_ct_segmentation (no project imports)."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/Task09_Spleen",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "UNet", **UNET},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": [1.0, 1.0, 1.0], "mode": "bilinear"},
                {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": HU[0], "a_max": HU[1], "b_min": 0.0,
                 "b_max": 1.0, "clip": True},
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": ROI, "sw_batch_size": 4, "overlap": 0.5},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}},
                     {"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers"},
        "run": ["$@evaluator.run()"],
    }


def _zoo_metadata() -> dict:
    return {
        "version": "0.0.1", "name": "Tiny spleen", "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": ROI}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                                 "channel_def": {"0": "background", "1": "spleen"}}}},
    }


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy bright ellipsoid in HU (SIZE³ float32) and its mask (uint8)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"), -1).astype(np.float32)
    centre = rng.uniform(7, 13, 3)
    radii = rng.uniform(3.5, 6.0, 3)
    mask = (((grid - centre) / radii) ** 2).sum(-1) <= 1
    image = np.where(mask, 120.0, -40.0) + rng.normal(0, 30, mask.shape)
    return image.astype(np.float32), mask.astype(np.uint8)


def _nifti(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _train(net: torch.nn.Module, images, labels, steps: int = 25) -> None:
    """A few Adam steps of cross-entropy, so that the predictions are not trivial."""
    x = torch.from_numpy(np.stack(images))[:, None][..., :16, :16, :16]
    x = ((x - HU[0]) / (HU[1] - HU[0])).clamp(0, 1)
    y = torch.from_numpy(np.stack(labels)).long()[..., :16, :16, :16]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """A zoo-style bundle (UNet, SlidingWindowInferer, LoadImaged/.../ScaleIntensityRanged) and 3 cases."""
    from monai.networks.nets import UNet

    root = tmp_path_factory.mktemp("zoo") / "tiny_spleen"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "inference.json").write_text(json.dumps(_zoo_config(), indent=1))
    (root / "configs" / "metadata.json").write_text(json.dumps(_zoo_metadata()))
    data = root.parent / "data"
    images, labels, entries = [], [], []
    for i in range(3):
        image, label = _phantom(i)
        _nifti(data / "imagesTr" / f"spleen_{i}.nii.gz", image)
        _nifti(data / "labelsTr" / f"spleen_{i}.nii.gz", label)
        images.append(image)
        labels.append(label)
        entries.append({"image": f"imagesTr/spleen_{i}.nii.gz", "label": f"labelsTr/spleen_{i}.nii.gz"})
    datalist = write_datalist(data / "datalist.json", {"training": entries})
    torch.manual_seed(0)
    net = UNet(**UNET)
    _train(net, images, labels)
    save_weights(net, root / "models" / "model.pt")
    out = root.parent / "card"
    paths = run_card(root, datalist, output_dir=out, **FAST)
    return {"root": root, "datalist": datalist, "net": net, "images": images, "labels": labels, "out": out,
            "paths": paths, "card": json.loads((out / "card.json").read_text())}


def _dice(pred: np.ndarray, truth: np.ndarray, c: int) -> float:
    p, g = pred == c, truth == c
    if not p.any() and not g.any():
        return 1.0
    return 2.0 * (p & g).sum() / (p.sum() + g.sum())


def test_zoo_card_matches_direct_calls(zoo):
    card, net = zoo["card"], zoo["net"]
    assert card["bundle"]["inferer"] == {"type": "SlidingWindowInferer", "key": "inferer", "roi_size": ROI,
                                         "overlap": 0.5, "mode": "constant", "sw_batch_size": 4,
                                         "sigma_scale": 0.125, "padding_mode": "constant", "cval": 0.0,
                                         "slice_dim": None}
    assert card["bundle"]["class_names"] == ["spleen"] and card["bundle"]["num_classes"] == 2
    assert card["bundle"]["spatial_dims"] == 3 and card["units"]["input_range"] == [0.0, 1.0]
    assert card["units"]["range_source"].startswith("ScaleIntensityRanged(a_min=-57, a_max=164, b_min=0, b_max=1")
    assert card["units"]["eps_input_units"] == pytest.approx(FAST["eps"])
    forward = SlidingWindowForward(net, ROI, overlap=0.5, sw_batch_size=4, mode="constant")
    bundle = read_bundle(zoo["root"])
    cases, _ = read_datalist(zoo["datalist"])
    clean, attacked = [], []
    for i, case in enumerate(cases):
        # the preprocessing, checked against the window formula on the raw HU array (and the raw label)
        x, y = load_case(bundle, case)
        expected = np.clip((zoo["images"][i] - HU[0]) / (HU[1] - HU[0]), 0, 1)
        np.testing.assert_allclose(x[0, 0].numpy(), expected, atol=1e-6)
        np.testing.assert_array_equal(y[0, 0].numpy(), zoo["labels"][i])
        truth = zoo["labels"][i]
        with torch.no_grad():
            pred = forward(x).argmax(1)[0].numpy()
        clean.append(_dice(pred, truth, 1))
        assert card["clean"]["per_case"][case.case_id]["spleen"] == pytest.approx(clean[-1], abs=1e-12)
        # one attack at one eps: I-FGSM with the cross-entropy loss at eps = 0.08
        eps = 0.08
        x_adv = IFGSM(forward, eps, steps=FAST["steps"], loss="ce", clip=(0.0, 1.0))(x, y)  # IFGSM's α = ε / N
        with torch.no_grad():
            pred_adv = forward(x_adv).argmax(1)[0].numpy()
        entry = next(e for e in card["attacks"] if e["name"] == "IFGSM-ce" and e["eps"] == eps)
        attacked.append(_dice(pred_adv, truth, 1))
        assert entry["per_case"][case.case_id]["spleen"] == pytest.approx(attacked[-1], abs=1e-12)
        # certification with the same seed: certified Dice ignoring abstained pixels, abstained fraction
        cert = certify(forward, x, 0.25, n0=4, n=64, alpha=0.001, tau=0.75, correction="holm", batch_size=8,
                       generator=part_generator(FAST["seed"], case.case_id, cert_part(0.25)))
        labels = cert.labels[0].numpy()
        kept = labels != -1
        p, g = (labels == 1) & kept, (truth == 1) & kept
        got = card["certification"][0]["per_case"][case.case_id]
        assert got["abstain_fraction"] == pytest.approx(1 - kept.mean(), abs=1e-12)
        # empty-class rule (common.metrics.EMPTY_CLASS_RULE): absent from both the kept truth and prediction -> 1
        expected = 2 * (p & g).sum() / (p.sum() + g.sum()) if (p.any() or g.any()) else 1.0
        assert got["certified_dice"]["spleen"] == pytest.approx(expected, abs=1e-12)
    assert 0 < card["certification"][0]["abstain_fraction"] < 0.5  # n = 64 draws certify most voxels
    assert card["clean"]["mean"]["spleen"] == pytest.approx(np.mean(clean), abs=1e-12)
    assert entry["mean"]["spleen"] == pytest.approx(np.mean(attacked), abs=1e-12)
    assert entry["sd"]["spleen"] == pytest.approx(np.std(attacked, ddof=1), abs=1e-12)
    assert 0.3 < np.mean(clean) <= 1.0  # the briefly trained network does segment
    # Wilcoxon against clean, Holm over the 12 (attack, eps) tests of the class
    ids = card["data"]["case_ids"]
    raw = []
    for e in card["attacks"]:
        a = [e["per_case"][c]["spleen"] for c in ids]
        c = [card["clean"]["per_case"][c]["spleen"] for c in ids]
        expected = 1.0 if a == c else wilcoxon(a, c).pvalue
        assert e["p_wilcoxon"]["spleen"] == pytest.approx(expected, abs=1e-12)
        raw.append(e["p_wilcoxon"]["spleen"])
    holm = multipletests(raw, method="holm")[1]
    assert [e["p_adjusted"]["spleen"] for e in card["attacks"]] == pytest.approx(list(holm), abs=1e-12)
    assert len(card["attacks"]) == 7 * len(FAST["eps"])  # the six classic attacks and the WorstCase ensemble
    _check_headline(card, forward, bundle, cases)


def _direct_attack(card, name: str, forward, eps: float):
    """The card's attack ``name`` built directly from ``common.attacks`` with the settings the card states."""
    cfg = card["settings"]["attacks"][name]
    if name == "WorstCase":
        members = [(m["attack"], {k: v for k, v in m.items() if k != "attack"}) for m in cfg["members"]]
        return WorstCase(forward, eps, clip=(0.0, 1.0), attacks=members, output="softmax", seed=FAST["seed"])
    if cfg["attack"] == "FGSM":
        return FGSM(forward, eps, loss=cfg["loss"], clip=(0.0, 1.0), output="softmax")
    target = (lambda y: inverted_target(y, 1)) if cfg["targeted"] else None
    return IFGSM(forward, eps, steps=cfg["steps"], loss=cfg["loss"], clip=(0.0, 1.0), output="softmax",
                 targeted=cfg["targeted"], target_fn=target)


def _check_headline(card, forward, bundle, cases) -> None:
    """Headline = per case, the attack with the lowest Dice; its Dice, HD95 (MONAI) and component detection
    (scipy.ndimage.label) equal direct calls; t interval and Wilcoxon by scipy; the smallest p is 2 / 2^n."""
    from monai.metrics import compute_hausdorff_distance
    from scipy import ndimage, stats

    head, ids = card["headline"], card["data"]["case_ids"]
    assert head["n_cases"] == len(ids) and head["min_p"] == 2 / 2 ** len(ids)
    assert head["min_p_holm"] == min(1.0, len(FAST["eps"]) * 2 / 2 ** len(ids))
    entry = head["eps"][-1]
    eps = entry["eps_input_units"]
    worst = []
    for case in cases:
        cid = case.case_id
        scores = {a["name"]: a["per_case"][cid]["spleen"] for a in card["attacks"] if a["eps"] == entry["eps"]}
        chosen = entry["per_case"][cid]["attack"]
        assert scores[chosen] == min(scores.values())  # one class: mean foreground Dice = the class's Dice
        x, y = load_case(bundle, case)
        x_adv = _direct_attack(card, chosen, forward, eps)(x, y)
        with torch.no_grad():
            pred = forward(x_adv).argmax(1)
        truth = y[:, 0]
        worst.append(_dice(pred[0].numpy(), truth[0].numpy(), 1))
        assert entry["per_case"][cid]["dice"]["spleen"] == pytest.approx(worst[-1], abs=1e-12)
        hd = compute_hausdorff_distance((pred == 1)[:, None].float(), (truth == 1)[:, None].float(),
                                        include_background=True, percentile=95, spacing=[1.0, 1.0, 1.0])
        assert entry["per_case"][cid]["hd95"]["spleen"] == pytest.approx(float(hd), abs=1e-6)
    # the WorstCase member itself: its per-case Dice equals the direct ensemble's
    wc = next(a for a in card["attacks"] if a["name"] == "WorstCase" and a["eps"] == entry["eps"])
    for case in cases:
        x, y = load_case(bundle, case)
        with torch.no_grad():
            pred = forward(_direct_attack(card, "WorstCase", forward, eps)(x, y)).argmax(1)[0].numpy()
        assert wc["per_case"][case.case_id]["spleen"] == pytest.approx(_dice(pred, y[0, 0].numpy(), 1), abs=1e-12)
    assert entry["mean"]["spleen"] == pytest.approx(np.mean(worst), abs=1e-12)
    lo, hi = stats.t.interval(0.95, len(worst) - 1, loc=np.mean(worst), scale=stats.sem(worst))
    assert entry["ci95"]["spleen"] == pytest.approx([max(lo, 0.0), min(hi, 1.0)], abs=1e-9)
    clean = [card["clean"]["per_case"][c]["spleen"] for c in ids]
    expected = 1.0 if worst == clean else wilcoxon(worst, clean).pvalue
    assert entry["p_wilcoxon"]["spleen"] == pytest.approx(expected, abs=1e-12)
    # component detection at the clean prediction: scipy's components of the label, covered >= 1/2
    total = np.zeros(2)
    for case in cases:
        x, y = load_case(bundle, case)
        with torch.no_grad():
            pred = forward(x).argmax(1)[0].numpy() == 1
        comps, num = ndimage.label(y[0, 0].numpy() == 1)
        for i in range(1, num + 1):
            size = (comps == i).sum()
            if 100 <= size < 1000:
                total += [1, (pred & (comps == i)).sum() >= card["settings"]["detected_overlap"] * size]
    got = head["clean"]["detection"]["spleen"][2]
    assert got["bin_voxels"] == [100, 1000] and got["components"] == total[0]
    assert got["detected_fraction"] == pytest.approx(total[1] / total[0] if total[0] else None)


def test_zoo_card_files_cost_and_examples(zoo):
    card, out = zoo["card"], zoo["out"]
    for name in CARD_FILES:
        assert (out / name).is_file(), name
    assert set(zoo["paths"]) >= {"json", "examples_npz", "md", "html"}
    assert set(read_manifest(out)) >= set(CARD_FILES)  # the card's files match the manifest written last
    assert "<img" in (out / "card.html").read_text()
    assert "Robustness card: tiny_spleen 0.0.1" in (out / "card.md").read_text()
    cost = card["cost"]
    assert cost["clean_forward_s_per_case"] > 0
    expected_parts = {"FGSM-dice", "FGSM-ce", "IFGSM-dice", "IFGSM-ce", "targeted-IFGSM-dice", "targeted-IFGSM-ce",
                      "WorstCase", "certification@sigma=0.25", "masking diagnostics (first case)"}
    assert set(cost["parts"]) == expected_parts
    for part in cost["parts"].values():
        assert part["ratio_to_forward"] == pytest.approx(part["s_per_case"] / cost["clean_forward_s_per_case"])
    # certification runs n0 + n = 68 forwards, an I-FGSM of 2 steps about 2 forward + backward passes
    assert cost["parts"]["certification@sigma=0.25"]["ratio_to_forward"] > 3
    with np.load(out / "examples.npz") as npz:
        ex = {k: npz[k] for k in npz.files}
    assert card["examples"]["slice_axis"] == 2 and card["examples"]["case_id"] == card["data"]["case_ids"][0]
    label = zoo["labels"][0]
    assert card["examples"]["slice_index"] == int(np.argmax(label.sum((0, 1))))
    np.testing.assert_array_equal(ex["label"], label[:, :, card["examples"]["slice_index"]])
    np.testing.assert_allclose(ex["perturbation"], ex["adversarial"] - ex["image"], atol=1e-7)
    assert np.abs(ex["perturbation"]).max() <= card["examples"]["eps"] + 1e-6
    assert ex["pred_certified"].min() >= -1 and ex["image"].shape == (SIZE, SIZE)
    assert card["settings"]["attacks"]["targeted-IFGSM-ce"]["targeted"] is True
    assert inverted_target(torch.tensor([[[0, 1]]]), 1).tolist() == [[[1, 0]]]  # the documented target


def test_zoo_card_opens_in_chromium_with_a_screenshot(zoo):
    """The card the runner produced (not a hand-made one) opens headless without console or page errors;
    the screenshot is attached to the card's output directory."""
    try:
        browser_check.find_chromium()
    except FileNotFoundError as err:
        pytest.fail(f"{err}; CI must run `{browser_check.APT_COMMAND}`")
    shot = zoo["out"].parent / "card_screenshot.png"
    messages, shot = browser_check.check_page(zoo["out"] / "card.html", shot)
    print(f"\nrobustness card screenshot: {shot}")
    assert messages == []
    html = (zoo["out"] / "card.html").read_text()
    # the first screen is the verdict: the plot and the clean vs worst-case table come before any details
    verdict, details = html.index("<h2>Verdict</h2>"), html.index("<details>")
    assert verdict < html.index("<img") < html.index("Clean and worst-case robust Dice per class") < details
    assert verdict < html.index("Gradient-masking checks") < html.index("Cost per case") < details
    with Image.open(shot) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert rgb.shape[1] == 1200 and rgb.shape[0] > 1500 and rgb.std() > 10


def test_label_values_map_label_files_to_channels(zoo, tmp_path):
    """Label files holding {0, 7} for the 2 channels: with ``label_values=[0, 7]`` the card loads exactly the
    0/1 label; a value that is none of them fails naming the file; a wrong count names the metadata."""
    case = read_datalist(zoo["datalist"])[0][0]
    moved = tmp_path / "label7.nii.gz"
    img = nib.load(case.label)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.uint8) * 7, img.affine), moved)
    bundle = read_bundle(zoo["root"], label_values=[0, 7])
    _, y_plain = load_case(read_bundle(zoo["root"]), case)
    _, y_mapped = load_case(bundle, CaseRef(case.case_id, case.image, moved, case.datalist))
    assert torch.equal(y_mapped, y_plain) and int(y_plain.max()) == 1
    with pytest.raises(ValueError, match=r"label1\.nii\.gz.*\[1\.0\] outside the label values \[0, 7\]"):
        wrong = tmp_path / "label1.nii.gz"
        shutil.copy(case.label, wrong)
        load_case(bundle, CaseRef(case.case_id, case.image, wrong, case.datalist))
    # a list per channel merges label values (organ labels into background / foreground)
    merged = tmp_path / "organs.nii.gz"
    organs = np.asarray(img.dataobj).astype(np.uint8) * np.where(np.arange(SIZE) % 2, 5, 9)[None, :, None]
    nib.save(nib.Nifti1Image(np.where(organs == 0, 3, organs).astype(np.uint8), img.affine), merged)
    _, y_merged = load_case(read_bundle(zoo["root"], label_values=[[0, 3], [5, 9]]),
                            CaseRef(case.case_id, case.image, merged, case.datalist))
    assert torch.equal(y_merged, y_plain)
    with pytest.raises(ValueError, match=r"label_values: 3 values for the 2 output channels declared in .*metadata"):
        read_bundle(zoo["root"], label_values=[0, 1, 2])
    for bad in ([0, 0], [[0, 1], [1]], [[], [1]], "01", [0, -1]):
        with pytest.raises(ValueError, match="label_values: expected"):
            read_bundle(zoo["root"], label_values=bad)


# ------------------------------------------------------------------------------------------------ resume
def test_resume_reuses_cached_cases(zoo, tmp_path):
    out = zoo["out"]
    before = json.loads((out / "card.json").read_text())
    for name in CARD_FILES:
        (out / name).unlink()
    run_card(zoo["root"], zoo["datalist"], output_dir=out, **FAST)
    after = json.loads((out / "card.json").read_text())
    assert after["cache"] == {**before["cache"], "reused_cases": 3, "computed_cases": 0}
    for key in ("clean", "attacks", "certification", "cost", "examples", "units", "settings"):
        assert after[key] == before[key], key
    # a partial run (2 cases) then the full run: only the third case is computed
    part = tmp_path / "partial"
    run_card(zoo["root"], zoo["datalist"], output_dir=part, max_cases=2, **FAST)
    run_card(zoo["root"], zoo["datalist"], output_dir=part, **FAST)
    full = json.loads((part / "card.json").read_text())
    assert (full["cache"]["reused_cases"], full["cache"]["computed_cases"]) == (2, 1)
    assert full["attacks"] == before["attacks"] and full["certification"] == before["certification"]


# ------------------------------------------------------------------------------- this project's bundles
RESDSN_INFERER = "$lambda x, net: @coarse_forward(x)"  # C2F returns labels without gradients: card the coarse stage
PROJECT = {
    # name: (phantom kind, size, label map (None: as generated), HU images, overrides, checkpoint files)
    "nlcen_lung": ("chest", (64, 64), {2: 1, 3: 0, 4: 0}, False,
                   {"image_size": [64, 64], "network_def#fpn_channels": 32, "network_def#num_codes": 8,
                    "network_def#widen_factor": 0.25}, ["models/model.pt"]),
    "unet3d_brats_distill": ("brain", (24, 24, 24), None, False,
                             {"image_size": [24, 24, 24], "network_def#base_filters": 4, "network_def#depth": 3,
                              "network_def#seg_levels": 2}, ["models/unet3d/model.pt"]),
    "resdsn_c2f_pancreas": ("abdomen", (24, 24, 24), None, False,
                            {"roi_size": [16, 16, 16], "channels": [2, 4, 8, 16], "n_coarse": 1,
                             "reference_size": [24, 24, 24], "inferer": RESDSN_INFERER},
                            ["models/coarse/model.pt", "models/fine/model.pt"]),
    "unet_advaug": ("chest", (32, 32), {2: 1, 3: 0, 4: 0}, True,
                    {"network_def#features": [4, 4, 8, 8, 16, 4]}, ["models/baseline/model.pt"]),
    "certified_seg": ("chest", (32, 32), {2: 1, 3: 2, 4: 3}, False,  # the bundle's label_map: the paper's classes
                      {"image_size": [32, 32], "network_def#channels": [8, 16, 32], "network_def#strides": [2, 2],
                       "network_def#num_res_units": 1}, ["models/chest/base/model.pt"]),
}
TINY = {"eps": [0.04], "sigmas": [0.25], "n0": 2, "n": 8, "steps": 1, "max_cases": 1, "seed": 0, "progress": False,
        "budget": "quick", "masking_check": False}


def _rewrite(path: Path, fn) -> None:
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(fn(np.asarray(img.dataobj)), img.affine, img.header), str(path))


def _seeded_weights(root: Path, overrides: dict, files: list[str]) -> None:
    """Untrained weights of the bundle's network_def (with the overrides), seeded, at each checkpoint path."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    for key, value in overrides.items():
        if key != "inferer":
            parser[key] = value
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    for f in files:
        save_weights(net, root / f)


@pytest.mark.parametrize("name", list(PROJECT))
def test_project_bundle_cards(name, tmp_path):
    from common.reporting.card import validate_card, validate_examples

    kind, size, label_map, hu, overrides, files = PROJECT[name]
    root = tmp_path / name
    shutil.copytree(REPO / "bundles" / name, root, ignore=shutil.ignore_patterns("demo", "models", "eval", "data"))
    datalist = write_phantom_dataset(kind, tmp_path / "data", num_cases=3, size=size, seed=1)
    entries = json.loads(datalist.read_text())
    for entry in (e for section in ("training", "validation", "test") for e in entries[section]):
        if label_map:
            table = np.array([label_map.get(v, v) for v in range(256)], dtype=np.uint8)
            _rewrite(datalist.parent / entry["label"], lambda a: table[a.astype(np.uint8)])
        if hu:
            _rewrite(datalist.parent / entry["image"], lambda a: (a * 340.0 - 100.0).astype(np.float32))
    _seeded_weights(root, overrides, files)
    out = tmp_path / "card"
    # raw BraTS label files hold {0, 1, 2, 4}: the card maps them to the 4 output channels
    label_values = [0, 1, 2, 4] if name == "unet3d_brats_distill" else None
    run_card(root, datalist, output_dir=out, overrides=overrides, label_values=label_values, **TINY)
    card = json.loads((out / "card.json").read_text())
    validate_card(card)
    assert card["settings"]["label_values"] == ([[v] for v in label_values] if label_values else None)
    with np.load(out / "examples.npz") as npz:
        validate_examples({k: npz[k] for k in npz.files})
    assert (out / "card.html").is_file() and (out / "card.md").is_file()
    classes = card["bundle"]["class_names"]
    assert len(classes) == card["bundle"]["num_classes"] - 1 >= 1
    case = card["data"]["case_ids"][0]
    values = [card["clean"]["mean"][c] for c in classes]
    for e in card["attacks"]:
        values += [e["mean"][c] for c in classes] + [e["per_case"][case][c] for c in classes]
        assert all(0 <= e[k][c] <= 1 for k in ("p_wilcoxon", "p_adjusted") for c in classes)
    assert len(card["attacks"]) == len(BUDGETS["quick"]["attacks"]) and all(v is not None and 0 <= v <= 1 for v in values)
    for e in card["certification"]:
        low, high = card["units"]["input_range"]
        assert e["certified_radius"] == pytest.approx(0.25 * norm.ppf(0.75) * (high - low))
        assert 0 <= e["abstain_fraction"] <= 1
        assert all(v is None or 0 <= v <= 1 for v in e["certified_dice"].values())
    assert card["cost"]["clean_forward_s_per_case"] > 0
    assert all(p["s_per_case"] > 0 and p["ratio_to_forward"] > 0 for p in card["cost"]["parts"].values())
    if name == "resdsn_c2f_pancreas":
        assert card["bundle"]["checkpoint"] is None and set(card["bundle"]["extra_checkpoints"]) == {
            "coarse_checkpoint", "fine_checkpoint"}
    else:
        assert card["bundle"]["checkpoint"] == str((root / files[0]).resolve())
    expected_range = {"unet_advaug": "ScaleIntensityRanged", "resdsn_c2f_pancreas": "ScaleIntensityRanged"}
    assert card["units"]["range_source"].startswith(expected_range.get(name, "ScaleIntensityd"))
    assert card["units"]["input_range"] == [0.0, 1.0]


# --------------------------------------------------------------------------------------------- bad input
def _break(kind: str, zoo: dict, root: Path, data: Path) -> tuple[Path, Path, list[str]]:
    """Make one kind of bad input; return the bundle root, the datalist and what the message must name."""
    from monai.networks.nets import UNet

    datalist = zoo["datalist"]
    if kind == "network_def":
        cfg = json.loads((root / "configs" / "inference.json").read_text())
        del cfg["network_def"]
        (root / "configs" / "inference.json").write_text(json.dumps(cfg))
        return root, datalist, [str(root / "configs" / "inference.json"), "'network_def'"]
    if kind == "checkpoint":
        save_weights(UNet(**{**UNET, "channels": [4, 16]}), root / "models" / "model.pt")
        return root, datalist, [str(root / "models" / "model.pt"), "shape of 'model.", "network_def"]
    section = json.loads(datalist.read_text())["training"]
    entries = [{k: str(datalist.parent / v) for k, v in e.items()} for e in section]
    if kind == "missing_file":
        entries[1]["label"] = "labelsTr/absent.nii.gz"  # relative to the datalist's folder
        dl = write_datalist(data / "datalist.json", {"training": entries})
        return root, dl, [str(dl), "'label'", str(data / "labelsTr" / "absent.nii.gz")]
    _, label = _phantom(7)
    label[0, 0, 0] = 3
    _nifti(data / "labelsTr" / "bad.nii.gz", label)
    entries[2]["label"] = str(data / "labelsTr" / "bad.nii.gz")
    dl = write_datalist(data / "datalist.json", {"training": entries})
    return root, dl, [str(dl), "'label'", str(data / "labelsTr" / "bad.nii.gz"), "[3.0]", "metadata.json"]


@pytest.mark.parametrize("kind", ["network_def", "checkpoint", "missing_file", "label_values"])
def test_bad_input_one_line_error_and_no_card(kind, zoo, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(zoo["root"], root)
    data = tmp_path / "data"
    data.mkdir()
    root, datalist, names = _break(kind, zoo, root, data)
    out = tmp_path / "card"
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        run_card(root, datalist, output_dir=out, **FAST)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)
    assert not out.exists()  # raised before anything was written: no card, not even a cache


@pytest.mark.parametrize("inferer, words", [
    ({"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "with_coord": True},
     ["with_coord=True", "not supported"]),
    ("$lambda x, net: net(x).argmax(1, keepdim=True).float()",
     ["returns (1, 1, 20, 20, 20)", "logits (1, 2, 20, 20, 20)"]),
    ("$lambda x, net: net(x).detach()", ["not differentiable"]),
])
def test_inferer_that_cannot_be_attacked(inferer, words, zoo, tmp_path):
    out = tmp_path / "card"
    with pytest.raises(ValueError) as err:
        run_card(zoo["root"], zoo["datalist"], output_dir=out, overrides={"inferer": inferer}, **FAST)
    message = str(err.value)
    assert "\n" not in message and "'inferer'" in message
    assert str(zoo["root"] / "configs" / "inference.json") in message
    assert all(w in message for w in words), message
    assert not out.exists()


# ----------------------------------------------------------------------------------- reading a bundle
def test_label_follows_the_image_geometry_with_nearest_interpolation(zoo):
    """Spacingd at 2 mm: the label gets the image's grid and nearest-neighbour values (voxel i ← 2i)."""
    bundle = read_bundle(zoo["root"], overrides={"preprocessing#transforms#3#pixdim": [2.0, 2.0, 2.0]})
    spacing = next(t for t in bundle.preprocessing.transforms if type(t).__name__ == "Spacingd")
    assert list(spacing.keys) == ["image", "label"] and [str(m) for m in spacing.mode] == ["bilinear", "nearest"]
    scale = next(t for t in bundle.preprocessing.transforms if type(t).__name__ == "ScaleIntensityRanged")
    assert list(scale.keys) == ["image"]  # intensity transforms leave the label alone
    cases, _ = read_datalist(zoo["datalist"], max_cases=1)
    x, y = load_case(bundle, cases[0])
    assert x.shape == y.shape == (1, 1, 10, 10, 10) and y.dtype == torch.int64
    np.testing.assert_array_equal(y[0, 0].numpy(), zoo["labels"][0][::2, ::2, ::2])


def test_input_range_of_the_preprocessing():
    from monai.transforms import NormalizeIntensityd, RandGaussianNoised, ScaleIntensityd, ScaleIntensityRanged

    r = input_range_of([ScaleIntensityRanged("image", -100, 240, 0.0, 1.0, clip=True)])
    assert (r.low, r.high, r.clip, r.measured) == (0.0, 1.0, (0.0, 1.0), False)
    r = input_range_of([ScaleIntensityRanged("image", -1000, 1000, -1.0, 1.0, clip=False)])
    assert (r.low, r.high, r.clip) == (-1.0, 1.0, None)
    r = input_range_of([ScaleIntensityd("image", minv=0.0, maxv=255.0)])
    assert (r.low, r.high, r.clip) == (0.0, 255.0, (0.0, 255.0)) and r.source == "ScaleIntensityd(minv=0, maxv=255)"
    r = input_range_of([ScaleIntensityd("image"), NormalizeIntensityd("image")])
    assert r.measured and "z-units" in r.source and r.clip is None
    r = input_range_of([ScaleIntensityd("image"), RandGaussianNoised("image")])
    assert r.measured and "followed by RandGaussianNoised" in r.source
    assert input_range_of([ScaleIntensityd("label")]).measured  # a transform of another key says nothing


# ----------------------------------------------------------------------------- command line and bundle config
def test_cli_and_bundle_config_reuse_the_cache(zoo):
    """The fire CLI (in process) and ``python -m monai.bundle run`` with the bundle config (a subprocess, as a
    user runs it), with the fixture's settings: both reuse its three cached cases and reproduce its numbers."""
    import fire

    from scripts.robustness_card import main

    root, out = zoo["root"], zoo["out"]
    args = ["--bundle_root", str(root), "--datalist", str(zoo["datalist"]), "--output_dir", str(out),
            "--eps", "[0.02,0.08]", "--sigmas", "[0.25]", "--n0", "4", "--n", "64", "--steps", "2", "--seed", "3",
            "--ensemble_steps", "2"]
    (out / "card.json").unlink()
    assert fire.Fire(main, command=args) == str(out / "card.html")
    cards = {"fire": json.loads((out / "card.json").read_text())}
    (out / "card.json").unlink()
    config = str(REPO / "scripts" / "robustness_card.json")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config,
           "--meta_file", str(root / "configs" / "metadata.json"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert f"robustness card: {out / 'card.html'}" in proc.stdout
    cards["bundle"] = json.loads((out / "card.json").read_text())
    for name, card in cards.items():
        assert (card["cache"]["reused_cases"], card["cache"]["computed_cases"]) == (3, 0), name
        assert card["attacks"] == zoo["card"]["attacks"] and card["certification"] == zoo["card"]["certification"]


def test_card_on_a_brats_like_sigmoid_bundle_matches_direct_calls(tmp_path):
    """The whole card on the zoo-style BraTS bundle (SegResNet, 4 modalities, sigmoid TC / WT / ET with
    overlapping label sets): clean Dice and HD95 per region equal MONAI's inferer + sigmoid > 0.5 against
    ``ConvertToMultiChannelBasedOnBratsClasses``; certification is per channel (a direct ``certify`` of
    the channel's two-class logits (0, z_c)); the cache key covers every modality file."""
    from monai.metrics import compute_hausdorff_distance
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    from test_card_zoo_bundles import _brats_bundle, _oracle

    root, datalist, state = _brats_bundle(tmp_path)
    spacing = [1.5, 1.5, 2.0]  # anisotropic voxels: HD95 in mm differs from HD95 in voxels
    for case in read_datalist(datalist)[0]:
        for f in case.files:
            img = nib.load(str(f))
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([*spacing, 1.0])), str(f))
    regions = [[1, 4], [1, 2, 4], [4]]
    out = tmp_path / "card"
    kw = dict(eps=[0.02], sigmas=[0.25], n0=2, n=8, steps=1, seed=0, progress=False, budget="quick",
              label_values=regions, output_dir=out)
    run_card(root, datalist, **kw)
    card = json.loads((out / "card.json").read_text())
    names = ["Tumor core", "Whole tumor", "Enhancing tumor"]
    assert card["bundle"]["output"] == "sigmoid" and card["bundle"]["class_names"] == names
    assert card["settings"]["budget"]["attacks"] == ["FGSM-ce", "IFGSM-ce", "IFGSM-dice"]
    assert card["masking"]["checks"] and set(card["headline"]["eps"][0]["mean"]) == set(names)
    net, inferer = _oracle(root, "inference.json", state)
    bundle = read_bundle(root, label_values=regions)
    assert card["settings"]["spacing"] == spacing
    hds = []
    for i, case in enumerate(read_datalist(datalist)[0]):
        x, y = load_case(bundle, case)
        raw = torch.as_tensor(nib.load(str(case.label)).get_fdata())
        truth = ConvertToMultiChannelBasedOnBratsClasses()(raw).bool()[None]
        with torch.no_grad():
            logits = inferer(x, net).as_subclass(torch.Tensor)
        pred = logits > 0
        hd = compute_hausdorff_distance(pred.float(), truth.float(), include_background=True, percentile=95,
                                        spacing=spacing)[0]
        hds.append(hd.numpy())
        for c, name in enumerate(names):
            p, g = pred[0, c].numpy(), truth[0, c].numpy()
            dice = 1.0 if not (p.any() or g.any()) else 2.0 * (p & g).sum() / (p.sum() + g.sum())
            assert card["clean"]["per_case"][case.case_id][name] == pytest.approx(dice, abs=1e-6)
        worst = card["headline"]["eps"][0]["per_case"][case.case_id]
        assert worst["attack"] in card["settings"]["budget"]["attacks"]
        if i:
            continue
        # certification per channel with the card's generator, as the engine draws it (first case)
        gen = part_generator(0, case.case_id, cert_part(0.25))
        sigma = 0.25 * (card["units"]["input_range"][1] - card["units"]["input_range"][0])
        certs = [certify(lambda z, c=c: torch.cat([torch.zeros_like(bundle.forward(z)[:, c:c + 1]),
                                                    bundle.forward(z)[:, c:c + 1]], 1),
                         x, sigma, n0=2, n=8, alpha=0.001, tau=0.75, correction="holm", batch_size=8, generator=gen)
                 for c in range(3)]
        abstained = np.mean([float(ct.abstained_fraction.mean()) for ct in certs])
        assert card["certification"][0]["per_case"][case.case_id]["abstain_fraction"] == pytest.approx(abstained)
    for c, name in enumerate(names):  # median over cases, in mm; null when infinite (an empty prediction)
        median = float(np.median([h[c] for h in hds]))
        got = card["headline"]["clean"]["hd95_median"][name]
        assert (got is None and not np.isfinite(median)) or got == pytest.approx(median, abs=1e-5)
    # the cache key hashes every modality file: changing the FLAIR file of one case recomputes that case
    flair = read_datalist(datalist)[0][0].images[3]
    img = nib.load(str(flair))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1.0, img.affine), str(flair))
    run_card(root, datalist, **kw, masking_check=False)
    assert json.loads((out / "card.json").read_text())["cache"]["reused_cases"] == 1


def _schema_paths() -> list[str]:
    """Every backticked key path of the "Keys" list in docs/card_schema.md."""
    import re

    text = (REPO / "docs" / "card_schema.md").read_text().split("## Keys", 1)[1]
    paths = []
    for line in text.splitlines():
        if line.startswith("- "):
            head = line.split(" — ", 1)[0]
            paths += [p for p in re.findall(r"`([a-z0-9_.\[\]]+)`", head) if not p.isdigit() and p != "null"]
    return paths


def _has(obj, parts: list[str]) -> bool:
    if not parts:
        return True
    key, rest = parts[0], parts[1:]
    if key.endswith("[]"):
        items = obj.get(key[:-2]) if isinstance(obj, dict) else None
        return isinstance(items, list) and all(_has(i, rest) for i in items)
    return isinstance(obj, dict) and key in obj and (not rest or obj[key] is None or _has(obj[key], rest))


def test_card_json_follows_docs_card_schema(zoo):
    """A card written by the runner has every key docs/card_schema.md lists, and the doc lists every
    top-level key of the card."""
    card, paths = zoo["card"], _schema_paths()
    assert len(paths) > 60
    missing = [p for p in paths if not _has(card, p.replace("[].", "[]\0").replace(".", "\0").split("\0"))]
    assert missing == []
    assert set(card) <= {p.split(".")[0].removesuffix("[]") for p in paths}
    assert card["schema_version"] == 2


def test_compare_puts_two_cards_side_by_side_with_paired_tests(zoo, tmp_path):
    """``compare``: the other card's per-case Dice paired with this card's on the shared case ids only;
    differences and p-values equal scipy's Wilcoxon and statsmodels' Holm on those numbers."""
    other = json.loads((zoo["out"] / "card.json").read_text())
    ids = other["data"]["case_ids"]
    other["data"]["case_ids"] = ids[1:] + ["not_in_this_card"]  # one case not shared
    for k, e in enumerate(other["headline"]["eps"]):
        for j, c in enumerate(ids):
            e["per_case"][c]["dice"]["spleen"] = 0.1 * (j + 1) + 0.01 * k
    path = tmp_path / "other" / "card.json"
    path.parent.mkdir()
    path.write_text(json.dumps(other))
    out = tmp_path / "cmp"
    shutil.copytree(zoo["out"] / ".card_cache", out / ".card_cache")
    run_card(zoo["root"], zoo["datalist"], output_dir=out, compare=path, **FAST)
    card = json.loads((out / "card.json").read_text())
    cmp_ = card["comparison"]
    assert cmp_["shared_cases"] == ids[1:] and cmp_["min_p"] == 2 / 2 ** 2
    rows = [r for r in cmp_["rows"] if r["what"] == "worst-case Dice"]
    assert [r["eps"] for r in rows] == FAST["eps"]
    raw = []
    for k, r in enumerate(rows):
        this = [card["headline"]["eps"][k]["per_case"][c]["dice"]["spleen"] for c in ids[1:]]
        that = [0.1 * (j + 1) + 0.01 * k for j in range(1, len(ids))]
        assert r["difference"] == pytest.approx(np.mean(np.subtract(this, that)), abs=1e-12)
        assert r["p_wilcoxon"] == pytest.approx(wilcoxon(this, that).pvalue, abs=1e-12)
    clean_row = next(r for r in cmp_["rows"] if r["what"] == "clean Dice")
    allp = [clean_row["p_wilcoxon"]] + [r["p_wilcoxon"] for r in rows]
    assert [clean_row["p_adjusted"]] + [r["p_adjusted"] for r in rows] == pytest.approx(
        list(multipletests(allp, method="holm")[1]))
    html = (out / "card.html").read_text()
    assert "Compared with" in html and "Side by side" in html
    with pytest.raises(ValueError, match="compare: .*has no key 'headline'"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"clean": {}}))
        run_card(zoo["root"], zoo["datalist"], output_dir=tmp_path / "x", compare=bad, **FAST)


def test_budget_and_output_options_are_checked_before_any_work(zoo, tmp_path):
    """``budget`` and ``output`` errors name the argument and leave no output folder; each budget's
    attacks, steps and n are those of ``BUDGETS`` (standard: the default WorstCase ensemble)."""
    from common.attacks import DEFAULT_ENSEMBLE

    out = tmp_path / "card"
    for kwargs, words in (({"budget": "huge"}, "budget: expected one of"), ({"output": "relu"}, "output: expected")):
        with pytest.raises(ValueError, match=words):
            run_card(zoo["root"], zoo["datalist"], output_dir=out, **{**FAST, **kwargs})
        assert not out.exists()
    assert BUDGETS["standard"]["ensemble"] == DEFAULT_ENSEMBLE and BUDGETS["quick"]["ensemble"] is None
    assert zoo["card"]["settings"]["budget"] == {"name": "standard", "attacks": ["WorstCase", *BUDGETS["standard"]["attacks"]],
                                                 "steps": FAST["steps"], "n0": FAST["n0"], "n": FAST["n"]}
    members = zoo["card"]["settings"]["attacks"]["WorstCase"]["members"]
    assert [(m["attack"], m["loss"], m["steps"]) for m in members] == [(a, kw["loss"], 2) for a, kw in DEFAULT_ENSEMBLE]
