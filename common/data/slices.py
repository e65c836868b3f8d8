"""Data preparation for 2D slice bundles: lesion slices of 3D CT volumes, and the inverse intensity window.

- :func:`volumes_to_slices`: the 2D lesion-slice set the ``unet_advaug`` bundle trains on (Pervin et
  al., arXiv:2105.12106, train a 2D U-Net on CT slices through the lesion), from any MSD-style datalist
  of 3D NIfTI volumes; slices of a case stay in that case's section.
- :func:`unwindow`: the inverse of MONAI ``ScaleIntensityRange``, to write tensors in network units back
  in source units (e.g. HU), so files made from the network's input go through the same transforms.
- :func:`read_nifti`: (data, affine) of one NIfTI file with a one-line error naming a missing or
  unreadable file.

Files are written with :func:`common.io.atomic_write_nifti`; the datalist last, atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.datalist import load_datalist, write_datalist
from common.io import atomic_write_nifti
from common.validation import check_positive_int

__all__ = ["read_nifti", "unwindow", "volumes_to_slices"]


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine (4, 4)) of a NIfTI file, with a clear error for a missing or unreadable file."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image: no such file {path}")
    try:
        img = nib.load(str(path))
        return np.asanyarray(img.dataobj), img.affine
    except Exception as err:  # nibabel's ImageFileError, gzip/zlib errors on truncated files
        raise ValueError(f"image {path}: cannot be read as NIfTI ({type(err).__name__}: {err})") from err


def unwindow(x: np.ndarray, window: Sequence[float] | None) -> np.ndarray:
    """Inverse of MONAI ``ScaleIntensityRange(a_min, a_max, b_min, b_max)``: network units → source units.

    ``window = (a_min, a_max, b_min, b_max)``; ``None`` is the identity (images already in network units).
    x_src = a_min + (x − b_min)·(a_max − a_min)/(b_max − b_min), in float32.
    """
    x = np.asarray(x, dtype=np.float32)
    if window is None:
        return x
    if len(window) != 4 or window[3] == window[2] or window[1] == window[0]:
        raise ValueError(
            f"window: expected (a_min, a_max, b_min, b_max) with a_min != a_max, b_min != b_max, got {window}"
        )
    a_min, a_max, b_min, b_max = (float(v) for v in window)
    return (a_min + (x - b_min) * ((a_max - a_min) / (b_max - b_min))).astype(np.float32)


def volumes_to_slices(
    datalist: str | os.PathLike,
    out_dir: str | os.PathLike,
    label_value: int = 2,
    axis: int = -1,
    min_voxels: int = 1,
    sections: Sequence[str] = ("training", "validation", "test"),
    crop_size: Sequence[int] | None = None,
    seed: int = 0,
) -> Path:
    """The 2D slice set of the bundle: every slice along ``axis`` through structure ``label_value``.

    Reads each case of ``sections`` of a 3D datalist (NIfTI, one channel), keeps the slices holding at
    least ``min_voxels`` voxels of ``label_value`` and writes ``out_dir/imagesTr/<case>_s<k>.nii.gz``
    (source units and dtype, e.g. int16 HU) and ``out_dir/labelsTr/<case>_s<k>.nii.gz`` (uint8, 1 where
    the label is ``label_value``, else 0), with the in-plane part of the source affine. Slices of a case
    stay in that case's section (no slice of a test volume leaks into training). Writes
    ``out_dir/datalist.json`` atomically last and returns its path.

    ``crop_size`` (h, w) cuts each slice to a window around the structure: the window's centre is the
    structure's in-plane centroid shifted by a uniform random offset of up to a quarter of the window
    per axis (``seed``, per slice; so the structure is not always central), then moved inside the image.
    It raises the lesion's share of the pixels (small-lesion class imbalance) and the training speed.
    """
    label_value = int(label_value)
    min_voxels = check_positive_int(min_voxels, "min_voxels")
    if crop_size is not None:
        crop_size = tuple(check_positive_int(c, "crop_size") for c in crop_size)
        if len(crop_size) != 2:
            raise ValueError(f"crop_size: expected (h, w), got {crop_size}")
    rng = np.random.default_rng(int(seed))
    datalist, out_dir = Path(datalist), Path(out_dir)
    result: dict[str, list[dict[str, str]]] = {}
    for section in sections:
        result[section] = []
        for entry in load_datalist(datalist, section):
            image, affine = read_nifti(entry["image"])
            label, _ = read_nifti(entry["label"])
            if image.ndim != 3 or label.shape != image.shape:
                raise ValueError(
                    f"datalist {datalist}: {entry['image']} {image.shape} and its label {label.shape} "
                    "must be 3D volumes of the same shape"
                )
            ax = axis % 3
            counts = np.moveaxis(label == label_value, ax, 0).reshape(image.shape[ax], -1).sum(1)
            keep = np.flatnonzero(counts >= min_voxels)
            if keep.size == 0:
                continue
            inplane = [a for a in range(3) if a != ax]
            affine2d = np.eye(4)
            affine2d[:3, :2] = affine[:3, inplane]
            affine2d[:3, 3] = affine[:3, 3]
            stem = Path(entry["image"]).name.split(".")[0]
            images = np.take(np.asarray(image), keep, axis=ax)
            labels = (np.take(np.asarray(label), keep, axis=ax) == label_value).astype(np.uint8)
            for j, k in enumerate(keep):
                name = f"{stem}_s{k:03d}.nii.gz"
                im2, la2, aff = np.take(images, j, axis=ax), np.take(labels, j, axis=ax), affine2d
                if crop_size is not None:
                    im2, la2, aff = _crop(im2, la2, affine2d, crop_size, rng)
                atomic_write_nifti(out_dir / "imagesTr" / name, im2, aff)
                atomic_write_nifti(out_dir / "labelsTr" / name, la2, aff)
                result[section].append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    if not result.get("training"):
        raise ValueError(f"datalist {datalist}: no training slice holds label {label_value}")
    return write_datalist(
        out_dir / "datalist.json", result, name="lesion_slices",
        description=f"2D slices along axis {axis} through label {label_value} of {datalist.name}",
        labels={"0": "background", "1": "lesion"}, tensorImageSize="2D",
        numTraining=len(result["training"]),
    )


def _crop(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, size: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop (h, w) around the label's centroid with a random shift of up to size/4; the affine's origin
    moves to the crop's first pixel."""
    if any(s > n for s, n in zip(size, image.shape)):
        raise ValueError(f"crop_size: {size} is larger than the slice {image.shape}")
    centre = np.argwhere(label > 0).mean(axis=0) + rng.uniform(-0.25, 0.25, 2) * np.array(size)
    start = np.clip(np.round(centre - np.array(size) / 2.0).astype(int), 0, np.array(image.shape) - size)
    box = tuple(slice(a, a + s) for a, s in zip(start, size))
    out = affine.copy()
    out[:3, 3] = affine[:3, 3] + affine[:3, :2] @ start
    return image[box], label[box], out
