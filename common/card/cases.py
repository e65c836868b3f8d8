"""The cases of a robustness card: datalist entries, loaded through the bundle's own preprocessing.

The datalist is MSD-style (``common.data.datalist``): the first of the sections "test", "validation",
"training" whose every entry has an ``image`` and a ``label`` is used, or the only list of a datalist
that is a bare JSON list. ``image`` is a file or a list of files (one per input channel, as the model
zoo's BraTS datalist has); ``label`` is one file. Each case is loaded with the bundle's preprocessing
extended to the label (:mod:`common.card.label_transforms`) and checked: label on the image's grid, whole
numbers among the label values that the bundle's output channels stand for. Errors name the datalist,
the key and the file.

:func:`read_case` returns a :class:`CaseData`; the label takes the layout of the network's output
(:attr:`common.card.bundle_reader.Bundle.output`):

- softmax: ``y`` (1, 1, *spatial) int64 class indices, label-file values mapped to channels by
  ``bundle.channel_labels``;
- sigmoid: ``y`` (1, K, *spatial) int64 in {0, 1}, channel k = the label-file value lies in
  ``bundle.channel_labels[k]`` (overlapping regions, e.g. BraTS TC / WT / ET), or, with no
  ``label_values`` given and a label file that already has K channels, those channels as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.card.bundle_reader import Bundle, read_json
from common.metrics import case_id as _case_id

__all__ = ["CaseRef", "CaseData", "read_datalist", "read_case", "load_case", "SECTIONS"]

SECTIONS = ("test", "validation", "training")


@dataclass(frozen=True)
class CaseRef:
    """One datalist entry: a unique ``case_id`` (:func:`common.metrics.case_id` of the first image file),
    the first image file (``image``), all image files (``images``, one per channel group), the label file."""

    case_id: str
    image: Path
    label: Path
    datalist: Path
    images: tuple[Path, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        """Every input file of the case, image files first then the label (hash them for a cache key)."""
        return (*(self.images or (self.image,)), self.label)


@dataclass
class CaseData:
    """One loaded case: ``x`` (1, C, *spatial) float32 network input, ``y`` in the output's layout (see the
    module docstring), ``spacing`` the voxel size per spatial axis after preprocessing (from the image's
    affine; ``None`` when the preprocessing drops it), all on the bundle's device."""

    case_id: str
    x: torch.Tensor
    y: torch.Tensor
    spacing: tuple[float, ...] | None


def _file(path: Path, value: Any, key: str, i: int, section: str) -> Path:
    if not isinstance(value, str):
        raise ValueError(f"datalist {path}: '{key}' of entry {i} in '{section}' must be a file path")
    file = Path(value) if os.path.isabs(value) else path.parent / value
    if not file.is_file():
        raise FileNotFoundError(f"datalist {path}: '{key}' file {file} does not exist (section '{section}')")
    return file


def read_datalist(path: str | os.PathLike, max_cases: int | None = None) -> tuple[list[CaseRef], str]:
    """The cases of the datalist at ``path`` (at most ``max_cases``) and the section they come from.

    Raises ``FileNotFoundError`` naming the datalist key and the missing file, ``ValueError`` for a
    datalist without labelled entries.
    """
    path = Path(path)
    body = read_json(path, "datalist")
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
        value = entry["image"]
        values = value if isinstance(value, list) and value else [value]
        images = tuple(_file(path, v, "image", i, section) for v in values)
        label = _file(path, entry["label"], "label", i, section)
        cid = _case_id(images[0])
        if cid in seen:
            cid = f"{cid}_{i}"
        seen.add(cid)
        cases.append(CaseRef(cid, images[0], label, path, images))
    return cases, section


def _spacing(x: Any, nd: int) -> tuple[float, ...] | None:
    pixdim = getattr(x, "pixdim", None)
    if pixdim is None:
        return None
    values = [float(v) for v in torch.as_tensor(pixdim).flatten()[:nd]]
    valid = len(values) == nd and all(np.isfinite(values)) and all(v > 0 for v in values)
    return tuple(values) if valid else None


def _fail_values(bundle: Bundle, case: CaseRef, bad: list[float], declared: list[int]) -> ValueError:
    meta = bundle.root / "configs" / "metadata.json"
    return ValueError(
        f"datalist {case.datalist}: 'label' file {case.label} holds values {bad[:8]} outside the label "
        f"values {declared} of the {bundle.num_classes} {bundle.output} channels declared in {meta} "
        "(give label_values)"
    )


def _label_layout(bundle: Bundle, case: CaseRef, y: torch.Tensor) -> torch.Tensor:
    """The preprocessed label (Cy, *spatial) in the output's layout (see the module docstring)."""
    k, groups = bundle.num_classes, bundle.channel_labels
    values = torch.unique(y)
    whole = [float(v) for v in values if not torch.isfinite(v) or v != torch.round(v) or v < 0]
    if bundle.output == "sigmoid" and bundle.label_values is None and y.shape[0] == k > 1:
        bad = [float(v) for v in values if v not in (0, 1)]
        if bad:
            raise _fail_values(bundle, case, bad, [0, 1])
        return y.long()
    if y.shape[0] != 1:
        alternative = f" or {k} binary channels" if bundle.output == "sigmoid" else ""
        raise ValueError(
            f"datalist {case.datalist}: 'label' file {case.label} gives {y.shape[0]} channels after "
            f"preprocessing; expected one label map{alternative}"
        )
    declared = sorted({v for group in groups for v in group} | ({0} if bundle.output == "sigmoid" else set()))
    bad = whole or [float(v) for v in values if int(v) not in declared]
    if bad:
        raise _fail_values(bundle, case, bad, declared)
    y = y.long()
    if bundle.output == "sigmoid":
        return torch.cat([torch.isin(y, torch.tensor(g, device=y.device)) for g in groups]).long()
    lookup = torch.zeros(max(declared) + 1, dtype=torch.long, device=y.device)
    for channel, group in enumerate(groups):
        lookup[list(group)] = channel
    return lookup[y]


def read_case(bundle: Bundle, case: CaseRef) -> CaseData:
    """Load one case through the bundle's preprocessing (see the module docstring)."""
    images = [str(p) for p in (case.images or (case.image,))]
    data: Any = {"image": images if len(images) > 1 else images[0], "label": str(case.label)}
    try:
        data = bundle.preprocessing(data)
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
            f"{case.image} (it needs a LoadImaged on 'image' written as a dict, which the card extends to "
            "'label')"
        )
    spacing = _spacing(data["image"], torch.as_tensor(data["image"]).ndim - 1)
    x = torch.as_tensor(data["image"]).as_subclass(torch.Tensor).float()
    y = torch.as_tensor(data["label"]).as_subclass(torch.Tensor)
    if x.ndim not in (3, 4) or not bool(torch.isfinite(x).all()):
        raise ValueError(f"datalist {case.datalist}: 'image' file {case.image} gives {tuple(x.shape)} after "
                         "preprocessing; expected finite (C, *spatial) with 2 or 3 spatial dims")
    if y.ndim == x.ndim - 1:
        y = y[None]
    if y.ndim != x.ndim or y.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"datalist {case.datalist}: 'label' file {case.label} gives shape {tuple(y.shape)} after "
            f"preprocessing, expected (1, *{tuple(x.shape[1:])}) on the image's grid"
        )
    y = _label_layout(bundle, case, y)
    return CaseData(case.case_id, x[None].to(bundle.device), y[None].to(bundle.device), spacing)


def load_case(bundle: Bundle, case: CaseRef) -> tuple[torch.Tensor, torch.Tensor]:
    """The preprocessed image (1, C, *spatial) float32 and label in the output's layout (softmax:
    (1, 1, *spatial) class indices; sigmoid: (1, K, *spatial) binary), on the bundle's device."""
    data = read_case(bundle, case)
    return data.x, data.y
