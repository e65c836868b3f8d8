"""End-to-end runs of the ``unet3d_brats_distill`` bundle's configs on tiny brain phantoms (24³ resized to 16³, 5 cases: 2 training, 1 validation, 2 test),
resume from the last checkpoint, the distillation student's loss against the teacher's soft labels
(Eq. 7 evaluated directly in float64), the CLI around ``prepare_brats`` and the study's Table 2 maths."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.stats import wilcoxon

from tests.bundle_run import BUNDLES, REPO, run_bundle

NAME = "unet3d_brats_distill"
BUNDLE = BUNDLES / NAME


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Phantoms + the undefended model trained for one epoch; returns the overrides every run shares."""
    root = tmp_path_factory.mktemp("unet3d_brats")
    overrides = {
        "demo_dir": str(root),
        "phantom_size": [24, 24, 24],  # the phantoms' smallest size; Resized brings them to 16³
        "image_size": [16, 16, 16],
        "phantom_cases": 5,
        "phantom_fractions": [0.4, 0.2, 0.4],
        "max_epochs": 1,
    }
    proc = run_bundle(NAME, ["train.json", "demo.json"], overrides)
    return root, overrides, proc


def _read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _checkpoint(folder: Path, epoch: int) -> dict:
    return torch.load(folder / f"checkpoint_checkpoint_epoch={epoch}.pt", map_location="cpu", weights_only=True)


def _adam_steps(ckpt: dict) -> set[int]:
    return {int(float(s["step"])) for s in ckpt["optimizer"]["state"].values()}


def test_train_then_resume_continues_at_epoch_two(demo):
    root, overrides, first = demo
    models = root / "models" / "unet3d"
    n_train = len(json.loads((root / "data" / "datalist.json").read_text())["training"])
    assert (models / "model.pt").is_file()
    ckpt1 = _checkpoint(models, 1)
    assert ckpt1["trainer"]["iteration"] == n_train and _adam_steps(ckpt1) == {n_train}

    proc = run_bundle(NAME, ["train.json", "demo.json"], {**overrides, "max_epochs": 2, "resume": "True"})
    log = proc.stdout + proc.stderr
    assert re.search(r"Epoch: 2/2, Iter: 1/", log), "epoch 2 did not run"
    assert not re.search(r"Epoch: 1/2, Iter:", log), "epoch 1 ran again after resume"
    ckpt2 = _checkpoint(models, 2)
    assert ckpt2["trainer"]["max_epochs"] == 2 and ckpt2["trainer"]["iteration"] == 2 * n_train
    # Adam's step count continues from the restored state (a fresh optimizer would count n_train).
    assert _adam_steps(ckpt2) == {2 * n_train}


def test_distillation_student_learns_teacher_soft_labels(demo, monkeypatch):
    from monai.bundle import ConfigParser

    from common.handlers import DistillationIteration

    root, overrides, _ = demo
    monkeypatch.chdir(BUNDLE)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in ("train.json", "distill.json", "demo.json")])
    parser.update({"bundle_root": str(BUNDLE), **overrides, "temperature": 20.0,
                   "train#trainer#decollate": False})  # the test reads the raw batch output
    parser.parse()
    torch.manual_seed(0)
    trainer = parser.get_parsed_content("train#trainer")
    update = parser.get_parsed_content("train#iteration_update")
    teacher = parser.get_parsed_content("teacher#network")
    student = parser.get_parsed_content("network")
    assert isinstance(update, DistillationIteration) and update.teacher is teacher and teacher is not student
    assert parser.get_parsed_content("teacher#loss").temperature == 20.0
    assert parser.get_parsed_content("max_epochs") == 1  # demo shrinks the paper's 400 epochs
    assert parser.get_parsed_content("distill_max_epochs") == 400
    assert parser.get_parsed_content("distill_learning_rate") == 5e-4

    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    out = update(trainer, batch)
    x, pred = out["image"], out["pred"].detach().double()
    with torch.no_grad():
        q = torch.softmax(teacher.eval()(x).double() / 20.0, dim=1)  # Eq. 4, teacher soft labels
    p = torch.softmax(pred / 20.0, dim=1)  # student at the same T
    gamma, n = 1e-5, p.shape[1]
    dims = tuple(range(2, p.ndim))
    ratio = (2 * (p * q).sum(dims) + gamma) / (p.sum(dims) + q.sum(dims) + gamma)  # Eq. 7 per class
    expected = 1 - (ratio[:, 1:].sum(1) / n).mean()
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    y = torch.nn.functional.one_hot(out["label"][:, 0].long(), n).movedim(-1, 1).double()
    vs_truth = 1 - ((2 * (p * y).sum(dims) + gamma) / (p.sum(dims) + y.sum(dims) + gamma))[:, 1:].sum(1).mean() / n
    assert abs(float(vs_truth) - float(expected)) > 1e-3  # it is not the ground-truth loss


def test_distill_adv_noise_configs_train_end_to_end(demo):
    root, overrides, _ = demo
    run_bundle(NAME, ["train.json", "distill.json", "demo.json"], {**overrides, "temperature": 20})
    run_bundle(NAME, ["train.json", "adv_train.json", "demo.json"], overrides)
    run_bundle(NAME, ["train.json", "noise_aug.json", "demo.json"], overrides)
    models = root / "models"
    teacher = torch.load(models / "distill_T20" / "teacher" / "model.pt", map_location="cpu", weights_only=True)
    assert float(teacher["temperature"]) == 20.0
    for run in ("distill_T20", "adv_train_eps0.05", "noise_aug"):
        state = torch.load(models / run / "model.pt", map_location="cpu", weights_only=True)["model"]
        assert state["encoder.0.entry.conv.weight"].shape == (4, 4, 3, 3, 3)
        assert _adam_steps(_checkpoint(models / run, 1)) == {2}
    student = torch.load(models / "distill_T20" / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert any(not torch.equal(student[k], teacher["model"][k]) for k in student)


def test_train_2d_and_slicewise_inference(demo):
    root, overrides, _ = demo
    run_bundle(NAME, ["train.json", "train_2d.json", "demo.json"], overrides)
    state = torch.load(root / "models" / "unet2d" / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert state["encoder.0.entry.conv.weight"].shape == (4, 4, 3, 3)  # 2D kernels
    ckpt = _checkpoint(root / "models" / "unet2d", 1)
    # batch 64 of axial slices: 2 training volumes x 16 slices = 32 slices -> one iteration
    assert ckpt["trainer"]["iteration"] == 1
    run_bundle(NAME, ["inference.json", "inference_2d.json", "demo.json"], {k: overrides[k] for k in ("demo_dir", "image_size", "phantom_size")})
    masks = sorted((root / "eval" / "unet2d" / "masks").glob("*_seg.nii.gz"))
    assert len(masks) == 2
    mask = np.asarray(nib.load(masks[0]).dataobj)
    assert mask.shape == (24, 24, 24) and set(np.unique(mask)) <= {0, 1, 2, 4}


def test_attack_table1_and_ifgsm_steps(demo):
    root, overrides, _ = demo
    run_bundle(NAME, ["train.json", "attack.json", "demo.json"], overrides)
    out = root / "eval" / "unet3d" / "attack"
    summary = json.loads((out / "summary.json").read_text())
    assert [(e["attack"], e["eps"]) for e in summary["entries"]] == [
        ("clean", 0.0), ("fgsm", 0.05), ("ifgsm", 0.05), ("ti_fgsm", 0.05)
    ]
    assert {"dice_WT", "dice_TC", "dice_ET", "psnr", "ssim", "rmse"} <= set(summary["metrics"])
    assert summary["correction"] == "bonferroni"
    rows = [r for r in _read_rows(out / "per_case.csv") if r["attack"] != "clean"]
    for r in rows:  # PSNR of inputs in [0, 1] is -20 log10(RMSE); FGSM moves no voxel by more than eps
        rmse = float(r["rmse"])
        assert 0 < rmse <= 0.05 + 1e-6
        assert float(r["psnr"]) == pytest.approx(-20 * math.log10(rmse), abs=1e-3)
    assert (out / "summary.md").read_text().count("| fgsm |") == 1

    run_bundle(NAME, ["train.json", "attack.json", "ifgsm_steps.json", "demo.json"], overrides)
    steps = json.loads((root / "eval" / "unet3d" / "ifgsm_steps" / "summary.json").read_text())
    names = [e["attack"] for e in steps["entries"]]
    assert names == ["clean"] + [f"{k}_{n}" for k in ("ifgsm", "ti_fgsm") for n in (1, 2, 5, 10)]
    one = next(e for e in steps["entries"] if e["attack"] == "ifgsm_1")
    fgsm = next(e for e in summary["entries"] if e["attack"] == "fgsm")
    # one i-FGSM step with alpha = eps / 1 is FGSM: identical perturbation metrics
    assert one["mean"]["rmse"] == pytest.approx(fgsm["mean"]["rmse"], rel=1e-5)


def test_defense_sweep_evaluate_and_inference(demo):
    root, overrides, _ = demo
    run_bundle(NAME, ["train.json", "noise_aug.json", "attack.json", "defense_sweep.json", "demo.json"], overrides)
    summary = json.loads((root / "eval" / "noise_aug" / "defense_sweep" / "summary.json").read_text())
    eps = [e["eps"] for e in summary["entries"]]
    assert eps == pytest.approx([0.0] + [0.001 * i for i in range(1, 11)] + [0.05, 0.1])
    assert {e["attack"] for e in summary["entries"][1:]} == {"fgsm"}

    run_bundle(NAME, ["train.json", "evaluate.json", "demo.json"], overrides)
    rows = _read_rows(root / "eval" / "unet3d" / "evaluate" / "per_case.csv")
    assert len(rows) == 2 and {"dice_WT", "dice_TC", "dice_ET"} <= set(rows[0])

    run_bundle(NAME, ["inference.json", "demo.json"], {k: overrides[k] for k in ("demo_dir", "image_size", "phantom_size")})
    masks = sorted((root / "eval" / "unet3d" / "masks").glob("*_seg.nii.gz"))
    tests = [d["image"] for d in json.loads((root / "data" / "datalist.json").read_text())["test"]]
    assert [m.name for m in masks] == sorted(Path(t).name.replace(".nii.gz", "_seg.nii.gz") for t in tests)
    test_case = tests[0]
    mask = nib.load(masks[0].parent / Path(test_case).name.replace(".nii.gz", "_seg.nii.gz"))
    assert mask.shape == (24, 24, 24) and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 4}
    # the network's prediction on the 16³ input, mapped 3 -> 4 and inverted (nearest) to 24³, was written
    from common.checkpoint import load_weights
    from common.networks.unet_brats import UNetBraTS, index_to_brats

    net = load_weights(UNetBraTS(3, 4, 4, base_filters=4, depth=3, seg_levels=2), root / "models" / "unet3d" / "model.pt")
    image = np.asarray(nib.load(root / "data" / test_case).dataobj, dtype=np.float32)  # (X, Y, Z, 4)
    x = torch.from_numpy(np.moveaxis(image, -1, 0))[None]
    lo = x.amin(dim=(2, 3, 4), keepdim=True)
    x = (x - lo) / (x.amax(dim=(2, 3, 4), keepdim=True) - lo)
    x = torch.nn.functional.interpolate(x, size=(16, 16, 16), mode="trilinear")
    with torch.no_grad():
        pred = net(x).argmax(1, keepdim=True).float()
    pred = torch.nn.functional.interpolate(pred, size=(24, 24, 24), mode="nearest")[0, 0].long()
    expected = index_to_brats(pred).numpy()
    assert np.mean(expected == np.asarray(mask.dataobj)) > 0.98


def test_prepare_brats_cli(tmp_path):
    import subprocess

    root = tmp_path / "BraTS" / "HGG" / "Brats17_X_1_1"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    affine = np.eye(4)
    for m in ("t1", "t1ce", "t2", "flair"):
        nib.save(nib.Nifti1Image(rng.random((12, 12, 10), dtype=np.float32) + 1, affine), root / f"Brats17_X_1_1_{m}.nii.gz")
    seg = np.zeros((12, 12, 10), np.uint8)
    seg[4:8, 4:8, 3:6] = 2
    seg[5:7, 5:7, 4] = 4
    nib.save(nib.Nifti1Image(seg, affine), root / "Brats17_X_1_1_seg.nii.gz")
    out = tmp_path / "prepared"
    base = [sys.executable, "-m", "scripts.prepare_brats", "--root", str(tmp_path / "BraTS"), "--out_dir", str(out),
            "--n4", "False", "--test_fraction", "0", "--val_fraction", "0"]
    proc = subprocess.run([*base, "--size", "8,8,8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    datalist = json.loads((out / "datalist.json").read_text())
    assert [Path(d["image"]).name for d in datalist["training"]] == ["Brats17_X_1_1.nii.gz"]
    image = nib.load(out / "imagesTr" / "Brats17_X_1_1.nii.gz")
    assert image.shape == (8, 8, 8, 4)
    bad = subprocess.run([*base, "--size", "8,8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "size" in bad.stderr


def test_study_defence_table_against_scipy():
    from scripts.study_unet3d_brats import defence_table

    rng = np.random.default_rng(3)
    base = {("clean", 0.0): None, ("fgsm", 0.05): None, ("fgsm", 0.1): None}
    models = {}
    for shift, name in ((0.0, "No defense"), (0.1, "A"), (0.02, "B")):
        models[name] = {
            k: {"case_id": [f"c{i}" for i in range(8)], **{f"dice_{r}": np.clip(rng.random(8) * 0.5 + shift * j, 0, 1)
                for r in ("WT", "TC", "ET")}}
            for j, k in enumerate(base)
        }
    rows, md = defence_table(models)
    assert len(rows) == 9 and md.count("\n| ") == 10  # header + 9 rows
    row = next(r for r in rows if r["region"] == "TC" and r["defence"] == "A")
    a, ref = models["A"][("fgsm", 0.05)]["dice_TC"], models["No defense"][("fgsm", 0.05)]["dice_TC"]
    p = wilcoxon(a, ref).pvalue
    assert row["p_0.05"] == pytest.approx(p) and row["p_bonferroni_0.05"] == pytest.approx(min(1, 2 * p))
    assert row["dice_0.05"] == pytest.approx(a.mean()) and row["sd_0.05"] == pytest.approx(a.std(ddof=1))
    with pytest.raises(ValueError, match="reference"):
        defence_table({"A": models["A"]})
