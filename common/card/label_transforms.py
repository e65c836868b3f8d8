"""The label's preprocessing, derived from a bundle's image preprocessing by rewriting its config.

Model-zoo inference configs transform only ``"image"``; the card also needs the label on the grid the
network sees. The label's file layout may differ from the image's (an RGB image with a grey-level PNG
mask; a 4-file multi-modal image with a single-file label; a channel-last image), so the image's
transforms are sorted into three kinds before the list is instantiated:

- **loading and geometry** — ``LoadImaged`` and every transform of ``monai.transforms.spatial`` and
  ``monai.transforms.croppad`` (orientation, spacing, resizing, flips, rotations, cropping, padding),
  plus type / device conversions (``EnsureTyped``, ``ToTensord``, ``CastToTyped``, ``ToDeviced``):
  ``"label"`` joins their ``keys``; per-key settings are extended with the label's own value —
  ``mode`` ``"nearest"`` where the image's interpolates, ``anti_aliasing`` off, ``align_corners`` unset
  for a resize whose mode became nearest, the image's value otherwise.
- **channel layout** — the image's ``EnsureChannelFirstd`` (e.g. ``channel_dim=-1`` for an RGB file) is
  not applied to the label. Instead the label gets its own ``EnsureChannelFirstd`` right after it is
  loaded, with the channel axis read from the label file's metadata (``"no_channel"`` for a grey-level
  PNG or a 3D NIfTI), unless its ``LoadImaged`` already sets ``ensure_channel_first``; then
  ``common.transforms.CheckImageLabeld`` checks the two grids (shape, affine) and the image's values on the
  files as read, before any resampling could hide a mismatch.
- **everything else** (intensity transforms, ``Lambdad``, channel repeats and concatenations, custom
  transforms): image only.

Rewriting the config and instantiating it again (rather than mutating built transforms) keeps MONAI's
per-key argument handling intact. A loading step is wrapped with the label's ``EnsureChannelFirstd`` in
a nested ``Compose`` so that the indices of the other items in the list do not move. A list written as a
sum of references (``"$@preprocessing_transforms + @deepedit_transforms"``) is rewritten list by list.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "extend_to_label", "transform_list_ids", "follow_reference", "enum_value", "INTERPOLATION_MODES", "LABEL",
    "IMAGE",
]

#: interpolation modes (torch / MONAI names, spline orders) that a label must not go through
INTERPOLATION_MODES = {
    "bilinear", "trilinear", "bicubic", "linear", "area", "1", "2", "3", "4", "5",
}
LABEL = "label"
IMAGE = "image"

#: type and device conversions that the label follows too (module ``monai.transforms.utility``)
_CONVERSIONS = {"EnsureTyped", "ToTensord", "CastToTyped", "ToDeviced", "Identityd", "ToNumpyd"}
#: an expression joining transform lists: ``"$@a + @b"``
_SUM_OF_REFERENCES = re.compile(r"^\$\s*@[\w#:]+(\s*\+\s*@[\w#:]+)*\s*$")
#: settings of dictionary transforms given one value per key
_PER_KEY = ("mode", "padding_mode", "align_corners", "dtype", "anti_aliasing", "anti_aliasing_sigma",
            "scale_extent")
#: transforms whose ``mode`` goes to ``torch.nn.functional.interpolate`` (``align_corners`` only for
#: interpolating modes)
_INTERPOLATE = {"Resized", "Zoomd", "RandZoomd", "ResizeWithPadOrCropd"}


def follow_reference(parser, key: str) -> str:
    """Follow ``"@other"`` references of a config entry to the id that holds its content."""
    for _ in range(32):
        raw = parser.get(key)
        if isinstance(raw, str) and raw.startswith("@"):
            key = raw[1:].replace("::", "#")
        else:
            return key
    raise ValueError(f"config: reference cycle at '{key}'")


def transform_list_ids(parser, config_path: Path, key: str = "preprocessing") -> list[str]:
    """The config ids of the transform lists under ``key``: a ``Compose``'s ``transforms`` or a plain list,
    written out or as a sum of references (``"$@pre_transforms + @more_transforms"``)."""
    if key not in parser:
        raise ValueError(f"config {config_path}: no key '{key}' (the transforms that load the image)")
    list_id = follow_reference(parser, key)
    raw = parser.get(list_id)
    if isinstance(raw, dict) and "transforms" in raw:
        list_id = follow_reference(parser, f"{list_id}#transforms")
        raw = parser.get(list_id)
    if isinstance(raw, list):
        return [list_id]
    if isinstance(raw, str) and _SUM_OF_REFERENCES.match(raw):
        ids = [follow_reference(parser, ref.replace("::", "#")) for ref in re.findall(r"@([\w#:]+)", raw)]
        if all(i in parser and isinstance(parser.get(i), list) for i in ids):
            return ids
    raise ValueError(
        f"config {config_path}: key '{key}' must be a Compose of a transform list (written out or a sum of "
        "references to lists) or a list"
    )


def enum_value(value: Any) -> Any:
    """The value of a MONAI enum setting (``BlendMode.GAUSSIAN`` -> ``"gaussian"``), anything else as is."""
    return getattr(value, "value", value)


def _interpolates(mode: Any) -> bool:
    return str(enum_value(mode)).lower() in INTERPOLATION_MODES


def _label_settings(item: Any, raw: dict, keys: list[str]) -> dict[str, list]:
    """Per-key settings of ``item`` extended with the label's value (see the module docstring)."""
    params = inspect.signature(type(item).__init__).parameters
    out: dict[str, list] = {}
    n = len(keys)
    image = keys.index(IMAGE)
    nearest = False
    for name in _PER_KEY:
        if name not in params:
            continue
        value = getattr(item, name, None)  # MONAI dictionary transforms keep per-key tuples
        if not (isinstance(value, (list, tuple)) and len(value) == n):
            if name != "mode":
                continue
            given = raw.get("mode", params["mode"].default)
            if isinstance(given, (list, tuple)) or (isinstance(given, str) and given[:1] in "@$%"):
                continue
            value = [given] * n
        values = [enum_value(v) for v in value]
        own = values[image]
        if name == "mode" and _interpolates(own):
            own, nearest = "nearest", True
        elif name == "anti_aliasing":
            own = False
        elif name == "anti_aliasing_sigma":
            own = None
        out[name] = [*values, own]
    if nearest and "align_corners" in out and type(item).__name__ in _INTERPOLATE:
        out["align_corners"][-1] = None
    return out


def _kind(item: Any) -> str:
    """``"load"``, ``"follow"`` (geometry, conversions), ``"channel"`` or ``"image"`` (see the docstring)."""
    name, module = type(item).__name__, type(item).__module__
    if name == "LoadImaged":
        return "load"
    if name == "EnsureChannelFirstd":
        return "channel"
    if module.startswith(("monai.transforms.spatial", "monai.transforms.croppad")) or name in _CONVERSIONS:
        return "follow"
    return "image"


def extend_to_label(parser, config_path: Path, parsed: Callable[[Any, str, Path], Any],
                    key: str = "preprocessing") -> list[str]:
    """Rewrite the transform list under ``key`` in place so that it also prepares ``"label"``; return one
    line per transform saying what it does to the label (for the card's notes).

    ``parsed(parser, id, config_path)`` instantiates one config id (errors name the file and the key).
    """
    from monai.transforms import MapTransform

    item_ids = [f"{list_id}#{i}" for list_id in transform_list_ids(parser, config_path, key)
                for i in range(len(parser.get(list_id)))]
    steps: list[str] = []
    for item_id in item_ids:
        item = parsed(parser, item_id, config_path)
        name = type(item).__name__
        if not isinstance(item, MapTransform):
            steps.append(f"{name}: image only (not a dictionary transform)")
            continue
        keys = [str(k) for k in item.keys]
        if IMAGE not in keys or LABEL in keys:
            steps.append(f"{name}: as written (keys {keys})")
            continue
        kind = _kind(item)
        raw = copy.deepcopy(parser.get(item_id))
        if kind in ("image", "channel") or not isinstance(raw, dict):
            why = "the label keeps its own channel layout" if kind == "channel" else "image only"
            steps.append(f"{name}: {why}")
            continue
        raw["keys"] = [*keys, LABEL]
        settings = _label_settings(item, raw, keys)
        raw.update(settings)
        if kind == "load":
            if "meta_keys" in raw and isinstance(raw["meta_keys"], (list, tuple)):
                raw["meta_keys"] = [*raw["meta_keys"], None]
            # the label's grid (shape, affine) must be the image's and the image finite, checked on the
            # files as read, before any resampling could hide a mismatch (common.transforms.CheckImageLabeld)
            check = {"_target_": "common.transforms.CheckImageLabeld", "keys": [IMAGE, LABEL]}
            if getattr(getattr(item, "_loader", None), "ensure_channel_first", False):
                raw = {"_target_": "Compose", "transforms": [raw, check]}
                steps.append(f"{name}: label loaded, channel first from its own file's metadata")
            else:
                raw = {"_target_": "Compose", "transforms": [
                    raw, {"_target_": "EnsureChannelFirstd", "keys": LABEL, "strict_check": False}, check]}
                steps.append(f"{name}: label loaded, then EnsureChannelFirstd on its own file's layout")
        else:
            mode = settings.get("mode", [None])[-1]
            steps.append(f"{name}: label too" + (f" (mode {mode})" if mode is not None else ""))
        parser[item_id] = raw
    return steps
