"""Readers of the NIH Pancreas-CT (DICOM + NIfTI labels) and MSD Task07 layouts, and the 4-fold split."""

from __future__ import annotations

import json
import locale
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from common.data.pancreas import (
    assign_folds,
    discover_nih_cases,
    load_fold,
    prepare_msd_pancreas,
    prepare_nih_pancreas,
    read_dicom_series,
)

SPACING = (0.7, 0.7, 2.5)


def _write_dicom_series(folder: Path, volume: np.ndarray, series_uid: str) -> None:
    """``volume`` (z, y, x) int16 HU as one axial DICOM slice per z, with the series tags GDCM sorts by.

    GDCM's DICOM writer switches the whole process to the "C" locale (measured), which turns Python's
    default text encoding into ASCII for every later test in this process; the locale is put back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_slices(folder, volume, series_uid)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(folder: Path, volume: np.ndarray, series_uid: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(volume.shape[0]):
        sl = sitk.GetImageFromArray(volume[z : z + 1])
        sl.SetSpacing(SPACING)
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0032": f"0\\0\\{z * SPACING[2]}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(z + 1),
            "0028|0030": f"{SPACING[1]}\\{SPACING[0]}",
            "0018|0050": str(SPACING[2]),
            "0008|0018": f"{series_uid}.{z + 1}",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"1-{z + 1:03d}.dcm"))
        writer.Execute(sl)


def _nih_layout(root: Path, num_patients: int, rng: np.random.Generator):
    images, labels, volumes = root / "Pancreas-CT", root / "labels", {}
    labels.mkdir(parents=True)
    for p in range(1, num_patients + 1):
        vol = rng.integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)  # (z, y, x)
        lab = np.zeros((5, 6, 7), np.uint8)
        lab[1:3, 2:4, 3:6] = 1
        uid = f"1.2.826.0.1.3680043.2.1125.{p}.7"
        _write_dicom_series(images / f"PANCREAS_{p:04d}" / "study" / "series", vol, uid)
        img = sitk.GetImageFromArray(lab)
        img.SetSpacing(SPACING)
        sitk.WriteImage(img, str(labels / f"label{p:04d}.nii.gz"))
        volumes[f"pancreas_{p:04d}"] = (vol, lab)
    return images, labels, volumes


def test_assign_folds_balanced_and_seeded():
    ids = [f"c{i}" for i in range(82)]
    folds = assign_folds(ids, 4, seed=3)
    sizes = np.bincount(list(folds.values()), minlength=4)
    assert sorted(sizes.tolist(), reverse=True) == [21, 21, 20, 20]  # the paper's NIH fold sizes
    assert folds == assign_folds(ids, 4, seed=3)
    assert folds != assign_folds(ids, 4, seed=4)
    with pytest.raises(ValueError, match="case_ids"):
        assign_folds(["a", "a", "b", "c"], 2)


def test_read_dicom_series_values_and_spacing(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, size=(4, 5, 6)).astype(np.int16)
    _write_dicom_series(tmp_path / "p" / "a" / "b", vol, "1.2.3.4.5")
    img = read_dicom_series(tmp_path / "p")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), vol)
    np.testing.assert_allclose(img.GetSpacing(), SPACING, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="dicom"):
        (tmp_path / "empty").mkdir()
        read_dicom_series(tmp_path / "empty")


def test_prepare_nih_pancreas(tmp_path):
    rng = np.random.default_rng(1)
    images, labels, volumes = _nih_layout(tmp_path / "raw", 4, rng)
    datalist = prepare_nih_pancreas(images, labels, tmp_path / "out", num_folds=4, seed=0)
    body = json.loads(datalist.read_text())
    assert [len(body[f"fold{k}"]) for k in range(4)] == [1, 1, 1, 1]
    assert len(body["training"]) == 4
    for entry in body["training"]:
        vol, lab = volumes[entry["case_id"]]
        image = nib.load(datalist.parent / entry["image"])
        label = nib.load(datalist.parent / entry["label"])
        # NIfTI (x, y, z) holds the DICOM (z, y, x) array transposed, HU and spacing unchanged
        np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), vol)
        np.testing.assert_array_equal(np.asarray(label.dataobj).transpose(2, 1, 0), lab)
        np.testing.assert_allclose(image.header.get_zooms(), SPACING, atol=1e-5)
    train0 = load_fold(datalist, "training", 0)
    test0 = load_fold(datalist, "test", 0)
    assert len(train0) == 3 and len(test0) == 1
    assert {e["case_id"] for e in train0}.isdisjoint({e["case_id"] for e in test0})
    assert all(Path(e["image"]).is_absolute() for e in train0 + test0)
    with pytest.raises(ValueError, match="fold"):
        load_fold(datalist, "test", 7)


def test_nih_errors(tmp_path):
    rng = np.random.default_rng(2)
    images, labels, _ = _nih_layout(tmp_path / "raw", 1, rng)
    (labels / "label0001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="label0001"):
        discover_nih_cases(images, labels)
    bad = sitk.GetImageFromArray(np.zeros((5, 6, 8), np.uint8))
    sitk.WriteImage(bad, str(labels / "label0001.nii.gz"))
    with pytest.raises(ValueError, match="size"):
        prepare_nih_pancreas(images, labels, tmp_path / "out")
    assert not (tmp_path / "out" / "datalist.json").exists()
    with pytest.raises(FileNotFoundError, match="images_root"):
        discover_nih_cases(tmp_path / "nope", labels)


def test_prepare_msd_pancreas(tmp_path):
    task = tmp_path / "Task07_Pancreas"
    training = []
    for i in (1, 4, 5, 10, 12):
        label = np.eye(4, 4, dtype=np.uint8)[..., None].repeat(3, 2) * 2
        for sub, data in (("imagesTr", np.full((4, 4, 3), -50, np.int16)), ("labelsTr", label)):
            (task / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.eye(4)), task / sub / f"pancreas_{i:03d}.nii.gz")
        name = f"pancreas_{i:03d}.nii.gz"
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels = {"0": "background", "1": "pancreas", "2": "cancer"}
    (task / "dataset.json").write_text(json.dumps({"name": "Pancreas", "labels": labels, "training": training}))
    datalist = prepare_msd_pancreas(task, tmp_path / "lists", seed=1)
    body = json.loads(datalist.read_text())
    assert sorted(len(body[f"fold{k}"]) for k in range(4)) == [1, 1, 1, 2]
    assert sorted(e["case_id"] for e in body["training"]) == [f"pancreas_{i:03d}" for i in (1, 4, 5, 10, 12)]
    test = load_fold(datalist, "test", 2)
    assert all(Path(e["image"]).is_file() and Path(e["label"]).is_file() for e in test)
    (task / "imagesTr" / "pancreas_004.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="pancreas_004"):
        prepare_msd_pancreas(task, tmp_path / "lists2")
    (task / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset.json"):
        prepare_msd_pancreas(task)

