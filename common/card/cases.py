"""The cases of a robustness card: datalist entries, loaded through the bundle's own preprocessing.

The datalist is MSD-style (``common.data.datalist``): the first of the sections "test", "validation",
"training" whose every entry has an ``image`` and a ``label`` is used, or the only list of a datalist
that is a bare JSON list. Each case is loaded with the bundle's preprocessing extended to the label
(:mod:`common.card.bundle_reader`) and checked: label on the image's grid, one channel, whole numbers
inside the channels that ``metadata.json`` declares. Errors name the datalist, the key and the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.card.bundle_reader import Bundle
from common.metrics import case_id as metrics_case_id

__all__ = ["CaseRef", "read_datalist", "load_case", "SECTIONS"]

SECTIONS = ("test", "validation", "training")


@dataclass(frozen=True)
class CaseRef:
    """One datalist entry: a unique ``case_id`` (:func:`common.metrics.case_id` of the image file) and files."""

    case_id: str
    image: Path
    label: Path
    datalist: Path


def read_datalist(path: str | os.PathLike, max_cases: int | None = None) -> tuple[list[CaseRef], str]:
    """The cases of the datalist at ``path`` (at most ``max_cases``) and the section they come from.

    Raises ``FileNotFoundError`` naming the datalist key and the missing file, ``ValueError`` for a
    datalist without labelled entries.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist: no such file {path}")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"datalist {path}: cannot be read as JSON ({err})") from err
    sections = {"data": body} if isinstance(body, list) else body if isinstance(body, dict) else {}
    section = next(
        (s for s in (*SECTIONS, "data") if isinstance(sections.get(s), list) and sections[s]
         and all(isinstance(e, dict) and "image" in e and "label" in e for e in sections[s])),
        None,
    )
    if section is None:
        raise ValueError(
            f"datalist {path}: no section of {SECTIONS} whose entries all have the keys 'image' and 'label'"
        )
    entries = sections[section][: max_cases if max_cases else None]
    cases: list[CaseRef] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        files = {}
        for key in ("image", "label"):
            value = entry[key]
            if not isinstance(value, str):
                raise ValueError(f"datalist {path}: '{key}' of entry {i} in '{section}' must be a file path")
            file = Path(value) if os.path.isabs(value) else path.parent / value
            if not file.is_file():
                raise FileNotFoundError(
                    f"datalist {path}: '{key}' file {file} does not exist (section '{section}')"
                )
            files[key] = file
        case_id = metrics_case_id(files["image"])
        if case_id in seen:
            case_id = f"{case_id}_{i}"
        seen.add(case_id)
        cases.append(CaseRef(case_id, files["image"], files["label"], path))
    return cases, section


def load_case(bundle: Bundle, case: CaseRef) -> tuple[torch.Tensor, torch.Tensor]:
    """The preprocessed image (1, C, *spatial) float32 and label (1, 1, *spatial) int64, on the bundle's
    device."""
    try:
        data = bundle.preprocessing({"image": str(case.image), "label": str(case.label)})
    except Exception as err:
        msg = " ".join(str(err).split())[-300:]
        raise ValueError(
            f"datalist {case.datalist}: the bundle's preprocessing failed on 'image' file {case.image} / "
            f"'label' file {case.label} ({type(err).__name__}: {msg})"
        ) from err
    if not isinstance(data, dict) or "image" not in data or "label" not in data:
        raise ValueError(
            f"config {bundle.config_path}: key 'preprocessing' must return one dict with 'image' and 'label' "
            f"(got {type(data).__name__} for {case.image})"
        )
    if not all(isinstance(data[k], (torch.Tensor, np.ndarray)) for k in ("image", "label")):
        raise ValueError(
            f"config {bundle.config_path}: key 'preprocessing' did not load the 'image' and the 'label' of "
            f"{case.image} (it needs a LoadImaged on 'image' written as a dict, which the card extends to 'label')"
        )
    x = torch.as_tensor(data["image"]).as_subclass(torch.Tensor).float()
    y = torch.as_tensor(data["label"]).as_subclass(torch.Tensor)
    if x.ndim not in (3, 4) or not bool(torch.isfinite(x).all()):
        raise ValueError(f"datalist {case.datalist}: 'image' file {case.image} gives {tuple(x.shape)} after "
                         "preprocessing; expected finite (C, *spatial) with 2 or 3 spatial dims")
    if y.ndim == x.ndim - 1:
        y = y[None]
    if y.ndim != x.ndim or y.shape[0] != 1 or y.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"datalist {case.datalist}: 'label' file {case.label} gives shape {tuple(y.shape)} after "
            f"preprocessing, expected (1, *{tuple(x.shape[1:])}) on the image's grid"
        )
    values = torch.unique(y)
    k = bundle.num_classes
    groups = bundle.label_values or tuple((c,) for c in range(k))
    declared = sorted(v for group in groups for v in group)
    bad = [float(v) for v in values if not torch.isfinite(v) or v != torch.round(v) or int(v) not in declared]
    if bad:
        meta = bundle.root / "configs" / "metadata.json"
        raise ValueError(
            f"datalist {case.datalist}: 'label' file {case.label} holds values {bad[:8]} outside the "
            f"label values {list(declared)} of the {k} channels declared in {meta} (channel_def)"
        )
    y = y.long()
    if bundle.label_values is not None:  # label value -> channel index
        lookup = torch.zeros(max(declared) + 1, dtype=torch.long)
        for channel, group in enumerate(groups):
            lookup[list(group)] = channel
        y = lookup[y]
    return x[None].to(bundle.device), y[None].to(bundle.device)
