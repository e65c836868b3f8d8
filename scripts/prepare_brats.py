"""Prepare a BraTS 2017 training folder for the ``unet3d_brats_distill`` bundle (N4, 128³, split).

    python -m scripts.prepare_brats --root /data/MICCAI_BraTS17_Data_Training \
        --out_dir bundles/unet3d_brats_distill/data/brats2017

Reads ``<root>/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (or ``<root>/<case>/...``) and
writes ``<out_dir>/imagesTr``, ``<out_dir>/labelsTr`` and ``<out_dir>/datalist.json`` (the bundle's
default ``datalist``), as :func:`common.data.brats.prepare_brats` documents. ``--size 128`` or
``--size 128,128,128``; ``--n4 False`` skips the bias-field correction (faster, not the paper's).
"""

from __future__ import annotations

from typing import Any

import fire

from common.data.brats import prepare_brats
from scripts.cli import parse_size as parse_spatial_size

__all__ = ["main", "parse_size"]


def parse_size(size: Any) -> tuple[int, int, int]:
    """``size`` as fire hands it over (an int, 3 ints, or "128,128,128") -> 3 ints."""
    return parse_spatial_size(size, 3)


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
    from scripts.cli import run

    run(main)
