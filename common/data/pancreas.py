"""Pancreas CT datasets of the ResDSN paper (Li et al. 2019, ResDSN C2F, Sec. 4.1.2) as 4-fold cross-validation datalists.

Two native layouts are read, resolutions kept unchanged ("we did not normalize the spatial resolution"):

- **NIH Pancreas-CT** (TCIA): one DICOM series per patient, anywhere below ``<images_root>/PANCREAS_NNNN/``
  (the TCIA download nests ``<study>/<series>/*.dcm``), and labels ``<labels_root>/label00NN.nii.gz``
  (pancreas = 1). Series are read with SimpleITK's ``ImageSeriesReader`` (slices sorted by GDCM along
  the patient axis) and written as NIfTI ``<out_dir>/imagesTr/pancreas_NNNN.nii.gz`` (int16 HU); the
  label is written on the image's grid as ``<out_dir>/labelsTr/pancreas_NNNN.nii.gz`` (uint8, label > 0).
  A label whose voxel grid size differs from its series raises ``ValueError``.
- **MSD Task07_Pancreas**: ``imagesTr/pancreas_NNN.nii.gz``, ``labelsTr/pancreas_NNN.nii.gz`` and
  ``dataset.json``; nothing is copied, the datalist points at the original files. Task07 labels are
  1 = pancreas, 2 = tumour; the paper segments the whole pancreas, i.e. pancreas = label > 0, which the
  bundle's transforms apply (``AsDiscreted(threshold=0.5)``, also a no-op on NIH's 0/1 labels).

Datalist (``<out_dir>/datalist.json``, paths relative to its folder): sections ``fold0`` … ``fold3``, the
test cases of each fold of a seeded random 4-fold split (sizes differ by at most one: 21, 21, 20, 20 for
the 82 NIH cases), every entry carrying ``"fold": k`` and ``"case_id"``; :func:`load_fold` returns the
training part (the other three folds) or the test part of one fold. ``"training"`` lists all cases.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.data.datalist import load_datalist, write_datalist
from common.io import atomic_path
from common.validation import check_positive_int

__all__ = [
    "NUM_FOLDS",
    "assign_folds",
    "discover_nih_cases",
    "read_dicom_series",
    "convert_nih_case",
    "prepare_nih_pancreas",
    "prepare_msd_pancreas",
    "load_fold",
]

NUM_FOLDS = 4
LABELS = {"0": "background", "1": "pancreas"}
_NIH_PATIENT = re.compile(r"^PANCREAS_(\d+)$")


def assign_folds(case_ids: Sequence[str], num_folds: int = NUM_FOLDS, seed: int = 0) -> dict[str, int]:
    """A seeded random split of ``case_ids`` into ``num_folds`` folds whose sizes differ by at most one
    (the first folds take the remainder: 82 cases → 21, 21, 20, 20 as in the paper). Returns id → fold."""
    num_folds = check_positive_int(num_folds, "num_folds")
    ids = list(case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("case_ids: duplicate case ids")
    if len(ids) < num_folds:
        raise ValueError(f"case_ids: {len(ids)} cases cannot fill {num_folds} folds")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = np.empty(len(ids), dtype=np.int64)
    folds[order] = np.arange(len(ids)) % num_folds
    return {ids[i]: int(folds[i]) for i in range(len(ids))}


def _fold_datalist(
    out_dir: Path, entries: list[dict[str, Any]], num_folds: int, seed: int, **meta: Any
) -> Path:
    folds = assign_folds([e["case_id"] for e in entries], num_folds, seed)
    for e in entries:
        e["fold"] = folds[e["case_id"]]
    sections = {f"fold{k}": [e for e in entries if e["fold"] == k] for k in range(num_folds)}
    sections["training"] = entries
    return write_datalist(
        out_dir / "datalist.json", sections, labels=LABELS, modality={"0": "CT"}, tensorImageSize="3D",
        numTraining=len(entries), num_folds=num_folds, seed=seed, **meta,
    )


# ------------------------------------------------------------------------------------------------ NIH
def discover_nih_cases(
    images_root: str | os.PathLike, labels_root: str | os.PathLike
) -> list[tuple[str, Path, Path]]:
    """``(case_id, patient_dir, label_file)`` for every ``PANCREAS_NNNN`` folder with a ``label00NN.nii.gz``
    (or ``.nii``), sorted by number; ``case_id`` is ``pancreas_NNNN``. Raises ``FileNotFoundError`` for a
    missing root, a patient without a label, or no patient at all."""
    images_root, labels_root = Path(images_root), Path(labels_root)
    for name, root in (("images_root", images_root), ("labels_root", labels_root)):
        if not root.is_dir():
            raise FileNotFoundError(f"{name}: no such folder {root}")
    cases = []
    for patient in sorted(p for p in images_root.iterdir() if p.is_dir() and _NIH_PATIENT.match(p.name)):
        number = int(_NIH_PATIENT.match(patient.name).group(1))  # type: ignore[union-attr]
        candidates = [labels_root / f"label{number:04d}.nii.gz", labels_root / f"label{number:04d}.nii"]
        label = next((c for c in candidates if c.is_file()), None)
        if label is None:
            raise FileNotFoundError(f"labels_root: no label{number:04d}.nii.gz for {patient}")
        cases.append((f"pancreas_{number:04d}", patient, label))
    if not cases:
        raise FileNotFoundError(f"images_root: no PANCREAS_NNNN folder in {images_root}")
    return cases


def read_dicom_series(folder: str | os.PathLike):
    """The one DICOM series found anywhere below ``folder`` as a SimpleITK image (HU, with spacing,
    origin and direction from the headers). Raises ``FileNotFoundError`` if there is none and
    ``ValueError`` if there are several or the files cannot be read."""
    import SimpleITK as sitk

    folder = Path(folder)
    series: dict[str, list[str]] = {}
    for sub in sorted({p.parent for p in folder.rglob("*") if p.is_file()} | {folder}):
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(sub)) or ():
            series.setdefault(uid, []).extend(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(sub), uid))
    if not series:
        raise FileNotFoundError(f"dicom: no DICOM series below {folder}")
    if len(series) > 1:
        raise ValueError(f"dicom: {len(series)} series below {folder}, expected one per patient")
    (files,) = series.values()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise ValueError(f"dicom: cannot read the series below {folder}: {err}") from err


def convert_nih_case(
    patient_dir: Path, label_file: Path, image_out: Path, label_out: Path
) -> tuple[int, ...]:
    """Write one NIH case as NIfTI: the series (int16 HU) and its label (uint8, label > 0) on the
    series' grid. Returns the image size (x, y, z)."""
    import SimpleITK as sitk

    image = sitk.Cast(read_dicom_series(patient_dir), sitk.sitkInt16)
    try:
        label = sitk.ReadImage(str(label_file))
    except RuntimeError as err:
        raise ValueError(f"label {label_file}: cannot be read ({err})") from err
    if label.GetSize() != image.GetSize():
        raise ValueError(
            f"label {label_file}: size {label.GetSize()} differs from its series {image.GetSize()}"
        )
    mask = sitk.GetImageFromArray((sitk.GetArrayFromImage(label) > 0).astype(np.uint8))
    mask.CopyInformation(image)
    for img, path in ((image, image_out), (mask, label_out)):
        # ITK infers the format from the suffix: written whole under its own name, then moved into place
        with atomic_path(path, keep_name=True) as tmp:
            sitk.WriteImage(img, str(tmp), True)
    return tuple(image.GetSize())


def prepare_nih_pancreas(
    images_root: str | os.PathLike, labels_root: str | os.PathLike, out_dir: str | os.PathLike,
    num_folds: int = NUM_FOLDS, seed: int = 0,
) -> Path:
    """Convert every NIH case (:func:`convert_nih_case`) into ``out_dir`` and write the 4-fold datalist.
    Returns the datalist's path (written last)."""
    out_dir = Path(out_dir)
    entries = []
    for case_id, patient, label in discover_nih_cases(images_root, labels_root):
        image_rel, label_rel = f"imagesTr/{case_id}.nii.gz", f"labelsTr/{case_id}.nii.gz"
        convert_nih_case(patient, label, out_dir / image_rel, out_dir / label_rel)
        entries.append({"case_id": case_id, "image": image_rel, "label": label_rel})
    return _fold_datalist(
        out_dir, entries, num_folds, seed, name="NIH Pancreas-CT", description="TCIA Pancreas-CT, native spacing"
    )


# ------------------------------------------------------------------------------------------------ MSD
def prepare_msd_pancreas(
    task_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    num_folds: int = NUM_FOLDS,
    seed: int = 0,
) -> Path:
    """The 4-fold datalist of MSD ``Task07_Pancreas`` from its ``dataset.json`` "training" entries.

    Files are not copied: the datalist (in ``out_dir``, default ``task_dir``) refers to them by paths
    relative to ``out_dir``. Raises ``FileNotFoundError`` for a missing ``dataset.json`` or file and
    ``ValueError`` for a corrupt one.
    """
    task_dir = Path(task_dir)
    out_dir = Path(out_dir) if out_dir is not None else task_dir
    meta_file = task_dir / "dataset.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"task_dir: no dataset.json in {task_dir}")
    try:
        training = json.loads(meta_file.read_text())["training"]
        pairs = [(str(t["image"]), str(t["label"])) for t in training]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"dataset.json {meta_file}: expected a 'training' list of image/label entries ({err})"
        ) from err
    entries = []
    for image, label in pairs:
        paths = [(task_dir / p).resolve() for p in (image, label)]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"dataset.json {meta_file}: file {p} does not exist")
        case_id = Path(image).name.split(".")[0]
        rel = [os.path.relpath(p, out_dir.resolve()) for p in paths]
        entries.append({"case_id": case_id, "image": rel[0], "label": rel[1]})
    return _fold_datalist(
        out_dir, entries, num_folds, seed, name="MSD Task07_Pancreas",
        description="MSD Task07 (label 1 pancreas, 2 tumour; pancreas = label > 0)",
    )


# --------------------------------------------------------------------------------------------- folds
def load_fold(datalist: str | os.PathLike, section: str, fold: int | None = None) -> list[dict[str, Any]]:
    """Entries of one part of a datalist, paths absolute.

    ``fold=None``: the datalist's own section (``"training"``, ``"validation"``, ``"test"``, e.g. the
    phantom sets). ``fold=k``: cross-validation fold k of a datalist with sections ``fold0`` …:
    ``"training"`` is every other fold, ``"validation"`` and ``"test"`` are fold k (the paper trains a
    fixed number of iterations, so validation only monitors training).
    """
    if fold is None:
        return load_datalist(datalist, section)
    if section not in ("training", "validation", "test"):
        raise ValueError(f"section: expected 'training', 'validation' or 'test', got {section!r}")
    body = json.loads(Path(datalist).read_text()) if Path(datalist).is_file() else None
    if body is None:
        raise FileNotFoundError(f"datalist: no such file {datalist}")
    names = sorted(k for k in body if re.fullmatch(r"fold\d+", k))
    if f"fold{fold}" not in names:
        raise ValueError(f"fold: {fold!r} not among the datalist's folds {names}")
    if section != "training":
        return load_datalist(datalist, f"fold{fold}")
    entries = [e for name in names if name != f"fold{fold}" for e in load_datalist(datalist, name)]
    if not entries:  # a one-fold datalist has nothing to train on outside the held-out fold
        from common.errors import InputError

        raise InputError(f"datalist {datalist}: section 'training' of fold {fold} is empty (folds {names})")
    return entries
