"""Per-case metrics of a segmentation and of an input perturbation, on top of MONAI's metrics.

- :func:`case_id`: the one case id of the toolkit, the image file's name with its image suffix stripped
  (:data:`IMAGE_SUFFIXES`), so the CSVs of sweeps, certification and the card join on it.
- :func:`segmentation_scores`: Dice and IoU (Jaccard) per class or per region, per case, from integer
  label maps (softmax class maps) or from C-channel binary masks (sigmoid multi-label outputs), with an
  optional ignore mask (e.g. the abstained pixels of certification); optionally HD95 and surface Dice.
- :func:`overlap_scores`, :func:`surface_scores`: the same on binary masks (B, R, *spatial): Dice / IoU in
  float64 and MONAI ``compute_hausdorff_distance`` (95th percentile) /
  ``compute_surface_dice`` (the normalised surface Dice of Nikolov et al., J. Med. Internet Res. 2021).
- :func:`perturbation_scores`: PSNR, SSIM and RMSE of a perturbed input against the clean one, per case, via
  MONAI ``PSNRMetric``, ``SSIMMetric`` and ``RMSEMetric`` (the input-quality columns of Table 1 in the
  BraTS robustness paper, Liu et al., J. Digit. Imaging 2021).
- :func:`labels_to_regions`: nested label regions, e.g. BraTS whole tumour / tumour core / enhancing
  tumour (:data:`BRATS_REGIONS`).

Names: ``dice_<class>``, ``iou_<class>``, ``hd95_<class>``, ``nsd_<class>`` and ``<metric>_mean`` over the
reported classes of each case, everywhere in the toolkit.

Empty-class rule (:data:`EMPTY_CLASS_RULE`, used by every score of the toolkit and printed in every
report): a class (or region) absent from both the label and the prediction — after removing ignored
pixels — scores Dice = IoU = NSD = 1 and HD95 = 0 (nothing to find, nothing found: the BraTS challenge
convention, MONAI ``ignore_empty=False``); absent from one of them only, Dice = IoU = NSD = 0 and
HD95 = inf. Every score is therefore defined, and means and paired tests are taken over all cases.

All functions are vectorised over the batch and return one value per case: float64 tensors of shape (B,).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.metrics import (
    PSNRMetric,
    RMSEMetric,
    SSIMMetric,
    compute_hausdorff_distance,
    compute_surface_dice,
)
from monai.networks.utils import one_hot

from common.validation import check_image, check_label_map, check_positive_int

__all__ = [
    "BRATS_REGIONS",
    "EMPTY_CLASS_RULE",
    "IMAGE_SUFFIXES",
    "case_id",
    "labels_to_regions",
    "overlap_scores",
    "surface_scores",
    "segmentation_scores",
    "perturbation_scores",
]

#: BraTS evaluation regions over the labels 1 (necrotic / non-enhancing core), 2 (oedema) and
#: 4 (enhancing tumour): whole tumour, tumour core, enhancing tumour.
BRATS_REGIONS: dict[str, list[int]] = {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}

#: SSIM window of Wang et al. (2004) and MONAI's default; shrunk per axis for smaller images.
SSIM_WINDOW = 11

#: The rule for a class absent from the label and the prediction, as printed in every report.
EMPTY_CLASS_RULE = (
    "a class absent from both the label and the prediction (ignored pixels removed) scores Dice = IoU = "
    "NSD = 1 and HD95 = 0; absent from only one of them, Dice = IoU = NSD = 0 and HD95 = inf"
)

#: Image file suffixes stripped by :func:`case_id` (compound suffixes first).
IMAGE_SUFFIXES = (
    ".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp",
    ".npz", ".npy", ".dcm", ".pt",
)


def case_id(source: Any) -> str:
    """The case id of an image: its file name with the image suffix (:data:`IMAGE_SUFFIXES`) stripped.

    Args:
        source: a path (str or ``os.PathLike``), a MONAI metadata dict or a ``MetaTensor`` (its
            ``filename_or_obj``), or a one-element list of those (a collated batch of one).

    ``"/data/imagesTr/case_001.nii.gz"`` -> ``"case_001"``; a directory (a DICOM series) keeps its name.
    """
    if isinstance(source, torch.Tensor) and hasattr(source, "meta"):
        source = source.meta
    if isinstance(source, Mapping):
        if "filename_or_obj" not in source:
            raise ValueError("source: metadata without 'filename_or_obj'")
        source = source["filename_or_obj"]
    if isinstance(source, (list, tuple)):
        if len(source) != 1:
            raise ValueError(f"source: expected one file name, got {len(source)}")
        source = source[0]
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise ValueError(f"source: expected a file path or image metadata, got {source!r}")
    name = Path(str(source).rstrip("/\\")).name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _check_regions(regions: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    if not isinstance(regions, Mapping) or not regions:
        raise ValueError(f"regions: expected a non-empty mapping name -> list of labels, got {regions!r}")
    out: dict[str, list[int]] = {}
    for name, values in regions.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"regions: region names must be non-empty strings, got {name!r}")
        try:
            vals = [int(v) for v in values]
        except (TypeError, ValueError) as err:
            raise ValueError(f"regions: {name!r} must map to a list of integer labels, got {values!r}") \
                from err
        if not vals or any(v < 0 or v != float(w) for v, w in zip(vals, values)):
            raise ValueError(f"regions: {name!r} must map to a non-empty list of labels >= 0, got {values!r}")
        out[name] = vals
    return out


def labels_to_regions(label: torch.Tensor, regions: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """Binary region masks (B, R, *spatial), bool, from an integer label map (B, 1, *spatial).

    Channel r is true where the label is one of ``regions``' r-th list of values (in the mapping's
    order). With :data:`BRATS_REGIONS` a voxel labelled 2 is in WT only, 1 in WT and TC, 4 in WT, TC
    and ET, 0 in none. One table look-up, no loop over voxels.
    """
    regions = _check_regions(regions)
    check_label_map(label, label, "label")
    max_label = max(int(label.max()) if label.numel() else 0, *(max(v) for v in regions.values()))
    table = torch.zeros(max_label + 1, len(regions), dtype=torch.bool, device=label.device)
    for r, values in enumerate(regions.values()):
        table[torch.as_tensor(values, device=label.device), r] = True
    masks = table[label[:, 0].long()]  # (B, *spatial, R)
    return masks.movedim(-1, 1).contiguous()


def _reported_names(
    num_classes: int, include_background: bool, class_names: Sequence[str] | None
) -> list[str]:
    first = 0 if include_background else 1
    n_reported = num_classes - first
    if n_reported < 1:
        raise ValueError("num_classes: need at least 2 classes when the background is not reported")
    if class_names is None:
        return [str(c) for c in range(first, num_classes)]
    names = [str(n) for n in class_names]
    if len(names) == num_classes:
        return names[first:]
    if len(names) == n_reported:
        return names
    raise ValueError(
        f"class_names: expected {num_classes} names (every class) or {n_reported} (reported classes), "
        f"got {len(names)}"
    )


def _check_masks(pred: torch.Tensor, target: torch.Tensor, names: Sequence[str]) -> list[str]:
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor) or t.ndim not in (4, 5):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected binary masks (B, R, *spatial) with 2 or 3 spatial dims, got {got}")
        if t.dtype != torch.bool and bool(((t != 0) & (t != 1)).any()):
            raise ValueError(f"{name}: binary masks must hold only 0 and 1")
    if pred.shape != target.shape:
        raise ValueError(f"pred: shape {tuple(pred.shape)} differs from target's {tuple(target.shape)}")
    names = [str(n) for n in names]
    if len(names) != pred.shape[1]:
        raise ValueError(f"names: expected {pred.shape[1]} names (one per channel), got {len(names)}")
    if "mean" in names or len(set(names)) != len(names):
        raise ValueError(f"class_names: names must be unique and not 'mean', got {names}")
    return names


def _keyed(names: Sequence[str], **metrics: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"<metric>_<name>": (B,)}`` per metric (B, R) and name, then ``"<metric>_mean"`` of each."""
    scores = {f"{m}_{n}": v[:, r] for m, v in metrics.items() for r, n in enumerate(names)}
    scores.update({f"{m}_mean": v.mean(dim=1) for m, v in metrics.items()})
    return scores


def _keep_mask(ignore: torch.Tensor | None, masks: torch.Tensor) -> torch.Tensor | None:
    """``~ignore`` as (B, 1, *spatial) float64, or None."""
    if ignore is None:
        return None
    if not isinstance(ignore, torch.Tensor) or ignore.dtype != torch.bool:
        raise ValueError("ignore: expected a bool tensor (True where a pixel is ignored)")
    if ignore.ndim == masks.ndim - 1:
        ignore = ignore[:, None]
    if ignore.shape != (masks.shape[0], 1, *masks.shape[2:]):
        raise ValueError(
            f"ignore: expected shape (B, 1, *spatial) = {(masks.shape[0], 1, *masks.shape[2:])}, got {tuple(ignore.shape)}"
        )
    return (~ignore).to(device=masks.device, dtype=torch.float64)


def overlap_scores(
    pred: torch.Tensor, target: torch.Tensor, names: Sequence[str], ignore: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Dice and IoU per case of binary masks, one score per channel, under :data:`EMPTY_CLASS_RULE`.

    Args:
        pred, target: binary masks (B, R, *spatial) (bool or 0/1), one channel per reported class or region.
        names: R names, the keys' suffixes.
        ignore: optional bool (B, 1, *spatial) or (B, *spatial), True where a pixel is removed from both
            masks before scoring (certification's abstained pixels, Laousy et al., MICCAI 2023).

    Returns:
        ``{"dice_<name>": (B,), ..., "iou_<name>": (B,), ..., "dice_mean", "iou_mean"}`` float64;
        Dice = 2|P∩G| / (|P| + |G|), IoU = |P∩G| / |P∪G| (the formulas of MONAI ``compute_dice`` /
        ``compute_iou`` with ``ignore_empty=False``, evaluated in float64), the means over the R channels.
    """
    names = _check_masks(pred, target, names)
    p, t = torch.as_tensor(pred).double(), torch.as_tensor(target).double()
    keep = _keep_mask(ignore, p)
    if keep is not None:
        p, t = p * keep, t * keep
    # The formulas of MONAI's compute_dice / compute_iou (ignore_empty=False) in float64: MONAI's helpers
    # reduce in float32, and the card's and sweeps' numbers are compared with float64 oracles.
    inter, p_sum, t_sum = (p * t).flatten(2).sum(2), p.flatten(2).sum(2), t.flatten(2).sum(2)
    union = p_sum + t_sum - inter
    dice = torch.where(p_sum + t_sum > 0, 2 * inter / (p_sum + t_sum).clamp(min=1e-300), 1.0)
    iou = torch.where(union > 0, inter / union.clamp(min=1e-300), 1.0)
    return _keyed(names, dice=dice, iou=iou)


def surface_scores(
    pred: torch.Tensor,
    target: torch.Tensor,
    names: Sequence[str],
    spacing: float | Sequence[float] | None = None,
    tolerance: float = 1.0,
) -> dict[str, torch.Tensor]:
    """HD95 and normalised surface Dice (NSD) per case of binary masks, under :data:`EMPTY_CLASS_RULE`.

    Args:
        pred, target: binary masks (B, R, *spatial).
        names: R names.
        spacing: voxel size (one number, or one per spatial axis) in the unit of the distances; default 1.
        tolerance: NSD's tolerance τ in the same unit (Nikolov et al., J. Med. Internet Res. 2021).

    Returns:
        ``{"hd95_<name>", ..., "nsd_<name>", ..., "hd95_mean", "nsd_mean"}`` float64 (B,): MONAI
        ``compute_hausdorff_distance(percentile=95)`` (symmetric, Euclidean) and ``compute_surface_dice``.
    """
    names = _check_masks(pred, target, names)
    tolerance = float(tolerance)
    if not tolerance >= 0:
        raise ValueError(f"tolerance: expected a number >= 0, got {tolerance}")
    p, t = torch.as_tensor(pred).bool(), torch.as_tensor(target).bool()
    with warnings.catch_warnings():  # MONAI warns on empty masks; the rule below decides those cases
        warnings.simplefilter("ignore", UserWarning)
        # MONAI 1.6.1's surface distance passes its own deprecated ``always_return_as_numpy`` on every call
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd = compute_hausdorff_distance(p.float(), t.float(), include_background=True, percentile=95,
                                        spacing=spacing).double()
        nsd = compute_surface_dice(p.float(), t.float(), [tolerance] * p.shape[1], include_background=True,
                                   spacing=spacing).double()
    p_any, t_any = p.flatten(2).any(2).cpu(), t.flatten(2).any(2).cpu()
    hd, nsd = hd.cpu(), nsd.cpu()
    both_empty, one_empty = ~p_any & ~t_any, p_any ^ t_any
    hd = torch.where(both_empty, 0.0, torch.where(one_empty, torch.inf, hd))
    nsd = torch.where(both_empty, 1.0, torch.where(one_empty, 0.0, nsd))
    return _keyed(names, hd95=hd, nsd=nsd)


def segmentation_scores(
    pred: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    include_background: bool = False,
    regions: Mapping[str, Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
    ignore: torch.Tensor | None = None,
    multilabel: bool = False,
    surface: bool = False,
    spacing: float | Sequence[float] | None = None,
    tolerance: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Dice and IoU (and optionally HD95 / NSD) per case and per class (or region).

    Args:
        pred: predicted label map (B, 1, *spatial), integer values in [0, num_classes) (a softmax
            network's argmax); with ``multilabel``: binary masks (B, C, *spatial), C = ``num_classes``
            (a sigmoid network thresholded per channel, e.g. BraTS TC / WT / ET channels).
        label: ground truth of the same layout.
        num_classes: classes including the background (label 0); channels C with ``multilabel``.
        include_background: report class 0 too. Ignored with ``regions`` (regions never contain the
            background unless listed) and with ``multilabel`` (every channel is reported).
        regions: optional mapping name -> label values; scores are then per region (union of labels),
            e.g. :data:`BRATS_REGIONS` for WT / TC / ET, instead of per class. Not with ``multilabel``.
        class_names: names of the classes in the keys: ``num_classes`` names (one per class index) or
            one per reported class; default the class index. Not allowed together with ``regions``.
        ignore: optional bool mask (B, 1, *spatial), True where a pixel is left out of Dice / IoU.
        surface: also HD95 and NSD (:func:`surface_scores`, with ``spacing`` and ``tolerance``).

    Returns:
        ``{"dice_<name>": (B,), ..., "iou_<name>": (B,), ..., "dice_mean", "iou_mean"}`` (then
        ``hd95_*`` and ``nsd_*`` with ``surface``) float64 tensors in class / region order, the means taken
        over the reported classes of each case; empty classes follow :data:`EMPTY_CLASS_RULE`.
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    if label.ndim not in (4, 5):
        raise ValueError(
            f"label: expected shape (B, C, *spatial) with 2 or 3 spatial dims, got {tuple(label.shape)}"
        )
    if multilabel:
        if regions is not None:
            raise ValueError("regions: not used with multilabel (each channel is one region)")
        for name, t in (("label", label), ("pred", pred)):
            if not isinstance(t, torch.Tensor) or t.shape != (label.shape[0], num_classes, *label.shape[2:]):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected {num_classes}-channel binary masks like label "
                                 f"{(label.shape[0], num_classes, *label.shape[2:])}, got {got}")
        names = [str(c) for c in range(num_classes)] if class_names is None else [str(n) for n in class_names]
        if len(names) != num_classes:
            raise ValueError(f"class_names: expected {num_classes} names (one per channel), got {len(names)}")
        pred_m, label_m = pred, label
    else:
        check_label_map(label, label, "label", num_classes)
        check_label_map(pred, label, "pred", num_classes)
        if regions is not None:
            if class_names is not None:
                raise ValueError("class_names: not used with regions (the region names are the keys)")
            regions = _check_regions(regions)
            bad = sorted({v for vals in regions.values() for v in vals if v >= num_classes})
            if bad:
                raise ValueError(f"regions: label values {bad} outside the declared {num_classes} classes")
            names = list(regions)
            pred_m, label_m = labels_to_regions(pred, regions), labels_to_regions(label, regions)
        else:
            names = _reported_names(num_classes, include_background, class_names)
            pred_m = one_hot(pred.long(), num_classes, dtype=torch.float64, dim=1)
            label_m = one_hot(label.long(), num_classes, dtype=torch.float64, dim=1)
            if not include_background:
                pred_m, label_m = pred_m[:, 1:], label_m[:, 1:]
    scores = overlap_scores(pred_m, label_m, names, ignore)
    if surface:
        scores.update(surface_scores(pred_m, label_m, names, spacing, tolerance))
    return scores


def perturbation_scores(
    x_adv: torch.Tensor, x: torch.Tensor, data_range: float = 1.0
) -> dict[str, torch.Tensor]:
    """PSNR (dB), SSIM and RMSE (input units) of ``x_adv`` against ``x``, per case.

    Args:
        x_adv: perturbed input (B, C, *spatial), 2 or 3 spatial dims.
        x: clean input of the same shape.
        data_range: dynamic range of the input (max − min allowed value): PSNR's MAX and SSIM's L.

    Returns:
        ``{"psnr": (B,), "ssim": (B,), "rmse": (B,)}`` float64 tensors.
        PSNR = 20 log10(data_range) − 10 log10(MSE) (MONAI ``PSNRMetric``; +inf when x_adv == x),
        RMSE = sqrt(MSE) over all channels and voxels (``RMSEMetric``), SSIM (Wang et al. 2004) with a
        Gaussian window of 11 (σ = 1.5) per axis, shrunk to the largest odd size that fits along an axis
        shorter than 11 so that small images and patches still get a score (``SSIMMetric``, averaged
        over channels and window positions; exactly 1.0 when x_adv == x).
    """
    check_image(x, "x")
    check_image(x_adv, "x_adv")
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv: shape {tuple(x_adv.shape)} differs from x's {tuple(x.shape)}")
    if not isinstance(data_range, (int, float)) or isinstance(data_range, bool) or not data_range > 0:
        raise ValueError(f"data_range: expected a number > 0, got {data_range!r}")
    data_range = float(data_range)
    spatial_dims = x.ndim - 2
    # Plain tensors: MetaTensor bookkeeping is not wanted in metric arithmetic.
    xa, xc = torch.as_tensor(x_adv).double(), torch.as_tensor(x).double()
    psnr = PSNRMetric(max_val=data_range, reduction="none")(xa, xc)
    rmse = RMSEMetric(reduction="none")(xa, xc)
    window = [min(SSIM_WINDOW, s if s % 2 else s - 1) for s in x.shape[2:]]
    ssim = SSIMMetric(spatial_dims, data_range=data_range, win_size=window, reduction="none")(xa, xc)
    scores = {"psnr": psnr, "ssim": ssim, "rmse": rmse}
    return {k: torch.as_tensor(v).reshape(-1).double() for k, v in scores.items()}
