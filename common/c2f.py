"""Coarse-to-fine (C2F) building blocks of the ResDSN paper (Li et al. 2019, ResDSN C2F, Sec. 3.1, 4.1.1).

- :func:`bounding_box`, :func:`crop_to_box`, :func:`fine_input` (Eq. 4: X_F = Crop[X_C ⊗ P_C; P_C, m]) and
  :func:`decrop` (Eq. 5: P_C2F = DeCrop[P_F ⊙ P_C; X_F, X_C]).
- :func:`windows_per_axis` and :func:`overlap_for_n`: the paper's sliding-window density parameter n
  (⌊W / W_I⌋ + n windows per axis; n = 6 coarse, n = 12 fine) translated into MONAI's ``overlap``;
  :class:`SlidingWindowN` recomputes that overlap for every input size (the fine boxes differ per case).
- :func:`remove_small_components`: the post-processing "throw away small isolated predictions whose
  portions are smaller than 0.2 of the total prediction".
- :func:`coarse_to_fine_predict` / :class:`CoarseToFine`: the whole test-time pipeline of Fig. 2.
- :class:`CoarseToFineLogits`: a differentiable ``x -> logits`` of the same pipeline (coarse logits outside
  the crop box, fine logits inside), the target of white-box attacks on C2F.
- :class:`SlidingWindowForwardN`: the attack's differentiable whole-volume forward over exactly the windows
  of the coarse test (Sec. 3.3: the gradient of the volume is aggregated over the windows the model sees).
- :func:`hu_window_normalise`: clip to [-100, 240] HU, then per-case z-normalisation (Sec. 4.1.1), with the
  case's (mean, std) — the paper's preprocessing, written out in HU (the bundle's tests compare it with the
  bundle's window-scaled pipeline; PGD training's per-case budget is :mod:`common.ct_window`).

Spatial boxes are tuples of ``slice`` objects, one per spatial axis, applied to the trailing axes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.transforms.utils import generate_spatial_bounding_box
from scipy import ndimage

from common.networks.forwards import check_autograd_forward
from common.sliding_window import SlidingWindowForward
from common.validation import check_clip, check_image, check_nonnegative, check_positive_int, check_probability

__all__ = [
    "bounding_box",
    "crop_to_box",
    "fine_input",
    "decrop",
    "windows_per_axis",
    "overlap_for_n",
    "SlidingWindowN",
    "SlidingWindowForwardN",
    "remove_small_components",
    "coarse_to_fine_predict",
    "CoarseToFine",
    "CoarseToFineLogits",
    "hu_window_normalise",
    "HU_RANGE",
]

HU_RANGE = (-100.0, 240.0)  # Sec. 4.1.1; Λ = 240 - (-100) = 340 HU (Sec. 4.2.1)

Box = tuple[slice, ...]
Array = torch.Tensor | np.ndarray


def _per_axis_ints(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """An int ≥ 0 or one int ≥ 0 per axis → a tuple of ``ndim`` ints."""
    try:
        values = (value,) * ndim if np.isscalar(value) else tuple(value)
        whole = [not isinstance(v, (bool, np.bool_)) and float(v).is_integer() and v >= 0 for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected an int or {ndim} ints >= 0, got {value!r}") from err
    if len(values) != ndim or not all(whole):
        raise ValueError(f"{name}: expected an int or {ndim} ints >= 0, got {value!r}")
    return tuple(int(v) for v in values)


def bounding_box(
    mask: Array, margin: int | Sequence[int] = 0, min_size: int | Sequence[int] | None = None
) -> Box | None:
    """The box covering every non-zero voxel of ``mask`` (*spatial), widened by ``margin`` voxels on
    both sides of each axis (an int or one int per axis) and clipped to the volume: Crop[·; P, m] of Eq. 4.

    ``min_size`` (an int or one int per axis; None: off) widens an axis shorter than it symmetrically,
    shifted to stay inside the volume and capped at the volume's size, so that a fine model run by
    sliding windows of that size sees the volume's own voxels instead of the inferer's padding (a small
    organ plus margin m can be shorter than the window; on NIH CT with m = 20 and 64³ windows it rarely is).

    Returns one ``slice`` per spatial axis, or ``None`` when ``mask`` has no non-zero voxel (callers
    fall back to the coarse prediction). MONAI's ``generate_spatial_bounding_box`` computes the box.
    """
    if not isinstance(mask, (torch.Tensor, np.ndarray)) or mask.ndim < 1:
        raise ValueError(f"mask: expected a tensor or array of shape (*spatial), got {type(mask).__name__}")
    margin = _per_axis_ints(margin, mask.ndim, "margin")
    sizes = (0,) * mask.ndim if min_size is None else _per_axis_ints(min_size, mask.ndim, "min_size")
    if not bool(mask.any()):
        return None
    start, end = generate_spatial_bounding_box(mask[None], margin=margin, allow_smaller=True)
    box = []
    for s, e, want, n in zip(map(int, start), map(int, end), sizes, mask.shape):
        want = min(want, int(n))
        if e - s < want:
            s = min(max(s - (want - (e - s)) // 2, 0), int(n) - want)
            e = s + want
        box.append(slice(s, e))
    return tuple(box)


def _check_box(box: Box, shape: Sequence[int], name: str) -> None:
    if not isinstance(box, tuple) or not box or len(box) > len(shape):
        raise ValueError(
            f"box: expected a tuple of 1 to {len(shape)} slices for {name} of shape {tuple(shape)}"
        )
    for s, size in zip(box, shape[len(shape) - len(box) :]):
        if not isinstance(s, slice) or s.step not in (None, 1) or s.start is None or s.stop is None:
            raise ValueError(f"box: expected slices with explicit start and stop, got {box!r}")
        if not 0 <= s.start < s.stop <= size:
            raise ValueError(f"box: {box!r} does not lie inside {name} of shape {tuple(shape)}")


def crop_to_box(x: Array, box: Box) -> Array:
    """``x`` (..., *spatial) restricted to ``box`` on its trailing axes → (..., *box_size); a view."""
    _check_box(box, x.shape, "x")
    return x[(Ellipsis, *box)]


def fine_input(
    x: torch.Tensor,
    coarse_mask: torch.Tensor,
    margin: int | Sequence[int],
    mask_input: bool = True,
    min_size: int | Sequence[int] | None = None,
) -> tuple[torch.Tensor, Box] | tuple[None, None]:
    """Eq. 4: X_F = Crop[X_C ⊗ P_C; P_C, m] for one case.

    Args:
        x: the case X_C, (C, *spatial).
        coarse_mask: the coarse binary prediction P_C, (*spatial) (non-zero = foreground).
        margin: m, voxels added on each side of each axis (int or per axis).
        mask_input: multiply X_C by P_C before cropping (the ⊗ of Eq. 4, the default). The paper's
            training recipe for the fine model (Sec. 4.1.1: patches from ground-truth boxes) does not
            mention the product, so ``False`` crops the raw input for a fine model trained that way.
        min_size: the box's smallest size per axis (:func:`bounding_box`); None keeps the paper's box.

    Returns ``(x_f, box)`` with x_f (C, *box_size), or ``(None, None)`` for an empty ``coarse_mask``.
    """
    if coarse_mask.shape != x.shape[1:]:
        raise ValueError(
            f"coarse_mask: shape {tuple(coarse_mask.shape)} differs from x's spatial {tuple(x.shape[1:])}"
        )
    box = bounding_box(coarse_mask, margin, min_size)
    if box is None:
        return None, None
    source = x * (coarse_mask != 0).to(x.dtype) if mask_input else x
    return crop_to_box(source, box), box


def decrop(coarse_pred: Array, fine_pred_in_box: Array, box: Box) -> Array:
    """Eq. 5: a copy of ``coarse_pred`` (..., *spatial) whose ``box`` is replaced by ``fine_pred_in_box``
    (..., *box_size); voxels outside the box keep the coarse prediction."""
    _check_box(box, coarse_pred.shape, "coarse_pred")
    region = coarse_pred[(Ellipsis, *box)]
    if tuple(fine_pred_in_box.shape) != tuple(region.shape):
        raise ValueError(
            f"fine_pred_in_box: shape {tuple(fine_pred_in_box.shape)} "
            f"differs from the box's {tuple(region.shape)}"
        )
    out = coarse_pred.clone() if isinstance(coarse_pred, torch.Tensor) else coarse_pred.copy()
    out[(Ellipsis, *box)] = fine_pred_in_box
    return out


def windows_per_axis(W: int, W_I: int, n: int) -> int:
    """Sec. 4.1.1: ⌊W / W_I⌋ + n windows along an axis of W voxels for windows of W_I voxels."""
    W, W_I = check_positive_int(W, "W"), check_positive_int(W_I, "W_I")
    n = int(check_nonnegative(n, "n"))
    return W // W_I + n


def _overlap_1d(W: int, W_I: int, n: int) -> float:
    """Overlap fraction making MONAI scan ⌊W/W_I⌋ + n windows along one axis (see :func:`overlap_for_n`)."""
    if W <= W_I:  # MONAI pads the axis to W_I and scans a single window whatever the overlap
        return 0.0
    span = W - W_I
    target = windows_per_axis(W, W_I, n)
    intervals = np.arange(1, W_I + 1)
    counts = -(-span // intervals) + 1  # MONAI's dense_patch_slices: ⌈(W - W_I) / s⌉ + 1 windows
    feasible = intervals[counts >= min(target, span + 1)]
    interval = int(feasible.max())
    # int(W_I * (1 - overlap)) == interval (MONAI's _get_scan_interval); the +0.5 keeps it off the
    # rounding edge. interval == W_I means no overlap.
    return 0.0 if interval == W_I else 1.0 - (interval + 0.5) / W_I


def overlap_for_n(
    image_size: int | Sequence[int], roi_size: int | Sequence[int], n: int
) -> float | tuple[float, ...]:
    """MONAI ``overlap`` (per axis) under which ``sliding_window_inference`` scans ⌊W / W_I⌋ + n windows.

    MONAI places windows at multiples of the interval s = int(W_I (1 - overlap)) (the last one moved
    back to end at the border), i.e. ⌈(W - W_I) / s⌉ + 1 windows on an axis of W > W_I voxels. This
    returns, per axis, the overlap of the largest integer interval s ≤ W_I whose count reaches the
    paper's ⌊W / W_I⌋ + n. The count is exact whenever some integer interval gives it (always for the
    paper's CT sizes, e.g. W = 512, W_I = 64: 14 windows for n = 6, 20 for n = 12); otherwise it is the
    nearest achievable count above, bounded by W - W_I + 1 (interval 1). An axis with W ≤ W_I gets
    overlap 0: MONAI pads it to W_I and scans one window.

    ``image_size`` and ``roi_size`` are ints (→ a float) or one int per spatial axis (→ a tuple of floats,
    which MONAI's ``SlidingWindowInferer(overlap=...)`` accepts).
    """
    n = int(check_nonnegative(n, "n"))
    if np.isscalar(image_size) and np.isscalar(roi_size):
        W, W_I = check_positive_int(image_size, "image_size"), check_positive_int(roi_size, "roi_size")
        return _overlap_1d(W, W_I, n)
    sizes = tuple(image_size) if not np.isscalar(image_size) else None
    rois = tuple(roi_size) if not np.isscalar(roi_size) else None
    ndim = len(sizes) if sizes is not None else len(rois)  # type: ignore[arg-type]
    sizes = sizes or (image_size,) * ndim  # type: ignore[assignment]
    rois = rois or (roi_size,) * ndim  # type: ignore[assignment]
    if len(sizes) != len(rois):
        raise ValueError(f"roi_size: {rois} has a different number of axes from image_size {sizes}")
    return tuple(
        _overlap_1d(check_positive_int(w, "image_size"), check_positive_int(r, "roi_size"), n)
        for w, r in zip(sizes, rois)
    )


class SlidingWindowN:
    """``forward(x) -> logits`` by MONAI's ``sliding_window_inference`` with the paper's n instead of an
    overlap: the overlap is recomputed by :func:`overlap_for_n` for every input size, so the fine stage
    scans ⌊W_F / W_I⌋ + n windows per axis of each case's box. ``mode="constant"`` averages the scores
    of overlapping windows, as the paper does. Deep-supervision lists are reduced to the main head.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        roi_size: Sequence[int],
        n: int,
        sw_batch_size: int = 4,
        mode: str = "constant",
    ) -> None:
        if not callable(network):
            raise ValueError(f"network: expected a callable, got {type(network).__name__}")
        self.network = check_autograd_forward(network, "network", "SlidingWindowN")
        self.roi_size = tuple(check_positive_int(r, "roi_size") for r in roi_size)
        self.n = int(check_nonnegative(n, "n"))
        self.sw_batch_size = check_positive_int(sw_batch_size, "sw_batch_size")
        self.mode = mode

    def _predict(self, window: torch.Tensor) -> torch.Tensor:
        out = self.network(window)
        return out[0] if isinstance(out, (list, tuple)) else out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, "x")
        if x.ndim - 2 != len(self.roi_size):
            raise ValueError(f"x: {x.ndim - 2} spatial dims for a roi_size of {len(self.roi_size)}")
        overlap = overlap_for_n(tuple(x.shape[2:]), self.roi_size, self.n)
        return sliding_window_inference(
            x, self.roi_size, self.sw_batch_size, self._predict, overlap=overlap, mode=self.mode
        )


class SlidingWindowForwardN(SlidingWindowForward):
    """:class:`common.sliding_window.SlidingWindowForward` over the windows :class:`SlidingWindowN` scans:
    the overlap is :func:`overlap_for_n` of each input's own size, so an attack's gradient windows are the
    coarse test windows of that case (``⌊W / W_I⌋ + n`` per axis; e.g. 13 along a 466-slice axis for
    W_I = 64, n = 6, where the overlap of a fixed 256-slice reference grid would scan 19).

    Args as ``SlidingWindowForward`` with ``n`` (the paper's density, n = 6 coarse) instead of ``overlap``.
    """

    def __init__(
        self,
        network: Callable,
        roi_size: Sequence[int],
        n: int,
        sw_batch_size: int = 4,
        mode: str = "constant",
        aggregation: str = "exact",
        skip_background: bool = False,
    ) -> None:
        super().__init__(network, roi_size, 0.0, sw_batch_size, mode, aggregation, skip_background)
        self.n = int(check_nonnegative(n, "n"))

    def _set_overlap(self, x: torch.Tensor) -> None:
        check_image(x, "x")
        self.overlap = overlap_for_n(tuple(x.shape[2:]), self._roi(x), self.n)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._set_overlap(x)
        return super().__call__(x)

    def _window_mean_gradient(self, x, y, loss):
        self._set_overlap(x)
        return super()._window_mean_gradient(x, y, loss)


def remove_small_components(
    mask: Array, min_fraction: float = 0.2, spatial_dims: int = 3, connectivity: int | None = None
) -> Array:
    """Post-processing of Sec. 4.1.2: drop connected components of the foreground (non-zero voxels)
    holding less than ``min_fraction`` of that volume's foreground; components with exactly
    ``min_fraction`` of it are kept (the paper removes those "smaller than 0.2").

    Args:
        mask: (..., *spatial) label map, torch or numpy; the leading axes index independent volumes
            (e.g. (B, 1, D, H, W)), each with its own total.
        min_fraction: the paper's 0.2 (0.05 on the cyst dataset), in [0, 1]. The comparison
            size ≥ min_fraction · total is made in exact integer arithmetic (min_fraction as a fraction
            with denominator ≤ 10⁶), so a component of exactly 0.2 of the total is kept.
        spatial_dims: number of trailing spatial axes.
        connectivity: neighbourhood of ``scipy.ndimage.generate_binary_structure``: 1 = faces (6 in 3D),
            ``None`` = full (26 in 3D, the default; the paper does not say).

    Returns a copy of ``mask`` (same type and dtype) with the dropped components set to 0. MONAI's
    ``RemoveSmallObjects`` takes an absolute size (and needs scikit-image), hence scipy here; all
    volumes are labelled in one call (no connection across the leading axes).
    """
    check_probability(min_fraction, "min_fraction", open_interval=False)
    spatial_dims = check_positive_int(spatial_dims, "spatial_dims")
    if not isinstance(mask, (torch.Tensor, np.ndarray)) or mask.ndim < spatial_dims:
        raise ValueError(f"mask: expected a tensor or array with {spatial_dims} trailing spatial axes")
    connectivity = spatial_dims if connectivity is None else connectivity
    if not 1 <= connectivity <= spatial_dims:
        raise ValueError(f"connectivity: expected 1 to {spatial_dims}, got {connectivity}")
    is_torch = isinstance(mask, torch.Tensor)
    values = mask.detach().cpu().numpy() if is_torch else mask
    volumes = (values != 0).reshape(-1, *values.shape[values.ndim - spatial_dims :])
    structure = np.zeros((3,) * (spatial_dims + 1), dtype=bool)  # the volume axis links nothing
    structure[1] = ndimage.generate_binary_structure(spatial_dims, connectivity)
    labels, count = ndimage.label(volumes, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    totals = volumes.reshape(len(volumes), -1).sum(1)
    # a component never crosses volumes: the leading slice of its bounding box names its volume
    boxes = ndimage.find_objects(labels)
    volume_of = np.fromiter((box[0].start for box in boxes), dtype=np.int64, count=count)
    frac = Fraction(min_fraction).limit_denominator(10**6)
    keep_component = np.zeros(count + 1, dtype=bool)
    keep_component[1:] = sizes[1:] * frac.denominator >= totals[volume_of] * frac.numerator
    keep = keep_component[labels]
    keep = keep.reshape(values.shape)
    if is_torch:
        return mask * torch.from_numpy(keep).to(device=mask.device, dtype=mask.dtype)
    return np.where(keep, values, np.zeros((), dtype=values.dtype))


def _labels(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, *spatial) logits → (B, 1, *spatial) int64 labels: argmax, or logit > 0 for K = 1."""
    if logits.shape[1] == 1:
        return (logits > 0).long()
    return logits.argmax(1, keepdim=True)


def _forward_labels(forward: Callable, x: torch.Tensor, name: str) -> torch.Tensor:
    out = forward(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    expected = (x.shape[0], *x.shape[2:])
    if not isinstance(out, torch.Tensor) or out.ndim != x.ndim or (out.shape[0], *out.shape[2:]) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name}: expected logits (B, K, *spatial) matching {tuple(x.shape)}, got {got}")
    return _labels(out)


@torch.no_grad()
def coarse_to_fine_predict(
    x: torch.Tensor,
    coarse_forward: Callable[[torch.Tensor], torch.Tensor],
    fine_forward: Callable[[torch.Tensor], torch.Tensor],
    margin: int | Sequence[int],
    min_fraction: float = 0.2,
    mask_input: bool = True,
    clean_coarse: bool = True,
    return_coarse: bool = False,
    min_size: int | Sequence[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ResDSN C2F at test time (Fig. 2, Eq. 4–5), without gradients.

    1. P_C: ``coarse_forward`` on the whole volumes (one batched call), argmax labels; with
       ``clean_coarse`` small components are removed first (so isolated false positives do not widen
       the box), as for the final prediction.
    2. Per case (the boxes differ in size, so cases are processed one at a time): X_F = Crop[X ⊗ P_C;
       P_C, m] (:func:`fine_input`), P_F = argmax ``fine_forward``(X_F), P_C2F = DeCrop (:func:`decrop`).
       A case whose coarse mask is empty keeps its coarse prediction (all background).
    3. :func:`remove_small_components` with ``min_fraction`` (0 disables it).

    Args:
        x: (B, C, *spatial) volumes, z-normalised as the networks expect.
        coarse_forward, fine_forward: ``x -> logits (B, K, *spatial)`` (networks or sliding-window
            inferers, e.g. :class:`SlidingWindowN` with n = 6 and n = 12); K = 1 means sigmoid logits.
        margin: the crop padding m in voxels (int or per axis).
        min_size: the crop's smallest size per axis, e.g. the fine window (:func:`bounding_box`); None: off.

    Returns the C2F labels (B, 1, *spatial) int64, and the (cleaned) coarse labels as well with
    ``return_coarse`` (the "ResDSN Coarse" row computed from the same pass).
    """
    check_image(x, "x")
    check_probability(min_fraction, "min_fraction", open_interval=False)
    spatial_dims = x.ndim - 2
    coarse = _forward_labels(coarse_forward, x, "coarse_forward")
    if clean_coarse and min_fraction > 0:
        coarse = remove_small_components(coarse, min_fraction, spatial_dims)
    pred = coarse.clone()
    for b in range(x.shape[0]):
        x_f, box = fine_input(x[b], coarse[b, 0], margin, mask_input, min_size)
        if box is None:
            continue
        fine = _forward_labels(fine_forward, x_f[None], "fine_forward")
        pred[b] = decrop(coarse[b], fine[0], box)
    if min_fraction > 0:
        pred = remove_small_components(pred, min_fraction, spatial_dims)
    return (pred, coarse) if return_coarse else pred


class CoarseToFine:
    """Workflow wrapper of :func:`coarse_to_fine_predict`: ``c2f(x) -> (B, 1, *spatial)`` labels."""

    def __init__(
        self,
        coarse_forward: Callable[[torch.Tensor], torch.Tensor],
        fine_forward: Callable[[torch.Tensor], torch.Tensor],
        margin: int | Sequence[int],
        min_fraction: float = 0.2,
        mask_input: bool = True,
        clean_coarse: bool = True,
        min_size: int | Sequence[int] | None = None,
    ) -> None:
        for name, fn in (("coarse_forward", coarse_forward), ("fine_forward", fine_forward)):
            if not callable(fn):
                raise ValueError(f"{name}: expected a callable x -> logits, got {type(fn).__name__}")
        self.coarse_forward, self.fine_forward = coarse_forward, fine_forward
        self.margin = margin
        self.min_fraction = check_probability(min_fraction, "min_fraction", open_interval=False)
        self.mask_input, self.clean_coarse = bool(mask_input), bool(clean_coarse)
        if min_size is not None:  # checked here, before any forward pass; the axis count is checked per volume
            _per_axis_ints(min_size, 1 if np.isscalar(min_size) else len(min_size), "min_size")
        self.min_size = min_size

    def __call__(self, x: torch.Tensor, return_coarse: bool = False):
        return coarse_to_fine_predict(
            x, self.coarse_forward, self.fine_forward, self.margin, self.min_fraction,
            self.mask_input, self.clean_coarse, return_coarse, self.min_size,
        )


class CoarseToFineLogits(CoarseToFine):
    """``forward(x) -> logits (B, K, *spatial)`` of the C2F pipeline, differentiable in ``x``: the white-box
    target for attacks on "ResDSN C2F" (the paper attacks the coarse model only, Sec. 4.2.1).

    The logits are the coarse logits outside each case's crop box and the fine logits of X_F inside it
    (Eq. 5 applied to logits instead of labels), so their argmax is the C2F prediction before the final
    small-component removal. The box comes from the current input's coarse labels (argmax, small
    components removed with ``clean_coarse``) exactly as in :func:`coarse_to_fine_predict`; it is chosen
    without gradient (box selection, argmax and component removal are piecewise constant), so the
    gradient is that of the coarse and fine logits which decide every voxel's label. With ``mask_input``
    the crop is X ⊗ P_C with P_C treated as a constant.

    ``coarse_forward`` and ``fine_forward`` must be differentiable (e.g. :class:`SlidingWindowN`, which
    runs MONAI's ``sliding_window_inference``; attacks then use the exact gradient, every window's graph
    kept until the backward pass, so this is meant for volumes whose windows fit in memory at once).

    Constructor arguments as :class:`CoarseToFine`; a coarse or fine forward that supplies its own
    ``input_gradient`` is refused (:func:`common.networks.forwards.check_autograd_forward`), since these
    logits are differentiated by autograd and would silently drop it.
    """

    def __init__(self, coarse_forward: Callable, fine_forward: Callable, *args, **kwargs) -> None:
        super().__init__(coarse_forward, fine_forward, *args, **kwargs)
        check_autograd_forward(coarse_forward, "coarse_forward", "CoarseToFineLogits")
        check_autograd_forward(fine_forward, "fine_forward", "CoarseToFineLogits")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, "x")
        coarse_logits = self.coarse_forward(x)
        coarse_logits = coarse_logits[0] if isinstance(coarse_logits, (list, tuple)) else coarse_logits
        if not isinstance(coarse_logits, torch.Tensor) or coarse_logits.shape[2:] != x.shape[2:]:
            raise ValueError(f"coarse_forward: expected logits (B, K, *spatial) matching {tuple(x.shape)}")
        with torch.no_grad():
            coarse = _labels(coarse_logits.detach())
            if self.clean_coarse and self.min_fraction > 0:
                coarse = remove_small_components(coarse, self.min_fraction, x.ndim - 2)
        cases = []
        for b in range(x.shape[0]):
            x_f, box = fine_input(x[b], coarse[b, 0], self.margin, self.mask_input, self.min_size)
            if box is None:
                cases.append(coarse_logits[b])
                continue
            fine_logits = self.fine_forward(x_f[None])
            fine_logits = fine_logits[0] if isinstance(fine_logits, (list, tuple)) else fine_logits
            cases.append(decrop(coarse_logits[b], fine_logits[0], box))
        return torch.stack(cases)


def hu_window_normalise(
    x: torch.Tensor, hu_range: Sequence[float] = HU_RANGE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sec. 4.1.1 preprocessing: clip to ``hu_range`` HU, then z-normalise each case.

    Args:
        x: (B, C, *spatial) CT in HU.

    Returns ``(z, mean, std)``: z (B, C, *spatial) float32, and each case's mean and population std
    (B,) in HU after clipping (std 0 → 1, as MONAI's ``NormalizeIntensity``): the paper's preprocessing in
    its own units, against which the bundle's window-scaled pipeline is checked.
    """
    check_image(x, "x")
    low, high = check_clip(hu_range, "hu_range")
    clipped = x.float().clamp(low, high)
    flat = clipped.reshape(x.shape[0], -1)
    mean = flat.mean(1)
    std = flat.std(1, unbiased=False)
    std = torch.where(std == 0, torch.ones_like(std), std)
    view = (-1,) + (1,) * (x.ndim - 1)
    return (clipped - mean.view(view)) / std.view(view), mean, std

