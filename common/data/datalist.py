"""MSD-style datalists: ``{"training": [...], "validation": [...], "test": [...], ...}``.

Each entry is a dict of file paths, e.g. ``{"image": "imagesTr/case_000.nii.gz", "label": "labelsTr/case_000.nii.gz"}``
(paths relative to the datalist's directory, as MONAI's ``load_decathlon_datalist`` resolves them with
``base_dir``). Every reader and generator in ``common.data`` writes its output through :func:`write_datalist`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.io import atomic_write_json

__all__ = ["split_cases", "write_datalist", "load_datalist"]


def split_cases(
    cases: Sequence[Any], fractions: Sequence[float], names: Sequence[str], seed: int = 0
) -> dict[str, list[Any]]:
    """Shuffle ``cases`` with ``seed`` and cut them into consecutive parts by ``fractions``.

    The fractions must be positive and sum to 1; part sizes are rounded so that they add up to
    ``len(cases)`` (the last part takes the rest). Example: ``split_cases(c, (0.7, 0.1, 0.2),
    ("training", "validation", "test"))`` is the 70/10/20 split of the certification paper.
    """
    if len(fractions) != len(names):
        raise ValueError(f"fractions: {len(fractions)} values for {len(names)} names")
    fr = np.asarray(fractions, dtype=float)
    if (fr <= 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"fractions: must be positive and sum to 1, got {list(fractions)}")
    order = np.random.default_rng(seed).permutation(len(cases))
    bounds = np.round(np.cumsum(fr) * len(cases)).astype(int)
    bounds[-1] = len(cases)
    parts, start = {}, 0
    for name, stop in zip(names, bounds):
        parts[name] = [cases[i] for i in order[start:stop]]
        start = stop
    return parts


def write_datalist(path: str | os.PathLike, sections: Mapping[str, Sequence[Mapping[str, Any]]], **meta: Any) -> Path:
    """Write an MSD-style datalist JSON atomically; ``meta`` adds top-level keys (``labels``, ``name`` ...)."""
    body: dict[str, Any] = dict(meta)
    for key, entries in sections.items():
        body[key] = [dict(e) for e in entries]
    return atomic_write_json(path, body)


def load_datalist(path: str | os.PathLike, section: str = "training") -> list[dict[str, Any]]:
    """Read one section of a datalist with every path made absolute against the datalist's folder.

    Raises ``FileNotFoundError`` naming the datalist or the first missing file, and ``ValueError``
    for a corrupt JSON or an absent or empty section (an empty ``validation`` section would otherwise
    let a training run finish without ever writing its best weights) — both
    :class:`common.errors.InputError`, so a bundle run reports them on one line.
    """
    from monai.data import load_decathlon_datalist

    from common.errors import InputError, MissingInputError

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"datalist: no such file {path}")
    try:
        entries = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=section, base_dir=str(path.parent))
    except ValueError as err:
        raise InputError(f"datalist {path}: {err}") from err
    except Exception as err:  # json.JSONDecodeError and friends
        raise InputError(f"datalist {path}: cannot be read as JSON ({err})") from err
    if not entries:
        raise InputError(f"datalist {path}: section '{section}' is empty")
    for entry in entries:
        for key, value in entry.items():
            if isinstance(value, str) and key in ("image", "label") and not Path(value).exists():
                raise MissingInputError(f"datalist {path}: '{key}' file {value} does not exist")
    return entries
