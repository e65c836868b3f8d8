"""Chest X-ray readers: JSRT + SCR, Montgomery, Shenzhen, native layouts.

Native layouts read
-------------------
JSRT + SCR (NLCEN paper "Datasets"; certification paper "Chest X-rays datasets")::

    <root>/**/JPCLN001.IMG ... JPCNN093.IMG        raw, no header, 2048 x 2048, 12-bit values in
                                                    big-endian unsigned 16-bit words
    <scr_root>/**/{left lung,right lung,heart,left clavicle,right clavicle}/**/JPCLN001.gif
                                                    SCR masks, 1024 x 1024, 0 / 255 (e.g. the release's
                                                    fold1/masks/... and fold2/masks/...)

Montgomery (``<root>/CXR_png/MCUCXR_0001_0.png``,
``<root>/ManualMask/{leftMask,rightMask}/MCUCXR_0001_0.png``) and Shenzhen
(``<root>/CXR_png/CHNCXR_0001_0.png``, ``<root>/mask/CHNCXR_0001_0_mask.png``); ``root`` may also be the
folder one level above (``MontgomerySet/``, ``ChinaSet_AllFiles/``).

Output (what ``prepare_*`` writes, paths in the datalist relative to ``out_dir``)::

    <out_dir>/imagesTr/<case>.nii.gz   float32 (H, W) in [0, 1], row 0 = top of the radiograph
    <out_dir>/labelsTr/<case>.nii.gz   uint8 (H, W) class codes
    <out_dir>/datalist.json            sections training / validation / test, "labels", "preprocessing"

the same layout as the chest phantom (``common.data.synthetic``); MONAI
``LoadImaged(ensure_channel_first=True)`` gives image and label as (1, H, W). Label codes are the
phantom's: 0 background, 1 left lung, 2 right lung, 3 heart, 4 clavicles ("left"/"right" as the releases
name their folders, i.e. the patient's side; Shenzhen has one mask for both lungs, code 1 "lung").

Overlapping SCR masks (``target``): the SCR lung, heart and clavicle masks overlap (clavicles over the lung
apices, heart over the medial lower lung fields), and a class map holds one code per pixel, so the
painting order decides which structure a shared pixel keeps (:func:`paint_chest_label`, the same rule
for the chest phantom):

- ``"lungs"`` (default; NLCEN, He et al., AAAI 2019, scores DIC and JSC on the SCR lung fields): heart,
  clavicles, then the lungs on top, so codes {1, 2} are exactly the union of the SCR lung masks; heart
  and clavicles keep only their pixels outside the lungs.
- ``"classes"`` (certification, Laousy et al., MICCAI 2023: classes Lung, Heart, Clavicles with one
  class per pixel, as randomized smoothing certifies one class per pixel): lungs, heart, then the
  clavicles on top. The paper names the three classes but not an overlap rule; the smaller structure
  wins, so the clavicles (its smallest class) are whole, the heart is whole except under a clavicle,
  and the lung class is the lung fields without heart and clavicles. ``PAPER_CLASS_MAP`` maps the codes
  to the paper's classes (``PAPER_CLASSES``: 0 background, 1 lung, 2 heart, 3 clavicles), as the
  certified_seg bundle's ``label_map`` does.

Intensity convention (JSRT): the raw words are digitised film values in which air (lung fields) is high
and bone is low, so displaying them directly gives a negative; the reader returns ``(4095 - raw) / 4095``
(``invert=True``, the usual radiograph look the chest phantom and the SCR overlays use: air dark, bone
bright) or ``raw / 4095`` with ``invert=False``.

File discovery, reading, resizing, splitting and writing are the dataset-independent helpers of
``common.data.io2d`` (shared with ``common.data.dermoscopy`` and ``common.data.endoscopy``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.data.io2d import (
    carve_validation,
    check_dir,
    check_seed,
    check_size_2d,
    find_dir,
    grey_label_case,
    image_files,
    pair_files,
    random_split,
    read_binary_mask,
    resize_image,
    resize_label,
    write_2d_dataset,
)
from common.validation import check_positive_int

__all__ = [
    "CHEST_LABELS",
    "CHEST_TARGETS",
    "PAPER_CLASSES",
    "PAPER_CLASS_MAP",
    "SCR_STRUCTURES",
    "paint_chest_label",
    "JSRTCase",
    "check_chest_target",
    "read_jsrt_image",
    "find_jsrt_cases",
    "jsrt_nlcen_split",
    "prepare_jsrt",
    "prepare_montgomery",
    "prepare_shenzhen",
]

logger = logging.getLogger(__name__)

CHEST_LABELS: dict[str, str] = {
    "0": "background", "1": "left lung", "2": "right lung", "3": "heart", "4": "clavicles"
}
SCR_STRUCTURES: dict[str, int] = {
    "left lung": 1,
    "right lung": 2,
    "heart": 3,
    "left clavicle": 4,
    "right clavicle": 4,
}
"""SCR folder name -> label code (the order in which ``JSRTCase.masks`` lists the GIFs)."""
CHEST_TARGETS: dict[str, tuple[str, ...]] = {
    "lungs": ("heart", "left clavicle", "right clavicle", "left lung", "right lung"),
    "classes": ("left lung", "right lung", "heart", "left clavicle", "right clavicle"),
}
"""Painting order per label target (later structures win where masks overlap), module docstring."""
PAPER_CLASSES: dict[str, str] = {"0": "background", "1": "lung", "2": "heart", "3": "clavicles"}
PAPER_CLASS_MAP: dict[int, int] = {1: 1, 2: 1, 3: 2, 4: 3}
"""Chest code -> certification class (Laousy et al., MICCAI 2023: Lung, Heart, Clavicles)."""

JSRT_MAX = 4095  # 12-bit
JSRT_FOV_MM = 0.175 * 2048  # JSRT pixel size 0.175 mm on the 2048 grid
MONTGOMERY_PIXEL_MM = 0.0875


def check_chest_target(target: str) -> str:
    """``target`` if it is one of ``CHEST_TARGETS``, else a ValueError naming the argument."""
    if target not in CHEST_TARGETS:
        raise ValueError(f"target: expected one of {sorted(CHEST_TARGETS)}, got {target!r}")
    return target


def paint_chest_label(masks: Mapping[str, np.ndarray], target: str = "lungs") -> np.ndarray:
    """One uint8 class map (H, W) from binary structure masks, overlaps resolved by ``target``.

    ``masks`` maps every ``SCR_STRUCTURES`` name to a boolean (H, W) array (the SCR GIFs, or the
    phantom's shapes); codes as ``CHEST_LABELS``; painting order ``CHEST_TARGETS[target]`` (module
    docstring: "lungs" keeps the union of the lung masks whole, "classes" the clavicles).
    """
    check_chest_target(target)
    missing = [s for s in SCR_STRUCTURES if s not in masks]
    if missing:
        raise ValueError(f"masks: missing structures {missing}")
    shapes = {np.shape(m) for m in masks.values()}
    if len(shapes) != 1:
        raise ValueError(f"masks: structures differ in shape {sorted(shapes)}")
    label = np.zeros(shapes.pop(), np.uint8)
    for structure in CHEST_TARGETS[target]:
        label[np.asarray(masks[structure], bool)] = SCR_STRUCTURES[structure]
    return label


# ----------------------------------------------------------------------------------------- JSRT + SCR
@dataclass(frozen=True)
class JSRTCase:
    """One JSRT radiograph: id (``JPCLN001``), its ``.IMG`` file, one SCR GIF per ``SCR_STRUCTURES`` entry
    (same order), and the SCR fold (1 or 2) read from a ``fold1`` / ``fold2`` folder in the mask paths
    (None if the masks are not in fold folders)."""

    case_id: str
    image: Path
    masks: tuple[Path, ...]
    fold: int | None

    @property
    def number(self) -> int:
        """The case's JSRT number (``JPCLN007`` → 7)."""
        return int(re.search(r"(\d+)$", self.case_id).group(1))


def read_jsrt_image(path: str | os.PathLike, native_size: int = 2048, invert: bool = True) -> np.ndarray:
    """One JSRT ``.IMG`` file as float32 (native_size, native_size) in [0, 1].

    The file is headerless: ``native_size``² big-endian unsigned 16-bit words holding 12-bit values.
    Returns ``(4095 - raw) / 4095`` (``invert=True``: air dark, bone bright) or ``raw / 4095``.
    ValueError naming the file if its size is not ``2 * native_size**2`` bytes or a value exceeds 4095
    (a sign of the wrong byte order or of a file that is not JSRT).
    """
    path = Path(path)
    native_size = check_positive_int(native_size, "native_size")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    expected = 2 * native_size * native_size
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"{path}: {actual} bytes, expected {expected} (= 2 x {native_size}²: headerless big-endian "
            "16-bit); wrong native_size or a truncated file"
        )
    raw = np.fromfile(path, dtype=">u2").reshape(native_size, native_size)
    if raw.max() > JSRT_MAX:
        raise ValueError(
            f"{path}: value {raw.max()} exceeds 12 bits ({JSRT_MAX}); not a big-endian JSRT file"
        )
    values = (JSRT_MAX - raw.astype(np.float64)) if invert else raw.astype(np.float64)
    return (values / JSRT_MAX).astype(np.float32)


def _structure_of(folder_name: str) -> str | None:
    name = folder_name.lower().replace("_", " ").strip()
    return name if name in SCR_STRUCTURES else None


def _fold_of(path: Path) -> int | None:
    folds = {int(m.group(1)) for part in path.parts if (m := re.fullmatch(r"fold([12])", part.lower()))}
    return folds.pop() if len(folds) == 1 else None


def find_jsrt_cases(root: str | os.PathLike, scr_root: str | os.PathLike | None = None) -> list[JSRTCase]:
    """Every ``JPC*.IMG`` under ``root`` (recursively) with its five SCR masks under ``scr_root`` (default
    ``root``): each structure folder (``left lung`` ... ``right clavicle``, anywhere below ``scr_root``) is
    searched recursively for ``<case>.gif``. Sorted by case id.

    FileNotFoundError for a missing folder, no images, a missing structure folder, an image without one
    of its masks (naming the expected GIF) or a mask without its image (naming the mask); ValueError for a
    case found twice or masks of one case in different folds.
    """
    root = check_dir(root)
    scr_root = root if scr_root is None else check_dir(scr_root, "scr_root")
    images: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() == ".img" and p.stem.upper().startswith("JPC"):
            case = p.stem.upper()
            if case in images:
                raise ValueError(f"root: case {case} found twice ({images[case]}, {p})")
            images[case] = p
    if not images:
        raise FileNotFoundError(f"root: no JSRT images (JPC*.IMG) under {root}")
    masks: dict[str, dict[str, Path]] = {s: {} for s in SCR_STRUCTURES}
    folders: dict[str, list[Path]] = {s: [] for s in SCR_STRUCTURES}
    for d in sorted(scr_root.rglob("*")):
        if d.is_dir() and (structure := _structure_of(d.name)):
            folders[structure].append(d)
    for structure, dirs in folders.items():
        if not dirs:
            raise FileNotFoundError(f"scr_root: no SCR mask folder {structure!r} under {scr_root}")
        for d in dirs:
            for p in sorted(d.rglob("*")):
                if not (p.is_file() and p.suffix.lower() == ".gif"):
                    continue
                case = p.stem.upper()
                if case in masks[structure]:
                    first = masks[structure][case]
                    raise ValueError(f"scr_root: {structure!r} mask of {case} found twice ({first}, {p})")
                if case not in images:
                    raise FileNotFoundError(f"{p}: SCR mask without a JSRT image {case}.IMG under {root}")
                masks[structure][case] = p
    cases = []
    for case in sorted(images):
        paths = []
        for structure, found in masks.items():
            if case not in found:
                expected = folders[structure][0] / f"{case}.gif"
                raise FileNotFoundError(f"{images[case]}: missing SCR mask {expected} ({structure!r})")
            paths.append(found[case])
        folds = {_fold_of(p) for p in paths}
        if len(folds) != 1:
            raise ValueError(f"scr_root: masks of {case} lie in different folds: {[str(p) for p in paths]}")
        cases.append(JSRTCase(case, images[case], tuple(paths), folds.pop()))
    return cases


def jsrt_nlcen_split(cases: Sequence[JSRTCase]) -> tuple[dict[str, list[str]], str]:
    """The NLCEN paper's 124 / 123 training / test split (Hwang and Park 2017, following SCR).

    If every case's masks lie in the SCR release's ``fold1`` / ``fold2`` folders, fold 1 is training and
    fold 2 test; otherwise the SCR rule those folds follow (van Ginneken et al. 2006): odd-numbered JSRT
    cases (124 of 247) training, even-numbered (123) test. Returns ``({"training", "test"}, rule)`` with
    ``rule`` "scr_folds" or "odd_even"; ValueError if only some cases have a fold.
    """
    folds = [c.fold for c in cases]
    if all(f is not None for f in folds):
        train = [c.case_id for c in cases if c.fold == 1]
        return {"training": train, "test": [c.case_id for c in cases if c.fold == 2]}, "scr_folds"
    if any(f is not None for f in folds):
        without = [c.case_id for c in cases if c.fold is None][:3]
        raise ValueError(f"scr_root: some cases have fold1/fold2 masks, others not (e.g. {without})")
    train = [c.case_id for c in cases if c.number % 2 == 1]
    return {"training": train, "test": [c.case_id for c in cases if c.number % 2 == 0]}, "odd_even"


def _jsrt_case(
    case: JSRTCase, size, native_size: int, invert: bool, target: str
) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Read, label and resize one JSRT case (image (H, W) float32, label (H, W) uint8, spacing mm)."""
    image = read_jsrt_image(case.image, native_size, invert)
    masks: dict[str, np.ndarray] = {}
    for path, structure in zip(case.masks, SCR_STRUCTURES):
        mask = read_binary_mask(path)
        first = next(iter(masks.values()), mask)
        if mask.shape[0] != mask.shape[1] or mask.shape != first.shape:
            first_name = case.masks[0].name
            raise ValueError(f"{path}: mask shape {mask.shape} is not square or differs from {first_name}'s")
        masks[structure] = mask
    label = paint_chest_label(masks, target)
    out = size or label.shape  # None: the SCR mask grid (1024 for the release)
    spacing = tuple(JSRT_FOV_MM / o for o in out)
    return resize_image(image[None], out)[0], resize_label(label, out), spacing


def prepare_jsrt(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    scr_root: str | os.PathLike | None = None,
    size: int | Sequence[int] | None = 256,
    split: str = "nlcen",
    val_fraction: float = 0.1,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    invert: bool = True,
    native_size: int = 2048,
    seed: int = 0,
    target: str = "lungs",
) -> Path:
    """Prepare JSRT radiographs with SCR labels (lungs, heart, clavicles) for the chest bundles.

    Args:
        root: folder holding the ``JPC*.IMG`` files (searched recursively); ``scr_root``: the SCR masks
            (default ``root``), see :func:`find_jsrt_cases`.
        out_dir: output folder (module docstring); files with the same names are replaced.
        size: output grid, int or (H, W); default 256 (NLCEN paper: "all input images are resized to
            256 × 256"); None keeps the SCR mask grid (1024). Image: area averaging; label: nearest.
        split: "nlcen" (:func:`jsrt_nlcen_split`, 124 / 123, with ``val_fraction`` of training moved to
            validation; 0 gives the paper's sets exactly) or "random" (certification paper: ``fractions``
            70 / 10 / 20 with ``seed``).
        invert: intensity convention, see :func:`read_jsrt_image`; ``native_size``: side of the raw files.
        target: overlap rule, "lungs" (NLCEN: codes 1 / 2 = the whole SCR lung masks) or "classes"
            (certification: clavicles > heart > lungs), see the module docstring; stored in the
            datalist's "preprocessing".

    Label codes: ``CHEST_LABELS``; both clavicles are 4.
    Returns the datalist path; errors leave nothing behind (:func:`write_2d_dataset`).
    """
    check_chest_target(target)
    spatial = check_size_2d(size)
    native_size = check_positive_int(native_size, "native_size")
    seed = check_seed(seed)
    if split not in ("nlcen", "random"):
        raise ValueError(f"split: expected 'nlcen' or 'random', got {split!r}")
    cases = {c.case_id: c for c in find_jsrt_cases(root, scr_root)}
    if split == "nlcen":
        fixed, rule = jsrt_nlcen_split(list(cases.values()))
        parts = carve_validation(fixed["training"], fixed["test"], val_fraction, seed)
    else:
        parts, rule = random_split(list(cases), fractions, seed), "random"
    return write_2d_dataset(
        out_dir,
        parts,
        lambda cid: _jsrt_case(cases[cid], spatial, native_size, bool(invert), target),
        "nifti",
        name="JSRT_SCR",
        description="JSRT radiographs (12-bit raw) with SCR lung, heart and clavicle masks",
        tensorImageSize="2D",
        modality={"0": "X-ray"},
        labels=CHEST_LABELS,
        split={"rule": rule, "val_fraction": val_fraction if split == "nlcen" else None,
               "fractions": list(fractions) if split == "random" else None, "seed": seed},
        preprocessing={
            "size": list(spatial) if spatial else None,
            "invert": bool(invert),
            "scale": "(4095 - raw) / 4095" if invert else "raw / 4095",
            "native_size": native_size,
            "target": target,
            "overlaps": " < ".join(CHEST_TARGETS[target]) + " (later wins)",
        },
    )


# --------------------------------------------------------------------------------- Montgomery, Shenzhen
def _prepare_lung_set(
    pairs: dict[str, tuple[Path, tuple[Path, ...]]],
    out_dir, codes: Sequence[int], labels: dict[str, str], name: str, size, fractions, bit_depth, seed,
    pixel_mm: float | None, **meta: Any,
) -> Path:
    """Common part of Montgomery and Shenzhen: random split, grey NIfTI writer."""
    if not pairs:
        raise FileNotFoundError(f"{name}: no image/mask pairs found")
    parts = random_split(list(pairs), fractions, seed)
    return write_2d_dataset(
        out_dir,
        parts,
        lambda cid: grey_label_case(pairs[cid][0], pairs[cid][1], codes, size, bit_depth, pixel_mm),
        "nifti",
        name=name,
        tensorImageSize="2D",
        modality={"0": "X-ray"},
        labels=labels,
        split={"rule": "random", "fractions": list(fractions), "seed": seed},
        preprocessing={"size": list(size) if size else None, "bit_depth": bit_depth},
        **meta,
    )


def prepare_montgomery(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    size: int | Sequence[int] | None = 256,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    bit_depth: int | None = None,
    seed: int = 0,
) -> Path:
    """Prepare the Montgomery set (138 radiographs; certification paper: 70 / 10 / 20 random split).

    Reads ``CXR_png/<case>.png`` and ``ManualMask/leftMask/<case>.png``, ``ManualMask/rightMask/<case>.png``
    (0 / 255) → label 1 left lung, 2 right lung (right painted last where they overlap). ``size`` as in
    :func:`prepare_jsrt` (the radiographs are about 4020 × 4892 and are resized without keeping the aspect
    ratio); ``bit_depth`` as in :func:`common.data.io2d.read_grey`. Spacing in the NIfTI: 0.0875 mm native pixels scaled.
    """
    root = check_dir(root)
    spatial, seed = check_size_2d(size), check_seed(seed)
    masks = find_dir(root, "ManualMask")
    pairs = pair_files(find_dir(root, "CXR_png"), [find_dir(masks, "leftMask"), find_dir(masks, "rightMask")])
    labels = {"0": "background", "1": "left lung", "2": "right lung"}
    return _prepare_lung_set(
        pairs, out_dir, (1, 2), labels, "Montgomery", spatial, fractions, bit_depth, seed,
        MONTGOMERY_PIXEL_MM, description="Montgomery County chest X-rays, manual lung masks",
    )


def prepare_shenzhen(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    size: int | Sequence[int] | None = 256,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    bit_depth: int | None = None,
    seed: int = 0,
) -> Path:
    """Prepare the Shenzhen set (certification paper: 662 annotated radiographs, 70 / 10 / 20 split).

    Reads ``CXR_png/<case>.png`` with ``mask/<case>_mask.png`` (or ``masks/``; one mask for both lungs,
    0 / 255) → label 1 "lung". Radiographs without a mask are left out (the public mask release does not
    cover every image); their number is stored as ``images_without_mask`` in the datalist. A mask without
    its radiograph is a FileNotFoundError. The pixel size is not given per image: spacing is 1 per native
    pixel. Other arguments as in :func:`prepare_montgomery`.
    """
    root = check_dir(root)
    spatial, seed = check_size_2d(size), check_seed(seed)
    image_dir = find_dir(root, "CXR_png")
    pairs = pair_files(image_dir, [find_dir(root, "mask", "masks")], mask_suffix="_mask", require_mask=False)
    skipped = len(image_files(image_dir)) - len(pairs)
    if skipped:
        logger.warning("Shenzhen: %d radiographs without a mask are left out", skipped)
    return _prepare_lung_set(pairs, out_dir, (1,), {"0": "background", "1": "lung"}, "Shenzhen", spatial,
                             fractions, bit_depth, seed, None, images_without_mask=skipped,
                             description="Shenzhen chest X-rays, lung masks")
