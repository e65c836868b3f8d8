"""Prepare a BraTS 2017 training folder for the ``unet3d_brats_distill`` bundle (N4, 128³, split).

    python -m scripts.prepare_brats --root /data/MICCAI_BraTS17_Data_Training \
        --out_dir bundles/unet3d_brats_distill/data/brats2017

Reads ``<root>/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (or ``<root>/<case>/...``) and
writes ``<out_dir>/imagesTr``, ``<out_dir>/labelsTr`` and ``<out_dir>/dataset.json`` (the bundle's
default ``datalist``), as :func:`common.data.brats.prepare_brats` documents. ``--size 128`` or
``--size 128,128,128``; ``--n4 False`` skips the bias-field correction (faster, not the paper's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fire

from common.data.brats import prepare_brats

__all__ = ["main", "parse_size"]


def parse_size(size: Any) -> int | tuple[int, int, int]:
    """``size`` as fire hands it over (int, tuple/list, or "128,128,128" / "128x128x128") -> an int or 3 ints."""
    if isinstance(size, str):
        parts = [p for p in size.replace("x", ",").replace("(", "").replace(")", "").split(",") if p.strip()]
        try:
            size = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"size: expected integers like '128,128,128', got {size!r}") from None
        size = size[0] if len(size) == 1 else size
    if isinstance(size, bool) or not isinstance(size, (int, Sequence)):
        raise ValueError(f"size: expected an int or 3 ints, got {size!r}")
    if isinstance(size, Sequence):
        if len(size) != 3 or any(isinstance(s, bool) or not isinstance(s, int) for s in size):
            raise ValueError(f"size: expected 3 integers, got {size!r}")
        return tuple(size)
    return size


def main(
    root: str,
    out_dir: str,
    size: Any = 128,
    n4: bool = True,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    shrink_factor: int = 4,
) -> str:
    """Pre-process every case under ``root`` into ``out_dir`` and return the datalist's path.

    Args mirror :func:`common.data.brats.prepare_brats` (paper: N4 on, 128³, 20 % test split).
    """
    if not isinstance(n4, bool):
        raise ValueError(f"n4: expected True or False, got {n4!r}")
    return prepare_brats(
        root, out_dir, size=parse_size(size), n4=n4, test_fraction=test_fraction,
        val_fraction=val_fraction, seed=seed, shrink_factor=shrink_factor,
    )


if __name__ == "__main__":
    fire.Fire(main)
