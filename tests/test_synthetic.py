"""Synthetic phantoms: determinism, variation, anatomy, value ranges, writers, MONAI loading, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from common.data.datalist import load_datalist
from common.data.synthetic import (
    _smooth_field,
    abdomen_ct_phantom,
    brain_mri_phantom,
    chest_xray_phantom,
    skin_lesion_phantom,
    write_phantom_dataset,
)
from scripts.make_phantoms import main, parse_size

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "chest": (chest_xray_phantom, (32, 32), 1, {0, 1, 2, 3, 4}),
    "skin": (skin_lesion_phantom, (32, 32), 3, {0, 1}),
    "brain": (brain_mri_phantom, (24, 24, 24), 4, {0, 1, 2, 4}),
    "abdomen": (abdomen_ct_phantom, (24, 24, 24), 1, {0, 1}),
}
SEEDS = range(20)
BALL = np.ones((3, 3, 3), bool)  # 26-neighbourhood


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_same_seed_is_bit_identical_and_shapes_dtypes(kind):
    gen, size, channels, _ = SMALL[kind]
    size = tuple(s + 3 * i for i, s in enumerate(size))  # non-square / non-cubic
    (im1, lb1), (im2, lb2) = gen(size, seed=7), gen(size, seed=7)
    assert im1.tobytes() == im2.tobytes() and lb1.tobytes() == lb2.tobytes()
    assert im1.shape == (channels, *size) and lb1.shape == size
    assert im1.dtype == np.float32 and lb1.dtype == np.int64
    assert np.isfinite(im1).all()


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_seeds_vary_image_geometry_and_contrast(kind):
    gen, size, _, classes = SMALL[kind]
    cases = [gen(size, seed=s) for s in range(5)]
    assert all(not np.array_equal(cases[0][0], c[0]) for c in cases[1:])
    assert all(not np.array_equal(cases[0][1], c[1]) for c in cases[1:])
    for k in sorted(classes - {0}):
        centroids = np.array([_centroid(lb == k) for _, lb in cases])
        assert centroids.std(axis=0).max() > 0.2, f"class {k} does not move with the seed"
        means = [im[0][lb == k].mean() for im, lb in cases]
        assert np.std(means) > 1e-3, f"class {k} contrast does not change with the seed"


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_every_structure_present_for_20_seeds_at_minimum_size(kind):
    gen, size, _, classes = SMALL[kind]
    for seed in SEEDS:
        _, label = gen(size, seed=seed)
        assert set(np.unique(label).tolist()) == classes, f"seed {seed}"


def test_chest_targets_resolve_the_same_overlaps_as_prepared_jsrt():
    """Both targets label the same anatomy (the image does not change). "lungs": codes 1 / 2 are the whole
    lung shapes; "classes": clavicles > heart > lungs. With L, H, C the lung, heart and clavicle shapes,
    "classes" gives 4 = C, 3 = H \\ C, {1, 2} = L \\ (H ∪ C) and "lungs" gives {1, 2} = L, {3, 4} = (H ∪ C) \\ L,
    so "lungs"' lung pixels minus "classes"' heart and clavicles are "classes"' lung pixels, and
    the overlaps are not empty (else no test could tell the rules apart)."""
    lost = []
    for size in ((32, 32), (96, 80)):
        for seed in SEEDS:
            image_l, by_lungs = chest_xray_phantom(size, seed=seed, target="lungs")
            image_c, by_classes = chest_xray_phantom(size, seed=seed, target="classes")
            np.testing.assert_array_equal(image_l, image_c)
            lungs_l, lungs_c = np.isin(by_lungs, (1, 2)), np.isin(by_classes, (1, 2))
            hc = np.isin(by_classes, (3, 4))
            np.testing.assert_array_equal(lungs_c, lungs_l & ~hc)
            np.testing.assert_array_equal(np.isin(by_lungs, (3, 4)), hc & ~lungs_l)
            np.testing.assert_array_equal(np.where(lungs_c, by_classes, 0), np.where(lungs_c, by_lungs, 0))
            assert (lungs_l & (by_classes == 3)).any(), f"seed {seed}: no heart over a lung"
            lost.append(((lungs_l & hc).sum() / lungs_l.sum(), (lungs_l & (by_classes == 4)).any()))
    assert min(f for f, _ in lost) > 0.01  # every case has lung pixels "classes" gives to heart / clavicles
    assert np.mean([c for _, c in lost]) > 0.8  # and in most cases a clavicle crosses a lung apex
    with pytest.raises(ValueError, match="target"):
        chest_xray_phantom((32, 32), target="heart")


def test_chest_sides_priority_and_intensities():
    """Radiological PA view: patient's left (label 1) on the image's right, i.e. columns > (W-1)/2."""
    for size in ((32, 32), (64, 48)):
        mid = (size[1] - 1) / 2
        for seed in SEEDS:
            image, label = chest_xray_phantom(size, seed=seed, target="classes")
            left, right, heart, clav = (_centroid(label == k) for k in (1, 2, 3, 4))
            assert left[1] > mid > right[1], f"seed {seed}: lungs on the wrong side"
            assert heart[1] > mid, f"seed {seed}: heart not on the patient's left"
            assert clav[0] < min(left[0], right[0], heart[0])  # clavicles are at the top
            assert 0.0 <= image.min() and image.max() <= 1.0
            lungs = image[0][(label == 1) | (label == 2)].mean()
            assert lungs < image[0][label == 3].mean() and lungs < image[0][label == 4].mean()


def test_skin_lesion_darker_than_skin_and_in_range():
    for seed in SEEDS:
        image, label = skin_lesion_phantom((48, 40), seed=seed)
        assert 0.0 <= image.min() and image.max() <= 1.0
        luminance = image.mean(axis=0)
        assert 0 < label.sum() < label.size
        assert luminance[label == 1].mean() < luminance[label == 0].mean() - 0.1


def test_brain_brats_nesting_and_contrasts():
    for size in ((24, 24, 24), (24, 30, 28)):
        for seed in SEEDS:
            image, label = brain_mri_phantom(size, seed=seed)
            necrosis, core, whole = label == 1, (label == 1) | (label == 4), label > 0
            # the necrosis is enclosed by the enhancing rim, the core by the oedema (26-connectivity)
            assert not (ndimage.binary_dilation(necrosis, BALL) & ~core).any(), f"seed {seed}"
            assert not (ndimage.binary_dilation(core, BALL) & ~whole).any(), f"seed {seed}"
            assert 0.0 <= image.min() and image.max() <= 1.0
            assert (image[:, whole] > 0).all()  # tumour lies inside the (skull-stripped) brain
            t1gd, flair = image[1], image[3]
            assert t1gd[label == 4].mean() > max(t1gd[label == 2].mean(), t1gd[label == 1].mean())
            normal = (label == 0) & (image.sum(axis=0) > 0)
            assert flair[label == 2].mean() > flair[normal].mean()


def test_ct_hounsfield_ranges_and_pancreas_soft_tissue():
    for size in ((24, 24, 24), (40, 32, 24)):
        for seed in SEEDS:
            image, label = abdomen_ct_phantom(size, seed=seed)
            hu = image[0]
            assert hu.min() >= -1024 and hu.max() <= 3071 and np.array_equal(hu, np.round(hu))
            assert hu[:2, :2].mean() < -900  # air in the corners
            assert hu.max() > 300  # vertebral bone
            assert 20.0 < hu[label == 1].mean() < 70.0, f"seed {seed}"
    image, label = abdomen_ct_phantom((96, 96, 64), seed=0)
    assert image.shape == (1, 96, 96, 64) and 20.0 < image[0][label == 1].mean() < 70.0


def test_ct_lesion_is_hypodense_and_leaves_the_rest_unchanged():
    for seed in range(10):
        plain, plain_label = abdomen_ct_phantom((40, 40, 32), seed=seed)
        image, label = abdomen_ct_phantom((40, 40, 32), seed=seed, lesion=True)
        lesion = label == 2
        assert lesion.sum() > 0 and np.array_equal(label == 1, plain_label == 1)
        near = ndimage.binary_dilation(lesion, BALL, iterations=3)
        assert np.array_equal(image[0][~near], plain[0][~near])
        shell = ndimage.binary_dilation(lesion, BALL) & ~lesion  # liver around it
        assert image[0][lesion].mean() < np.median(image[0][shell]) - 15.0


def test_smooth_field_has_zero_mean_unit_variance_pointwise():
    points = ([3, 20], [7, 31])
    values = np.array([_smooth_field(np.random.default_rng(s), (33, 40), 5)[points] for s in range(3000)])
    np.testing.assert_allclose(values.mean(axis=0), 0.0, atol=0.08)
    np.testing.assert_allclose(values.var(axis=0), 1.0, atol=0.1)


@pytest.mark.parametrize(
    "gen, size",
    [
        (chest_xray_phantom, (31, 64)),
        (skin_lesion_phantom, (64, 16)),
        (chest_xray_phantom, (64, 64, 64)),
        (brain_mri_phantom, (23, 48, 48)),
        (abdomen_ct_phantom, (48, 48, 20)),
        (abdomen_ct_phantom, "big"),
    ],
)
def test_bad_sizes_raise_naming_size(gen, size):
    with pytest.raises(ValueError, match="size"):
        gen(size)


def test_bad_seed_and_lesion_raise():
    with pytest.raises(ValueError, match="seed"):
        chest_xray_phantom((32, 32), seed=-1)
    with pytest.raises(ValueError, match="seed"):
        brain_mri_phantom((24, 24, 24), seed=1.5)
    with pytest.raises(ValueError, match="lesion"):
        abdomen_ct_phantom((24, 24, 24), lesion="yes")


def test_generation_time_budget():
    """CPU time (robust to other jobs on the machine) of the default sizes: < 0.5 s each."""
    for gen, size in ((chest_xray_phantom, (256, 256)), (abdomen_ct_phantom, (96, 96, 64))):
        costs = []
        for seed in range(2):
            start = time.process_time()
            gen(size, seed=seed)
            costs.append(time.process_time() - start)
        assert min(costs) < 0.5, (gen.__name__, costs)


LOAD_CASES = [
    ("chest", (32, 40), "nifti", {}, None),
    ("chest", (32, 40), "png", {}, None),
    ("skin", (40, 32), "png", {}, None),
    ("skin", (40, 32), "nifti", {}, "ITKReader"),
    ("brain", (24, 26, 28), "nifti", {}, None),
    ("abdomen", (28, 26, 24), "nifti", {"lesion": True}, None),
]
LOAD_IDS = [f"{c[0]}-{c[2]}" for c in LOAD_CASES]
GENERATOR = {"chest": chest_xray_phantom, "skin": skin_lesion_phantom, "brain": brain_mri_phantom,
             "abdomen": abdomen_ct_phantom}


@pytest.mark.parametrize("kind, size, fmt, kwargs, reader", LOAD_CASES, ids=LOAD_IDS)
def test_written_dataset_loads_in_monai_and_matches_the_generator(tmp_path, kind, size, fmt, kwargs, reader):
    from monai.transforms import LoadImaged

    path = write_phantom_dataset(kind, tmp_path, 5, size, seed=3, image_format=fmt, **kwargs)
    body = json.loads(path.read_text())
    assert body["name"] == f"synthetic_{kind}" and body["numTraining"] == 3 and body["modality"]
    assert set(body["labels"]) == {str(k) for k in SMALL[kind][3] | ({2} if kwargs else set())}
    assert body["labels"]["0"] == "background"
    entries = {s: load_datalist(path, s) for s in ("training", "validation", "test")}
    assert [len(e) for e in entries.values()] == [3, 1, 1]
    names = sorted(Path(e["image"]).name for es in entries.values() for e in es)
    assert names == sorted(f"{kind}_{i:03d}.{'png' if fmt == 'png' else 'nii.gz'}" for i in range(5))
    loader = LoadImaged(keys=["image", "label"], ensure_channel_first=True, reader=reader)
    for entry in entries["training"] + entries["test"]:
        case = int(Path(entry["image"]).name.split("_")[1].split(".")[0])
        image, label = GENERATOR[kind](size, seed=3 + case, **kwargs)
        data = loader(entry)
        got, got_label = data["image"].numpy(), data["label"].numpy()
        assert got_label.shape[0] == 1 and got.shape[0] == image.shape[0]
        if fmt == "png":  # MONAI's PILReader returns (C, W, H); the PNG holds round(255 * image)
            got, got_label = got.swapaxes(1, 2), got_label.swapaxes(1, 2)
            image = np.round(image * 255.0)
        assert got.shape == image.shape and got_label.shape == (1, *label.shape)
        np.testing.assert_array_equal(got_label[0], label)
        np.testing.assert_array_equal(got, image)
        region = label > 0
        assert got[:, region].mean() == pytest.approx(image[:, region].mean())
        if fmt == "nifti":
            spacing = np.sqrt((np.asarray(data["image"].affine)[:-1, :-1] ** 2).sum(axis=0))
            expected = {"chest": 360.0 / 40, "skin": 20.0 / 40, "brain": 1.0, "abdomen": None}[kind]
            if expected is None:
                np.testing.assert_allclose(spacing[:3], [0.8, 0.8, 1.5])
            else:
                np.testing.assert_allclose(spacing[: len(size)], expected)


def test_writer_is_reproducible_and_validates_before_writing(tmp_path):
    a = write_phantom_dataset("chest", tmp_path / "a", 3, (32, 32), seed=5)
    b = write_phantom_dataset("chest", tmp_path / "b", 3, (32, 32), seed=5)
    for rel in ("datalist.json", "imagesTr/chest_002.nii.gz", "labelsTr/chest_001.nii.gz"):
        assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes()
    bad = [
        (dict(kind="lungs"), "kind"),
        (dict(kind="brain", size=(24, 24, 24), image_format="png"), "image_format"),
        (dict(image_format="jpeg"), "image_format"),
        (dict(num_cases=0), "num_cases"),
        (dict(size=(16, 32)), "size"),
        (dict(lesion=True), "kwargs"),
        (dict(fractions=(0.5, 0.5)), "fractions"),
    ]
    for change, name in bad:
        args = dict(kind="chest", out_dir=tmp_path / "bad", num_cases=2, size=(32, 32)) | change
        with pytest.raises(ValueError, match=name):
            write_phantom_dataset(**args)
    assert not (tmp_path / "bad").exists()


def test_cli_main_and_size_parsing(tmp_path):
    assert parse_size("128,128", "chest") == (128, 128)
    assert parse_size("64x64x32", "abdomen") == (64, 64, 32)
    assert parse_size((128, 96), "skin") == (128, 96) and parse_size(48, "brain") == (48, 48, 48)
    assert parse_size(None, "abdomen") == (96, 96, 64)
    for size, kind in (("a,b", "chest"), ((32, 32, 32), "chest"), (True, "skin")):
        with pytest.raises(ValueError, match="size"):
            parse_size(size, kind)
    path = Path(main(kind="abdomen", out_dir=str(tmp_path / "ct"), num_cases=3, size="24,24,24", lesion=True))
    body = json.loads(path.read_text())
    assert body["labels"]["2"] == "liver lesion"
    assert len(body["training"] + body["validation"] + body["test"]) == 3
    with pytest.raises(ValueError, match="lesion"):
        main(kind="chest", out_dir=str(tmp_path / "x"), num_cases=2, size=(32, 32), lesion=True)
    with pytest.raises(ValueError, match="kind"):
        main(kind="knee", out_dir=str(tmp_path / "x"))


def test_cli_subprocess_writes_a_dataset(tmp_path):
    out = tmp_path / "chest"
    cmd = [sys.executable, "-m", "scripts.make_phantoms", "--kind", "chest", "--out_dir", str(out),
           "--num_cases", "3", "--size", "32,48", "--seed", "4"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert str(out / "datalist.json") in result.stdout
    import nibabel as nib

    image, label = chest_xray_phantom((32, 48), seed=4 + 2)
    written = [np.asarray(nib.load(out / d / "chest_002.nii.gz").dataobj) for d in ("imagesTr", "labelsTr")]
    np.testing.assert_array_equal(written[0], image[0])
    np.testing.assert_array_equal(written[1], label)
