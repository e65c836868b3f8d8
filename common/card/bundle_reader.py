"""Read any MONAI bundle's inference config into what a robustness card needs (issue #9).

:func:`read_bundle` parses ``configs/<config>`` with MONAI's ``ConfigParser`` and ``configs/metadata.json``
and returns a :class:`Bundle`: the network of ``network_def`` with its checkpoint loaded
(``weights_only``), a differentiable ``forward(x) -> logits`` built from the config's ``inferer``, the
class names of the first output's ``channel_def``, the preprocessing extended to the label, and the
intensity range of the network input. The bundle needs to know nothing about this project.

Choices, and why:

- **Inferer → forward.** ``SimpleInferer`` → the network. ``SlidingWindowInferer`` (and subclasses) →
  :class:`common.sliding_window.SlidingWindowForward` with the same ``roi_size``, ``overlap``, blend
  ``mode`` and ``sw_batch_size`` (``"exact"`` gradients, autograd through the stitched volume). A plain
  callable ``inferer(x, network)`` (a ``$lambda`` in the config) is called as it is; any other MONAI
  ``Inferer`` is refused, since its gradients cannot be guaranteed. Whether the forward returns
  differentiable logits with one channel per declared class is checked on the first case
  (:func:`check_forward`).
- **Checkpoint.** ``ckpt`` if given; else the config's ``checkpoint`` key; else the ``load_path`` of a
  ``CheckpointLoader`` in the config; else ``models/model.pt`` (the model-zoo layout). When none of
  these exists but the inferer is a custom callable and the config names other checkpoint files (keys
  ending in ``_checkpoint``, e.g. a coarse and a fine stage), the inferer loads its own weights and
  those files are reported instead.
- **Label preprocessing.** Zoo preprocessing usually names only ``"image"``. The label must go through
  the same geometry (loading, channel-first, orientation, spacing, resizing, cropping, padding) but not
  through intensity transforms. So the config's transform list is rewritten before it is instantiated:
  every dictionary transform on ``"image"`` that is not an intensity transform (``monai.transforms.
  intensity``) gets ``"label"`` added to its ``keys``, and, where it interpolates, ``"nearest"`` as the
  label's ``mode``. Re-instantiating from the config (rather than mutating built transforms) keeps
  MONAI's per-key argument handling intact.
- **Input range** (the unit of ε and σ): the last ``ScaleIntensityRanged`` (``b_min``..``b_max``),
  ``ScaleIntensityRangePercentilesd`` (``b_min``..``b_max``), ``ScaleIntensityd`` (``minv``..``maxv``) or
  ``NormalizeIntensityd`` (z-units) on the image; attacks clip to that range when the transform
  guarantees it. Otherwise (z-units, no recognised transform, or an intensity transform after it) the
  range is measured on the cases and the card says so.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from common.checkpoint import load_weights
from common.sliding_window import SlidingWindowForward
from common.validation import main_output

__all__ = [
    "Bundle", "InputRange", "read_bundle", "check_forward", "input_range_of", "sha256_file",
    "INTERPOLATION_MODES",
]

#: interpolation modes (torch / MONAI names, spline orders) that a label must not go through
INTERPOLATION_MODES = {
    "bilinear", "trilinear", "bicubic", "linear", "area", "nearest-exact", "1", "2", "3", "4", "5",
}
_LABEL = "label"
_IMAGE = "image"


@dataclass
class InputRange:
    """Intensity range of the network input: ``low``..``high`` in input units, where it comes from
    (``source``), the attack clip range (``None``: unbounded) and whether it must be measured on the
    cases (``measured``)."""

    low: float | None
    high: float | None
    source: str
    clip: tuple[float, float] | None
    measured: bool = False


@dataclass
class Bundle:
    """A parsed bundle: everything the card runner needs. ``forward(x)`` takes (B, C, *spatial) input in
    network-input units and returns logits (B, K, *spatial)."""

    root: Path
    name: str
    version: str | None
    display_name: str | None
    config_path: Path
    network: nn.Module
    network_target: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    inferer: dict[str, Any]
    checkpoint: Path | None
    checkpoint_sha256: str | None
    extra_checkpoints: dict[str, dict[str, str]]
    num_classes: int
    class_names: list[str]
    preprocessing: Callable[[Mapping[str, Any]], Mapping[str, Any]]
    input_range: InputRange
    device: torch.device
    overrides: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    label_values: tuple[tuple[int, ...], ...] | None = None

    @property
    def foreground_names(self) -> list[str]:
        """Names of the classes scored by Dice (every class but the background, channel 0)."""
        return self.class_names[1:]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ parsing
def _config_path(root: Path, config: str | os.PathLike) -> Path:
    path = Path(config)
    for candidate in (path, root / "configs" / path, root / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config: no such file {root / 'configs' / path}")


def _metadata(root: Path) -> dict[str, Any]:
    path = root / "configs" / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"metadata: no such file {path}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"metadata {path}: cannot be read as JSON ({err})") from err
    return meta


def _classes(meta: Mapping[str, Any], path: Path) -> tuple[int, list[str]]:
    """K and the K class names from ``network_data_format.outputs.<first>.channel_def`` (or num_channels)."""
    outputs = (meta.get("network_data_format") or {}).get("outputs") or {}
    if not outputs:
        raise ValueError(f"metadata {path}: no key 'network_data_format.outputs' (the label channels)")
    key, spec = next(iter(outputs.items()))
    where = f"metadata {path}: 'network_data_format.outputs.{key}"
    channel_def = spec.get("channel_def") or {}
    try:
        indices = {int(k): str(v) for k, v in channel_def.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}.channel_def' keys must be integers") from err
    num = spec.get("num_channels", max(indices, default=-1) + 1)
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(
            f"{where}.num_channels' must be an integer >= 2 (softmax logits, one per class), got {num!r}"
        )
    if indices and (min(indices) < 0 or max(indices) >= num):
        raise ValueError(f"{where}.channel_def' has channels outside 0..{num - 1}")
    names = [indices.get(c, str(c)) for c in range(num)]
    if len(set(names)) != len(names) or "mean" in names:
        raise ValueError(f"metadata {path}: 'channel_def' names must be unique and not 'mean', got {names}")
    return num, names


def _parser(config_path: Path, meta_path: Path, root: Path, overrides: Mapping[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config(str(config_path))
    except Exception as err:
        raise ValueError(f"config {config_path}: cannot be read ({type(err).__name__}: {err})") from err
    parser.read_meta(str(meta_path))
    parser["bundle_root"] = str(root)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _parsed(parser, key: str, config_path: Path) -> Any:
    """``parser.get_parsed_content(key)`` with errors naming the config file and the key."""
    if key not in parser:
        raise ValueError(f"config {config_path}: no key '{key}'")
    try:
        return parser.get_parsed_content(key, instantiate=True)
    except Exception as err:
        msg = " ".join(str(err).split())[:400]
        raise ValueError(
            f"config {config_path}: key '{key}' cannot be instantiated ({type(err).__name__}: {msg})"
        ) from err


def _target_name(parser, key: str, obj: Any) -> str:
    raw = parser.get(key)
    if isinstance(raw, Mapping) and isinstance(raw.get("_target_"), str):
        return raw["_target_"]
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# ---------------------------------------------------------------------------------- preprocessing
def _follow(parser, key: str) -> str:
    """Follow ``"@other"`` references of a config entry to the id that holds its content."""
    for _ in range(32):
        raw = parser.get(key)
        if isinstance(raw, str) and raw.startswith("@"):
            key = raw[1:].replace("::", "#")
        else:
            return key
    raise ValueError(f"config: reference cycle at '{key}'")


def _transform_list_id(parser, config_path: Path) -> str:
    """The config id of the preprocessing's list of transforms (a ``Compose``'s ``transforms`` or a list)."""
    if "preprocessing" not in parser:
        raise ValueError(f"config {config_path}: no key 'preprocessing' (the transforms that load the image)")
    key = _follow(parser, "preprocessing")
    raw = parser.get(key)
    if isinstance(raw, Mapping) and "transforms" in raw:
        key = _follow(parser, f"{key}#transforms")
        raw = parser.get(key)
    if not isinstance(raw, list):
        raise ValueError(f"config {config_path}: key 'preprocessing' must be a Compose or a transform list")
    return key


def _interpolates(mode: Any) -> bool:
    return str(getattr(mode, "value", mode)).lower() in INTERPOLATION_MODES


def _extend_to_label(parser, config_path: Path) -> None:
    """Rewrite the preprocessing config in place so that every geometric dictionary transform on the
    image also transforms the label (nearest-neighbour where it interpolates); see the module docstring."""
    from monai.transforms import MapTransform

    list_id = _transform_list_id(parser, config_path)
    n_items = len(parser.get(list_id))
    for i in range(n_items):
        item_id = f"{list_id}#{i}"
        item = _parsed(parser, item_id, config_path)
        if not isinstance(item, MapTransform):
            continue
        keys = [str(k) for k in item.keys]
        intensity = type(item).__module__.startswith("monai.transforms.intensity")
        if _IMAGE not in keys or _LABEL in keys or intensity:
            continue
        raw = copy.deepcopy(parser.get(item_id))
        if not isinstance(raw, dict):
            continue
        raw["keys"] = [*keys, _LABEL]
        params = inspect.signature(type(item).__init__).parameters
        if "mode" in params:
            modes = getattr(item, "mode", None)
            if modes is None:
                modes = params["mode"].default
            modes = list(modes) if isinstance(modes, (list, tuple)) else [modes] * len(keys)
            modes = [getattr(m, "value", m) for m in modes][: len(keys)]
            image_mode = modes[keys.index(_IMAGE)]
            raw["mode"] = [*modes, "nearest" if _interpolates(image_mode) else image_mode]
        parser[item_id] = raw


def _walk(transform: Any) -> list[Any]:
    """The flat list of transforms inside (nested) ``Compose`` objects."""
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple)):
        return [t for sub in inner for t in _walk(sub)]
    return [transform]


def input_range_of(transforms: Sequence[Any]) -> InputRange:
    """The intensity range of the image after ``transforms`` (see the module docstring)."""
    from monai.transforms import (
        MapTransform,
        NormalizeIntensityd,
        ScaleIntensityd,
        ScaleIntensityRanged,
        ScaleIntensityRangePercentilesd,
    )

    found: InputRange | None = None
    after: list[str] = []
    for t in transforms:
        if not isinstance(t, MapTransform) or _IMAGE not in [str(k) for k in t.keys]:
            continue
        s = getattr(t, "scaler", None)
        if isinstance(t, ScaleIntensityRanged) and s.b_min is not None and s.b_max is not None:
            lo, hi = float(s.b_min), float(s.b_max)
            src = (f"ScaleIntensityRanged(a_min={s.a_min:g}, a_max={s.a_max:g}, b_min={lo:g}, b_max={hi:g}, "
                   f"clip={s.clip})")
            found, after = InputRange(lo, hi, src, (lo, hi) if s.clip else None), []
        elif isinstance(t, ScaleIntensityRangePercentilesd) and s.b_min is not None and s.b_max is not None:
            lo, hi = float(s.b_min), float(s.b_max)
            src = (f"ScaleIntensityRangePercentilesd(lower={s.lower:g}, upper={s.upper:g}, b_min={lo:g}, "
                   f"b_max={hi:g}, clip={s.clip})")
            found, after = InputRange(lo, hi, src, (lo, hi) if s.clip else None), []
        elif isinstance(t, ScaleIntensityd) and s.minv is not None and s.maxv is not None:
            lo, hi = float(s.minv), float(s.maxv)
            src = f"ScaleIntensityd(minv={lo:g}, maxv={hi:g})"
            found, after = InputRange(lo, hi, src, (lo, hi)), []
        elif isinstance(t, NormalizeIntensityd):
            src = "NormalizeIntensityd (z-units); range measured on the cases"
            found, after = InputRange(None, None, src, None, measured=True), []
        elif type(t).__module__.startswith("monai.transforms.intensity"):
            after.append(type(t).__name__)
    if found is None:
        src = "no intensity transform with a declared output range; range measured on the cases"
        return InputRange(None, None, src, None, measured=True)
    if after:
        src = f"{found.source} followed by {', '.join(after)}; range measured on the cases"
        return InputRange(None, None, src, None, measured=True)
    return found


# ----------------------------------------------------------------------------------------- weights
def _checkpoint_candidates(parser, root: Path, ckpt, config_path: Path) -> tuple[Path | None, str]:
    """The checkpoint path and where it came from (see the module docstring)."""
    if ckpt is not None:
        return Path(ckpt), "--ckpt"
    if "checkpoint" in parser:
        value = _parsed(parser, "checkpoint", config_path)
        if isinstance(value, (str, os.PathLike)):
            return Path(value), f"config key 'checkpoint' of {config_path.name}"
    for key in _find_targets(parser.get(""), "CheckpointLoader"):
        value = _parsed(parser, f"{key}#load_path", config_path)
        if isinstance(value, (str, os.PathLike)):
            return Path(value), f"CheckpointLoader '{key}#load_path' of {config_path.name}"
    return root / "models" / "model.pt", "the model-zoo default models/model.pt"


def _find_targets(node: Any, target: str, prefix: str = "") -> list[str]:
    """Config ids of every dict whose ``_target_`` ends with ``target``."""
    found: list[str] = []
    if isinstance(node, Mapping):
        if str(node.get("_target_", "")).split(".")[-1] == target:
            found.append(prefix)
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return found
    for k, v in items:
        found += _find_targets(v, target, f"{prefix}#{k}" if prefix else str(k))
    return found


def _state_dict_diff(network: nn.Module, path: Path) -> str:
    """A one-line description of how the checkpoint's state dict misfits ``network`` (keys and shapes)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("model", obj) if isinstance(obj, dict) else {}
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"'{k}' {tuple(state[k].shape)} vs the network's {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)
    ]
    kinds = (("missing key '{}'", missing), ("unexpected key '{}'", unexpected), ("shape of {}", shapes))
    parts = [
        what.format(items[0]) + (f" (+{len(items) - 1} more)" if len(items) > 1 else "")
        for what, items in kinds
        if items
    ]
    return "; ".join(parts) or "state dict not accepted"


def _load_checkpoint(network: nn.Module, path: Path, source: str, config_path: Path) -> None:
    try:
        load_weights(network, path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"checkpoint: no such file {path} (from {source})") from err
    except ValueError as err:
        try:
            detail = _state_dict_diff(network, path)
        except Exception:  # unreadable file: load_weights' message says why
            raise err from None
        raise ValueError(
            f"checkpoint {path}: does not fit network_def ({type(network).__name__}) of {config_path}: "
            f"{detail}"
        ) from err


def _config_checkpoints(parser, config_path: Path) -> dict[str, dict[str, str]]:
    """Existing files named by top-level keys ending in ``_checkpoint`` (weights a custom inferer loads)."""
    out: dict[str, dict[str, str]] = {}
    for key in parser.get(""):
        if str(key).endswith("_checkpoint"):
            value = _parsed(parser, str(key), config_path)
            if isinstance(value, (str, os.PathLike)) and Path(value).is_file():
                out[str(key)] = {"path": str(value), "sha256": sha256_file(value)}
    return out


# ----------------------------------------------------------------------------------------- inferer
def _plain_logits(out: Any) -> torch.Tensor:
    out = main_output(out)
    return out.as_tensor() if hasattr(out, "as_tensor") else out


def _forward(inferer: Any, network: nn.Module, key_desc: str) -> tuple[Callable, dict[str, Any], list[str]]:
    """Differentiable ``forward`` from the config's inferer, its description for the card, and notes."""
    from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer, SlidingWindowInfererAdapt

    notes: list[str] = []
    if isinstance(inferer, SimpleInferer):
        info = {"type": "SimpleInferer", "roi_size": None, "overlap": None, "mode": None}
        return (lambda x: _plain_logits(network(x))), info, notes
    if type(inferer) in (SlidingWindowInferer, SlidingWindowInfererAdapt):  # not SliceInferer & co.
        mode = str(getattr(inferer.mode, "value", inferer.mode))
        overlap = inferer.overlap
        roi_size = inferer.roi_size
        roi = [int(r) for r in (roi_size if isinstance(roi_size, Sequence) else [roi_size])]
        if any(r < 1 for r in roi):
            raise ValueError(f"{key_desc}: roi_size {roi} has non-positive entries; give the window size")
        sw = SlidingWindowForward(network, roi, overlap=overlap, sw_batch_size=inferer.sw_batch_size,
                                  mode=mode)
        differs = [
            f"{name}={getattr(inferer, name)!r}"
            for name, default in (("sigma_scale", 0.125), ("cval", 0.0))
            if getattr(inferer, name, default) != default
        ]
        if str(getattr(inferer.padding_mode, "value", inferer.padding_mode)) != "constant":
            differs.append(f"padding_mode={inferer.padding_mode!r}")
        if differs:
            notes.append(
                "The sliding-window forward uses MONAI's defaults instead of the inferer's "
                + ", ".join(differs) + "."
            )
        info = {"type": type(inferer).__name__, "roi_size": roi,
                "overlap": [float(o) for o in overlap] if isinstance(overlap, Sequence) else float(overlap),
                "mode": mode, "sw_batch_size": int(inferer.sw_batch_size)}
        return (lambda x: _plain_logits(sw(x))), info, notes
    if isinstance(inferer, Inferer):
        raise ValueError(
            f"{key_desc}: {type(inferer).__name__} is not supported (SimpleInferer, SlidingWindowInferer or "
            "a callable inferer(x, network) -> logits)"
        )
    if callable(inferer):
        notes.append("The config's inferer is a custom callable inferer(x, network); it is used as it is.")
        return (lambda x: _plain_logits(inferer(x, network))), {"type": "callable", "roi_size": None,
                                                                 "overlap": None, "mode": None}, notes
    raise ValueError(f"{key_desc}: expected an inferer, got {type(inferer).__name__}")


def check_forward(bundle: Bundle, x: torch.Tensor, case: str) -> None:
    """Check on one case that ``bundle.forward`` returns differentiable logits (1, K, *spatial)."""
    where = f"config {bundle.config_path}: key 'inferer'"
    xg = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = bundle.forward(xg)
    except Exception as err:
        msg = " ".join(str(err).split())[:300]
        raise ValueError(f"{where}: the forward pass failed on {case} ({type(err).__name__}: {msg})") from err
    expected = (x.shape[0], bundle.num_classes, *x.shape[2:])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{where}: returns {got} on {case}, expected logits {expected} (one channel per class of "
            "metadata.json; override 'inferer' with a differentiable stage if the config's returns labels)"
        )
    if not out.requires_grad:
        raise ValueError(f"{where}: its output on {case} is not differentiable (computed without gradients)")


# -------------------------------------------------------------------------------------- read_bundle
def _label_values(
    values: Sequence[int | Sequence[int]] | None, num_classes: int, meta_path: Path
) -> tuple[tuple[int, ...], ...] | None:
    """``label_values`` checked and normalised: per output channel of ``metadata.json``, the label-file values
    that stand for it (an int or a list of ints; every value >= 0 and used by one channel only)."""
    if values is None:
        return None
    given = values

    def is_value(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        values = None
    else:
        values = tuple((v,) if is_value(v) else tuple(v) if isinstance(v, Sequence) and not isinstance(v, str)
                       and v and all(map(is_value, v)) else () for v in values)
    flat = [v for group in values or () for v in group]
    if not values or not all(values) or len(set(flat)) != len(flat):
        raise ValueError(
            "label_values: expected, per output channel, an integer >= 0 or a non-empty list of them, every "
            f"value used once, got {given!r}"
        )
    if len(values) != num_classes:
        raise ValueError(
            f"label_values: {len(values)} values for the {num_classes} output channels declared in {meta_path}"
        )
    return values


def read_bundle(
    bundle_root: str | os.PathLike,
    config: str | os.PathLike = "inference.json",
    ckpt: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
    label_values: Sequence[int | Sequence[int]] | None = None,
) -> Bundle:
    """Parse a bundle (see the module docstring). ``overrides`` set config ids before parsing, as
    ``monai.bundle run --key value`` does (e.g. ``{"image_size": [64, 64]}``). ``label_values[k]`` is the
    label-file value, or list of values, that stands for output channel ``k`` (``[0, 1, 2, 4]`` for raw
    BraTS labels, ``[[0, 3, 4], [1, 2]]`` to merge organ labels into background / lung); by default a label
    value is its channel index.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the key for a missing config or
    metadata, a missing ``network_def``/``inferer``/``preprocessing``, or a checkpoint that does not fit.
    """
    root = Path(bundle_root)
    if not root.is_dir():
        raise FileNotFoundError(f"bundle_root: no such directory {root}")
    config_path = _config_path(root, config)
    meta_path = root / "configs" / "metadata.json"
    meta = _metadata(root)
    num_classes, class_names = _classes(meta, meta_path)
    label_values = _label_values(label_values, num_classes, meta_path)
    overrides = dict(overrides or {})
    parser = _parser(config_path, meta_path, root, overrides)
    device = torch.device(device)

    if "network_def" not in parser:
        raise ValueError(f"config {config_path}: no key 'network_def' (the bundle's network definition)")
    _extend_to_label(parser, config_path)
    network = _parsed(parser, "network_def", config_path)
    if not isinstance(network, nn.Module):
        raise ValueError(
            f"config {config_path}: key 'network_def' is a {type(network).__name__}, not a torch module"
        )
    network_target = _target_name(parser, "network_def", network)
    inferer = _parsed(parser, "inferer", config_path)
    preprocessing = _parsed(parser, "preprocessing", config_path)
    if not callable(preprocessing):
        raise ValueError(f"config {config_path}: key 'preprocessing' is not a transform")
    input_range = input_range_of(_walk(preprocessing))

    path, source = _checkpoint_candidates(parser, root, ckpt, config_path)
    extra = {}
    notes: list[str] = []
    from monai.inferers import Inferer

    custom = callable(inferer) and not isinstance(inferer, Inferer)
    if ckpt is None and not path.is_file() and custom:
        extra = _config_checkpoints(parser, config_path)
    if extra:
        notes.append(
            f"No checkpoint for network_def ({path} does not exist); the custom inferer loads its own "
            "weights: "
            + ", ".join(f"{k} = {v['path']}" for k, v in extra.items()) + "."
        )
        checkpoint, sha = None, None
    else:
        _load_checkpoint(network, path, source, config_path)
        checkpoint, sha = path, sha256_file(path)
    network = network.to(device).eval()
    forward, inferer_info, inferer_notes = _forward(inferer, network, f"config {config_path}: key 'inferer'")
    notes += inferer_notes
    if overrides:
        notes.append("Config overrides: " + json.dumps(overrides, default=str) + ".")
    return Bundle(
        label_values=label_values,
        root=root.resolve(),
        name=root.resolve().name,
        version=meta.get("version"),
        display_name=meta.get("name"),
        config_path=config_path.resolve(),
        network=network,
        network_target=network_target,
        forward=forward,
        inferer=inferer_info,
        checkpoint=checkpoint.resolve() if checkpoint else None,
        checkpoint_sha256=sha,
        extra_checkpoints=extra,
        num_classes=num_classes,
        class_names=class_names,
        preprocessing=preprocessing,
        input_range=input_range,
        device=device,
        overrides=overrides,
        notes=notes,
    )
