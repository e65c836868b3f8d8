"""Skin lesion readers: ISBI 2016 (ISIC 2016 challenge, part 1) and ISIC 2018 task 1, native layouts.

ISBI 2016 (NLCEN paper: 900 training and 379 test images)::

    <root>/ISBI2016_ISIC_Part1_Training_Data/ISIC_0000000.jpg
    <root>/ISBI2016_ISIC_Part1_Training_GroundTruth/ISIC_0000000_Segmentation.png
    <root>/ISBI2016_ISIC_Part1_Test_Data/ISIC_0000003.jpg
    <root>/ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000003_Segmentation.png

ISIC 2018 task 1 (certification paper: 2694 images = the 2594 training + 100 validation release,
70 / 10 / 20 random split)::

    <root>/ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg
    <root>/ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png
    <root>/ISIC2018_Task1-2_Validation_Input/...,  <root>/ISIC2018_Task1_Validation_GroundTruth/...

(the folders may also sit one level below ``root``; non-image files such as ``LICENSE.txt`` are ignored).

Output: ``imagesTr/<case>.png`` RGB uint8, ``labelsTr/<case>.png`` uint8 0 / 1 (masks 0 / 255 → 0 / 1),
``datalist.json`` (see ``common.data.io2d.write_2d_dataset``). MONAI ``LoadImaged(ensure_channel_first=True)``
gives image (3, W, H) and label (1, W, H): PIL's reader transposes both the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from common.data.io2d import (
    carve_validation,
    check_dir,
    check_seed,
    check_size_2d,
    find_dir,
    pair_files,
    random_split,
    rgb_binary_case,
    write_2d_dataset,
)

__all__ = ["SKIN_LABELS", "SKIN_MODALITY", "ISIC2018_RELEASES", "prepare_isbi2016", "prepare_isic2018"]

SKIN_LABELS: dict[str, str] = {"0": "background", "1": "lesion"}
SKIN_MODALITY: dict[str, str] = {"0": "dermoscopy red", "1": "dermoscopy green", "2": "dermoscopy blue"}
ISIC2018_RELEASES: tuple[str, ...] = ("Training", "Validation", "Test")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _write_skin(out_dir, pairs, parts, size, name: str, description: str, split: dict) -> Path:
    return write_2d_dataset(
        out_dir,
        parts,
        lambda cid: rgb_binary_case(pairs[cid][0], pairs[cid][1][0], size),
        "png",
        name=name,
        description=description,
        tensorImageSize="3D",
        modality=SKIN_MODALITY,
        labels=SKIN_LABELS,
        split=split,
        preprocessing={"size": list(size) if size else None},
    )


def prepare_isbi2016(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    size: int | Sequence[int] | None = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Path:
    """Prepare ISBI 2016 part 1: the challenge's training set → training (minus ``val_fraction``, moved to
    validation with ``seed``; 0 keeps the paper's 900 / 379 exactly), its test set → test.

    ``size``: int or (H, W), default 256 (NLCEN paper: "all input images are resized to 256 × 256"),
    None keeps the native size. Image: area averaging (bilinear when enlarging); mask: nearest.
    Every image needs its ``<case>_Segmentation.png`` and vice versa (FileNotFoundError naming the file).
    Returns the datalist path.
    """
    root = check_dir(root)
    spatial, seed = check_size_2d(size), check_seed(seed)
    pairs, sets = {}, {}
    for release in ("Training", "Test"):
        found = pair_files(
            find_dir(root, f"ISBI2016_ISIC_Part1_{release}_Data"),
            [find_dir(root, f"ISBI2016_ISIC_Part1_{release}_GroundTruth")],
            mask_suffix="_Segmentation",
            image_exts=_IMAGE_EXTS,
        )
        clash = sorted(set(found) & set(pairs))
        if clash:
            raise ValueError(f"root: case {clash[0]} is in both the training and the test release")
        pairs.update(found)
        sets[release] = list(found)
    parts = carve_validation(sets["Training"], sets["Test"], val_fraction, seed)
    return _write_skin(out_dir, pairs, parts, spatial, "ISBI2016_ISIC_Part1",
                       "ISBI 2016 skin lesion segmentation (challenge training / test sets)",
                       {"rule": "challenge_sets", "val_fraction": val_fraction, "seed": seed})


def prepare_isic2018(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    size: int | Sequence[int] | None = 256,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    releases: Sequence[str] = ("Training", "Validation"),
    seed: int = 0,
) -> Path:
    """Prepare ISIC 2018 task 1: pool the ``releases`` (default training + validation, the certification
    paper's 2694 images) and split them at random by ``fractions`` (70 / 10 / 20) with ``seed``.

    Each release needs ``ISIC2018_Task1-2_<release>_Input`` and ``ISIC2018_Task1_<release>_GroundTruth``
    (FileNotFoundError naming the folder otherwise; pass ``releases=("Training",)`` if you only have the
    training release). ``size`` as in :func:`prepare_isbi2016`. Returns the datalist path.
    """
    root = check_dir(root)
    spatial, seed = check_size_2d(size), check_seed(seed)
    if isinstance(releases, str):
        releases = (releases,)
    bad = [r for r in releases if r not in ISIC2018_RELEASES]
    if bad or not releases:
        expected = list(ISIC2018_RELEASES)
        raise ValueError(f"releases: expected a non-empty subset of {expected}, got {list(releases)}")
    pairs = {}
    for release in dict.fromkeys(releases):
        found = pair_files(
            find_dir(root, f"ISIC2018_Task1-2_{release}_Input"),
            [find_dir(root, f"ISIC2018_Task1_{release}_GroundTruth")],
            mask_suffix="_segmentation",
            image_exts=_IMAGE_EXTS,
        )
        clash = sorted(set(found) & set(pairs))
        if clash:
            raise ValueError(f"root: case {clash[0]} appears in more than one release")
        pairs.update(found)
    if not pairs:
        raise FileNotFoundError(f"root: no ISIC 2018 image/mask pairs under {root}")
    parts = random_split(list(pairs), fractions, seed)
    pooled = " + ".join(dict.fromkeys(releases))
    return _write_skin(out_dir, pairs, parts, spatial, "ISIC2018_Task1",
                       f"ISIC 2018 task 1 lesion boundary segmentation ({pooled})",
                       {"rule": "random", "fractions": list(fractions), "seed": seed})
