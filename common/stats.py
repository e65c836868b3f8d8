"""Paired tests and family-wise error control: Wilcoxon signed-rank (scipy), Bonferroni and Holm step-down.

Used for the many per-pixel tests of randomized-smoothing certification (millions of p-values, one
family per image) and for the few Wilcoxon tests of a robustness table. scipy has no Holm
correction with a reject mask over a batch of families (``scipy.stats.false_discovery_control`` is
Benjamini–Hochberg only) and statsmodels is not a runtime dependency, hence these few lines;
the tests compare them with ``statsmodels.stats.multitest.multipletests``.

All functions take an array of p-values of shape (..., m): each row along the last axis is one
family of m hypotheses. One ``argsort`` per call, no Python loop over hypotheses.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy.stats import wilcoxon

from common.validation import check_probability

__all__ = [
    "bonferroni_adjust",
    "holm_adjust",
    "bonferroni_reject",
    "holm_reject",
    "paired_wilcoxon",
    "compare_with_clean",
    "finite_or_none",
    "mean_or_none",
    "sd_or_none",
    "median_or_none",
]


def _as_pvalues(pvalues) -> np.ndarray:
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim == 0:
        p = p[None]
    if p.size and (np.isnan(p).any() or (p < 0).any() or (p > 1).any()):
        raise ValueError("pvalues: must lie in [0, 1] and hold no NaN")
    return p


def bonferroni_adjust(pvalues) -> np.ndarray:
    """Bonferroni-adjusted p-values min(1, m·p), m = size of the last axis. Shape preserved."""
    p = _as_pvalues(pvalues)
    return np.minimum(1.0, p * p.shape[-1])


def holm_adjust(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values (Holm 1979), per family along the last axis.

    With p sorted ascending, p̃_(i) = max_{j ≤ i} min(1, (m − j)·p_(j)) for 0-based j.
    """
    p = _as_pvalues(pvalues)
    m = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    p_sorted = np.take_along_axis(p, order, axis=-1)
    factors = (m - np.arange(m, dtype=np.float64))
    adjusted_sorted = np.maximum.accumulate(np.minimum(1.0, p_sorted * factors), axis=-1)
    adjusted = np.empty_like(adjusted_sorted)
    np.put_along_axis(adjusted, order, adjusted_sorted, axis=-1)
    return adjusted


def bonferroni_reject(pvalues, alpha: float) -> np.ndarray:
    """Boolean mask of hypotheses rejected at family-wise level ``alpha`` (p ≤ α/m)."""
    alpha = check_probability(alpha, "alpha")
    return bonferroni_adjust(pvalues) <= alpha


def holm_reject(pvalues, alpha: float) -> np.ndarray:
    """Boolean mask of hypotheses rejected by Holm's step-down procedure at family-wise level ``alpha``."""
    alpha = check_probability(alpha, "alpha")
    return holm_adjust(pvalues) <= alpha


def paired_wilcoxon(clean: np.ndarray, attacked: np.ndarray) -> np.ndarray:
    """Two-sided Wilcoxon signed-rank p-values of ``attacked`` against ``clean``, paired along the last axis.

    Args:
        clean: per-case values (..., n), broadcastable to ``attacked``.
        attacked: per-case values (..., n), case i paired with ``clean``'s case i.

    Returns:
        p-values of shape ``attacked.shape[:-1]``, from ``scipy.stats.wilcoxon`` with its defaults
        (zero differences dropped, exact distribution for small n without ties). Where all differences
        are zero (an attack that changed nothing) scipy has no test (NaN); the p-value is then 1.0:
        no evidence of a difference. With a single case the exact two-sided p-value is 1.0 as well
        (the smallest attainable with n = 1), which scipy refuses to compute.
    """
    clean = np.asarray(clean, dtype=np.float64)
    attacked = np.asarray(attacked, dtype=np.float64)
    clean, attacked = np.broadcast_arrays(clean, attacked)
    if attacked.ndim == 0 or attacked.shape[-1] < 1:
        raise ValueError("attacked: expected at least one case along the last axis")
    if not (np.isfinite(clean).all() and np.isfinite(attacked).all()):
        raise ValueError("attacked: the Wilcoxon test needs finite values")
    all_zero = (attacked == clean).all(axis=-1)
    if attacked.shape[-1] == 1:
        return np.ones(attacked.shape[:-1], dtype=np.float64)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        p = np.asarray(wilcoxon(attacked, clean, axis=-1).pvalue, dtype=np.float64)
    return np.where(all_zero, 1.0, p)


def compare_with_clean(clean: np.ndarray, attacked: np.ndarray) -> dict[str, np.ndarray]:
    """Wilcoxon p-values and their Bonferroni / Holm adjustment over a family of (attack, ε) tests.

    Args:
        clean: (M, n) per-case values of M metrics on clean inputs.
        attacked: (M, k, n): the same metrics under k (attack, ε) settings, cases in the same order.

    Returns:
        ``{"p_wilcoxon", "p_bonferroni", "p_holm"}``, each (M, k); the family of each metric is its k tests.
    """
    clean = np.asarray(clean, dtype=np.float64)
    attacked = np.asarray(attacked, dtype=np.float64)
    if clean.ndim != 2 or attacked.ndim != 3 or attacked.shape[::2] != clean.shape:
        raise ValueError(
            f"attacked: expected shape (M, k, n) for clean (M, n) = {clean.shape}, got {attacked.shape}"
        )
    p = paired_wilcoxon(clean[:, None, :], attacked)
    return {"p_wilcoxon": p, "p_bonferroni": bonferroni_adjust(p), "p_holm": holm_adjust(p)}


# Summaries for JSON reports (sweep, card): JSON has no inf / NaN, so an undefined number is ``None``.
def finite_or_none(value: float | None) -> float | None:
    """``float(value)``, or ``None`` when it is ``None`` or not finite (PSNR of an unchanged input, sd of one
    case, the HD95 of an empty prediction)."""
    return None if value is None or not math.isfinite(float(value)) else float(value)


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of the defined (not ``None``) values, ``None`` when there is none."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def sd_or_none(values: Sequence[float | None]) -> float | None:
    """Sample sd (ddof 1) of the defined values, ``None`` with fewer than two."""
    vals = [v for v in values if v is not None]
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else None


def median_or_none(values: Sequence[float | None]) -> float | None:
    """Median of the defined values (inf allowed: an empty prediction's HD95); ``None`` when it is not finite."""
    vals = [v for v in values if v is not None]
    return finite_or_none(np.median(vals)) if vals else None
