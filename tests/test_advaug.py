"""Adversarial augmentation (common.defenses.advaug): FGSM / InvFGSM copies, offline files + datalist, online
refresh; the slice set (common.data.slices), the metric history (common.handlers) and Tables 1-2
(common.reporting.advaug_tables) of the unet_advaug bundle."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.data.slices import unwindow, volumes_to_slices
from common.defenses import advaug
from common.defenses.advaug import (
    AdversarialAugmentedDataset,
    OnlineAdversarialAugmentation,
    adversarial_examples,
    augmented_name,
    write_adversarial_dataset,
)
from common.handlers import MetricHistory
from common.io import atomic_write_nifti as write_nifti
from common.reporting.advaug_tables import iou_over_epochs_table, robustness_table
from common.data.datalist import load_datalist, write_datalist

WINDOW = (-100.0, 240.0, 0.0, 1.0)


class MaskedConv(nn.Module):
    """Logits from a 3x3 conv of the input times a fixed mask: zero input gradient where the mask's
    dilation is zero (the first and last two columns), non-zero elsewhere almost surely."""

    def __init__(self, size: int = 12) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        mask = torch.ones(1, 1, size, size)
        mask[..., :, :3] = 0
        mask[..., :, -3:] = 0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.conv(x * self.mask)


def _batch(size=12, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, size, size, generator=g)
    y = (torch.rand(b, 1, size, size, generator=g) > 0.6).long()
    return x, y


def test_linf_equals_eps_where_gradient_nonzero_without_clip():
    model, eps = MaskedConv(), 0.1
    x, y = _batch()
    adv = adversarial_examples(model, x, y, ["fgsm", "invfgsm"], eps, loss="ce", clip=None)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y[:, 0]), [xg])  # the loss of Eq. 1-2
    nonzero = grad != 0
    assert nonzero.any() and (~nonzero).any()
    for name, sign in (("fgsm", 1.0), ("invfgsm", -1.0)):
        delta = adv[name] - x
        assert torch.allclose(delta[nonzero].abs(), torch.full_like(delta[nonzero], eps), atol=1e-6)
        assert torch.equal(adv[name][~nonzero], x[~nonzero])
        assert torch.equal(torch.sign(delta[nonzero]), sign * torch.sign(grad[nonzero]))  # Eq. 1 / Eq. 2


def test_clipping_keeps_range_and_bound():
    model = MaskedConv()
    x, y = _batch()
    adv = adversarial_examples(model, x, y, ["fgsm", "invfgsm"], 0.3, clip=(0.0, 1.0))
    for xa in adv.values():
        assert xa.min() >= 0 and xa.max() <= 1
        assert (xa - x).abs().max() <= 0.3 + 1e-6


def test_fgsm_raises_and_invfgsm_lowers_the_loss_of_the_model_that_made_them():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(1)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 8, 4), act="relu")
    net = net.eval()
    x, y = _batch(size=32, b=4, seed=3)
    adv = adversarial_examples(net, x, y, ["fgsm", "invfgsm"], 0.01, clip=(0.0, 1.0))
    with torch.no_grad():
        loss = {k: float(F.cross_entropy(net(v), y[:, 0])) for k, v in {"clean": x, **adv}.items()}
    assert loss["fgsm"] > loss["clean"] > loss["invfgsm"]


def test_bad_arguments():
    model = MaskedConv()
    x, y = _batch()
    with pytest.raises(ValueError, match="methods"):
        adversarial_examples(model, x, y, ["pgd"], 0.1)
    with pytest.raises(ValueError, match="methods"):
        adversarial_examples(model, x, y, "fgsm", 0.1)
    with pytest.raises(ValueError, match="eps"):
        adversarial_examples(model, x, y, ["fgsm"], -0.1)
    with pytest.raises(ValueError, match="window"):
        unwindow(np.zeros(3), (0.0, 0.0, 0.0, 1.0))
    assert augmented_name(["fgsm", "invfgsm"], 0.1) == "advaug_fgsm+invfgsm_eps0.1"


def test_unwindow_inverts_scale_intensity_range():
    from monai.transforms import ScaleIntensityRange

    hu = np.array([-100.0, 0.0, 70.0, 240.0], dtype=np.float32)
    x = np.asarray(ScaleIntensityRange(*WINDOW, clip=True)(hu))
    np.testing.assert_allclose(unwindow(x, WINDOW), hu, atol=1e-4)


# ------------------------------------------------------------------------------------------ offline
def _slice_set(root: Path, n: int = 4, size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        hu = rng.integers(-200, 300, (size, size)).astype(np.int16)
        lab = (rng.random((size, size)) > 0.7).astype(np.uint8)
        write_nifti(root / "imagesTr" / f"s{i}.nii.gz", hu, np.diag([0.8, 0.8, 1.0, 1.0]))
        write_nifti(root / "labelsTr" / f"s{i}.nii.gz", lab, np.diag([0.8, 0.8, 1.0, 1.0]))
        entries.append({"image": f"imagesTr/s{i}.nii.gz", "label": f"labelsTr/s{i}.nii.gz"})
    sections = {"training": entries[:3], "validation": entries[3:]}
    return write_datalist(root / "datalist.json", sections, numTraining=3)


def _preprocessing():
    from monai.transforms import Compose, EnsureTyped, LoadImaged, ScaleIntensityRanged

    return Compose([
        LoadImaged(["image", "label"], ensure_channel_first=True, image_only=True),
        ScaleIntensityRanged("image", *WINDOW, clip=True),
        EnsureTyped(["image", "label"], dtype=[torch.float32, torch.long]),
    ])


def test_offline_examples_keep_source_masks_and_are_the_attacks(tmp_path):
    datalist = _slice_set(tmp_path)
    model, eps = MaskedConv(), 0.1
    pre = _preprocessing()
    methods = ["fgsm", "invfgsm"]
    out = write_adversarial_dataset(model, datalist, methods, eps, pre, window=WINDOW, batch_size=2)
    assert out == tmp_path / "advaug_fgsm+invfgsm_eps0.1.json"
    body = json.loads(out.read_text())
    train, orig = body["training"], json.loads(datalist.read_text())["training"]
    assert train[:3] == orig and len(train) == 9 and body["numTraining"] == 9
    assert body["validation"] == json.loads(datalist.read_text())["validation"]
    entries = load_datalist(out, "training")  # every referenced file exists
    pre = _preprocessing()
    for k, m in enumerate(["fgsm", "invfgsm"]):
        for i in range(3):
            new = train[3 + 3 * k + i]
            assert new["label"] == orig[i]["label"]  # the ORIGINAL label file
            assert new["image"] == f"advaug_fgsm+invfgsm_eps0.1/imagesTr/{m}_s{i}.nii.gz"
            src, aug = pre(entries[i]), pre(entries[3 + 3 * k + i])
            attack = advaug.METHODS[m](model, eps, clip=(0.0, 1.0))
            expected = attack(src["image"][None], src["label"][None])[0]
            assert torch.allclose(aug["image"], expected, atol=1e-5)
            assert torch.equal(aug["label"], src["label"])
            assert float((aug["image"] - src["image"]).abs().max()) <= eps + 1e-5


def test_offline_rerun_is_byte_identical_and_datalist_atomic(tmp_path, monkeypatch):
    datalist = _slice_set(tmp_path)
    args = (MaskedConv(), datalist, ["fgsm"], 0.1, _preprocessing())
    out = write_adversarial_dataset(*args, window=WINDOW, seed=7)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    first = {p: p.read_bytes() for p in files}
    write_adversarial_dataset(*args, window=WINDOW, seed=7)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == b for p, b in first.items())

    import common.io

    real_replace = common.io.os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(common.io.os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_adversarial_dataset(*args, window=WINDOW, seed=7)
    assert out.read_bytes() == first[out]  # the old datalist is untouched
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_offline_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist"):
        write_adversarial_dataset(MaskedConv(), tmp_path / "none.json", ["fgsm"], 0.1, _preprocessing())
    datalist = _slice_set(tmp_path)
    from monai.transforms import Compose, Resized

    bad = Compose([_preprocessing(), Resized(["image", "label"], (8, 8), mode=["bilinear", "nearest"])])
    with pytest.raises(ValueError, match="preprocessing"):
        write_adversarial_dataset(MaskedConv(8), datalist, ["fgsm"], 0.1, bad)


# ------------------------------------------------------------------------------------------ slices
def test_volumes_to_slices(tmp_path):
    rng = np.random.default_rng(1)
    entries = []
    for i in range(2):
        hu = rng.integers(-500, 500, (6, 5, 7)).astype(np.int16)
        lab = np.zeros((6, 5, 7), np.uint8)
        lab[1:3, 1:4, 2 + i] = 2
        lab[0, 0, :] = 1  # pancreas on every slice: not a lesion
        affine = np.diag([0.8, 0.7, 1.5, 1.0])
        write_nifti(tmp_path / "vol" / "imagesTr" / f"c{i}.nii.gz", hu, affine)
        write_nifti(tmp_path / "vol" / "labelsTr" / f"c{i}.nii.gz", lab, affine)
        entries.append(({"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"}, hu, lab))
    sections = {"training": [entries[0][0]], "test": [entries[1][0]]}
    src = write_datalist(tmp_path / "vol" / "datalist.json", sections)
    out = volumes_to_slices(src, tmp_path / "slices", label_value=2, sections=("training", "test"))
    body = json.loads(out.read_text())
    assert [e["image"] for e in body["training"]] == ["imagesTr/c0_s002.nii.gz"]
    assert [e["image"] for e in body["test"]] == ["imagesTr/c1_s003.nii.gz"]
    for (entry, hu, lab), k, sec in ((entries[0], 2, "training"), (entries[1], 3, "test")):
        img = nib.load(tmp_path / "slices" / body[sec][0]["image"])
        seg = np.asanyarray(nib.load(tmp_path / "slices" / body[sec][0]["label"]).dataobj)
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), hu[:, :, k])
        np.testing.assert_array_equal(seg, (lab[:, :, k] == 2).astype(np.uint8))
        np.testing.assert_allclose(np.diag(img.affine)[:2], [0.8, 0.7])
    with pytest.raises(ValueError, match="no training slice"):
        volumes_to_slices(src, tmp_path / "none", label_value=4, sections=("training",))


# ------------------------------------------------------------------------------------------ online
def test_online_dataset_and_handler():
    from ignite.engine import Engine

    x, y = _batch(b=5)
    items = [{"image": x[i], "label": y[i], "id": i} for i in range(5)]
    ds = AdversarialAugmentedDataset(items, ["fgsm", "invfgsm"])
    assert len(ds) == 15
    assert torch.equal(ds[7]["image"], x[2]) and ds[7]["id"] == 2  # before a refresh: copies = originals
    model = MaskedConv()
    handler = OnlineAdversarialAugmentation(ds, model, eps=0.05, interval=2, batch_size=2)
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    engine.run([0], max_epochs=5)
    assert ds.refreshes == 2  # after epochs 2 and 4
    expected = {m: advaug.METHODS[m](model, 0.05, clip=(0.0, 1.0))(x, y) for m in ("fgsm", "invfgsm")}
    for i in range(5):
        assert torch.equal(ds[i]["image"], x[i])
        for k, m in enumerate(("fgsm", "invfgsm")):
            item = ds[5 * (k + 1) + i]
            assert torch.allclose(item["image"], expected[m][i], atol=1e-6)
            assert torch.equal(item["label"], y[i])  # the source mask
    with pytest.raises(IndexError):
        ds[15]
    with pytest.raises(ValueError, match="dataset"):
        OnlineAdversarialAugmentation(items, model, eps=0.1)


# ------------------------------------------------------------------------------------------ tables
class _State:
    def __init__(self, epoch, metrics):
        self.epoch, self.metrics = epoch, metrics


class _Engine:
    def __init__(self, epoch, metrics):
        self.state = _State(epoch, metrics)


def test_metric_history_and_iou_table(tmp_path):
    for name, values in (("a", [0.1, 0.5, 0.7]), ("b", [0.2, 0.6])):
        h = MetricHistory(tmp_path / name / "h.csv", ["val_mean_iou"])
        for e, v in enumerate(values, 1):
            h(_Engine(e, {"val_mean_iou": v, "other": 0.0}))
    text = (tmp_path / "a" / "h.csv").read_text()
    assert text.splitlines() == ["epoch,val_mean_iou", "1,0.1", "2,0.5", "3,0.7"]
    table = iou_over_epochs_table({"UNet": tmp_path / "a" / "h.csv", "UNet + FGSM": tmp_path / "b" / "h.csv"})
    assert table.splitlines()[0] == "| Model | epoch 1 | epoch 2 |"
    assert "| UNet + FGSM | 0.2000 | 0.6000 |" in table
    with pytest.raises(ValueError, match="metric_names"):
        MetricHistory(tmp_path / "c.csv", ["nope"])(_Engine(1, {"val_mean_iou": 0.1}))


def test_robustness_table():
    def summary(clean, fgsm):
        entries = [{"attack": "clean", "eps_display": 0.0, "mean": {"iou_lesion": clean}}]
        for e, v in fgsm.items():
            entries.append({"attack": "fgsm", "eps_display": e, "mean": {"iou_lesion": v}})
        return {"entries": entries}

    summaries = {"UNet": summary(0.8, {0.1: 0.5}), "UNet + FGSM": summary(0.82, {0.1: 0.7})}
    table = robustness_table(summaries, "fgsm")
    assert table.splitlines()[0] == "| Model (fgsm, ε →) | 0 | 0.1 |"
    assert "| UNet + FGSM | 0.8200 | 0.7000 |" in table
    with pytest.raises(ValueError, match="metric"):  # the pre-unification name is refused, not shown as "-"
        robustness_table(summaries, "fgsm", metric="jaccard_lesion")


def test_volumes_to_slices_crop_keeps_the_lesion(tmp_path):
    hu = np.arange(20 * 20 * 4, dtype=np.int16).reshape(20, 20, 4)
    lab = np.zeros((20, 20, 4), np.uint8)
    lab[13:15, 3:5, 1] = 2
    affine = np.diag([0.8, 0.7, 1.5, 1.0])
    write_nifti(tmp_path / "v" / "imagesTr" / "c.nii.gz", hu, affine)
    write_nifti(tmp_path / "v" / "labelsTr" / "c.nii.gz", lab, affine)
    entry = {"image": "imagesTr/c.nii.gz", "label": "labelsTr/c.nii.gz"}
    src = write_datalist(tmp_path / "v" / "datalist.json", {"training": [entry]})
    out = volumes_to_slices(src, tmp_path / "s", crop_size=(8, 8), sections=("training",), seed=3)
    entry = json.loads(out.read_text())["training"][0]
    img = nib.load(tmp_path / "s" / entry["image"])
    crop = np.asanyarray(img.dataobj)
    seg = np.asanyarray(nib.load(tmp_path / "s" / entry["label"]).dataobj)
    assert crop.shape == (8, 8) and seg.sum() == 4  # the whole lesion is inside the window
    r0, c0 = np.argwhere(hu[:, :, 1] == crop[0, 0])[0]  # where the crop sits in the slice
    np.testing.assert_array_equal(crop, hu[r0 : r0 + 8, c0 : c0 + 8, 1])
    np.testing.assert_array_equal(seg, (lab[r0 : r0 + 8, c0 : c0 + 8, 1] == 2).astype(np.uint8))
    np.testing.assert_allclose(img.affine[:2, 3], [0.8 * r0, 0.7 * c0])  # world position of pixel (0, 0)
    with pytest.raises(ValueError, match="crop_size"):
        volumes_to_slices(src, tmp_path / "t", crop_size=(30, 8), sections=("training",))
