"""Oracles for common.metrics: hand-computed Dice / IoU, BraTS regions, scipy surface distances, closed-form
PSNR / RMSE / SSIM, case ids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scipy import ndimage

from common.metrics import (
    BRATS_REGIONS,
    case_id,
    labels_to_regions,
    perturbation_scores,
    segmentation_scores,
    surface_scores,
)


def _map(*rows) -> torch.Tensor:
    """A (1, 1, H, W) int64 label map from nested lists."""
    return torch.tensor(rows, dtype=torch.long)[None, None]


def test_brats_regions_mapping_is_the_papers():
    assert BRATS_REGIONS == {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}


def test_labels_to_regions_all_brats_labels():
    label = _map([0, 1, 2, 4])
    masks = labels_to_regions(label, BRATS_REGIONS)
    assert masks.dtype == torch.bool and masks.shape == (1, 3, 1, 4)
    expected = {  # label -> (WT, TC, ET)
        0: (False, False, False),
        1: (True, True, False),
        2: (True, False, False),
        4: (True, True, True),
    }
    for col, lab in enumerate([0, 1, 2, 4]):
        assert tuple(masks[0, :, 0, col].tolist()) == expected[lab]


def test_labels_to_regions_3d_batch():
    label = torch.tensor([0, 1, 2, 4, 3]).reshape(1, 1, 5, 1, 1).repeat(2, 1, 1, 2, 1)
    masks = labels_to_regions(label, {"A": [3], "B": [2, 3]})
    assert masks.shape == (2, 2, 5, 2, 1)
    assert masks[:, 0].sum() == 2 * 2 and masks[:, 1].sum() == 2 * 2 * 2
    assert bool(masks[:, 0, 4].all()) and not bool(masks[:, 0, :4].any())


def test_dice_iou_hand_computed_with_empty_class_conventions():
    # classes: 1 present in both (overlap 2 of |P|=3, |G|=3); 2 in gt only; 3 predicted only (absent in gt);
    # 4 absent from both.
    label = _map([1, 1, 1, 2], [0, 0, 0, 0])
    pred = _map([1, 1, 0, 0], [1, 3, 0, 0])
    s = segmentation_scores(pred, label, num_classes=5)
    assert s["dice_1"].item() == pytest.approx(2 * 2 / (3 + 3))
    assert s["iou_1"].item() == pytest.approx(2 / 4)
    assert s["dice_2"].item() == 0.0 and s["iou_2"].item() == 0.0
    assert s["dice_3"].item() == 0.0 and s["iou_3"].item() == 0.0  # empty gt, non-empty pred -> 0
    assert s["dice_4"].item() == 1.0 and s["iou_4"].item() == 1.0  # empty gt, empty pred -> 1
    assert s["dice_mean"].item() == pytest.approx((2 / 3 + 0 + 0 + 1) / 4)
    assert s["iou_mean"].item() == pytest.approx((0.5 + 0 + 0 + 1) / 4)
    assert "dice_0" not in s
    assert list(s) == [f"dice_{c}" for c in range(1, 5)] + [f"iou_{c}" for c in range(1, 5)] + [
        "dice_mean",
        "iou_mean",
    ]


def test_include_background_and_class_names_per_case():
    label = torch.stack([_map([0, 1], [1, 1])[0], _map([0, 0], [0, 1])[0]])  # (2, 1, 2, 2)
    pred = torch.stack([_map([0, 1], [1, 0])[0], _map([0, 0], [0, 0])[0]])
    s = segmentation_scores(pred, label, 2, include_background=True, class_names=["bg", "lung"])
    # case 0: bg |P|=2 |G|=1 overlap 1 -> 2/3; lung |P|=2 |G|=3 overlap 2 -> 4/5
    # case 1: bg |P|=4 |G|=3 overlap 3 -> 6/7; lung |P|=0 |G|=1 -> 0
    assert torch.allclose(s["dice_bg"], torch.tensor([2 / 3, 6 / 7], dtype=torch.float64))
    assert torch.allclose(s["dice_lung"], torch.tensor([4 / 5, 0.0], dtype=torch.float64))
    assert torch.allclose(s["iou_bg"], torch.tensor([1 / 2, 3 / 4], dtype=torch.float64))
    assert torch.allclose(s["dice_mean"], torch.tensor([(2 / 3 + 4 / 5) / 2, 3 / 7], dtype=torch.float64))
    fg_only = segmentation_scores(pred, label, 2, class_names=["lung"])
    assert set(fg_only) == {"dice_lung", "iou_lung", "dice_mean", "iou_mean"}


def test_brats_region_scores_hand_computed():
    label = _map([0, 1, 2, 4], [4, 4, 2, 0])
    pred = _map([2, 4, 2, 4], [4, 1, 0, 0])
    s = segmentation_scores(pred, label, num_classes=5, regions=BRATS_REGIONS)
    # WT: gt {1,2,4,4,4,2} = 6 voxels, pred non-zero 6 voxels, overlap 5 (pred (0,0)=2 is on gt 0)
    assert s["dice_WT"].item() == pytest.approx(2 * 5 / 12)
    assert s["iou_WT"].item() == pytest.approx(5 / 7)
    # TC: gt {1,4,4,4} at (0,1),(0,3),(1,0),(1,1); pred {4,4,4,1} at (0,1),(0,3),(1,0),(1,1): all overlap
    assert s["dice_TC"].item() == pytest.approx(1.0)
    # ET: gt at (0,3),(1,0),(1,1); pred at (0,1),(0,3),(1,0): overlap 2
    assert s["dice_ET"].item() == pytest.approx(2 * 2 / 6)
    assert s["iou_ET"].item() == pytest.approx(2 / 4)
    assert s["dice_mean"].item() == pytest.approx((10 / 12 + 1 + 4 / 6) / 3)
    # A label-2-only map: WT only, so TC and ET are empty in gt and pred -> 1.0 by convention.
    only_oedema = _map([2, 0])
    s2 = segmentation_scores(only_oedema, only_oedema, 5, regions=BRATS_REGIONS)
    assert [s2[f"dice_{r}"].item() for r in ("WT", "TC", "ET")] == [1.0, 1.0, 1.0]
    single = segmentation_scores(pred, label, 5, regions={"ET": [4]})
    assert single["dice_ET"].item() == pytest.approx(2 / 3)


def test_segmentation_scores_3d_matches_formula():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 4, 5, 6), generator=g)
    pred = torch.randint(0, 3, (2, 1, 4, 5, 6), generator=g)
    s = segmentation_scores(pred, label, 3)
    for c in (1, 2):
        p, t = (pred == c).flatten(1).double(), (label == c).flatten(1).double()
        inter = (p * t).sum(1)
        assert torch.allclose(s[f"dice_{c}"].double(), 2 * inter / (p.sum(1) + t.sum(1)), atol=1e-6)
        assert torch.allclose(s[f"iou_{c}"].double(), inter / (p.sum(1) + t.sum(1) - inter), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pred=torch.zeros(1, 1, 3, 3), label=torch.zeros(1, 1, 3, 4)), "pred"),
        (dict(pred=torch.zeros(1, 1, 3, 3), label=torch.full((1, 1, 3, 3), 3.0)), "label"),
        (dict(pred=torch.full((1, 1, 3, 3), float("nan")), label=torch.zeros(1, 1, 3, 3)), "pred"),
        (dict(pred=torch.zeros(1, 1, 3, 3), label=torch.zeros(1, 1, 3, 3), regions={"X": [7]}), "regions"),
        (dict(pred=torch.zeros(1, 1, 3, 3), label=torch.zeros(1, 1, 3, 3), class_names=["a"]), "class_names"),
        (dict(pred=torch.zeros(1, 1, 3, 3), label=torch.zeros(1, 1, 3, 3), num_classes=0), "num_classes"),
    ],
)
def test_segmentation_scores_bad_input(kwargs, match):
    kwargs = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        segmentation_scores(**kwargs)


def test_psnr_rmse_closed_form_2d_and_3d():
    rng = np.random.default_rng(1)
    for shape, data_range in (((2, 1, 16, 12), 1.0), ((2, 2, 6, 7, 8), 255.0)):
        x = rng.random(shape) * data_range
        x_adv = np.clip(x + rng.choice([-1.0, 1.0], size=shape) * 0.03 * data_range, 0, data_range)
        s = perturbation_scores(torch.tensor(x_adv).float(), torch.tensor(x).float(), data_range)
        x32, xa32 = x.astype(np.float32).astype(np.float64), x_adv.astype(np.float32).astype(np.float64)
        mse = ((xa32 - x32) ** 2).reshape(shape[0], -1).mean(1)
        np.testing.assert_allclose(s["rmse"].numpy(), np.sqrt(mse), rtol=1e-9)
        psnr = 20 * np.log10(data_range) - 10 * np.log10(mse)
        np.testing.assert_allclose(s["psnr"].numpy(), psnr, rtol=1e-9)
        assert s["ssim"].shape == (shape[0],) and bool(((s["ssim"] > 0) & (s["ssim"] < 1)).all())


def test_ssim_small_image_matches_gaussian_window_formula():
    """A 5×5 image: the window shrinks to 5×5 (one position); oracle = Wang et al.'s formula in float64."""
    rng = np.random.default_rng(2)
    x = rng.random((1, 1, 5, 5))
    x_adv = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    g = np.exp(-((np.arange(5) - 2.0) ** 2) / (2 * 1.5**2))
    g /= g.sum()
    w = np.outer(g, g)
    a, b = x_adv[0, 0], x[0, 0]
    mu_a, mu_b = (w * a).sum(), (w * b).sum()
    va, vb = (w * a * a).sum() - mu_a**2, (w * b * b).sum() - mu_b**2
    cov = (w * a * b).sum() - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    s = perturbation_scores(torch.tensor(x_adv), torch.tensor(x), 1.0)
    assert s["ssim"].item() == pytest.approx(expected, abs=1e-5)


def test_unchanged_input_and_tiny_volume():
    x = torch.rand(3, 1, 4, 3, 2)  # smaller than SSIM's 11 window on every axis
    s = perturbation_scores(x.clone(), x)
    assert torch.isinf(s["psnr"]).all() and (s["psnr"] > 0).all()
    assert torch.equal(s["ssim"], torch.ones(3, dtype=torch.float64))
    assert torch.equal(s["rmse"], torch.zeros(3, dtype=torch.float64))
    moved = perturbation_scores((x + 0.01).clamp(0, 1), x)
    assert torch.isfinite(moved["psnr"]).all() and bool((moved["ssim"] < 1).all())


@pytest.mark.parametrize(
    "x_adv, x, data_range, match",
    [
        (torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), 1.0, "x_adv"),
        (torch.full((1, 1, 4, 4), math.nan), torch.zeros(1, 1, 4, 4), 1.0, "x_adv"),
        (torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), math.inf), 1.0, "^x:"),
        (torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), 0.0, "data_range"),
    ],
)
def test_perturbation_scores_bad_input(x_adv, x, data_range, match):
    with pytest.raises(ValueError, match=match):
        perturbation_scores(x_adv, x, data_range)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("/data/imagesTr/case_001.nii.gz", "case_001"),
        ("case_001.NII.GZ", "case_001"),
        ("img.nii", "img"),
        ("a/b/slice.png", "slice"),
        ("v.mha", "v"),
        ("v.nrrd", "v"),
        ("x.jpg", "x"),
        ("arr.npz", "arr"),
        ("scan.dcm", "scan"),
        ("series_dir/", "series_dir"),
        ("name.with.dots.nii.gz", "name.with.dots"),
        ({"filename_or_obj": ["/d/c7.nii.gz"]}, "c7"),
    ],
)
def test_case_id_strips_image_suffixes(source, expected):
    assert case_id(source) == expected


def test_case_id_from_metatensor_and_bad_input():
    from monai.data import MetaTensor

    assert case_id(MetaTensor(torch.zeros(1), meta={"filename_or_obj": "/x/lung_3.png"})) == "lung_3"
    for bad in (None, 3, {"spacing": 1}, ["a.png", "b.png"]):
        with pytest.raises(ValueError, match="source"):
            case_id(bad)


def test_ignore_mask_removes_pixels_from_both_maps():
    rng = np.random.default_rng(3)
    label = torch.tensor(rng.integers(0, 3, (2, 1, 6, 7)))
    pred = torch.tensor(rng.integers(0, 3, (2, 1, 6, 7)))
    ignore = torch.tensor(rng.random((2, 1, 6, 7)) < 0.3)
    s = segmentation_scores(pred, label, 3, ignore=ignore)
    keep = ~ignore.numpy()
    for c in (1, 2):
        p, t = (pred.numpy() == c) & keep, (label.numpy() == c) & keep
        inter = (p & t).reshape(2, -1).sum(1)
        ps, ts = p.reshape(2, -1).sum(1), t.reshape(2, -1).sum(1)
        np.testing.assert_allclose(s[f"dice_{c}"].numpy(), 2 * inter / (ps + ts))
        np.testing.assert_allclose(s[f"iou_{c}"].numpy(), inter / (ps + ts - inter))
    # a class only inside the ignored pixels is absent from both after removal -> 1 (the empty-class rule)
    lab, prd = _map([0, 1]), _map([0, 0])
    only = segmentation_scores(prd, lab, 2, ignore=torch.tensor([[[[False, True]]]]))
    assert only["dice_1"].item() == 1.0 and only["iou_1"].item() == 1.0
    with pytest.raises(ValueError, match="ignore"):
        segmentation_scores(pred, label, 3, ignore=ignore.float())


def test_multilabel_sigmoid_masks_per_channel():
    # BraTS-like overlapping channels: TC, WT, ET as 3 binary masks
    rng = np.random.default_rng(4)
    label = torch.tensor(rng.random((2, 3, 5, 4, 3)) < 0.4).long()
    pred = torch.tensor(rng.random((2, 3, 5, 4, 3)) < 0.4).long()
    s = segmentation_scores(pred, label, 3, multilabel=True, class_names=["TC", "WT", "ET"])
    for k, name in enumerate(["TC", "WT", "ET"]):
        p, t = pred[:, k].reshape(2, -1).numpy(), label[:, k].reshape(2, -1).numpy()
        inter = (p * t).sum(1)
        np.testing.assert_allclose(s[f"dice_{name}"].numpy(), 2 * inter / (p.sum(1) + t.sum(1)))
    assert list(s)[:3] == ["dice_TC", "dice_WT", "dice_ET"]
    with pytest.raises(ValueError, match="pred"):
        segmentation_scores(pred[:, :2], label, 3, multilabel=True)
    with pytest.raises(ValueError, match="binary"):
        segmentation_scores(pred * 2, label, 3, multilabel=True)


def _surface_oracle(p: np.ndarray, t: np.ndarray, tol: float) -> tuple[float, float]:
    """HD95 and NSD from scipy: border pixels (mask minus its erosion), Euclidean distance transforms."""
    edge = lambda m: m & ~ndimage.binary_erosion(m, border_value=0)  # noqa: E731
    ep, et = edge(p), edge(t)
    d_pt = ndimage.distance_transform_edt(~et)[ep]
    d_tp = ndimage.distance_transform_edt(~ep)[et]
    hd95 = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    nsd = ((d_pt <= tol).sum() + (d_tp <= tol).sum()) / (d_pt.size + d_tp.size)
    return hd95, nsd


def test_hd95_and_nsd_match_scipy_and_follow_the_empty_rule():
    t = np.zeros((16, 16), bool)
    t[3:10, 4:12] = True
    p = np.zeros((16, 16), bool)
    p[5:13, 2:9] = True
    p[14, 14] = True  # a far-away false positive
    pred = torch.tensor(np.stack([p, np.zeros_like(p), p]))[None]
    truth = torch.tensor(np.stack([t, np.zeros_like(t), np.zeros_like(t)]))[None]
    s = surface_scores(pred, truth, ["a", "empty", "fp"], tolerance=2.0)
    hd95, nsd = _surface_oracle(p, t, 2.0)
    assert s["hd95_a"].item() == pytest.approx(hd95, rel=1e-5)
    assert s["nsd_a"].item() == pytest.approx(nsd, rel=1e-6)
    assert s["hd95_empty"].item() == 0.0 and s["nsd_empty"].item() == 1.0
    assert math.isinf(s["hd95_fp"].item()) and s["nsd_fp"].item() == 0.0
    both = segmentation_scores(_map(*p.astype(int).tolist()), _map(*t.astype(int).tolist()), 2, surface=True,
                               tolerance=2.0)
    assert both["hd95_1"].item() == pytest.approx(hd95, rel=1e-5) and "nsd_mean" in both
