"""Family-wise error control: Bonferroni and Holm step-down, vectorised over the last axis.

Used for the many per-pixel tests of randomized-smoothing certification (millions of p-values, one
family per image) and for the few Wilcoxon tests of a robustness table. scipy has no Holm
correction with a reject mask over a batch of families (``scipy.stats.false_discovery_control`` is
Benjamini–Hochberg only) and statsmodels is not a runtime dependency, hence these few lines;
the tests compare them with ``statsmodels.stats.multitest.multipletests``.

All functions take an array of p-values of shape (..., m): each row along the last axis is one
family of m hypotheses. One ``argsort`` per call, no Python loop over hypotheses.
"""

from __future__ import annotations

import numpy as np

from common.validation import check_probability

__all__ = ["bonferroni_adjust", "holm_adjust", "bonferroni_reject", "holm_reject"]


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
