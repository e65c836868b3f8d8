"""Write a synthetic phantom dataset (MSD layout + datalist.json) for tests, CI and the demo.

    python -m scripts.make_phantoms --kind chest --out_dir /tmp/chest --num_cases 20 --size 128,128 --seed 0
    python -m scripts.make_phantoms --kind abdomen --out_dir /tmp/ct --num_cases 8 --size 64,64,48 --lesion
    python -m scripts.make_phantoms --kind skin --out_dir /tmp/skin --num_cases 10 --image_format png

``--size`` takes ``128,128`` (fire reads it as a tuple), ``[128,128]``, ``128x128`` or one integer for
every axis; without it each kind uses its generator's default size. Case ``i`` uses seed ``seed + i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fire

from common.data.synthetic import PHANTOM_KINDS, write_phantom_dataset
from scripts.cli import parse_size as parse_spatial_size

__all__ = ["main", "parse_size"]


def parse_size(size: Any, kind: str) -> tuple[int, ...]:
    """``size`` as fire hands it over -> one int per spatial axis of ``kind`` (None: the kind's default)."""
    if size is None:
        return PHANTOM_KINDS[kind].default_size
    return parse_spatial_size(size, PHANTOM_KINDS[kind].ndim)


def main(
    kind: str,
    out_dir: str,
    num_cases: int = 20,
    size: Any = None,
    seed: int = 0,
    image_format: str = "nifti",
    lesion: bool = False,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
) -> str:
    """Generate ``num_cases`` phantoms of ``kind`` (chest, skin, brain, abdomen) into ``out_dir``.

    ``image_format`` is "nifti" or "png" (2D kinds only); ``lesion`` (abdomen only) adds a liver
    lesion labelled 2; ``fractions`` splits the cases into training / validation / test. Returns the
    path of the written ``datalist.json``.
    """
    if not isinstance(kind, str) or kind not in PHANTOM_KINDS:
        raise ValueError(f"kind: expected one of {sorted(PHANTOM_KINDS)}, got {kind!r}")
    if not isinstance(lesion, bool):
        raise ValueError(f"lesion: expected a flag (--lesion), got {lesion!r}")
    if lesion and kind != "abdomen":
        raise ValueError(f"lesion: only the abdomen phantom has a lesion, not {kind!r}")
    if isinstance(fractions, str) or not isinstance(fractions, Sequence):
        raise ValueError(f"fractions: expected three numbers like 0.6,0.2,0.2, got {fractions!r}")
    extra = {"lesion": True} if lesion else {}
    path = write_phantom_dataset(
        kind, out_dir, num_cases, parse_size(size, kind), seed=seed, fractions=tuple(fractions),
        image_format=image_format, **extra,
    )
    return str(path)


if __name__ == "__main__":
    from scripts.cli import run

    run(main)
