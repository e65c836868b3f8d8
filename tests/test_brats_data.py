"""BraTS 2017 preparation: discovery, N4, resize + standardisation, split, datalist, failure cleanup."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from common.data.brats import (
    BRATS_MODALITIES,
    discover_brats_cases,
    load_brats_case,
    n4_bias_correct,
    prepare_brats,
)
from common.data.datalist import load_datalist, split_cases

SHAPE = (24, 24, 16)
ZOOMS = (1.0, 1.0, 1.5)


def _grid(shape=SHAPE):
    return np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")


def _phantom(seed: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Modalities (4, *shape) with a multiplicative bias field, label with {0,1,2,4}, brain mask."""
    rng = np.random.default_rng(seed)
    g = _grid(shape)
    r2 = g[0] ** 2 + g[1] ** 2 + g[2] ** 2
    brain = r2 < 0.8
    c = 0.15 * rng.uniform(-1, 1, 3)  # tumour centre
    t2 = (g[0] - c[0]) ** 2 + (g[1] - c[1]) ** 2 + (g[2] - c[2]) ** 2
    label = np.zeros(shape, np.uint8)
    label[t2 < 0.25] = 2
    label[t2 < 0.12] = 4
    label[t2 < 0.04] = 1
    bias = np.exp(0.3 * g[0] + 0.2 * g[1] - 0.15 * g[2] ** 2)
    images = []
    for k in range(4):
        contrast = np.array([100.0, 140.0, 60.0, 200.0])[k] + np.array([0, 30, -20, 50])[k] * (label > 0)
        vol = np.where(brain, contrast + rng.normal(0, 2, shape), 0.0) * bias
        images.append(vol.astype(np.float32))
    return np.stack(images), label, brain


def _write_case(folder: Path, case_id: str, seed: int) -> dict:
    images, label, brain = _phantom(seed)
    case_dir = folder / case_id
    case_dir.mkdir(parents=True)
    affine = np.diag([*ZOOMS, 1.0])
    for m, vol in zip(BRATS_MODALITIES, images):
        nib.save(nib.Nifti1Image(vol, affine), str(case_dir / f"{case_id}_{m}.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(case_dir / f"{case_id}_seg.nii.gz"))
    return {"images": images, "label": label, "brain": brain}


@pytest.fixture()
def brats_root(tmp_path) -> tuple[Path, dict]:
    """Three fake cases in the BraTS 2017 HGG/LGG layout."""
    root = tmp_path / "BraTS2017"
    cases = {
        "Brats17_A_1": _write_case(root / "HGG", "Brats17_A_1", 1),
        "Brats17_B_1": _write_case(root / "HGG", "Brats17_B_1", 2),
        "Brats17_C_1": _write_case(root / "LGG", "Brats17_C_1", 3),
    }
    return root, cases


def test_discovery_layouts(brats_root, tmp_path):
    root, truth = brats_root
    cases = discover_brats_cases(root)
    assert [c.case_id for c in cases] == sorted(truth)
    assert [p.name for p in cases[2].images] == [f"Brats17_C_1_{m}.nii.gz" for m in BRATS_MODALITIES]
    assert cases[2].label.parent.parent.name == "LGG"
    image, label, affine = load_brats_case(cases[0])
    np.testing.assert_allclose(image, truth["Brats17_A_1"]["images"], rtol=1e-6)
    np.testing.assert_array_equal(label, truth["Brats17_A_1"]["label"])
    np.testing.assert_allclose(np.diag(affine)[:3], ZOOMS)
    # flat layout
    flat = tmp_path / "flat"
    _write_case(flat, "case_x", 5)
    assert [c.case_id for c in discover_brats_cases(flat)] == ["case_x"]
    with pytest.raises(FileNotFoundError, match="root"):
        discover_brats_cases(tmp_path / "nope")


def test_n4_removes_known_bias_field():
    """A smooth multiplicative field on a homogeneous brain: N4 recovers it (up to a constant)."""
    rng = np.random.default_rng(0)
    g = _grid()
    brain = g[0] ** 2 + g[1] ** 2 + g[2] ** 2 < 0.8
    clean = np.where(brain, 100.0 + rng.normal(0, 2, SHAPE), 0.0)
    log_bias = 0.3 * g[0] + 0.2 * g[1] - 0.15 * g[2] ** 2
    biased = (clean * np.exp(log_bias)).astype(np.float32)
    corrected = n4_bias_correct(biased, spacing=ZOOMS, shrink_factor=2, iterations=(20, 20))

    def cov(v):
        return v[brain].std() / v[brain].mean()

    assert corrected.shape == SHAPE and corrected.dtype == np.float32
    assert cov(biased) > 0.14 and cov(corrected) < 0.03 and cov(clean) < 0.021
    assert np.all(corrected[~brain] == 0)
    est = np.log(biased[brain] / corrected[brain])  # estimated log field inside the mask
    assert np.corrcoef(est, log_bias[brain])[0, 1] > 0.95
    # a volume without foreground is returned unchanged
    np.testing.assert_array_equal(n4_bias_correct(np.zeros(SHAPE, np.float32), shrink_factor=2), 0)
    with pytest.raises(ValueError, match="shrink_factor"):
        n4_bias_correct(biased, shrink_factor=0)


def test_prepare_outputs_n4(brats_root, tmp_path):
    root, truth = brats_root
    out = tmp_path / "prepared"
    datalist = prepare_brats(root, out, size=16, n4=True, shrink_factor=2, n4_iterations=(10, 10))
    assert Path(datalist) == out / "datalist.json"
    body = json.loads(Path(datalist).read_text())
    assert sorted(body["labels"]) == ["0", "1", "2", "4"]
    assert body["modality"] == {"0": "t1", "1": "t1ce", "2": "t2", "3": "flair"}
    entries = [e for s in ("training", "validation", "test") if body[s] for e in load_datalist(datalist, s)]
    assert sorted(Path(e["image"]).name for e in entries) == [f"{c}.nii.gz" for c in sorted(truth)]
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no staging left
    g = _grid()
    log_bias = _resize(0.3 * g[0] + 0.2 * g[1] - 0.15 * g[2] ** 2, (16, 16, 16))
    for e in entries:
        case = Path(e["image"]).name[: -len(".nii.gz")]
        img = nib.load(e["image"])
        x = np.asarray(img.dataobj)
        assert x.shape == (16, 16, 16, 4) and x.dtype == np.float32
        # zooms follow the resampling: 24 → 16 voxels of 1 mm is 1.5 mm, 16 → 16 of 1.5 mm stays
        np.testing.assert_allclose(img.header.get_zooms()[:3], (1.5, 1.5, 1.5))
        # voxel centres stay put (align_corners=False): new voxel 0 sits at old index 0.25 in x, y
        np.testing.assert_allclose(img.affine[:3, 3], (0.25, 0.25, 0.0))
        for k in range(4):
            v = x[..., k][x[..., k] != 0].astype(np.float64)
            assert abs(v.mean()) < 1e-4 and abs(v.std() - 1.0) < 1e-4
        lab = np.asarray(nib.load(e["label"]).dataobj)
        assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1, 2, 4}
        # nearest-neighbour oracle: output voxel i takes input voxel floor(i * 24/16) (z: 16 → 16)
        src = truth[case]["label"]
        ix = (np.arange(16) * 24) // 16
        np.testing.assert_array_equal(lab, src[np.ix_(ix, ix, np.arange(16))])
        # N4 applied: healthy T1 (no tumour contrast) no longer follows the bias field
        interior = ndimage.binary_erosion(x[..., 0] != 0, iterations=2) & ndimage.binary_erosion(lab == 0)
        plain = _resize_standardise(truth[case]["images"], (16, 16, 16))[0]
        r = np.corrcoef(x[..., 0][interior], log_bias[interior])[0, 1]
        r_plain = np.corrcoef(plain[interior], log_bias[interior])[0, 1]
        print(f"{case}: corr(T1, log bias) without N4 {r_plain:.3f}, with N4 {r:.3f}")
        assert r_plain > 0.8 and abs(r) < 0.4, (r_plain, r)


def _resize(v: np.ndarray, size) -> np.ndarray:
    """Trilinear resize of (*S) or (C, *S) in float64 with torch (align_corners=False)."""
    t = torch.from_numpy(np.asarray(v, np.float64))
    t = t[None, None] if t.ndim == 3 else t[None]
    out = F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0].numpy()
    return out[0] if np.ndim(v) == 3 else out


def _resize_standardise(images: np.ndarray, size) -> np.ndarray:
    """Independent oracle of the n4=False pipeline in float64: trilinear resize, z-score over non-zeros."""
    resized = _resize(images, size)
    out = np.zeros_like(resized)
    for k, v in enumerate(resized):
        nz = v != 0
        out[k][nz] = (v[nz] - v[nz].mean()) / v[nz].std()
    return out


def test_prepare_without_n4_matches_resize_standardise_oracle(brats_root, tmp_path):
    root, truth = brats_root
    datalist = prepare_brats(root, tmp_path / "plain", size=(16, 16, 8), n4=False)
    body = json.loads(Path(datalist).read_text())
    entries = [e for s in ("training", "validation", "test") if body[s] for e in load_datalist(datalist, s)]
    entry = next(e for e in entries if "Brats17_B_1" in e["image"])
    x = np.asarray(nib.load(entry["image"]).dataobj)
    expect = _resize_standardise(truth["Brats17_B_1"]["images"], (16, 16, 8))
    np.testing.assert_allclose(np.moveaxis(x, -1, 0), expect, atol=1e-4)


def test_split_is_seeded_and_deterministic(brats_root, tmp_path):
    root, truth = brats_root

    def sections(name, seed):
        out = tmp_path / name
        path = prepare_brats(root, out, size=8, n4=False, seed=seed, test_fraction=0.34, val_fraction=0)
        body = json.loads(Path(path).read_text())
        names = ("training", "validation", "test")
        return {s: sorted(Path(e["image"]).name[: -len(".nii.gz")] for e in body[s]) for s in names}

    a, b = sections("a", 0), sections("b", 0)
    assert a == b
    assert a["validation"] == [] and len(a["test"]) == 1
    assert sorted(a["training"] + a["test"]) == sorted(truth)
    expect = split_cases(sorted(truth), (0.66, 0.34), ("training", "test"), seed=0)
    assert a["test"] == expect["test"]
    other = [sections(f"s{s}", s)["test"] for s in (1, 2, 3)]
    assert any(t != a["test"] for t in other)  # the seed matters


def _assert_no_dataset(out: Path, existed: bool):
    if existed:
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()


def test_missing_modality_names_file_and_writes_nothing(brats_root, tmp_path):
    root, _ = brats_root
    missing = root / "LGG" / "Brats17_C_1" / "Brats17_C_1_t1ce.nii.gz"
    missing.unlink()
    out = tmp_path / "out_missing"
    with pytest.raises(FileNotFoundError, match="Brats17_C_1_t1ce.nii.gz"):
        prepare_brats(root, out, size=8, n4=False)
    _assert_no_dataset(out, existed=False)


@pytest.mark.parametrize("existed", [False, True])
def test_corrupt_file_names_file_and_writes_nothing(brats_root, tmp_path, existed):
    root, _ = brats_root
    # the last case in sorted order: the first two have already been processed when it fails
    bad = root / "LGG" / "Brats17_C_1" / "Brats17_C_1_t2.nii.gz"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # truncated gzip stream
    out = tmp_path / f"out_corrupt_{existed}"
    if existed:
        out.mkdir()
        (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="Brats17_C_1_t2.nii.gz"):
        prepare_brats(root, out, size=8, n4=False)
    _assert_no_dataset(out, existed)
    bad.write_bytes(b"not a nifti file at all")
    with pytest.raises(ValueError, match="Brats17_C_1_t2.nii.gz"):
        prepare_brats(root, out, size=8, n4=False)
    _assert_no_dataset(out, existed)


def test_shape_mismatch_and_bad_labels(tmp_path):
    root = tmp_path / "r"
    _write_case(root, "c1", 0)
    short = nib.Nifti1Image(np.ones((24, 24, 15), np.float32), np.eye(4))
    nib.save(short, str(root / "c1" / "c1_flair.nii.gz"))
    with pytest.raises(ValueError, match=r"c1_flair.nii.gz: shape \(24, 24, 15\)"):
        prepare_brats(root, tmp_path / "o1", size=8, n4=False)
    _write_case(root, "c2", 1)
    seg = np.zeros(SHAPE, np.uint8)
    seg[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(seg, np.eye(4)), str(root / "c2" / "c2_seg.nii.gz"))
    with pytest.raises(ValueError, match=r"c2_seg.nii.gz: label values \[3\]"):
        load_brats_case(discover_brats_cases(root)[1])
    with pytest.raises(ValueError, match="test_fraction"):
        prepare_brats(root, tmp_path / "o2", test_fraction=0.8, val_fraction=0.2)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
