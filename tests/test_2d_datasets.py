"""Readers of the papers' 2D datasets (JSRT + SCR, Montgomery, Shenzhen, ISBI 2016, ISIC 2018, CVC-ClinicDB)
on tiny fake files written in each native format: values, label codes, splits, datalists, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.chest_xray import (
    JSRTCase,
    find_jsrt_cases,
    jsrt_nlcen_split,
    paint_chest_label,
    prepare_jsrt,
    prepare_montgomery,
    prepare_shenzhen,
    read_jsrt_image,
)
from common.data.io2d import random_split, read_grey
from common.data.datalist import load_datalist, split_cases
from common.data.dermoscopy import prepare_isbi2016, prepare_isic2018
from common.data.endoscopy import prepare_cvc_clinicdb
from scripts.prepare_2d_datasets import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
N = 64  # fake JSRT native side (the real one is 2048)
M = N // 2  # SCR masks are half the image grid


def _load(datalist: Path, section: str) -> list[dict]:
    from monai.transforms import LoadImaged

    loader = LoadImaged(["image", "label"], ensure_channel_first=True, image_only=True)
    return [loader(e) | {"_entry": e} for e in load_datalist(datalist, section)]


# ------------------------------------------------------------------------------------------ fake files
def _raw(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, (N, N)).astype(np.uint16)


def _scr_masks() -> dict[str, np.ndarray]:
    """0/255 masks (M, M) with overlaps: heart over both lungs, clavicles over the lung apices."""
    r, c = np.mgrid[:M, :M]

    def box(r0, r1, c0, c1):
        return ((r >= r0) & (r < r1) & (c >= c0) & (c < c1)).astype(np.uint8) * 255

    return {
        "left lung": box(4, 28, 18, 29),  # image right = patient's left
        "right lung": box(4, 28, 3, 14),
        "heart": box(18, 30, 10, 22),
        "left clavicle": box(3, 7, 17, 30),
        "right clavicle": box(3, 7, 2, 15),
    }


def _expected_label(target: str = "lungs") -> np.ndarray:
    """Hand-written painting orders: "lungs" puts the lungs last, "classes" the clavicles."""
    lungs = (("left lung", 1), ("right lung", 2))
    others = (("heart", 3), ("left clavicle", 4), ("right clavicle", 4))
    label = np.zeros((M, M), np.uint8)
    for name, code in (others + lungs if target == "lungs" else lungs + others):
        label[_scr_masks()[name] > 0] = code
    return label


def _fake_jsrt(root: Path, cases: list[str], folds: dict[str, int] | None = None) -> Path:
    for i, case in enumerate(cases):
        (root / "images").mkdir(parents=True, exist_ok=True)
        _raw(i).astype(">u2").tofile(root / "images" / f"{case}.IMG")
        base = root / "scr" / (f"fold{folds[case]}" if folds else "") / "masks"
        for structure, mask in _scr_masks().items():
            (base / structure).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(base / structure / f"{case}.gif")
    return root


def _rgb(seed: int, shape=(12, 18)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3)).astype(np.uint8)


def _disc(seed: int, shape=(12, 18)) -> np.ndarray:
    r, c = np.mgrid[: shape[0], : shape[1]]
    cy, cx = 3 + seed % 5, 4 + seed % 7
    return (((r - cy) ** 2 + (c - cx) ** 2) < 9).astype(np.uint8) * 255


def _fake_isbi(root: Path, train: list[str], test: list[str]) -> Path:
    for release, ids in (("Training", train), ("Test", test)):
        data = root / f"ISBI2016_ISIC_Part1_{release}_Data"
        gt = root / f"ISBI2016_ISIC_Part1_{release}_GroundTruth"
        data.mkdir(parents=True), gt.mkdir(parents=True)
        for k, case in enumerate(ids):
            Image.fromarray(_rgb(k)).save(data / f"{case}.jpg", quality=95)
            Image.fromarray(_disc(k)).save(gt / f"{case}_Segmentation.png")
    return root


# ------------------------------------------------------------------------------------------ JSRT + SCR
def test_read_jsrt_image_byte_order_and_scaling(tmp_path):
    raw = _raw(0)
    raw[0, 0], raw[0, 1] = 0x0ABC, 0x0102  # little-endian reading would give 0xBC0A, 0x0201
    path = tmp_path / "JPCLN001.IMG"
    raw.astype(">u2").tofile(path)
    data = np.frombuffer(path.read_bytes(), np.uint8).astype(np.int64)
    assert (data[0], data[1], data[2], data[3]) == (0x0A, 0xBC, 0x01, 0x02)
    words = (data[0::2] * 256 + data[1::2]).reshape(N, N)  # big-endian decoded by hand
    out = read_jsrt_image(path, native_size=N)
    assert out.dtype == np.float32 and out.shape == (N, N)
    np.testing.assert_array_equal(out, ((4095 - words) / 4095).astype(np.float32))
    assert out[0, 0] == np.float32((4095 - 2748) / 4095) and out[0, 1] == np.float32((4095 - 258) / 4095)
    np.testing.assert_array_equal(
        read_jsrt_image(path, native_size=N, invert=False), (words / 4095).astype(np.float32)
    )


def test_read_jsrt_image_rejects_wrong_size_and_byte_order(tmp_path):
    path = tmp_path / "JPCNN001.IMG"
    _raw(1).astype(">u2").tofile(path)
    with pytest.raises(ValueError, match=r"JPCNN001\.IMG.*8192 bytes, expected 8388608"):
        read_jsrt_image(path)  # default native_size 2048
    raw = _raw(1)
    raw[5, 5] = 0x0F01
    raw.astype("<u2").tofile(path)  # little-endian: 0x0F01 reads back as 0x010F... and 0x0001 -> 0x0100 etc.
    with pytest.raises(ValueError, match=r"JPCNN001\.IMG.*exceeds 12 bits"):
        read_jsrt_image(path, native_size=N)


def test_prepare_jsrt_labels_resize_and_monai_alignment(tmp_path):
    root = _fake_jsrt(tmp_path / "jsrt", ["JPCLN001", "JPCLN002", "JPCNN001", "JPCNN002"])
    # native SCR grid: labels exactly as painted (default target "lungs": lungs on top), image 2x2 area mean
    dl = prepare_jsrt(root, tmp_path / "out32", size=None, native_size=N, val_fraction=0.0)
    body = json.loads(Path(dl).read_text())
    assert body["labels"] == {
        "0": "background", "1": "left lung", "2": "right lung", "3": "heart", "4": "clavicles"
    }
    assert body["split"]["rule"] == "odd_even"
    assert body["training"][0] == {"image": "imagesTr/JPCLN001.nii.gz", "label": "labelsTr/JPCLN001.nii.gz"}
    expected = _expected_label()
    assert set(np.unique(expected)) == {0, 1, 2, 3, 4} and expected[5, 20] == 1 and expected[20, 12] == 2
    assert expected[3, 20] == 4 and expected[29, 15] == 3  # clavicle above the lungs, heart below them
    for d in _load(Path(dl), "training") + _load(Path(dl), "test"):
        case = Path(d["_entry"]["image"]).name.split(".")[0]
        seed = ["JPCLN001", "JPCLN002", "JPCNN001", "JPCNN002"].index(case)
        assert tuple(d["image"].shape) == (1, M, M) == tuple(d["label"].shape)
        np.testing.assert_array_equal(d["label"][0].numpy(), expected)
        oracle = ((4095 - _raw(seed).astype(np.float64)) / 4095).reshape(M, 2, M, 2).mean(axis=(1, 3))
        np.testing.assert_allclose(d["image"][0].numpy(), oracle, atol=1e-6)
    # size 16 from the 32 masks / 64 raw: nearest-exact takes pixel 2i+1, area takes 4x4 block means
    dl = prepare_jsrt(root, tmp_path / "out16", size=16, native_size=N, val_fraction=0.0)
    d = _load(Path(dl), "training")[0]
    assert tuple(d["image"].shape) == (1, 16, 16) == tuple(d["label"].shape)
    np.testing.assert_array_equal(d["label"][0].numpy(), expected[1::2, 1::2])
    oracle = ((4095 - _raw(0).astype(np.float64)) / 4095).reshape(16, 4, 16, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(d["image"][0].numpy(), oracle, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d["image"].meta["pixdim"][1:3]), [0.175 * 2048 / 16] * 2, rtol=1e-6)


def _bundle_preprocessing(bundle: str, size: int):
    """The bundle's own ``deterministic_transforms`` (train.json) at ``size`` x ``size``."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
    parser["image_size"] = [size, size]
    return Compose(parser.get_parsed_content("deterministic_transforms"))


@pytest.mark.parametrize("target, bundle", [("lungs", "nlcen_lung"), ("classes", "certified_seg")])
def test_cli_prepared_jsrt_through_bundle_preprocessing_keeps_overlaps(tmp_path, target, bundle):
    """Done-when of the JSRT overlap fix: SCR masks that overlap (heart and clavicles over the lungs),
    prepared by ``python -m scripts.prepare_2d_datasets jsrt`` and loaded through the bundle's own
    preprocessing. NLCEN (He et al., AAAI 2019) scores the SCR lung fields: its label must be the union
    of the two lung masks pixel for pixel. Certification (Laousy et al., MICCAI 2023): classes Lung,
    Heart, Clavicles, one per pixel; the overlap rule (the paper names none) is the clavicles whole,
    then the heart, then the lungs — written here as set algebra on the masks."""
    root = _fake_jsrt(tmp_path / "jsrt", ["JPCLN001", "JPCLN002"])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "scripts.prepare_2d_datasets", "jsrt", "--root", str(root), "--out_dir", str(out),
           "--size", "None", "--native_size", str(N), "--val_fraction", "0", "--target", target]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    m = {name: mask > 0 for name, mask in _scr_masks().items()}
    lungs = m["left lung"] | m["right lung"]
    heart, clavicles = m["heart"], m["left clavicle"] | m["right clavicle"]
    assert (lungs & heart).sum() > 0 and (lungs & clavicles).sum() > 0  # the case has overlaps
    if target == "lungs":
        expected = lungs.astype(np.int64)
    else:
        expected = np.zeros((M, M), np.int64)
        expected[lungs & ~heart & ~clavicles] = 1
        expected[heart & ~clavicles] = 2
        expected[clavicles] = 3
    assert json.loads((out / "datalist.json").read_text())["preprocessing"]["target"] == target
    preprocess = _bundle_preprocessing(bundle, M)
    entries = load_datalist(out / "datalist.json", "training") + load_datalist(out / "datalist.json", "test")
    assert len(entries) == 2
    for entry in entries:
        label = preprocess(entry)["label"]
        assert tuple(label.shape) == (1, M, M)
        np.testing.assert_array_equal(label[0].numpy(), expected)


def test_paint_chest_label_rejects_unknown_target_and_missing_structure():
    masks = {name: mask > 0 for name, mask in _scr_masks().items()}
    with pytest.raises(ValueError, match="target: expected one of"):
        paint_chest_label(masks, "lung")
    with pytest.raises(ValueError, match=r"masks: missing structures \['heart'\]"):
        paint_chest_label({k: v for k, v in masks.items() if k != "heart"})
    with pytest.raises(ValueError, match="target: expected one of"):
        prepare_jsrt(ROOT / "nowhere", ROOT / "never", target="lung")  # checked before any file access


def test_jsrt_nlcen_split_scr_folds_or_parity(tmp_path):
    names = [f"JPCLN{i:03d}" for i in range(1, 155)] + [f"JPCNN{i:03d}" for i in range(1, 94)]
    fake = [JSRTCase(n, Path(n), (), None) for n in names]
    parts, rule = jsrt_nlcen_split(fake)
    assert rule == "odd_even" and (len(parts["training"]), len(parts["test"])) == (124, 123)
    assert "JPCLN001" in parts["training"] and "JPCNN093" in parts["training"] and "JPCNN092" in parts["test"]
    # fold folders win over parity when present (here deliberately against parity)
    cases = ["JPCLN001", "JPCLN002", "JPCLN003", "JPCNN001"]
    folds = {"JPCLN001": 2, "JPCLN002": 1, "JPCLN003": 1, "JPCNN001": 2}
    root = _fake_jsrt(tmp_path / "folds", cases, folds)
    found = find_jsrt_cases(root / "images", root / "scr")
    assert [c.fold for c in found] == [folds[c.case_id] for c in found]
    parts, rule = jsrt_nlcen_split(found)
    assert rule == "scr_folds"
    assert parts == {"training": ["JPCLN002", "JPCLN003"], "test": ["JPCLN001", "JPCNN001"]}
    dl = prepare_jsrt(
        root / "images", tmp_path / "o", scr_root=root / "scr", size=8, native_size=N, val_fraction=0.5
    )
    body = json.loads(Path(dl).read_text())
    assert body["split"]["rule"] == "scr_folds" and len(body["validation"]) == 1
    expected = {f"imagesTr/{c}.nii.gz" for c in ("JPCLN002", "JPCLN003")}
    assert {e["image"] for e in body["training"] + body["validation"]} == expected
    assert [e["image"] for e in body["test"]] == ["imagesTr/JPCLN001.nii.gz", "imagesTr/JPCNN001.nii.gz"]


def test_random_split_is_seeded_and_70_10_20(tmp_path):
    ids = [f"JPCLN{i:03d}" for i in range(1, 21)]
    fractions = (0.7, 0.1, 0.2)
    a = random_split(ids, fractions, 3)
    b = random_split(ids[::-1], fractions, 3)
    c = random_split(ids, fractions, 4)
    assert a == b != c  # input order does not matter; the seed does
    assert [len(a[k]) for k in ("training", "validation", "test")] == [14, 2, 4]
    assert sorted(sum(a.values(), [])) == ids
    root = _fake_jsrt(tmp_path / "jsrt", ids[:10])
    dl1 = prepare_jsrt(root, tmp_path / "r1", size=8, split="random", native_size=N, seed=7)
    dl2 = prepare_jsrt(root, tmp_path / "r2", size=8, split="random", native_size=N, seed=7)
    b1, b2 = json.loads(Path(dl1).read_text()), json.loads(Path(dl2).read_text())
    oracle = split_cases(ids[:10], (0.7, 0.1, 0.2), ("training", "validation", "test"), seed=7)
    for k in ("training", "validation", "test"):
        entries = [{"image": f"imagesTr/{i}.nii.gz", "label": f"labelsTr/{i}.nii.gz"} for i in oracle[k]]
        assert b1[k] == b2[k] == entries
    assert b1["numTraining"] == 7


# ---------------------------------------------------------------------------------- Montgomery, Shenzhen
def test_prepare_montgomery_left_right_codes(tmp_path):
    root = tmp_path / "MontgomerySet"
    for sub in ("CXR_png", "ManualMask/leftMask", "ManualMask/rightMask"):
        (root / sub).mkdir(parents=True)
    images = {}
    for k in range(4):
        case = f"MCUCXR_{k + 1:04d}_{k % 2}"
        images[case] = np.random.default_rng(k).integers(0, 256, (20, 14)).astype(np.uint8)
        Image.fromarray(images[case]).save(root / "CXR_png" / f"{case}.png")
        left, right = np.zeros((20, 14), np.uint8), np.zeros((20, 14), np.uint8)
        left[3:15, 8:13], right[3:15, 1:7] = 255, 255
        Image.fromarray(left).save(root / "ManualMask/leftMask" / f"{case}.png")
        Image.fromarray(right).save(root / "ManualMask/rightMask" / f"{case}.png")
    (root / "CXR_png" / "Thumbs.db").write_bytes(b"junk")  # non-image files are ignored
    # root one level up
    dl = prepare_montgomery(tmp_path, tmp_path / "out", size=None, fractions=(0.5, 0.25, 0.25))
    body = json.loads(Path(dl).read_text())
    assert [len(body[k]) for k in ("training", "validation", "test")] == [2, 1, 1]
    for d in _load(Path(dl), "training"):
        case = Path(d["_entry"]["image"]).name.split(".")[0]
        np.testing.assert_allclose(d["image"][0].numpy(), images[case] / 255.0, atol=1e-7)
        label = d["label"][0].numpy()
        assert (label[3:15, 8:13] == 1).all() and (label[3:15, 1:7] == 2).all() and label.sum() == 60 + 2 * 72
        np.testing.assert_allclose(np.asarray(d["image"].meta["pixdim"][1:3]), [0.0875, 0.0875])


def test_read_grey_16_bit_and_shenzhen_masks(tmp_path):
    path = tmp_path / "g16.png"
    values = np.array([[0, 4095], [1000, 2048]], np.uint16)
    Image.fromarray(values).save(path)
    np.testing.assert_allclose(read_grey(path, bit_depth=12), values / 4095.0, rtol=1e-6)
    np.testing.assert_allclose(read_grey(path), values / 65535.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"g16\.png.*8-bit range"):
        read_grey(path, bit_depth=8)
    root = tmp_path / "ChinaSet_AllFiles"
    (root / "CXR_png").mkdir(parents=True), (root / "mask").mkdir()
    for k in range(5):
        case = f"CHNCXR_{k + 1:04d}_{k % 2}"
        rgb = np.full((10, 12, 3), 40 * k, np.uint8)  # an RGB file
        Image.fromarray(rgb).save(root / "CXR_png" / f"{case}.png")
        if k != 2:  # one radiograph has no mask
            mask = np.zeros((10, 12), np.uint8)
            mask[2:8, 1 + k : 5 + k] = 255
            Image.fromarray(mask).save(root / "mask" / f"{case}_mask.png")
    dl = prepare_shenzhen(root, tmp_path / "out", size=(5, 6), fractions=(0.5, 0.25, 0.25))
    body = json.loads(Path(dl).read_text())
    assert body["images_without_mask"] == 1 and body["labels"] == {"0": "background", "1": "lung"}
    entries = [e["image"] for k in ("training", "validation", "test") for e in body[k]]
    assert sorted(entries) == [f"imagesTr/CHNCXR_{k + 1:04d}_{k % 2}.nii.gz" for k in (0, 1, 3, 4)]
    for d in _load(Path(dl), "training"):
        k = int(Path(d["_entry"]["image"]).name[7:11]) - 1
        full = np.zeros((10, 12), np.uint8)
        full[2:8, 1 + k : 5 + k] = 1
        np.testing.assert_array_equal(d["label"][0].numpy(), full[1::2, 1::2])  # nearest-exact: pixel 2i+1
        np.testing.assert_allclose(d["image"][0].numpy(), np.full((5, 6), 40 * k / 255.0), atol=1e-6)


# ---------------------------------------------------------------------------------------- dermoscopy
def test_prepare_isbi2016_sections_values_and_png_alignment(tmp_path):
    train, test = [f"ISIC_{i:07d}" for i in (0, 1, 2, 4)], [f"ISIC_{i:07d}" for i in (3, 5)]
    root = _fake_isbi(tmp_path / "isbi", train, test)
    dl = prepare_isbi2016(root, tmp_path / "out", size=None, val_fraction=0.25, seed=1)
    body = json.loads(Path(dl).read_text())
    assert body["labels"] == {"0": "background", "1": "lesion"}
    assert [e["image"] for e in body["test"]] == [f"imagesTr/{c}.png" for c in test]
    got = {Path(e["image"]).stem for e in body["training"] + body["validation"]}
    assert got == set(train) and len(body["validation"]) == 1
    for section, ids in (("training", train), ("test", test)):
        for d in _load(Path(dl), section):
            case = Path(d["_entry"]["image"]).stem
            k = ids.index(case)
            folder = "Training" if section == "training" else "Test"
            jpeg = root / f"ISBI2016_ISIC_Part1_{folder}_Data" / f"{case}.jpg"
            decoded = np.asarray(Image.open(jpeg).convert("RGB"))
            # PIL reader: (C, W, H) for both image and label, i.e. the same transposition
            assert tuple(d["image"].shape) == (3, 18, 12) and tuple(d["label"].shape) == (1, 18, 12)
            np.testing.assert_array_equal(d["image"].numpy().transpose(2, 1, 0), decoded)
            np.testing.assert_array_equal(d["label"][0].numpy().T, _disc(k) // 255)


def test_prepare_isic2018_pools_releases_and_resizes(tmp_path):
    root = tmp_path / "isic"
    ids = {"Training": [f"ISIC_{i:07d}" for i in range(8)], "Validation": ["ISIC_0012255", "ISIC_0012256"]}
    for release, cases in ids.items():
        inp, gt = root / f"ISIC2018_Task1-2_{release}_Input", root / f"ISIC2018_Task1_{release}_GroundTruth"
        inp.mkdir(parents=True), gt.mkdir(parents=True)
        (inp / "LICENSE.txt").write_text("CC")
        for k, case in enumerate(cases):
            Image.fromarray(_rgb(k, (16, 24))).save(inp / f"{case}.jpg")
            Image.fromarray(_disc(k, (16, 24))).save(gt / f"{case}_segmentation.png")
    dl = prepare_isic2018(root, tmp_path / "out", size=(8, 12), seed=2)
    body = json.loads(Path(dl).read_text())
    assert [len(body[k]) for k in ("training", "validation", "test")] == [7, 1, 2]
    stems = {Path(e["image"]).stem for k in ("training", "validation", "test") for e in body[k]}
    assert stems == set(sum(ids.values(), []))
    d = _load(Path(dl), "test")[0]
    case = Path(d["_entry"]["image"]).stem
    release = "Validation" if case in ids["Validation"] else "Training"
    k = ids[release].index(case)
    jpeg = root / f"ISIC2018_Task1-2_{release}_Input" / f"{case}.jpg"
    decoded = np.asarray(Image.open(jpeg).convert("RGB"), np.float64)
    oracle = np.rint(decoded.reshape(8, 2, 12, 2, 3).mean(axis=(1, 3)))
    np.testing.assert_array_equal(d["image"].numpy().transpose(2, 1, 0), oracle)
    np.testing.assert_array_equal(d["label"][0].numpy().T, _disc(k, (16, 24))[1::2, 1::2] // 255)
    only_train = prepare_isic2018(root, tmp_path / "train_only", size=8, releases=("Training",))
    assert json.loads(Path(only_train).read_text())["numTraining"] == 6
    (root / "ISIC2018_Task1_Validation_GroundTruth").rename(root / "elsewhere")
    with pytest.raises(FileNotFoundError, match="ISIC2018_Task1_Validation_GroundTruth"):
        prepare_isic2018(root, tmp_path / "missing", size=8)
    assert not (tmp_path / "missing").exists()


# ------------------------------------------------------------------------------------------ endoscopy
def test_prepare_cvc_clinicdb_tif_and_png_layouts(tmp_path):
    root = tmp_path / "CVC-ClinicDB"
    for layout, ext in ((root, ".tif"), (tmp_path / "kaggle" / "PNG", ".png")):
        (layout / "Original").mkdir(parents=True), (layout / "Ground Truth").mkdir(parents=True)
        for n in range(1, 11):
            Image.fromarray(_rgb(n, (12, 18))).save(layout / "Original" / f"{n}{ext}")
            Image.fromarray(_disc(n)).save(layout / "Ground Truth" / f"{n}{ext}")
    dl = prepare_cvc_clinicdb(root, tmp_path / "out", size=None, seed=0)
    body = json.loads(Path(dl).read_text())
    assert body["labels"] == {"0": "background", "1": "polyp"} and body["numTraining"] == 7
    for d in _load(Path(dl), "test"):
        n = int(Path(d["_entry"]["image"]).stem)
        # TIFF is lossless
        np.testing.assert_array_equal(d["image"].numpy().transpose(2, 1, 0), _rgb(n, (12, 18)))
        np.testing.assert_array_equal(d["label"][0].numpy().T, _disc(n) // 255)
    dl_png = prepare_cvc_clinicdb(tmp_path / "kaggle", tmp_path / "out_png", size=None, seed=0)
    assert json.loads(Path(dl_png).read_text())["test"] == body["test"]  # same frames, same split


def test_cli_runs_a_sub_command(tmp_path):
    root = _fake_isbi(tmp_path / "isbi", ["ISIC_0000000", "ISIC_0000001"], ["ISIC_0000002"])
    argv = ["isbi2016", "--root", str(root), "--out_dir", str(tmp_path / "o")]
    out = cli_main(argv + ["--size", "6,9", "--val_fraction", "0"])
    assert out == str(tmp_path / "o" / "datalist.json")
    d = _load(Path(out), "training")[0]
    assert tuple(d["image"].shape) == (3, 9, 6) and tuple(d["label"].shape) == (1, 9, 6)


# ----------------------------------------------------------------------------------------------- errors
def _assert_nothing_written(out: Path, existed: bool = False) -> None:
    if existed:
        assert not (out / "datalist.json").exists()
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
    else:
        assert not out.exists()


def test_errors_name_the_file_and_leave_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_jsrt(tmp_path / "nowhere", tmp_path / "o")
    root = _fake_jsrt(tmp_path / "jsrt", ["JPCLN001", "JPCLN002", "JPCNN001"])
    out = tmp_path / "o"
    # wrong .IMG size (default native_size 2048)
    with pytest.raises(ValueError, match=r"JPCLN001\.IMG.*bytes, expected"):
        prepare_jsrt(root, out)
    _assert_nothing_written(out)
    # a corrupt GIF, found only after other cases were written to staging
    (root / "scr/masks/heart/JPCNN001.gif").write_bytes(b"GIF89a-not-really")
    with pytest.raises(ValueError, match=r"heart/JPCNN001\.gif.*cannot be read"):
        prepare_jsrt(root, out, native_size=N)
    _assert_nothing_written(out)
    # an existing out_dir keeps its files and gets no datalist
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="JPCNN001.gif"):
        prepare_jsrt(root, out, native_size=N)
    _assert_nothing_written(out, existed=True)
    assert (out / "keep.txt").read_text() == "x"
    # missing mask, then a mask without its image
    (root / "scr/masks/heart/JPCNN001.gif").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing SCR mask .*heart/JPCNN001\.gif"):
        prepare_jsrt(root, tmp_path / "o2", native_size=N)
    Image.fromarray(_scr_masks()["heart"]).save(root / "scr/masks/heart/JPCNN001.gif")
    Image.fromarray(_scr_masks()["heart"]).save(root / "scr/masks/heart/JPCNN077.gif")
    with pytest.raises(FileNotFoundError, match=r"heart/JPCNN077\.gif: SCR mask without a JSRT image"):
        prepare_jsrt(root, tmp_path / "o2", native_size=N)
    _assert_nothing_written(tmp_path / "o2")


def test_rgb_errors_name_the_file_and_leave_nothing(tmp_path):
    root = _fake_isbi(tmp_path / "isbi", ["ISIC_0000000", "ISIC_0000001"], ["ISIC_0000002"])
    gt = root / "ISBI2016_ISIC_Part1_Test_GroundTruth" / "ISIC_0000002_Segmentation.png"
    gt.unlink()
    message = r"ISIC_0000002\.jpg: missing mask .*ISIC_0000002_Segmentation"
    with pytest.raises(FileNotFoundError, match=message):
        prepare_isbi2016(root, tmp_path / "o")
    Image.fromarray(_disc(0)).save(gt)
    Image.fromarray(_disc(0)).save(gt.parent / "ISIC_0000009_Segmentation.png")
    with pytest.raises(FileNotFoundError, match=r"ISIC_0000009_Segmentation\.png: mask without an image"):
        prepare_isbi2016(root, tmp_path / "o")
    (gt.parent / "ISIC_0000009_Segmentation.png").unlink()
    bad = root / "ISBI2016_ISIC_Part1_Training_Data" / "ISIC_0000001.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    with pytest.raises(ValueError, match=r"ISIC_0000001\.jpg: cannot be read"):
        prepare_isbi2016(root, tmp_path / "o")
    _assert_nothing_written(tmp_path / "o")
    root = tmp_path / "cvc"
    (root / "Original").mkdir(parents=True), (root / "Ground Truth").mkdir()
    Image.fromarray(_rgb(1)).save(root / "Original" / "1.tif")
    Image.fromarray(_disc(1)[:6]).save(root / "Ground Truth" / "1.tif")
    with pytest.raises(ValueError, match=r"Ground Truth/1\.tif: mask shape \(6, 18\) differs"):
        prepare_cvc_clinicdb(root, tmp_path / "o", fractions=(0.7, 0.1, 0.2))
    _assert_nothing_written(tmp_path / "o")
    with pytest.raises(ValueError, match="size"):
        prepare_cvc_clinicdb(root, tmp_path / "o", size=(0, 4))
