"""Read any MONAI bundle's inference config into what a robustness card needs (issues #9, #15).

:func:`read_bundle` parses ``configs/<config>`` (JSON or YAML) with MONAI's ``ConfigParser`` and
``configs/metadata.json`` and returns a :class:`Bundle`. The bundle needs to know nothing about this
project: the model zoo's configs are read as their authors wrote them.

The :class:`Bundle` the card runner consumes:

============================ ===========================================================================
field                        meaning
============================ ===========================================================================
``forward``                  differentiable ``x (B, C_in, *spatial) -> logits (B, K, *spatial)`` in
                             network-input units: the deployed pipeline (inferer + network), autograd
                             through it (:mod:`common.card.forwards`)
``output``                   ``"softmax"`` (K mutually exclusive classes, channel 0 the background) or
                             ``"sigmoid"`` (K independent binary channels, e.g. BraTS TC / WT / ET)
``output_source``            where ``output`` was told (the option, the postprocessing, the default)
``num_classes``              K, the output channels of ``metadata.json`` (first output's
                             ``num_channels`` / ``channel_def``)
``class_names``              K names from ``channel_def``
``foreground_names``         the names scored: softmax: all but channel 0; sigmoid: all K
``channel_labels``           per output channel, the label-file values that stand for it: softmax: the
                             values mapped to class k (disjoint); sigmoid: the values inside region k
                             (may overlap, ``((1, 4), (1, 2, 4), (4,))`` for BraTS TC, WT, ET). Default:
                             softmax value k -> class k; sigmoid value k + 1 -> channel k (or a label
                             file that already has K binary channels)
``label_values``             ``channel_labels`` when given by the user, else ``None`` (as passed)
``preprocessing``            the config's preprocessing, rewritten to also prepare ``"label"``
                             (:mod:`common.card.label_transforms`); called on
                             ``{"image": file or files, "label": file}``
``label_pipeline``           one line per preprocessing transform: what it does to the label
``input_range``              :class:`InputRange`, the unit of ε and σ and the attack clip range
``inferer``                  description: ``type``, ``key``, ``roi_size``, ``overlap``, ``mode``,
                             ``sw_batch_size``, ``sigma_scale``, ``padding_mode``, ``cval``, ``slice_dim``
``network`` / ``network_target``  the ``network_def`` module (eval mode, on ``device``) and its target
``checkpoint`` / ``checkpoint_sha256`` / ``extra_checkpoints``  the weights loaded (see below)
``root``, ``name``, ``version``, ``display_name``, ``config_path``, ``device``, ``overrides``, ``notes``
============================ ===========================================================================

Choices, and why:

- **Config.** ``inference.json``; if absent, ``inference.yaml`` / ``inference.yml``. While the config is
  parsed and its objects built, the bundle root is first on ``sys.path`` and any ``scripts`` package
  already imported (this project has one) is set aside, so ``$import scripts.x`` and ``_target_:
  scripts.x.Y`` find the bundle's own ``scripts/`` as ``monai.bundle run`` does; afterwards ``sys.path``
  and ``sys.modules`` are restored.
- **Inferer → forward** (the config key ``inferer``, or the one the user names). ``SimpleInferer`` →
  the network; ``SlidingWindowInferer`` and subclasses → MONAI's sliding window with all the
  inferer's settings (any blend mode, ``sigma_scale``, padding mode, ``cval``); ``SliceInferer`` → the
  2D network on the slices moved into the batch; any other inferer, or a callable
  ``inferer(x, network)``, is used as it is. The config's ``sw_device`` / ``device`` are replaced by the
  card's device (a note says so). :func:`check_forward` checks on the first case that the forward
  returns differentiable logits with one channel per declared output.
- **Output kind.** The ``output`` option; else the postprocessing: ``Activationsd(sigmoid=True)`` or an
  ``AsDiscreted`` with a ``threshold`` and no ``argmax`` → sigmoid, ``Activationsd(softmax=True)`` or
  ``AsDiscreted(argmax=True)`` → softmax; else softmax for K ≥ 2 and sigmoid for K = 1.
- **Checkpoint.** ``ckpt`` if given; else the config's ``checkpoint`` key; else the ``load_path`` of a
  ``CheckpointLoader`` in the config; else ``models/model.pt`` (the model-zoo layout). The file is read
  with ``torch.load(weights_only=True)`` and may hold a bare state dict, ``{"model": ...}`` or
  ``{"state_dict": ...}``. When none exists but the inferer is a custom callable and the config names
  other checkpoint files (keys ending in ``_checkpoint``, e.g. a coarse and a fine stage), the inferer
  loads its own weights and those files are reported instead.
- **Input range** (the unit of ε and σ): the last ``ScaleIntensityRanged`` (``b_min``..``b_max``),
  ``ScaleIntensityRangePercentilesd`` (``b_min``..``b_max``), ``ScaleIntensityd`` (``minv``..``maxv``) or
  ``NormalizeIntensityd`` (z-units) on the image; attacks clip to that range when the transform
  guarantees it. Otherwise (z-units, no recognised transform, or an intensity transform after it) the
  range is measured on the cases and the card says so.

Whatever cannot be read raises one line naming the file and the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from common.card.forwards import NetworkForward, SliceForward, WindowForward, device_note
from common.card.label_transforms import (
    IMAGE, INTERPOLATION_MODES, enum_value, extend_to_label, follow_reference,
)

__all__ = [
    "Bundle", "InputRange", "read_bundle", "check_forward", "input_range_of", "sha256_file",
    "bundle_imports", "read_json", "INTERPOLATION_MODES", "OUTPUTS",
]

#: the output kinds of a segmentation network
OUTPUTS = ("softmax", "sigmoid")
_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")


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
    """A parsed bundle: everything the card runner needs (fields: see the module docstring)."""

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
    output: str = "softmax"
    output_source: str = "default"
    channel_labels: tuple[tuple[int, ...], ...] = ()
    label_pipeline: list[str] = field(default_factory=list)

    @property
    def foreground_names(self) -> list[str]:
        """Names of the channels scored by Dice: softmax: every class but the background (channel 0);
        sigmoid: every channel."""
        return list(self.class_names) if self.output == "sigmoid" else self.class_names[1:]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ parsing
def _config_path(root: Path, config: str | os.PathLike | None) -> Path:
    names = _CONFIG_NAMES if config is None or str(config) == _CONFIG_NAMES[0] else (str(config),)
    for name in names:
        path = Path(name)
        for candidate in (path, root / "configs" / path, root / path):
            if candidate.is_file():
                return candidate
    tried = " or ".join(str(root / "configs" / n) for n in names)
    raise FileNotFoundError(f"config: no such file {tried}")


@contextlib.contextmanager
def bundle_imports(root: Path) -> Iterator[None]:
    """Import the bundle's own ``scripts`` package (see the module docstring), then restore."""
    saved = {k: m for k, m in sys.modules.items() if k == "scripts" or k.startswith("scripts.")}
    own = (root / "scripts").is_dir()
    if own:
        for k in saved:
            del sys.modules[k]
    entry = str(root.resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)
        if own:
            for k in [k for k in sys.modules if k == "scripts" or k.startswith("scripts.")]:
                del sys.modules[k]
            sys.modules.update(saved)


def read_json(path: Path, what: str) -> Any:
    """The JSON file at ``path``; one-line errors ``<what>: no such file <path>`` (FileNotFoundError) and
    ``<what> <path>: cannot be read as JSON (...)`` (ValueError)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path}: cannot be read as JSON ({err})") from err


def _classes(meta: Mapping[str, Any], path: Path) -> tuple[int, list[str]]:
    """K and the K channel names from ``network_data_format.outputs.<first>.channel_def`` (or
    ``num_channels``)."""
    outputs = (meta.get("network_data_format") or {}).get("outputs") or {}
    if not outputs:
        raise ValueError(f"metadata {path}: no key 'network_data_format.outputs' (the output channels)")
    key, spec = next(iter(outputs.items()))
    where = f"metadata {path}: 'network_data_format.outputs.{key}"
    channel_def = spec.get("channel_def") or {}
    try:
        indices = {int(k): str(v) for k, v in channel_def.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}.channel_def' keys must be integers") from err
    num = spec.get("num_channels", max(indices, default=-1) + 1)
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"{where}.num_channels' must be an integer >= 1, got {num!r}")
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
        msg = " ".join(str(err).split())[:300]
        raise ValueError(f"config {config_path}: cannot be read ({type(err).__name__}: {msg})") from err
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


def _output_kind(parser, config_path: Path, option: str | None, num: int) -> tuple[str, str]:
    """``(output, where it was told)`` (see the module docstring)."""
    if option is not None:
        if option not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {option!r}")
        told, where = _output_kind(parser, config_path, None, num)
        return option, "option" + (f" (the config says {told}: {where})" if told != option else "")
    post_id = follow_reference(parser, "postprocessing") if "postprocessing" in parser else None
    post = parser.get(post_id) if post_id else None
    for target in ("Activationsd", "Activations", "AsDiscreted", "AsDiscrete"):
        for key in _find_targets(post, target, post_id or ""):
            def setting(name: str) -> Any:
                value = _parsed(parser, f"{key}#{name}", config_path) if name in parser.get(key) else None
                if isinstance(value, (list, tuple)):  # one value per key
                    return True if True in value else next((v for v in value if v is not None), None)
                return value

            where = f"postprocessing {target} of {config_path.name}"
            if target.startswith("Activations"):
                if setting("sigmoid") is True:
                    return "sigmoid", f"{where} (sigmoid=True)"
                if setting("softmax") is True:
                    return "softmax", f"{where} (softmax=True)"
            elif setting("argmax") is True:
                return "softmax", f"{where} (argmax=True)"
            elif setting("threshold") is not None:
                return "sigmoid", f"{where} (threshold without argmax)"
    if num == 1:
        return "sigmoid", "one output channel (no activation in the postprocessing)"
    return "softmax", "default (no activation in the postprocessing)"


def _channel_labels(
    values: Sequence[int | Sequence[int]] | None, num: int, output: str, meta_path: Path
) -> tuple[tuple[int, ...], ...] | None:
    """``label_values`` checked and normalised (see :class:`Bundle`'s ``channel_labels``)."""
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
    if not values or not all(values):
        raise ValueError(
            "label_values: expected, per output channel, an integer >= 0 or a non-empty list of them, got "
            f"{given!r}"
        )
    flat = [v for group in values for v in group]
    if output == "softmax" and len(set(flat)) != len(flat):
        raise ValueError(
            "label_values: expected disjoint values with softmax outputs (each stands for one class), got "
            f"{given!r} (overlapping regions need output='sigmoid')"
        )
    if len(values) != num:
        raise ValueError(
            f"label_values: {len(values)} values for the {num} output channels declared in {meta_path}"
        )
    return values


# ---------------------------------------------------------------------------------- preprocessing
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
        if not isinstance(t, MapTransform) or IMAGE not in [str(k) for k in t.keys]:
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


#: keys under which checkpoints keep the network's state dict (MONAI ``CheckpointSaver``, Lightning)
STATE_KEYS = ("model", "state_dict")


def _state_dict(path: Path, source: str) -> dict[str, torch.Tensor]:
    """The network state dict in the checkpoint at ``path``: bare, ``{"model": ...}`` or
    ``{"state_dict": ...}``."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path} (from {source})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated archives, disallowed globals
        msg = " ".join(str(err).split())[:300]
        raise ValueError(
            f"checkpoint {path}: cannot be read as a PyTorch checkpoint ({type(err).__name__}: {msg})"
        ) from err

    def is_state(d: Any) -> bool:
        return isinstance(d, Mapping) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())

    if is_state(obj):
        return dict(obj)
    for key in STATE_KEYS:
        if isinstance(obj, Mapping) and is_state(obj.get(key)):
            return dict(obj[key])
    found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(
        f"checkpoint {path}: expected a state dict or a dict with key 'model' or 'state_dict', found {found}"
    )


def _state_dict_diff(network: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """A one-line description of how ``state`` misfits ``network`` (keys and shapes)."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"'{k}' {tuple(state[k].shape)} vs the network's {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    kinds = (("missing key '{}'", missing), ("unexpected key '{}'", unexpected), ("shape of {}", shapes))
    parts = [
        what.format(items[0]) + (f" (+{len(items) - 1} more)" if len(items) > 1 else "")
        for what, items in kinds
        if items
    ]
    return "; ".join(parts) or "state dict not accepted"


def _load_checkpoint(network: nn.Module, path: Path, source: str, config_path: Path) -> None:
    state = _state_dict(path, source)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {path}: does not fit network_def ({type(network).__name__}) of {config_path}: "
            f"{_state_dict_diff(network, state)}"
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
def _describe(inferer: Any, key: str) -> dict[str, Any]:
    """The inferer's settings for the card (``None`` where a setting does not apply)."""
    def plain(v: Any) -> Any:
        v = enum_value(v)
        if isinstance(v, Sequence) and not isinstance(v, str):
            return [plain(u) for u in v]
        return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)

    info: dict[str, Any] = {"type": type(inferer).__name__, "key": key}
    for name in ("roi_size", "overlap", "mode", "sw_batch_size", "sigma_scale", "padding_mode", "cval"):
        info[name] = plain(getattr(inferer, name, None))
    if hasattr(inferer, "orig_roi_size"):
        info["roi_size"] = plain(inferer.orig_roi_size)
    info["slice_dim"] = getattr(inferer, "spatial_dim", None)
    return info


def _forward(inferer: Any, network: nn.Module, key: str, config_path: Path,
             device: torch.device) -> tuple[Callable, dict[str, Any], list[str]]:
    """Differentiable ``forward`` from the config's inferer, its description for the card, and notes."""
    from monai.inferers import Inferer, SimpleInferer, SliceInferer, SlidingWindowInferer

    where = f"config {config_path}: key '{key}'"
    notes: list[str] = []
    if isinstance(inferer, SimpleInferer):
        return NetworkForward(network), _describe(inferer, key), notes
    if isinstance(inferer, SlidingWindowInferer):
        if getattr(inferer, "with_coord", False):
            raise ValueError(
                f"{where}: with_coord=True (a network taking window coordinates) is not supported"
            )
        note = device_note(inferer, device)
        notes += [note] if note else []
        try:
            forward = SliceForward(network, inferer) if isinstance(inferer, SliceInferer) else WindowForward(
                network, inferer)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        return forward, _describe(inferer, key), notes
    if isinstance(inferer, Inferer) or callable(inferer):
        custom = not isinstance(inferer, Inferer)
        what = "a custom callable inferer(x, network)" if custom else type(inferer).__name__
        notes.append(
            f"The config's inferer is {what}; it is used as it is (its gradient checked on the first case)."
        )
        info = {**{k: None for k in _describe(SimpleInferer(), key)}, "key": key,
                "type": "callable" if custom else type(inferer).__name__}
        return NetworkForward(network, inferer), info, notes
    raise ValueError(f"{where}: expected an inferer, got {type(inferer).__name__}")


def check_forward(bundle: Bundle, x: torch.Tensor, case: str) -> None:
    """Check on one case that ``bundle.forward`` returns differentiable logits (1, K, *spatial)."""
    where = f"config {bundle.config_path}: key '{bundle.inferer.get('key', 'inferer')}'"
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
            f"{where}: returns {got} on {case}, expected logits {expected} (one channel per output of "
            "metadata.json; override the inferer with a differentiable stage if the config's returns labels)"
        )
    if not out.requires_grad:
        raise ValueError(f"{where}: its output on {case} is not differentiable (computed without gradients)")


# -------------------------------------------------------------------------------------- read_bundle
def read_bundle(
    bundle_root: str | os.PathLike,
    config: str | os.PathLike | None = None,
    ckpt: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
    label_values: Sequence[int | Sequence[int]] | None = None,
    output: str | None = None,
    inferer_key: str = "inferer",
) -> Bundle:
    """Parse a bundle (see the module docstring).

    Args:
        bundle_root: the bundle's directory (``configs/``, ``models/``, maybe ``scripts/``).
        config: the inference config under ``configs/`` (JSON or YAML); default ``inference.json``, else
            ``inference.yaml`` / ``inference.yml``.
        ckpt: weights to load instead of the config's.
        device: where the network runs and the windows are stitched.
        overrides: config ids set before parsing, as ``monai.bundle run --key value`` does (e.g.
            ``{"inferer#roi_size": [64, 64]}``).
        label_values: per output channel, the label-file value or list of values that stand for it
            (softmax: disjoint, ``[0, 1, 2, 4]`` for raw BraTS labels as 4 classes; sigmoid: may overlap,
            ``[[1, 4], [1, 2, 4], [4]]`` for the zoo's BraTS TC, WT, ET channels).
        output: ``"softmax"`` or ``"sigmoid"``; default from the config's postprocessing.
        inferer_key: the config key of the inferer to attack through.

    Raises ``FileNotFoundError`` / ``ValueError`` (one line, naming the file and the key) for a missing
    config or metadata, a missing or unbuildable ``network_def`` / inferer / ``preprocessing``, or a
    checkpoint that does not fit.
    """
    root = Path(bundle_root)
    if not root.is_dir():
        raise FileNotFoundError(f"bundle_root: no such directory {root}")
    config_path = _config_path(root, config)
    meta_path = root / "configs" / "metadata.json"
    meta = read_json(meta_path, "metadata")
    num_classes, class_names = _classes(meta, meta_path)
    overrides = dict(overrides or {})
    device = torch.device(device)
    with bundle_imports(root):
        parser = _parser(config_path, meta_path, root, overrides)
        kind, kind_source = _output_kind(parser, config_path, output, num_classes)
        if kind == "softmax" and num_classes < 2:
            raise ValueError(
                f"metadata {meta_path}: softmax outputs need num_channels >= 2, got {num_classes}"
            )
        given = _channel_labels(label_values, num_classes, kind, meta_path)
        if "network_def" not in parser:
            raise ValueError(f"config {config_path}: no key 'network_def' (the bundle's network definition)")
        if inferer_key not in parser:
            raise ValueError(f"config {config_path}: no key '{inferer_key}' (the inferer to attack through)")
        label_pipeline = extend_to_label(parser, config_path, _parsed)
        network = _parsed(parser, "network_def", config_path)
        if not isinstance(network, nn.Module):
            raise ValueError(
                f"config {config_path}: key 'network_def' is a {type(network).__name__}, not a torch module"
            )
        network_target = _target_name(parser, "network_def", network)
        inferer = _parsed(parser, inferer_key, config_path)
        preprocessing = _parsed(parser, "preprocessing", config_path)
        if not callable(preprocessing):
            raise ValueError(f"config {config_path}: key 'preprocessing' is not a transform")
        path, source = _checkpoint_candidates(parser, root, ckpt, config_path)
        extra: dict[str, dict[str, str]] = {}
        from monai.inferers import Inferer

        if ckpt is None and not path.is_file() and callable(inferer) and not isinstance(inferer, Inferer):
            extra = _config_checkpoints(parser, config_path)
    input_range = input_range_of(_walk(preprocessing))
    notes: list[str] = []
    if extra:
        notes.append(
            f"No checkpoint for network_def ({path} does not exist); the custom inferer loads its own "
            "weights: " + ", ".join(f"{k} = {v['path']}" for k, v in extra.items()) + "."
        )
        checkpoint, sha = None, None
    else:
        _load_checkpoint(network, path, source, config_path)
        checkpoint, sha = path, sha256_file(path)
    network = network.to(device).eval()
    forward, inferer_info, inferer_notes = _forward(inferer, network, inferer_key, config_path, device)
    notes += inferer_notes
    if kind == "sigmoid":
        notes.append(f"Sigmoid outputs ({kind_source}): each channel is a binary region, thresholded at 0.5.")
    if overrides:
        notes.append("Config overrides: " + json.dumps(overrides, default=str) + ".")
    default = tuple((c,) for c in range(num_classes)) if kind == "softmax" else tuple(
        (c + 1,) for c in range(num_classes))
    return Bundle(
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
        label_values=given,
        output=kind,
        output_source=kind_source,
        channel_labels=given or default,
        label_pipeline=label_pipeline,
    )
