"""The card's verdict: the per-case worst case over all its attacks, small-structure detection, masking flags.

- :func:`worst_case_entries`: at each ε and for each case, the attack (the card's ensemble
  :class:`common.attacks.WorstCase` among them) whose adversarial input gives the lowest mean foreground
  Dice; that input's per-class Dice, HD95 and NSD are the case's robust scores (the per-image worst case of
  Croce, Singh, Hein, ECCV 2024 — SEA — and of AutoAttack, Croce & Hein, ICML 2020). Each class gets the
  mean, a 95 % Student-t interval over cases, and a two-sided Wilcoxon signed-rank test against clean
  (scipy; Holm over the ε grid of each class). With n cases the smallest two-sided exact Wilcoxon p is
  2 / 2^n (:func:`min_wilcoxon_p`), so a small card cannot reach small p-values whatever the effect.
- :func:`component_observer`: an engine observer counting, per class and connected-component size bin,
  the ground-truth components (``scipy.ndimage.label``, face connectivity) that the prediction still
  detects — overlap ≥ ``overlap`` of the component's voxels. Small structures are the easiest to attack
  (Halmosi et al., ECCV 2024), which a mean Dice hides.
- :func:`masking_flags`: :func:`common.masking_diagnostics.masking_diagnostics` on the first case, as
  pass / flag lines with their numbers (Athalye, Carlini, Wagner, ICML 2018).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats

from common.stats import compare_with_clean
from common.stats import finite_or_none as _finite

__all__ = [
    "SIZE_BINS",
    "component_counts",
    "component_observer",
    "components_key",
    "masking_flags",
    "min_wilcoxon_p",
    "t_interval",
    "worst_case_entries",
]

#: component size bins in voxels: [lower, upper)
SIZE_BINS: tuple[tuple[int, float], ...] = ((1, 10), (10, 100), (100, 1000), (1000, float("inf")))


def min_wilcoxon_p(n: int, tests: int = 1) -> float:
    """Smallest two-sided exact Wilcoxon signed-rank p with ``n`` pairs: 2 / 2^n (all differences of one
    sign); after Holm over ``tests`` tests the smallest adjusted p is ``tests`` times that (capped at 1)."""
    return min(1.0, tests * 2.0 / 2.0**n) if n > 0 else 1.0


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean over cases, clipped to [0, 1] (Dice, NSD); ``None`` with fewer than two
    finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return None
    half = stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return float(max(0.0, v.mean() - half)), float(min(1.0, v.mean() + half))


def components_key(case_id: str, part: str, eps: float) -> str:
    """The observer artifact key of one case's component counts under one part."""
    return f"{case_id}/components:{part}@{float(eps)!r}"


def component_counts(pred: np.ndarray, truth: np.ndarray, overlap: float) -> np.ndarray:
    """(len(SIZE_BINS), 2) int64: per size bin, ground-truth components (face-connected, ``truth`` bool)
    and those with ``pred`` covering ≥ ``overlap`` of their voxels."""
    out = np.zeros((len(SIZE_BINS), 2), dtype=np.int64)
    labels, num = ndimage.label(truth)
    if num == 0:
        return out
    ids = np.arange(1, num + 1)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, ids)
    hits = ndimage.sum_labels(pred.astype(np.int64), labels, ids)
    for b, (lo, hi) in enumerate(SIZE_BINS):
        sel = (sizes >= lo) & (sizes < hi)
        out[b] = sel.sum(), (sel & (hits >= overlap * sizes)).sum()
    return out


def component_observer(output: str, class_names: Sequence[str], overlap: float) -> Callable:
    """Engine observer: for the clean prediction and every attack, :func:`component_counts` per foreground
    class (softmax: label c ≥ 1; sigmoid: channel c), keyed by :func:`components_key`, shape (K, bins, 2)."""

    def counts(k, ids, model, pert, x, y, outcome) -> dict[str, np.ndarray] | None:
        if pert.kind == "smoothing":
            return None
        pred, truth = outcome["pred"][0].detach().cpu().numpy(), y[0].detach().cpu().numpy()
        if output == "sigmoid":
            pairs = [(pred[c] > 0, truth[c] > 0) for c in range(len(class_names))]
        else:
            pairs = [(pred[0] == c, truth[0] == c) for c in range(1, len(class_names) + 1)]
        arr = np.stack([component_counts(p, t, overlap) for p, t in pairs])
        return {components_key(ids[0], pert.name, pert.eps): arr}

    return counts


def _detection(counts: Sequence[np.ndarray], classes: Sequence[str]) -> dict[str, list[dict]]:
    total = np.sum(counts, axis=0)  # (K, bins, 2)
    return {k: [{"bin_voxels": [lo, None if hi == float("inf") else int(hi)], "components": int(total[i, b, 0]),
                 "detected_fraction": float(total[i, b, 1] / total[i, b, 0]) if total[i, b, 0] else None}
                for b, (lo, hi) in enumerate(SIZE_BINS)] for i, k in enumerate(classes)}


def worst_case_entries(
    parts: Mapping, ids: Sequence[str], classes: Sequence[str], attacks: Sequence[str],
    eps: Sequence[float], eps_input: Sequence[float], components: Mapping[str, np.ndarray],
) -> dict[str, Any]:
    """The headline (module docstring): ``{"clean": {...}, "eps": [entry per ε], "n_cases", "min_p",
    "min_p_holm"}``; each entry has per class ``mean``, ``ci95``, ``hd95_median``, ``nsd_mean``,
    ``p_wilcoxon``, ``p_adjusted``, ``detection``, and per case the chosen attack and its scores."""
    clean = parts[("clean", 0.0, 0.0)]
    chosen: list[dict[str, str]] = []
    per_eps = []
    for e in eps_input:
        pick = {}
        for c in ids:
            scored = [(parts[(a, e, 0.0)][c]["dice_mean"], i, a) for i, a in enumerate(attacks)]
            pick[c] = min(scored)[2]  # lowest mean foreground Dice; ties: the first attack in card order
        chosen.append(pick)
        per_eps.append({c: parts[(pick[c], e, 0.0)][c] for c in ids})
    clean_dice = np.array([[clean[c][f"dice_{k}"] for c in ids] for k in classes], dtype=np.float64)
    worst = np.array([[[rows[c][f"dice_{k}"] for c in ids] for rows in per_eps] for k in classes], dtype=np.float64)
    tests = compare_with_clean(clean_dice, worst)
    n = len(ids)

    def summary(rows: Mapping[str, Mapping], comp_part: Callable[[str], str], e: float) -> dict[str, Any]:
        counts = [components.get(components_key(c, comp_part(c), e)) for c in ids]
        return {
            "mean": {k: float(np.mean([rows[c][f"dice_{k}"] for c in ids])) for k in classes},
            "ci95": {k: t_interval([rows[c][f"dice_{k}"] for c in ids]) for k in classes},
            "hd95_median": {k: _finite(np.median([rows[c].get(f"hd95_{k}", np.nan) for c in ids])) for k in classes},
            "nsd_mean": {k: _finite(np.mean([rows[c].get(f"nsd_{k}", np.nan) for c in ids])) for k in classes},
            "detection": _detection(counts, classes) if all(x is not None for x in counts) else None,
        }

    out_eps = []
    for j, (e, ei) in enumerate(zip(eps, eps_input)):
        entry = summary(per_eps[j], lambda c, j=j: chosen[j][c], ei)
        entry.update({
            "eps": e, "eps_input_units": ei,
            "p_wilcoxon": {k: float(tests["p_wilcoxon"][m, j]) for m, k in enumerate(classes)},
            "p_adjusted": {k: float(tests["p_holm"][m, j]) for m, k in enumerate(classes)},
            "per_case": {c: {"attack": chosen[j][c], "dice": {k: per_eps[j][c][f"dice_{k}"] for k in classes},
                             "hd95": {k: _finite(per_eps[j][c].get(f"hd95_{k}")) for k in classes},
                             "nsd": {k: _finite(per_eps[j][c].get(f"nsd_{k}")) for k in classes}} for c in ids},
        })
        out_eps.append(entry)
    return {"clean": summary(clean, lambda c: "clean", 0.0), "eps": out_eps, "n_cases": n,
            "interval": "95 % Student-t interval of the mean over cases, clipped to [0, 1]",
            "selection": "per case and eps, the attack with the lowest mean foreground Dice (its input's scores)",
            "test": "two-sided Wilcoxon signed-rank against clean (scipy), Holm over the eps grid of each class",
            "min_p": min_wilcoxon_p(n), "min_p_holm": min_wilcoxon_p(n, len(eps))}


def masking_flags(forward: Callable, x: torch.Tensor, y: torch.Tensor, eps_input: Sequence[float],
                  clip: Sequence[float] | None, input_range: tuple[float, float], output: str, steps: int,
                  seed: int) -> dict[str, Any]:
    """:func:`common.masking_diagnostics.masking_diagnostics` on one case (APGD, ``steps`` steps, CE and
    margin losses; the large ε is the input range's width): ``{"flagged", "checks": {name: {"passed",
    "reason"}}, "clean_dice", "attack_dice", "seconds", "case"}`` with JSON-safe numbers."""
    from common.masking_diagnostics import masking_diagnostics

    start = time.perf_counter()
    d = masking_diagnostics(forward, x, y, list(eps_input), clip=clip, steps=steps, output=output, seed=seed,
                            large_eps=float(input_range[1] - input_range[0]))
    seconds = time.perf_counter() - start
    checks = {name: {"passed": c.get("passed"), "reason": str(c.get("reason", ""))} for name, c in d["checks"].items()}
    return {"flagged": bool(d["flagged"]), "checks": checks, "clean_dice": _json(d.get("clean_dice")),
            "attack_dice": _json(d.get("attack_dice")), "single_step_dice": _json(d.get("single_step_dice")),
            "noise_dice": _json(d.get("noise_dice")), "transfer_dice": _json(d.get("transfer_dice")),
            "eps_input_units": list(eps_input), "steps": steps, "seconds": seconds}


def _json(v: Any) -> Any:
    """Nested floats made JSON-safe (non-finite → None)."""
    if isinstance(v, Mapping):
        return {str(k): _json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    if isinstance(v, (bool, str)) or v is None:
        return v
    try:
        return _finite(float(v))
    except (TypeError, ValueError):
        return str(v)
