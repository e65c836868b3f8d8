"""BraTS 2017 preparation as in the BraTS robustness paper (Liu et al. 2021, "Experiments"):
N4 bias-field correction, resize to 128³, global standardisation, 20 % held-out test split.

Input layout (the challenge's own)::

    <root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz          (or .nii)
    <root>/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz   (BraTS 2017 training release)

Output layout (MSD Task01 style, paths in the datalist relative to ``out_dir``)::

    <out_dir>/imagesTr/<case>.nii.gz   float32 (X, Y, Z, 4), channels last: t1, t1ce, t2, flair
    <out_dir>/labelsTr/<case>.nii.gz   uint8 (X, Y, Z), BraTS values {0, 1, 2, 4} kept
    <out_dir>/datalist.json             {"training": [...], "validation": [...], "test": [...], ...}

Labels are stored as BraTS values; training maps them to class indices with
``common.networks.unet_brats.brats_to_index`` (or MONAI ``MapLabelValued``), and scoring in whole
tumour / tumour core / enhancing tumour regions uses ``common.metrics.labels_to_regions``.

Everything is staged in a hidden folder inside ``out_dir`` and moved into place only after every case
has been processed, and the datalist is written last: a missing or corrupt file leaves no dataset
behind.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from common.data.datalist import split_cases, write_datalist
from common.io import atomic_path, staged_directory
from common.validation import check_nonnegative, check_positive_int

__all__ = [
    "BRATS_MODALITIES",
    "BRATS_LABEL_NAMES",
    "DATALIST_NAME",
    "BraTSCase",
    "discover_brats_cases",
    "load_brats_case",
    "n4_bias_correct",
    "preprocess_brats_case",
    "prepare_brats",
]

logger = logging.getLogger(__name__)

BRATS_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""File suffixes of the four MR series, in output channel order (paper: T1, T1Gd, T2, FLAIR)."""
DATALIST_NAME = "datalist.json"
BRATS_LABEL_NAMES: dict[str, str] = {
    "0": "background",
    "1": "necrotic / non-enhancing tumour",
    "2": "peritumoral edema",
    "4": "enhancing tumour",
}
# The values of common.networks.unet_brats.BRATS_LABELS, kept here so that data preparation does not
# import the network package.
_LABEL_VALUES = tuple(int(k) for k in BRATS_LABEL_NAMES)
_GRADE_FOLDERS = ("HGG", "LGG")


@dataclass(frozen=True)
class BraTSCase:
    """One subject: its id, the four modality files (``BRATS_MODALITIES`` order) and the label file."""

    case_id: str
    images: tuple[Path, ...]
    label: Path


def _case_file(case_dir: Path, suffix: str) -> Path:
    for ext in (".nii.gz", ".nii"):
        path = case_dir / f"{case_dir.name}_{suffix}{ext}"
        if path.is_file():
            return path
    expected = case_dir / f"{case_dir.name}_{suffix}.nii.gz"
    raise FileNotFoundError(f"BraTS case {case_dir.name}: missing file {expected}")


def discover_brats_cases(root: str | os.PathLike) -> list[BraTSCase]:
    """Every case folder under ``root`` (or under ``root/HGG`` and ``root/LGG``), sorted by case id.

    Hidden folders are skipped. Raises FileNotFoundError for a missing ``root``, no case folders, or a
    case without one of its five files (naming that file), and ValueError for a duplicate case id.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: no such directory {root}")

    def subdirs(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    case_dirs: list[Path] = []
    for folder in subdirs(root):
        case_dirs.extend(subdirs(folder) if folder.name.upper() in _GRADE_FOLDERS else [folder])
    if not case_dirs:
        raise FileNotFoundError(f"root: no BraTS case folders under {root}")
    cases: dict[str, BraTSCase] = {}
    for case_dir in case_dirs:
        if case_dir.name in cases:
            first = cases[case_dir.name].label.parent
            raise ValueError(f"root: case id {case_dir.name} appears twice ({first}, {case_dir})")
        images = tuple(_case_file(case_dir, m) for m in BRATS_MODALITIES)
        cases[case_dir.name] = BraTSCase(case_dir.name, images, _case_file(case_dir, "seg"))
    return [cases[k] for k in sorted(cases)]


def _read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxel data (X, Y, Z) float32 and the affine of one NIfTI file; ValueError naming the file."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as err:  # nibabel raises ImageFileError, EOFError, OSError, zlib.error ...
        raise ValueError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err})") from err
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: contains NaN or Inf values")
    return data, np.asarray(img.affine, dtype=np.float64)


def load_brats_case(case: BraTSCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read one case: image (4, X, Y, Z) float32, label (X, Y, Z) uint8 with BraTS values, affine (4, 4).

    ValueError (naming the file) for an unreadable file, a shape that differs from the first
    modality's, or label values outside {0, 1, 2, 4}.
    """
    volumes, affine = [], None
    for path in (*case.images, case.label):
        data, aff = _read_volume(path)
        if volumes and data.shape != volumes[0].shape:
            first = case.images[0].name
            raise ValueError(f"{path}: shape {data.shape} differs from {first}'s {volumes[0].shape}")
        affine = aff if affine is None else affine
        volumes.append(data)
    label = volumes.pop()
    bad = ~np.isin(label, _LABEL_VALUES)
    if bad.any():
        values = ", ".join(f"{v:g}" for v in np.unique(label[bad])[:5])
        raise ValueError(f"{case.label}: label values [{values}] are not BraTS labels {list(_LABEL_VALUES)}")
    return np.stack(volumes), label.astype(np.uint8), affine


def n4_bias_correct(
    volume: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    shrink_factor: int = 4,
    iterations: Sequence[int] = (50, 50, 50, 50),
) -> np.ndarray:
    """N4 bias-field correction (Tustison et al. 2010, the paper's ref. [27]) with SimpleITK.

    The field is fitted on the image shrunk by ``shrink_factor`` inside an Otsu foreground mask
    (restricted to positive voxels, since N4 works on log intensities), then evaluated at full
    resolution and divided out: ``corrected = volume / exp(log_field)``. ``iterations`` gives the
    maximum iterations per fitting level (its length is the number of levels). ``volume`` (X, Y, Z),
    ``spacing`` in mm per axis; returns float32 of the same shape (zeros stay zero). A volume without
    foreground is returned unchanged.
    """
    import SimpleITK as sitk

    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"volume: expected (X, Y, Z), got shape {volume.shape}")
    shrink_factor = check_positive_int(shrink_factor, "shrink_factor")
    iterations = [check_positive_int(i, "iterations") for i in iterations]
    if not iterations:
        raise ValueError("iterations: at least one fitting level is needed")
    if shrink_factor > min(volume.shape):
        raise ValueError(f"shrink_factor: {shrink_factor} exceeds the smallest side {min(volume.shape)}")
    # GetImageFromArray reads numpy axes in reverse (z, y, x) order, hence the reversed spacing.
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing([float(s) for s in reversed(tuple(spacing))])
    mask = sitk.OtsuThreshold(image, 0, 1, 200) * sitk.Cast(image > 0, sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(mask).any():
        return volume.copy()
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(iterations)
    shrink = [shrink_factor] * 3
    corrector.Execute(sitk.Shrink(image, shrink), sitk.Shrink(mask, shrink))
    log_field = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image))
    return (volume / np.exp(log_field)).astype(np.float32)


def _resized_affine(affine: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
    """Affine of a grid resampled with ``align_corners=False``: old index = (new + 0.5) * s - 0.5."""
    scale = np.asarray(in_shape, dtype=np.float64) / np.asarray(out_shape, dtype=np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = 0.5 * scale - 0.5
    return affine @ index_map


def _spatial_size(size: int | Sequence[int]) -> tuple[int, int, int]:
    """``size`` as three positive ints (an int means a cube)."""
    spatial = (size,) * 3 if np.isscalar(size) else tuple(size)
    if len(spatial) != 3:
        raise ValueError(f"size: expected an int or 3 ints, got {size!r}")
    return tuple(check_positive_int(s, "size") for s in spatial)


def preprocess_brats_case(
    case: BraTSCase,
    size: int | Sequence[int] = 128,
    n4: bool = True,
    shrink_factor: int = 4,
    n4_iterations: Sequence[int] = (50, 50, 50, 50),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's pre-processing of one case: N4 per modality → resize → global standardisation.

    Images are resized trilinearly and labels by nearest neighbour (MONAI ``Resize``) to ``size``
    (int → cube); each modality is then standardised to zero mean, unit variance over its non-zero
    (brain) voxels, background left at 0 (MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)``).
    Standardising after resizing makes the output exactly standardised; it differs from
    standardise-then-resize only at the brain boundary. Returns image (4, *size) float32, label
    (*size) uint8 with values {0, 1, 2, 4}, and the resampled affine (4, 4).
    """
    from monai.transforms import NormalizeIntensity, Resize
    from monai.utils import convert_to_numpy

    spatial = _spatial_size(size)
    image, label, affine = load_brats_case(case)
    if n4:
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        image = np.stack([n4_bias_correct(ch, spacing, shrink_factor, n4_iterations) for ch in image])
    in_shape = label.shape
    image = Resize(spatial, mode="trilinear")(image)
    image = convert_to_numpy(NormalizeIntensity(nonzero=True, channel_wise=True)(image), dtype=np.float32)
    label = convert_to_numpy(Resize(spatial, mode="nearest")(label[None].astype(np.float32)))[0]
    return image, label.round().astype(np.uint8), _resized_affine(affine, in_shape, spatial)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a gzipped NIfTI-1 atomically (serialised in memory: nibabel picks the format from the
    file name, which ``atomic_path``'s temporary name hides)."""
    payload = gzip.compress(nib.Nifti1Image(data, affine).to_bytes(), compresslevel=1)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def _split(case_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded training / validation / test split of sorted ids; a zero fraction gives an empty section."""
    train_fraction = 1.0 - val_fraction - test_fraction
    fractions = {"training": train_fraction, "validation": val_fraction, "test": test_fraction}
    used = {k: v for k, v in fractions.items() if v > 0}
    parts = split_cases(sorted(case_ids), tuple(used.values()), tuple(used), seed=seed)
    return {k: parts.get(k, []) for k in fractions}


def prepare_brats(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    size: int | Sequence[int] = 128,
    n4: bool = True,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    shrink_factor: int = 4,
    n4_iterations: Sequence[int] = (50, 50, 50, 50),
) -> str:
    """Prepare a BraTS 2017 folder for the bundles: pre-process every case, split, write a datalist.

    Args:
        root: BraTS folder (``<root>/<case>/...`` or ``<root>/{HGG,LGG}/<case>/...``); ``out_dir``
            must not lie inside it.
        out_dir: output folder (created); files already there with the same names are replaced.
        size: output grid (paper: 128 → 128³).
        n4: apply N4 bias-field correction (paper: yes); ``shrink_factor`` and ``n4_iterations``
            as in :func:`n4_bias_correct`.
        test_fraction: held-out test share (paper: 0.2); ``val_fraction`` is taken from the rest of
            the 80 % for model selection. Either may be 0; their sum must be < 1.
        seed: seed of the split (``split_cases`` over sorted case ids, so it is the same on every run).

    Returns the datalist path (``<out_dir>/datalist.json``). Arguments and the presence of every file
    are checked before any work; outputs are staged, moved into place once every case has been
    processed, and the datalist is written last: an error (FileNotFoundError / ValueError naming the
    file) leaves no new dataset behind.
    """
    test_fraction = check_nonnegative(test_fraction, "test_fraction")
    val_fraction = check_nonnegative(val_fraction, "val_fraction")
    if test_fraction + val_fraction >= 1.0:
        raise ValueError(f"test_fraction + val_fraction: must be < 1, got {test_fraction + val_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    spatial = _spatial_size(size)
    shrink_factor = check_positive_int(shrink_factor, "shrink_factor")
    n4_iterations = tuple(check_positive_int(i, "n4_iterations") for i in n4_iterations)
    if not n4_iterations:
        raise ValueError("n4_iterations: at least one fitting level is needed")
    cases = discover_brats_cases(root)
    parts = _split([c.case_id for c in cases], val_fraction, test_fraction, int(seed))

    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        for i, case in enumerate(cases):
            logger.info("BraTS %d/%d: %s", i + 1, len(cases), case.case_id)
            image, label, affine = preprocess_brats_case(case, spatial, n4, shrink_factor, n4_iterations)
            _save_nifti(staging / "imagesTr" / f"{case.case_id}.nii.gz", np.moveaxis(image, 0, -1), affine)
            _save_nifti(staging / "labelsTr" / f"{case.case_id}.nii.gz", label, affine)
    sections = {
        name: [{"image": f"imagesTr/{c}.nii.gz", "label": f"labelsTr/{c}.nii.gz"} for c in ids]
        for name, ids in parts.items()
    }
    path = write_datalist(
        out_dir / DATALIST_NAME,
        sections,
        name="BraTS2017",
        description="N4 bias-field corrected, resized, standardised over non-zero voxels per modality",
        tensorImageSize="4D",
        modality={str(i): m for i, m in enumerate(BRATS_MODALITIES)},
        labels=BRATS_LABEL_NAMES,
        preprocessing={
            "size": list(spatial),
            "n4": bool(n4),
            "shrink_factor": shrink_factor,
            "n4_iterations": list(n4_iterations),
            "seed": int(seed),
            "test_fraction": test_fraction,
            "val_fraction": val_fraction,
        },
    )
    return str(path)
