"""Per-case z-normalisation as the first layer of a whole-volume ``forward`` (Li et al. 2019, ResDSN C2F, Sec. 4.1.1).

The ResDSN paper clips CT to [−100, 240] HU and z-normalises every case, and states its attack budget in
HU: ε = 0.03 Λ, α = 0.01 Λ with Λ = 340 HU (Sec. 4.2.1). An attack works in the units of the tensor it
perturbs, so the bundles feed the *window-scaled* image x_w = (clip(HU) + 100) / 340 ∈ [0, 1] (MONAI
``ScaleIntensityRanged(a_min=-100, a_max=240, b_min=0, b_max=1, clip=True)``) and put the
z-normalisation in front of the network with :class:`PerCaseZNorm`. Then ε = 0.03 and α = 0.01 in input
units are exactly 0.03 Λ = 10.2 HU and 0.01 Λ = 3.4 HU, and ``clip=(0, 1)`` is the HU window.

z-normalisation is invariant to the affine map HU → x_w, so z(x_w) equals the paper's z of the clipped
HU volume. The statistics are computed over the *whole case* (all voxels of one batch element), which
is why :class:`PerCaseZNorm` wraps a whole-volume ``forward`` (a sliding-window inferer, the C2F
pipeline), never the window network: windows must not be normalised by their own statistics.

The statistics are functions of the input, so a perturbation also moves them slightly; gradients flow
through them (autograd for ``"exact"`` sliding-window gradients; :func:`znorm_input_gradient`, the
closed-form chain rule, for forwards that supply their own ``input_gradient`` such as
``SlidingWindowForward(aggregation="window_mean")``; :class:`PerCaseZNorm` is an
:class:`common.networks.forwards.InputTransformForward`, so it keeps such a gradient by construction).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.networks.forwards import InputTransformForward
from common.validation import check_image

__all__ = [
    "per_case_znorm", "znorm_input_gradient", "PerCaseZNorm", "window_to_hu", "hu_to_window",
]


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-case mean and population std over channels and space, shaped (B, 1, ..., 1); std 0 → 1."""
    dims = tuple(range(1, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    std = (x - mean).pow(2).mean(dim=dims, keepdim=True).sqrt()
    return mean, torch.where(std == 0, torch.ones_like(std), std)


def per_case_znorm(x: torch.Tensor) -> torch.Tensor:
    """z = (x − μ_b) / σ_b for each case b of ``x`` (B, C, *spatial), μ_b and σ_b (population) over all
    of that case's voxels and channels, as MONAI ``NormalizeIntensity`` (σ = 0 → 1). Differentiable."""
    check_image(x, "x")
    mean, std = _stats(x)
    return (x - mean) / std


def znorm_input_gradient(x: torch.Tensor, grad_z: torch.Tensor) -> torch.Tensor:
    """Chain rule through :func:`per_case_znorm`: ∂L/∂x from ∂L/∂z, both (B, C, *spatial).

    With z = (x − μ)/σ over the N voxels of a case, ∂z_i/∂x_j = (δ_ij − 1/N − z_i z_j / N) / σ, hence
    ∂L/∂x = (g − mean(g) − z · mean(g z)) / σ per case (g = ∂L/∂z). For σ = 0 (constant case) the
    statistics term vanishes and the result is g − mean(g).
    """
    check_image(x, "x")
    if not isinstance(grad_z, torch.Tensor) or grad_z.shape != x.shape:
        got = tuple(grad_z.shape) if isinstance(grad_z, torch.Tensor) else type(grad_z).__name__
        raise ValueError(f"grad_z: expected shape {tuple(x.shape)}, got {got}")
    dims = tuple(range(1, x.ndim))
    mean, std = _stats(x)
    z = (x - mean) / std
    centred = grad_z - grad_z.mean(dim=dims, keepdim=True)
    return (centred - z * (grad_z * z).mean(dim=dims, keepdim=True)) / std


class PerCaseZNorm(InputTransformForward):
    """``forward(x) = inner(per_case_znorm(x))``: a whole-volume forward whose input is window-scaled CT.

    Args:
        inner: a whole-volume ``forward`` on z-normalised input, e.g. ``SlidingWindowForward(ResDSN)``,
            ``SlidingWindowN`` or ``CoarseToFine``; it may return logits, a list of heads or labels.

    An :class:`common.networks.forwards.InputTransformForward`: if ``inner`` supplies its own
    ``input_gradient(z, y, loss)`` (the ResDSN paper's ``window_mean`` aggregation), so does this
    object, mapping that gradient back to x with the closed form :func:`znorm_input_gradient`, so
    attacks (``common.attacks``) use it unchanged. Otherwise attacks back-propagate through
    ``__call__``, statistics included.
    """

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return per_case_znorm(x)

    def pullback(self, x: torch.Tensor, grad_t: torch.Tensor) -> torch.Tensor:
        return znorm_input_gradient(x, grad_t)


def _window(hu_range: Sequence[float]) -> tuple[float, float]:
    low, high = (float(v) for v in hu_range)
    if not low < high:
        raise ValueError(f"hu_range: expected low < high, got {hu_range!r}")
    return low, high


def hu_to_window(hu: torch.Tensor | float, hu_range: Sequence[float] = (-100.0, 240.0)):
    """HU → window units (hu − low) / Λ, Λ = high − low (no clipping): the bundle's input scale."""
    low, high = _window(hu_range)
    return (hu - low) / (high - low)


def window_to_hu(value: torch.Tensor | float, hu_range: Sequence[float] = (-100.0, 240.0)):
    """Window units → HU: low + value · Λ. A perturbation δ in window units is δ · Λ HU (0.03 → 10.2 HU)."""
    low, high = _window(hu_range)
    return low + value * (high - low)
