"""Whole-volume forward passes and input gradients through overlapping windows.

:class:`SlidingWindowForward` is a callable ``x -> logits`` built on MONAI's ``sliding_window_inference``,
so it can be handed to any attack or to certification in place of the network. Two named gradient
aggregations:

- ``"exact"``: autograd through MONAI's stitched output — the true gradient of the whole-volume loss
  (every window's graph is kept until the backward pass).
- ``"window_mean"``: the ResDSN paper's rule (Li et al., 2019 (ResDSN C2F), Sec. 3.3): every window's *own* loss,
  L_w = loss(network(x_w), y_w), is differentiated with respect to its window, and the window gradients
  are averaged where windows overlap; with ``skip_background=True`` windows whose labels are all
  background are skipped (their voxels get no contribution; a voxel covered only by skipped windows gets
  a zero gradient). The graph of one window batch is freed before the next, so memory is bounded by
  ``sw_batch_size`` windows, not by the volume. This aggregation is exposed as ``input_gradient(x, y,
  loss)``, which :class:`common.attacks.Attack` calls when present.

Windows are enumerated exactly as ``sliding_window_inference`` enumerates them (same padding of volumes
smaller than the ROI, same scan interval) and are batched ``sw_batch_size`` at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.utils import ensure_tuple_rep

from common.networks.forwards import check_autograd_forward, input_gradient
from common.validation import check_image, check_label_map, check_positive_int, main_output

__all__ = ["SlidingWindowForward", "window_slices", "AGGREGATIONS"]

AGGREGATIONS = ("exact", "window_mean")


def _pad_to_roi(x: torch.Tensor, roi_size: Sequence[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Symmetric constant padding of the spatial dims up to ``roi_size`` (as ``sliding_window_inference``)."""
    pad: list[int] = []
    for k in range(x.ndim - 1, 1, -1):
        diff = max(roi_size[k - 2] - x.shape[k], 0)
        pad.extend([diff // 2, diff - diff // 2])
    if any(pad):
        x = F.pad(x, pad=pad, mode="constant", value=value)
    return x, pad


def _unpad(x: torch.Tensor, pad: Sequence[int]) -> torch.Tensor:
    """Undo :func:`_pad_to_roi` on a tensor with the padded spatial shape."""
    if not any(pad):
        return x
    index = [slice(None), slice(None)]
    spatial = x.shape[2:]
    for d in range(len(spatial)):
        before, after = pad[2 * (len(spatial) - 1 - d)], pad[2 * (len(spatial) - 1 - d) + 1]
        index.append(slice(before, spatial[d] - after))
    return x[tuple(index)]


def _sum_per_window(loss: Callable) -> Callable:
    """``loss`` of each window (batch element) on its own, summed: one backward pass gives every window
    the gradient of its own loss."""

    def total(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(loss(logits[i : i + 1], labels[i : i + 1]) for i in range(logits.shape[0]))

    return total


def window_slices(image_size: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float]) -> list[tuple[slice, ...]]:
    """The spatial slices of every window MONAI's ``sliding_window_inference`` visits on ``image_size``
    (already padded to at least ``roi_size``)."""
    nd = len(image_size)
    overlap = ensure_tuple_rep(overlap, nd)
    interval = _get_scan_interval(image_size, roi_size, nd, overlap)
    return list(dense_patch_slices(image_size, roi_size, interval))


class SlidingWindowForward:
    """A differentiable whole-volume ``forward`` built from overlapping windows.

    Args:
        network: callable on a window batch (N, C, *roi_size) returning logits (or a list of heads, main
            first — only the main head is stitched).
        roi_size: window size, e.g. (64, 64, 64) (an int is repeated over the spatial dims of ``x``).
        overlap: fraction of overlap between neighbouring windows, in [0, 1) (a number or one per axis).
        sw_batch_size: windows per network call.
        mode: MONAI blend mode of the stitched output, ``"constant"`` (mean) or ``"gaussian"``.
        aggregation: ``"exact"`` or ``"window_mean"`` (see the module docstring).
        skip_background: with ``window_mean``, skip windows whose labels are all 0.

    ``forward(x)`` with x (B, C, *spatial) returns logits (B, K, *spatial).
    """

    def __init__(
        self,
        network: Callable,
        roi_size: Sequence[int] | int,
        overlap: float | Sequence[float] = 0.25,
        sw_batch_size: int = 4,
        mode: str = "constant",
        aggregation: str = "exact",
        skip_background: bool = False,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
        if mode not in ("constant", "gaussian"):
            raise ValueError(f"mode: expected 'constant' or 'gaussian', got {mode!r}")
        for o in overlap if isinstance(overlap, Sequence) else (overlap,):
            if not 0.0 <= float(o) < 1.0:
                raise ValueError(f"overlap: must lie in [0, 1), got {overlap}")
        self.network = network
        self.roi_size = roi_size
        self.overlap = overlap
        self.sw_batch_size = check_positive_int(sw_batch_size, "sw_batch_size")
        self.mode = mode
        self.aggregation = aggregation
        self.skip_background = bool(skip_background)
        if aggregation == "exact":  # autograd through the stitched output cannot keep the network's own
            check_autograd_forward(network, "network", "SlidingWindowForward(aggregation='exact')")

    @property
    def input_gradient(self) -> Callable:
        """``window_mean`` only: the ResDSN aggregation as ``input_gradient(x, y, loss)``, the
        :class:`common.networks.forwards.InputGradientForward` contract that attacks honour. With
        ``exact`` there is none (``hasattr`` is False): autograd through ``__call__`` is the gradient."""
        if self.aggregation != "window_mean":
            raise AttributeError("SlidingWindowForward: aggregation 'exact' has no input_gradient (autograd)")
        return self._window_mean_gradient

    def _roi(self, x: torch.Tensor) -> tuple[int, ...]:
        nd = x.ndim - 2
        roi = (self.roi_size,) * nd if isinstance(self.roi_size, int) else tuple(self.roi_size)
        if len(roi) != nd or any(int(r) < 1 for r in roi):
            raise ValueError(f"roi_size: {self.roi_size} does not fit x with {nd} spatial dims")
        return tuple(int(r) for r in roi)

    def _predict(self, window: torch.Tensor) -> torch.Tensor:
        return main_output(self.network(window))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, "x")
        roi = self._roi(x)
        return sliding_window_inference(
            x, roi, self.sw_batch_size, self._predict, overlap=self.overlap, mode=self.mode
        )

    def _window_mean_gradient(
        self, x: torch.Tensor, y: torch.Tensor, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The ResDSN paper's aggregation (Li et al., 2019, Sec. 3.3): mean over covering windows of each
        window's own loss gradient.

        Shapes: x (B, C, *spatial), y (B, 1, *spatial); returns (B, C, *spatial). The per-window losses
        of one batch are summed before one backward pass: windows are disjoint leaves of the stacked
        batch, so each receives exactly the gradient of its own loss. A window network that supplies its
        own ``input_gradient`` is asked for it (:func:`common.networks.forwards.input_gradient`).
        """
        check_image(x, "x")
        check_label_map(y, x, "y")
        roi = self._roi(x)
        xp, pad = _pad_to_roi(x.detach(), roi)
        yp, _ = _pad_to_roi(y, roi)
        slices = window_slices(xp.shape[2:], roi, self.overlap)
        jobs = [(b, s) for b in range(x.shape[0]) for s in slices]
        if self.skip_background:
            jobs = [(b, s) for b, s in jobs if bool(yp[(b, slice(None), *s)].any())]
        grad = torch.zeros_like(xp)
        count = torch.zeros((xp.shape[0], 1, *xp.shape[2:]), dtype=xp.dtype, device=xp.device)
        for start in range(0, len(jobs), self.sw_batch_size):
            chunk = jobs[start : start + self.sw_batch_size]
            windows = torch.stack([xp[(b, slice(None), *s)] for b, s in chunk])
            labels = torch.stack([yp[(b, slice(None), *s)] for b, s in chunk])
            window_grad = input_gradient(self.network, windows, labels, _sum_per_window(loss))
            for i, (b, s) in enumerate(chunk):
                grad[(b, slice(None), *s)] += window_grad[i]
                count[(b, slice(None), *s)] += 1
        grad = grad / count.clamp_min(1)
        return _unpad(grad, pad)

    def __repr__(self) -> str:
        return (
            f"SlidingWindowForward(roi_size={self.roi_size}, overlap={self.overlap}, sw_batch_size={self.sw_batch_size}, "
            f"mode={self.mode!r}, aggregation={self.aggregation!r}, skip_background={self.skip_background})"
        )
