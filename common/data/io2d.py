"""Reading, resizing and writing 2D image / mask datasets (shared by the chest X-ray, dermoscopy and
endoscopy readers in ``common.data``).

Readers: :func:`read_grey` (float32 (H, W) in [0, 1]), :func:`read_rgb` (uint8 (H, W, 3)),
:func:`read_binary_mask` (bool (H, W)). Resizing: :func:`resize_image` (MONAI ``Resize``, "area" when
shrinking) and :func:`resize_label` ("nearest-exact"). Case assembly: :func:`grey_label_case`,
:func:`rgb_binary_case`. File discovery: :func:`find_dir`, :func:`image_files`, :func:`pair_files`.
Splits: :func:`random_split`, :func:`carve_validation`. Output: :func:`write_2d_dataset`::

    <out_dir>/imagesTr/<case>.nii.gz | .png   float32 (H, W) in [0, 1] | RGB uint8 (H, W, 3)
    <out_dir>/labelsTr/<case>.nii.gz | .png   uint8 (H, W) class codes
    <out_dir>/datalist.json                   sections training / validation / test (MSD style)
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.data.datalist import split_cases, write_datalist
from common.io import atomic_path, atomic_write_bytes, staged_directory
from common.validation import check_nonnegative, check_positive_int

__all__ = [
    "DATALIST_NAME",
    "SECTIONS",
    "IMAGE_EXTS",
    "check_dir",
    "check_seed",
    "check_size_2d",
    "read_grey",
    "read_rgb",
    "read_binary_mask",
    "resize_image",
    "resize_label",
    "find_dir",
    "image_files",
    "natural_key",
    "pair_files",
    "random_split",
    "carve_validation",
    "grey_label_case",
    "rgb_binary_case",
    "write_2d_dataset",
]

logger = logging.getLogger(__name__)

DATALIST_NAME = "datalist.json"
SECTIONS: tuple[str, ...] = ("training", "validation", "test")
IMAGE_EXTS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")


def check_size_2d(size: Any) -> tuple[int, int] | None:
    """``size`` as (H, W): an int means a square, a pair is (H, W), None keeps the native grid."""
    if size is None:
        return None
    if isinstance(size, str):
        size = tuple(p for p in re.split(r"[,x ]+", size.strip("()[] ")) if p)
        try:
            size = tuple(int(p) for p in size)
        except ValueError:
            raise ValueError(f"size: expected an int or two ints, got {size!r}") from None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"size: expected an int, two ints (H, W) or None, got {size!r}")
    return tuple(check_positive_int(s, "size") for s in size)


def _open_image(path: Path):
    """PIL image with its pixels loaded; FileNotFoundError / ValueError naming ``path``."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        img = Image.open(path)
        img.load()
    except Exception as err:  # UnidentifiedImageError, truncated data, decoder errors
        raise ValueError(f"{path}: cannot be read as an image ({type(err).__name__}: {err})") from err
    return img


def read_grey(path: str | os.PathLike, bit_depth: int | None = None) -> np.ndarray:
    """A grey image file (PNG, TIFF, ...) as float32 (H, W) in [0, 1].

    8-bit files are divided by 255, 16-bit files by ``2**bit_depth - 1`` (default 16; give 12 for 12-bit
    data stored in 16-bit words). Colour files are converted to luminance (PIL ``convert("L")``).
    ValueError naming the file for an unreadable file or values beyond ``bit_depth`` bits.
    """
    img = _open_image(Path(path))
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        data, container = np.asarray(img).astype(np.int64), 16
    elif img.mode == "F":
        raise ValueError(f"{path}: floating-point images are not supported (mode 'F')")
    else:
        data, container = np.asarray(img.convert("L")).astype(np.int64), 8
    bits = container if bit_depth is None else check_positive_int(bit_depth, "bit_depth")
    if bits > 16:
        raise ValueError(f"bit_depth: expected at most 16, got {bits}")
    top = 2**bits - 1
    if data.size and (data.min() < 0 or data.max() > top):
        raise ValueError(f"{path}: values up to {data.max()} exceed the {bits}-bit range [0, {top}]")
    return (data / top).astype(np.float32)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An 8-bit colour image (JPEG, PNG, TIFF) as uint8 (H, W, 3); grey files are replicated to RGB."""
    img = _open_image(Path(path))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise ValueError(f"{path}: expected an 8-bit colour image, got PIL mode {img.mode!r}")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_binary_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file (GIF, PNG, TIFF; 0 / 255 in the releases) as bool (H, W): grey value >= 128 is foreground.

    Palette files (SCR GIFs) are converted to their grey values first, so palette indices never leak in.
    """
    img = _open_image(Path(path))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise ValueError(f"{path}: expected an 8-bit mask, got PIL mode {img.mode!r}")
    return np.asarray(img.convert("L")) >= 128


def resize_image(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize (C, H, W) to (C, *size) float32 with MONAI ``Resize``: "area" (mean over each output
    pixel's footprint: anti-aliased, exact block means for integer factors) when shrinking both axes,
    otherwise "bilinear" (``align_corners=False``). ``size=None`` or the same size returns a copy."""
    from monai.transforms import Resize
    from monai.utils import convert_to_numpy

    image = np.asarray(image, dtype=np.float32)
    if size is None or tuple(image.shape[1:]) == tuple(size):
        return image.copy()
    mode = "area" if all(o <= i for o, i in zip(size, image.shape[1:])) else "bilinear"
    return convert_to_numpy(Resize(size, mode=mode)(image), dtype=np.float32)


def resize_label(label: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize a label map (H, W) to ``size`` by nearest neighbour, uint8 out. MONAI ``Resize`` with
    "nearest-exact": output pixel i takes input pixel floor((i + 0.5) * in / out) (pixel centres)."""
    from monai.transforms import Resize
    from monai.utils import convert_to_numpy

    label = np.asarray(label)
    if size is None or tuple(label.shape) == tuple(size):
        return label.astype(np.uint8)
    out = convert_to_numpy(Resize(size, mode="nearest-exact")(label[None].astype(np.float32)))[0]
    return np.rint(out).astype(np.uint8)


def find_dir(root: Path, *names: str) -> Path:
    """``root/<name>`` or ``root/<child>/<name>`` for the first of ``names`` found (names compared
    case-insensitively); FileNotFoundError naming ``root`` and the names otherwise, ValueError if
    ambiguous."""
    wanted = [n.lower() for n in names]
    for name in wanted:
        for level in (root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))):
            hits = [p for p in level.iterdir() if p.is_dir() and p.name.lower() == name]
            if len(hits) > 1:
                raise ValueError(f"{level}: folder name {name!r} matches {len(hits)} folders")
            if hits:
                return hits[0]
    listed = " or ".join(repr(n) for n in names)
    raise FileNotFoundError(f"{root}: no folder named {listed} (nor one level below)")


def image_files(folder: Path, exts: Sequence[str] = IMAGE_EXTS) -> dict[str, Path]:
    """Stem -> path of the image files directly in ``folder``; ValueError for a stem appearing twice."""
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts:
            if p.stem in files:
                raise ValueError(f"{folder}: two files for case {p.stem!r}: {files[p.stem].name}, {p.name}")
            files[p.stem] = p
    return files


def pair_files(
    image_dir: Path,
    mask_dirs: Sequence[Path],
    mask_suffix: str = "",
    image_exts: Sequence[str] = IMAGE_EXTS,
    require_mask: bool = True,
) -> dict[str, tuple[Path, tuple[Path, ...]]]:
    """Pair each image ``<case><ext>`` in ``image_dir`` with ``<case><mask_suffix><ext>`` in every folder
    of ``mask_dirs`` (suffix compared case-insensitively). Returns case -> (image, masks), sorted.

    A mask without its image is a FileNotFoundError naming the mask; an image without a mask is one
    naming the expected mask (or, with ``require_mask=False``, the image is left out).
    """
    images = image_files(image_dir, image_exts)
    masks_per_dir = []
    for mask_dir in mask_dirs:
        by_case: dict[str, Path] = {}
        for stem, path in image_files(mask_dir).items():
            if mask_suffix and not stem.lower().endswith(mask_suffix.lower()):
                continue
            case = stem[: len(stem) - len(mask_suffix)]
            if case not in images:
                raise FileNotFoundError(f"{path}: mask without an image; expected {image_dir / case}.<ext>")
            by_case[case] = path
        masks_per_dir.append(by_case)
    pairs = {}
    for case in sorted(images, key=natural_key):
        found = [m.get(case) for m in masks_per_dir]
        if any(f is None for f in found):
            if not require_mask and all(f is None for f in found):
                continue
            missing = mask_dirs[[f is None for f in found].index(True)]
            raise FileNotFoundError(f"{images[case]}: missing mask {missing / (case + mask_suffix)}.<ext>")
        pairs[case] = (images[case], tuple(found))
    return pairs


def natural_key(name: str) -> tuple:
    """Sort key treating digit runs as numbers ("2" < "10")."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def check_seed(seed: Any) -> int:
    """``seed`` as an int (bools and floats are rejected)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    return int(seed)


def check_dir(root: str | os.PathLike, name: str = "root") -> Path:
    """``root`` as a Path; FileNotFoundError naming ``name`` and the path if it is not a directory."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: no such directory {root}")
    return root


def random_split(case_ids: Sequence[str], fractions: Sequence[float], seed: int = 0) -> dict[str, list[str]]:
    """Seeded training / validation / test split (``split_cases`` over naturally sorted ids), e.g. the
    certification paper's (0.7, 0.1, 0.2)."""
    if len(fractions) != len(SECTIONS):
        raise ValueError(f"fractions: expected 3 values (training, validation, test), got {list(fractions)}")
    return split_cases(sorted(case_ids, key=natural_key), tuple(fractions), SECTIONS, seed=check_seed(seed))


def carve_validation(
    training: Sequence[str], test: Sequence[str], val_fraction: float, seed: int = 0
) -> dict[str, list[str]]:
    """Sections for a fixed training / test split, with ``val_fraction`` of training moved (seeded) to
    validation (0 → empty validation section)."""
    val_fraction = check_nonnegative(val_fraction, "val_fraction")
    if val_fraction >= 1.0:
        raise ValueError(f"val_fraction: must be < 1, got {val_fraction}")
    training = sorted(training, key=natural_key)
    test = sorted(test, key=natural_key)
    if val_fraction == 0.0 or not training:
        return {"training": training, "validation": [], "test": test}
    fractions = (1.0 - val_fraction, val_fraction)
    parts = split_cases(training, fractions, ("training", "validation"), check_seed(seed))
    return {"training": parts["training"], "validation": parts["validation"], "test": test}


def _nifti_bytes(data: np.ndarray, spacing: Sequence[float]) -> bytes:
    """Gzipped NIfTI-1 of a 2D array with a diagonal affine of ``spacing`` (mm per row, per column)."""
    import nibabel as nib

    affine = np.diag([float(spacing[0]), float(spacing[1]), 1.0, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _write_png(path: Path, data: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(data).save(tmp, format="PNG")


def _write_case(
    staging: Path,
    case_id: str,
    image: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    image_format: str,
) -> None:
    """Check and write one case into ``staging/{imagesTr,labelsTr}``."""
    label = np.asarray(label)
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"case {case_id}: label must be uint8 (H, W), got {label.dtype} {label.shape}")
    if image_format == "nifti":
        if image.dtype != np.float32 or image.shape != label.shape:
            got = f"{image.dtype} {image.shape}"
            raise ValueError(f"case {case_id}: image must be float32 {label.shape}, got {got}")
        atomic_write_bytes(staging / "imagesTr" / f"{case_id}.nii.gz", _nifti_bytes(image, spacing))
        atomic_write_bytes(staging / "labelsTr" / f"{case_id}.nii.gz", _nifti_bytes(label, spacing))
    else:
        if image.dtype != np.uint8 or image.shape != (*label.shape, 3):
            got = f"{image.dtype} {image.shape}"
            raise ValueError(f"case {case_id}: image must be uint8 {(*label.shape, 3)}, got {got}")
        _write_png(staging / "imagesTr" / f"{case_id}.png", image)
        _write_png(staging / "labelsTr" / f"{case_id}.png", label)


def write_2d_dataset(
    out_dir: str | os.PathLike,
    parts: Mapping[str, Sequence[str]],
    load_case: Callable[[str], tuple[np.ndarray, np.ndarray, Sequence[float]]],
    image_format: str,
    **meta: Any,
) -> Path:
    """Write every case of ``parts`` (section -> case ids) and an MSD-style datalist; return its path.

    ``load_case(case_id)`` returns ``(image, label, spacing)``: for ``image_format="nifti"`` image float32
    (H, W) in [0, 1], written as ``imagesTr/<case>.nii.gz`` with a diagonal affine of ``spacing`` (mm);
    for ``"png"`` image uint8 (H, W, 3), written as ``imagesTr/<case>.png`` (MONAI's default readers
    cannot load a 2D multichannel NIfTI as (3, H, W); PNG loads as (3, W, H) with the label as (1, W, H),
    the same transposition for both). Labels are uint8 (H, W) class codes in ``labelsTr``.

    Everything is written to a hidden staging folder inside ``out_dir``, moved into place once every case
    has loaded, and the datalist (``out_dir/datalist.json``) is written last: an error leaves no new file
    behind (and removes ``out_dir`` if this call created it). ``meta`` adds top-level datalist keys.
    """
    if image_format not in ("nifti", "png"):
        raise ValueError(f"image_format: expected 'nifti' or 'png', got {image_format!r}")
    unknown = sorted(set(parts) - set(SECTIONS))
    if unknown:
        raise ValueError(f"parts: unknown sections {unknown}; expected {list(SECTIONS)}")
    ids = [c for name in SECTIONS for c in parts.get(name, [])]
    if len(set(ids)) != len(ids):
        raise ValueError("parts: a case id appears in more than one section or twice")
    suffix = ".nii.gz" if image_format == "nifti" else ".png"
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        for i, case_id in enumerate(ids):
            logger.info("case %d/%d: %s", i + 1, len(ids), case_id)
            image, label, spacing = load_case(case_id)
            _write_case(staging, case_id, image, label, spacing, image_format)
    sections = {
        name: [
            {"image": f"imagesTr/{c}{suffix}", "label": f"labelsTr/{c}{suffix}"}
            for c in parts.get(name, [])
        ]
        for name in SECTIONS
    }
    path = write_datalist(out_dir / DATALIST_NAME, sections, numTraining=len(sections["training"]), **meta)
    return path


def grey_label_case(
    image_path: Path,
    mask_paths: Sequence[Path],
    codes: Sequence[int],
    size: tuple[int, int] | None,
    bit_depth: int | None,
    pixel_mm: float | None,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Grey image + one binary mask per code (painted in order, later codes win) -> image float32 (H, W)
    in [0, 1] (:func:`read_grey` with ``bit_depth``), label uint8 (H, W), spacing in mm per output pixel
    (``pixel_mm`` per native pixel, 1 if None), resized to ``size`` (None keeps the native grid)."""
    image = read_grey(image_path, bit_depth)
    label = np.zeros(image.shape, np.uint8)
    for path, code in zip(mask_paths, codes):
        mask = read_binary_mask(path)
        if mask.shape != image.shape:
            raise ValueError(
                f"{path}: mask shape {mask.shape} differs from image {image_path.name}'s {image.shape}"
            )
        label[mask] = code
    out = size or image.shape
    spacing = tuple((pixel_mm or 1.0) * n / o for n, o in zip(image.shape, out))
    return resize_image(image[None], size)[0], resize_label(label, size), spacing


def rgb_binary_case(
    image_path: Path, mask_path: Path, size: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """A colour image and its binary mask (0 / 255 → 0 / 1) -> uint8 (H, W, 3), uint8 (H, W), spacing
    (1 per native pixel), resized to ``size`` (image: :func:`resize_image` rounded back to 8 bits)."""
    image = read_rgb(image_path)
    mask = read_binary_mask(mask_path)
    if mask.shape != image.shape[:2]:
        raise ValueError(
            f"{mask_path}: mask shape {mask.shape} differs from image {image_path.name}'s {image.shape[:2]}"
        )
    spacing = tuple(n / o for n, o in zip(mask.shape, size or mask.shape))
    if size is not None and tuple(size) != mask.shape:
        resized = resize_image(np.moveaxis(image, -1, 0).astype(np.float32), size)
        image = np.clip(np.rint(np.moveaxis(resized, 0, -1)), 0, 255).astype(np.uint8)
    return image, resize_label(mask.astype(np.uint8), size), spacing
