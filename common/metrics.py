"""Per-case metrics of a segmentation and of an input perturbation, on top of MONAI's metrics.

- :func:`segmentation_scores`: Dice (DIC) and Jaccard (JSC, IoU) per class or per region, per case, from
  integer label maps, via MONAI ``DiceMetric`` and ``MeanIoU`` on one-hot masks.
- :func:`perturbation_scores`: PSNR, SSIM and RMSE of a perturbed input against the clean one, per case, via
  MONAI ``PSNRMetric``, ``SSIMMetric`` and ``RMSEMetric`` (the input-quality columns of Table 1 in the
  BraTS robustness paper, Liu et al., J. Digit. Imaging 2021).
- :func:`labels_to_regions`: nested label regions, e.g. BraTS whole tumour / tumour core / enhancing
  tumour (:data:`BRATS_REGIONS`).

All functions are vectorised over the batch and return one value per case: tensors of shape (B,).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.metrics import DiceMetric, MeanIoU, PSNRMetric, RMSEMetric, SSIMMetric
from monai.networks.utils import one_hot

from common.validation import check_image, check_label_map, check_positive_int

__all__ = ["BRATS_REGIONS", "labels_to_regions", "segmentation_scores", "perturbation_scores"]

#: BraTS evaluation regions over the labels 1 (necrotic / non-enhancing core), 2 (oedema) and
#: 4 (enhancing tumour): whole tumour, tumour core, enhancing tumour.
BRATS_REGIONS: dict[str, list[int]] = {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}

#: SSIM window of Wang et al. (2004) and MONAI's default; shrunk per axis for smaller images.
SSIM_WINDOW = 11


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


def segmentation_scores(
    pred: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    include_background: bool = False,
    regions: Mapping[str, Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Dice and Jaccard per case and per class (or region), from integer label maps.

    Args:
        pred: predicted label map (B, 1, *spatial), integer values in [0, num_classes).
        label: ground-truth label map of the same shape and range.
        num_classes: number of classes including the background (label 0).
        include_background: report class 0 too. Ignored with ``regions`` (regions never contain the
            background unless listed).
        regions: optional mapping name -> label values; scores are then per region (union of labels),
            e.g. :data:`BRATS_REGIONS` for WT / TC / ET, instead of per class.
        class_names: names of the classes in the keys: ``num_classes`` names (one per class index) or
            one per reported class; default the class index. Not allowed together with ``regions``.

    Returns:
        ``{"dice_<name>": (B,), "jaccard_<name>": (B,), ..., "dice_mean": (B,), "jaccard_mean": (B,)}``
        float64 tensors, in class / region order, the means taken over the reported classes of each case.
        Dice = 2|P∩G| / (|P| + |G|), Jaccard = |P∩G| / |P∪G|, computed by MONAI ``DiceMetric`` and
        ``MeanIoU`` with ``ignore_empty=False``. Empty-class convention: a class absent from both the
        ground truth and the prediction scores 1.0; absent from the ground truth but predicted, 0.0.
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    if label.ndim not in (4, 5):
        raise ValueError(
            f"label: expected shape (B, 1, *spatial) with 2 or 3 spatial dims, got {tuple(label.shape)}"
        )
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
        pred_oh = labels_to_regions(pred, regions).double()
        label_oh = labels_to_regions(label, regions).double()
        include = True
    else:
        names = _reported_names(num_classes, include_background, class_names)
        pred_oh = one_hot(pred, num_classes, dtype=torch.float64, dim=1)
        label_oh = one_hot(label, num_classes, dtype=torch.float64, dim=1)
        include = include_background
    if "mean" in names or len(set(names)) != len(names):
        raise ValueError(f"class_names: names must be unique and not 'mean', got {names}")

    dice = DiceMetric(include_background=include, reduction="none", ignore_empty=False)(pred_oh, label_oh)
    jaccard = MeanIoU(include_background=include, reduction="none", ignore_empty=False)(pred_oh, label_oh)
    dice, jaccard = torch.as_tensor(dice).double(), torch.as_tensor(jaccard).double()  # (B, R)
    scores: dict[str, torch.Tensor] = {}
    for r, name in enumerate(names):
        scores[f"dice_{name}"] = dice[:, r]
    for r, name in enumerate(names):
        scores[f"jaccard_{name}"] = jaccard[:, r]
    scores["dice_mean"] = dice.mean(dim=1)
    scores["jaccard_mean"] = jaccard.mean(dim=1)
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
    return {
        "psnr": torch.as_tensor(psnr).reshape(-1).double(),
        "ssim": torch.as_tensor(ssim).reshape(-1).double(),
        "rmse": torch.as_tensor(rmse).reshape(-1).double(),
    }
