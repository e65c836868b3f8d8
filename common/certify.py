"""Randomized smoothing certification for segmentation (SegCertify; Fischer et al. 2021, Cohen et al. 2019).

The smoothed segmenter assigns to pixel i the class c maximising P_δ[f(x + δ)_i = c], δ ~ N(0, σ²I).
For every pixel, SegCertify (as used by Laousy et al., MICCAI 2023, Sec. 3-4) selects a class ĉ_i from
n0 noisy draws, counts how often ĉ_i is predicted among n fresh draws, tests H0: P(ĉ_i) ≤ τ with a
one-sided binomial test, and corrects over all pixels of one image (Holm 1979 by default). Where H0
is rejected the pixel is certified with class ĉ_i for every ‖δ‖₂ < R = σ·Φ⁻¹(τ); elsewhere it carries
the abstain label. With Holm or Bonferroni the probability that an image holds any wrongly
certified pixel is at most α.

Only per-pixel counts are kept (O(pixels · classes) memory, never O(draws · pixels)), so a 3D
volume through a sliding-window ``forward`` certifies as well as a 2D image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom, norm

from common.metrics import overlap_scores
from common.stats import bonferroni_reject, holm_reject
from common.validation import (
    check_image,
    check_nonnegative,
    check_positive_int,
    check_probability,
    main_output,
)

__all__ = [
    "ABSTAIN",
    "CORRECTIONS",
    "CertifiedSegmentation",
    "certify",
    "certify_counts",
    "binomial_pvalues",
    "certified_radius",
    "certified_metrics",
    "holm_reject",
    "bonferroni_reject",
]

ABSTAIN = -1
CORRECTIONS = ("holm", "bonferroni", "none")


@dataclass(frozen=True)
class CertifiedSegmentation:
    """Result of :func:`certify` for a batch of B images.

    Attributes:
        labels: (B, *spatial) int64, the certified class ĉ, or ``ABSTAIN`` (-1) where H0 stands.
        radius: ℓ2 radius R = σ·Φ⁻¹(τ), in the units of the input tensor; the same for every pixel.
        pvalues: (B, *spatial) float64, uncorrected one-sided binomial p-values of H0: P(ĉ) ≤ τ.
        selected: (B, *spatial) int64, the class ĉ chosen from the n0 selection draws.
        counts: (B, *spatial) int64, how many of the n estimation draws predicted ĉ.
        n: number of estimation draws per image.
        sigma, alpha, tau, correction: the certification parameters.
    """

    labels: torch.Tensor
    radius: float
    pvalues: torch.Tensor
    selected: torch.Tensor
    counts: torch.Tensor
    n: int
    sigma: float
    alpha: float
    tau: float
    correction: str

    @property
    def abstained(self) -> torch.Tensor:
        """(B, *spatial) bool mask of abstained pixels."""
        return self.labels == ABSTAIN

    @property
    def abstained_fraction(self) -> torch.Tensor:
        """(B,) float64: fraction of each image's pixels that abstain (the paper's %⊘ divided by 100)."""
        return self.abstained.flatten(1).double().mean(1)


def certified_radius(sigma: float, tau: float) -> float:
    """R = σ·Φ⁻¹(τ) (Cohen et al. 2019, Thm. 1 with p_A ≥ τ; Fischer et al. 2021, Thm. 3.1)."""
    sigma = _check_sigma(sigma)
    tau = _check_tau(tau)
    return float(sigma * norm.ppf(tau))


def binomial_pvalues(counts, n: int, tau: float) -> np.ndarray:
    """One-sided binomial p-values P(K ≥ k), K ~ Bin(n, τ), for H0: P(ĉ) ≤ τ (any shape).

    The p-value depends only on the integer k ∈ [0, n], so the n + 1 possible values
    ``binom.sf(k - 1, n, tau)`` are computed once in float64 and indexed: exact, and O(1) per pixel.
    Equal to ``scipy.stats.binomtest(k, n, tau, alternative="greater").pvalue``.
    """
    n = check_positive_int(n, "n")
    tau = _check_tau(tau)
    k = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts)
    if not np.issubdtype(k.dtype, np.integer):
        raise ValueError(f"counts: expected integer counts, got dtype {k.dtype}")
    if k.size and (k.min() < 0 or k.max() > n):
        raise ValueError(f"counts: must lie in [0, n={n}], got range [{k.min()}, {k.max()}]")
    table = binom.sf(np.arange(n + 1) - 1, n, tau)
    return table[k]


def certify_counts(
    selected: torch.Tensor,
    counts: torch.Tensor,
    n: int,
    alpha: float = 0.001,
    tau: float = 0.75,
    correction: str = "holm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics of SegCertify from counts: p-values, multiple-testing correction, abstain.

    Args:
        selected: (B, *spatial) integer tensor, the selected class ĉ per pixel.
        counts: (B, *spatial) integer tensor, number of the n draws that predicted ĉ.
        n, alpha, tau, correction: as in :func:`certify`; the family of tests is one image.

    Returns:
        labels (B, *spatial) int64 with ``ABSTAIN`` where H0 is not rejected, and the uncorrected
        p-values (B, *spatial) float64, both on ``counts``' device.
    """
    alpha = check_probability(alpha, "alpha")
    correction = _check_correction(correction)
    for name, value in (("selected", selected), ("counts", counts)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if selected.shape != counts.shape or counts.ndim < 2:
        raise ValueError(
            f"counts: expected shape (B, *spatial) equal to selected's {tuple(selected.shape)}, "
            f"got {tuple(counts.shape)}"
        )
    pvalues = binomial_pvalues(counts, n, tau)
    family = pvalues.reshape(pvalues.shape[0], -1)
    if correction == "holm":
        reject = holm_reject(family, alpha)
    elif correction == "bonferroni":
        reject = bonferroni_reject(family, alpha)
    else:
        reject = family <= alpha
    reject_t = torch.from_numpy(reject.reshape(pvalues.shape)).to(counts.device)
    labels = selected.to(torch.int64).masked_fill(~reject_t, ABSTAIN)
    return labels, torch.from_numpy(pvalues).to(counts.device)


def certify(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float,
    n0: int = 10,
    n: int = 100,
    alpha: float = 0.001,
    tau: float = 0.75,
    correction: str = "holm",
    batch_size: int = 16,
    denoiser: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> CertifiedSegmentation:
    """Certify every pixel of a batch with randomized smoothing (SegCertify).

    Args:
        forward: any callable (N, C, *spatial) → logits (N, K, *spatial) (or a list/tuple whose first
            element is the main head); a network, or a sliding-window inferer around one.
        x: (B, C, *spatial) finite float tensor, 2 or 3 spatial dims, in the units ``forward`` expects.
        sigma: noise standard deviation σ > 0, in the units of ``x``.
        n0: selection draws per image (ĉ = per-pixel argmax of their class histogram).
        n: fresh estimation draws per image for the binomial test.
        alpha: family-wise error level per image, 0 < α < 1.
        tau: threshold of H0: P(ĉ) ≤ τ, 0.5 ≤ τ < 1. τ ≥ 0.5 is required because a class with
            probability above 1/2 is the unique argmax of the smoothed segmenter, and because
            R = σ·Φ⁻¹(τ) is negative for τ < 0.5, i.e. no certificate at all.
        correction: "holm" (the paper), "bonferroni", or "none" (per-pixel level α, no family-wise
            guarantee).
        batch_size: noisy copies per ``forward`` call; copies of several images are stacked in one call.
        denoiser: optional callable ``denoiser(noisy_x, sigma)`` applied to every noisy copy before
            ``forward`` (denoise-then-certify, e.g. :class:`common.denoise.DiffusionDenoiser`).
        generator: torch.Generator on ``x``'s device for the noise; the same seed gives the same result.

    Returns:
        :class:`CertifiedSegmentation` with labels, radius, p-values, selected classes and counts.
    """
    check_image(x, "x")
    sigma = _check_sigma(sigma)
    n0 = check_positive_int(n0, "n0")
    n = check_positive_int(n, "n")
    alpha = check_probability(alpha, "alpha")
    tau = _check_tau(tau)
    correction = _check_correction(correction)
    batch_size = check_positive_int(batch_size, "batch_size")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")

    batch, spatial = x.shape[0], tuple(x.shape[2:])
    n_pix = int(np.prod(spatial))
    if batch == 0 or n_pix == 0:
        raise ValueError(f"x: expected at least one image with pixels, got shape {tuple(x.shape)}")
    with torch.no_grad():
        # Selection (n0 draws): per-pixel class histogram via one-hot scatter, summed per image.
        hist: torch.Tensor | None = None
        for rows, pred, num_classes in _draws(forward, x, sigma, n0, batch_size, denoiser, generator):
            m = pred.shape[0]
            if hist is None:
                hist = torch.zeros(batch, num_classes, n_pix, dtype=torch.int32, device=x.device)
            one_hot = torch.zeros(m, num_classes, n_pix, dtype=torch.int32, device=x.device)
            one_hot.scatter_(1, pred.reshape(m, 1, n_pix).long(), 1)
            _accumulate(hist, rows, one_hot)
        selected = _class_map(hist)  # (B, P); ties go to the lowest class index
        # Estimation (n fresh draws): count of draws predicting ĉ at each pixel.
        counts = torch.zeros(batch, n_pix, dtype=torch.int32, device=x.device)
        for rows, pred, _ in _draws(forward, x, sigma, n, batch_size, denoiser, generator):
            _accumulate(counts, rows, pred.reshape(pred.shape[0], n_pix) == selected[rows])
        selected = selected.long()
    selected = selected.view(batch, *spatial)
    counts = counts.view(batch, *spatial).to(torch.int64)
    labels, pvalues = certify_counts(selected, counts, n, alpha, tau, correction)
    return CertifiedSegmentation(
        labels=labels,
        radius=certified_radius(sigma, tau),
        pvalues=pvalues,
        selected=selected,
        counts=counts,
        n=n,
        sigma=sigma,
        alpha=alpha,
        tau=tau,
        correction=correction,
    )


def certified_metrics(
    cert: CertifiedSegmentation, y: torch.Tensor, num_classes: int, include_background: bool = True
) -> dict[str, torch.Tensor]:
    """Certified Dice and IoU per image and class (Laousy et al. 2023, Sec. 4-5), plus the abstained fraction.

    Two variants, computed with :func:`common.metrics.overlap_scores` on one-hot maps:

    - ``dice_<c>``, ``iou_<c>`` (the paper's certified scores): abstained pixels are removed from both
      the prediction and the ground truth before scoring (the metrics' ignore mask).
    - ``dice_strict_<c>``, ``iou_strict_<c>``: abstained pixels count as errors (an abstained pixel is
      never class c, so a ground-truth c pixel that abstains is a false negative).

    Empty classes follow :data:`common.metrics.EMPTY_CLASS_RULE` (absent from both the remaining ground
    truth and the certified prediction: 1.0). ``dice_mean`` etc. are means over the reported classes;
    ``include_background`` False drops class 0.

    Args:
        cert: output of :func:`certify`, labels (B, *spatial).
        y: ground-truth class map (B, 1, *spatial) or (B, *spatial), whole-number values in [0, num_classes).
        num_classes: K, number of classes including background.

    Returns:
        dict of (B,) float tensors, including ``abstained_fraction``.
    """
    if not isinstance(cert, CertifiedSegmentation):
        raise ValueError(f"cert: expected a CertifiedSegmentation, got {type(cert).__name__}")
    num_classes = check_positive_int(num_classes, "num_classes")
    labels = cert.labels
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"y: expected a torch.Tensor, got {type(y).__name__}")
    if y.ndim == labels.ndim + 1 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != labels.shape:
        raise ValueError(
            f"y: expected shape {tuple(labels.shape)} or with a channel dim of 1, got {tuple(y.shape)}"
        )
    if torch.is_floating_point(y) and not bool((torch.isfinite(y) & (y == y.round())).all()):
        raise ValueError("y: a label map must hold whole-number class indices")
    y = y.to(device=labels.device, dtype=torch.int64)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"y: class indices must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]"
        )
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(
            f"num_classes: cert holds class {int(labels.max())}, more than {num_classes} classes"
        )

    abstained = labels == ABSTAIN
    first = 0 if include_background else 1
    pred = (_one_hot(labels.clamp(min=0), num_classes) * ~abstained.unsqueeze(1))[:, first:]
    truth = _one_hot(y, num_classes)[:, first:]
    names = [str(c) for c in range(first, num_classes)]
    out: dict[str, torch.Tensor] = dict(overlap_scores(pred, truth, names, ignore=abstained))
    strict = overlap_scores(pred, truth, names)
    out.update({k.replace("_", "_strict_", 1): v for k, v in strict.items()})
    out["abstained_fraction"] = cert.abstained_fraction.to(labels.device)
    return out


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *spatial) int64 → (B, K, *spatial) float32 one-hot."""
    return torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).float()


def _draws(forward, x, sigma, draws, batch_size, denoiser, generator):
    """Yield (rows, predicted classes (m, *spatial) int64, K) for the B·draws noisy copies of ``x``.

    The copies are enumerated image-major and cut into chunks of ``batch_size``, so one ``forward``
    call may hold copies of several images; no Python loop over draws within a chunk. ``rows`` says
    which image each copy belongs to: a slice ``i:i+1`` when the whole chunk is image i (broadcast, no
    gather), else an index tensor (m,).
    """
    batch, spatial = x.shape[0], tuple(x.shape[2:])
    total = batch * draws
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        first, last = start // draws, (stop - 1) // draws
        if first == last:
            rows = slice(first, first + 1)
        else:
            rows = torch.arange(start, stop, device=x.device) // draws
        noisy = torch.randn((stop - start, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
        noisy.mul_(sigma).add_(x[rows])  # x + N(0, σ²), in place
        if denoiser is not None:
            noisy = denoiser(noisy, sigma)
            if not _matches(noisy, stop - start, spatial):
                raise ValueError("denoiser: must return a tensor shaped like its input (N, C, *spatial)")
        logits = main_output(forward(noisy))
        if not _matches(logits, stop - start, spatial):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"forward: expected logits shaped ({stop - start}, K, *{spatial}), got {shape}")
        if logits.shape[1] < 2:
            raise ValueError(
                "forward: expected K >= 2 class channels; wrap a single-channel sigmoid logit z as [0, z]"
            )
        yield rows, _class_map(logits), logits.shape[1]


def _class_map(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the class dim (first maximal class, as ``torch.argmax``): (m, K, *sp) → (m, *sp).

    Written as K compare-and-select passes against ``amax`` in uint8 (int64 for K > 256) because
    torch's CPU argmax/max-with-indices over a short, non-innermost dim is a slow generic reduction
    (≈3-10× slower at 16×3×256×256); the result is identical, ties included.
    """
    num_classes = logits.shape[1]
    best = logits.amax(1)
    dtype = torch.uint8 if num_classes <= 256 else torch.int64
    classes = torch.zeros(best.shape, dtype=dtype, device=logits.device)
    for c in range(num_classes - 1, -1, -1):  # descending, so the first maximal class is kept
        is_max = logits[:, c] == best
        classes.mul_(~is_max).add_(is_max, alpha=c)
    return classes


def _accumulate(target: torch.Tensor, rows, values: torch.Tensor) -> None:
    """target[image of copy j] += values[j] for every copy j (int32 sums over the draws)."""
    if isinstance(rows, slice):
        target[rows] += values.sum(0, keepdim=True, dtype=torch.int32)
    else:
        target.index_add_(0, rows, values.to(torch.int32))


def _matches(t, batch: int, spatial: tuple[int, ...]) -> bool:
    """``t`` is a tensor (batch, any channels, *spatial)."""
    return isinstance(t, torch.Tensor) and t.ndim == 2 + len(spatial) and t.shape[0] == batch \
        and tuple(t.shape[2:]) == spatial


def _check_sigma(sigma: float) -> float:
    sigma = check_nonnegative(sigma, "sigma")
    if sigma <= 0:
        raise ValueError(f"sigma: must be > 0, got {sigma}")
    return sigma


def _check_tau(tau: float) -> float:
    """0.5 ≤ τ < 1: above 1/2 the certified class is the smoothed argmax and Φ⁻¹(τ) ≥ 0."""
    tau = check_nonnegative(tau, "tau")
    if not 0.5 <= tau < 1.0:
        raise ValueError(f"tau: must lie in [0.5, 1) so that R = sigma * Phi^-1(tau) >= 0, got {tau}")
    return tau


def _check_correction(correction: str) -> str:
    if correction not in CORRECTIONS:
        raise ValueError(f"correction: expected one of {CORRECTIONS}, got {correction!r}")
    return correction
