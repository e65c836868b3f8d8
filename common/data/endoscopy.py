"""Colonoscopy reader: CVC-ClinicDB (612 RGB frames with polyp masks; certification paper, 70 / 10 / 20).

Native layout (the TIFF release, or the PNG copy in common circulation)::

    <root>/Original/1.tif ... 612.tif            RGB, 384 x 288
    <root>/Ground Truth/1.tif ... 612.tif        polyp mask, 0 / 255

(``.png`` instead of ``.tif`` is accepted; the two folders may also sit one level below ``root``, e.g.
``<root>/PNG/Original`` — the first such folder in name order is used, and its sibling ``Ground Truth``).

Output: ``imagesTr/<case>.png`` RGB uint8, ``labelsTr/<case>.png`` uint8 0 / 1 (1 polyp), ``datalist.json``
(see ``common.data.io2d.write_2d_dataset``); MONAI ``LoadImaged(ensure_channel_first=True)`` gives
image (3, W, H) and label (1, W, H).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from common.data.io2d import (
    check_dir,
    check_seed,
    check_size_2d,
    find_dir,
    pair_files,
    random_split,
    rgb_binary_case,
    write_2d_dataset,
)

__all__ = ["POLYP_LABELS", "prepare_cvc_clinicdb"]

POLYP_LABELS: dict[str, str] = {"0": "background", "1": "polyp"}
_IMAGE_EXTS = (".tif", ".tiff", ".png", ".bmp")


def prepare_cvc_clinicdb(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    size: int | Sequence[int] | None = 256,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> Path:
    """Prepare CVC-ClinicDB: pair ``Original/<n>`` with ``Ground Truth/<n>``, split 70 / 10 / 20 at random.

    ``size``: int or (H, W), default 256 (the 384 × 288 frames are resized without keeping the aspect
    ratio); None keeps the native size. Image: area averaging (bilinear when enlarging); mask: nearest,
    grey value >= 128 → 1. Cases are named by their frame number. FileNotFoundError naming the file for an
    image without its mask or a mask without its image; ValueError for an unreadable file. Returns the
    datalist path; errors leave nothing behind.
    """
    root = check_dir(root)
    spatial, seed = check_size_2d(size), check_seed(seed)
    original = find_dir(root, "Original")
    ground_truth = find_dir(original.parent, "Ground Truth", "GroundTruth")
    pairs = pair_files(original, [ground_truth], image_exts=_IMAGE_EXTS)
    if not pairs:
        raise FileNotFoundError(f"root: no CVC-ClinicDB frames in {original}")
    parts = random_split(list(pairs), fractions, seed)
    return write_2d_dataset(
        out_dir,
        parts,
        lambda cid: rgb_binary_case(pairs[cid][0], pairs[cid][1][0], spatial),
        "png",
        name="CVC-ClinicDB",
        description="CVC-ClinicDB colonoscopy frames with polyp masks",
        tensorImageSize="3D",
        modality={"0": "colonoscopy red", "1": "colonoscopy green", "2": "colonoscopy blue"},
        labels=POLYP_LABELS,
        split={"rule": "random", "fractions": list(fractions), "seed": seed},
        preprocessing={"size": list(spatial) if spatial else None},
    )
