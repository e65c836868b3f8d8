"""Robustness sweeps: every case under every (attack, ε), per-case metrics, statistics, reports.

The evaluation of all five papers as one configuration of the engine (:func:`common.evaluation.engine.evaluate`):
Dice / IoU of the segmentation of clean and attacked inputs per case, PSNR / SSIM / RMSE of the
perturbations (Table 1 of Liu et al., J. Digit. Imaging 2021), paired two-sided Wilcoxon signed-rank tests
of each (attack, ε) against the clean input with Bonferroni or Holm correction over the (attack, ε) family
of each metric (same paper, §3), a Markdown table shaped like the papers' tables and a plot of a metric
against ε (He et al., AAAI 2019, Fig. 5).

Outputs of :class:`RobustnessSweep`, one report set (:func:`common.io.write_report_set`: the output folder
is checked before any case is evaluated, everything is rendered and staged first, ``manifest.json`` last):
``per_case.csv``, ``summary.json``, ``summary.md``, ``dice_vs_eps.png``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.evaluation.engine import ROW_KEYS, Scoring, attacked, clean, evaluate, run_and_write
from common.io import write_report_set
from common.metrics import EMPTY_CLASS_RULE
from common.report import CLEAN, csv_text
from common.reporting.paper_tables import CORRECTIONS, PERTURBATION_METRICS, sweep_table
from common.reporting.plots import render_metric_vs_eps
from common.stats import compare_with_clean, finite_or_none
from common.validation import check_nonnegative, check_positive_int, check_probability

__all__ = ["summarise", "write_reports", "evaluate_cases", "RobustnessSweep", "KEY_COLUMNS"]

KEY_COLUMNS = ("case_id", "attack", "eps", "eps_display")


def summarise(
    rows: Sequence[Mapping[str, Any]], tested_metrics: Sequence[str] | None = None
) -> dict[str, Any]:
    """Mean, sd (ddof = 1) and n of every metric per (attack, ε), and tests against clean.

    Args:
        rows: per-case rows with the keys ``case_id, attack, eps, eps_display`` and one numeric column per
            metric; the rows of attack ``"clean"`` are the reference. Every (attack, ε) group must hold the
            same cases in the same order as the clean group (as :func:`evaluate_cases` writes them).
        tested_metrics: metrics tested against clean; default every ``dice_*`` column.

    Returns:
        ``{"n_cases", "metrics", "tested_metrics", "test", "empty_class_rule", "entries"}``; ``entries``
        lists the clean entry then each (attack, ε) in row order, each ``{"attack", "eps", "eps_display",
        "n", "mean": {m}, "sd": {m}}``, and for attacked entries ``"p_wilcoxon"``, ``"p_bonferroni"``,
        ``"p_holm"``: {m}. Non-finite means / sds are null.
    """
    if not rows:
        raise ValueError("rows: no rows to summarise")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    missing = [k for k in KEY_COLUMNS if k not in columns]
    if missing:
        raise ValueError(f"rows: missing columns {missing}")
    metrics = [c for c in columns if c not in KEY_COLUMNS]
    tested = [m for m in metrics if m.startswith("dice_")] if tested_metrics is None else list(tested_metrics)
    unknown = [m for m in tested if m not in metrics]
    if unknown:
        raise ValueError(f"tested_metrics: {unknown} not among the metrics {metrics}")

    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row["attack"]), float(row["eps"])), []).append(row)
    clean_keys = [k for k in groups if k[0] == CLEAN]
    if len(clean_keys) != 1:
        raise ValueError(f"rows: expected one group of attack {CLEAN!r}, found {len(clean_keys)}")
    clean_rows = groups.pop(clean_keys[0])
    case_ids = [r["case_id"] for r in clean_rows]
    for (name, eps), grp in groups.items():
        if [r["case_id"] for r in grp] != case_ids:
            raise ValueError(f"rows: cases of ({name!r}, eps={eps}) do not match the clean cases")

    def values(grp: Sequence[Mapping[str, Any]]) -> np.ndarray:  # (M, n)
        table = [[float(r[m]) for r in grp] for m in metrics]
        return np.array(table, dtype=np.float64).reshape(len(metrics), -1)

    def entry(name: str, eps: float, grp: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        v = values(grp)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = v.mean(axis=1)
            sd = v.std(axis=1, ddof=1) if v.shape[1] > 1 else np.full(len(metrics), np.nan)
        return {
            "attack": name, "eps": eps, "eps_display": float(grp[0]["eps_display"]), "n": len(grp),
            "mean": {m: finite_or_none(a) for m, a in zip(metrics, mean)},
            "sd": {m: finite_or_none(s) for m, s in zip(metrics, sd)},
        }

    entries = [entry(CLEAN, clean_keys[0][1], clean_rows)]
    attacked_keys = list(groups)
    if attacked_keys and tested:
        idx = [metrics.index(m) for m in tested]
        clean_v = values(clean_rows)[idx]
        attacked_v = np.stack([values(groups[k])[idx] for k in attacked_keys], axis=1)  # (M, k, n)
        tests = compare_with_clean(clean_v, attacked_v)
    for j, key in enumerate(attacked_keys):
        e = entry(key[0], key[1], groups[key])
        for name in ("p_wilcoxon", "p_bonferroni", "p_holm"):
            e[name] = {m: float(tests[name][i, j]) for i, m in enumerate(tested)} if tested else {}
        entries.append(e)
    return {
        "n_cases": len(case_ids),
        "metrics": metrics,
        "tested_metrics": tested,
        "test": (
            "two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon, zero differences dropped) of each "
            "(attack, eps) against clean, paired by case; p = 1 when all differences are zero; Bonferroni "
            "and Holm adjustment over the (attack, eps) tests of each metric"
        ),
        "empty_class_rule": EMPTY_CLASS_RULE,
        "entries": entries,
    }


def write_reports(
    output_dir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    metric_for_plot: str = "dice_mean",
    eps_unit: str = "input units",
    correction: str = "bonferroni",
    alpha: float = 0.05,
    title: str = "",
) -> dict[str, Path]:
    """Render the four reports in memory, then write them as one report set to ``output_dir``."""
    return write_report_set(output_dir, {
        "per_case.csv": csv_text(rows),
        "summary.json": json.dumps(summary, indent=2, allow_nan=False) + "\n",
        "summary.md": sweep_table(summary, eps_unit, correction, alpha, title),
        "dice_vs_eps.png": render_metric_vs_eps(summary, metric_for_plot, f"ε ({eps_unit})", title),
    })


def evaluate_cases(
    forward: Callable,
    data: Iterable[Mapping[str, Any]],
    attacks: Sequence[tuple[str, float, Callable]],
    num_classes: int,
    include_background: bool = False,
    regions: Mapping[str, Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
    data_range: float = 1.0,
    eps_scale: float = 1.0,
    progress: bool = False,
    desc: str = "robustness sweep",
    output: str = "softmax",
) -> list[dict[str, Any]]:
    """Per-case sweep rows for clean inputs and every built attack, clean first, then by attack and ε.

    Args:
        forward: ``forward(x) -> logits`` (see :func:`common.evaluation.engine.predict_labels`).
        data: batches ``{"image": (B, C, *sp) float, "label": (B, 1, *sp), optional "case_id"}``.
        attacks: ``(name, eps, attack)`` triples, each attack built once and called ``attack(x, y)`` with the
            true labels (returning ``x_adv`` or ``(x_adv, records)``); ε > 0 (the clean row stands for ε = 0).
        eps_scale: ``eps_display = eps / eps_scale`` (the paper's units).
        output: ``"softmax"`` or ``"sigmoid"`` (multi-label; labels as C-channel binary masks).

    Returns:
        one dict per case and setting: ``case_id, attack, eps, eps_display``, the
        :func:`~common.metrics.segmentation_scores` and ``psnr, ssim, rmse``. Clean rows have PSNR = inf,
        SSIM = 1, RMSE = 0 (the exact values for an unchanged input, not recomputed). Sharded under
        ``torchrun`` by the engine; every rank returns all rows.
    """
    perts = [clean()] + [attacked(name, eps, atk) for name, eps, atk in attacks]
    scoring = Scoring(num_classes, include_background, regions, class_names, output, data_range=data_range)
    result = evaluate(forward, data, perts, scoring, progress=progress, desc=desc)
    rows = []
    for r in result.rows:
        metrics = {k: v for k, v in r.items() if k not in ROW_KEYS}
        if r["kind"] == "clean":
            metrics.update(psnr=math.inf, ssim=1.0, rmse=0.0)
        rows.append({"case_id": r["case_id"], "attack": r["perturbation"], "eps": r["eps"],
                     "eps_display": r["eps"] / eps_scale, **metrics})
    return rows


class RobustnessSweep:
    """Evaluate a model on clean inputs and under every attack at every ε, and write the reports.

    Args:
        forward: ``forward(x) -> logits (B, K, *sp)`` (or a list, main head first).
        attacks: name -> factory; ``attacks[name](eps=eps)`` (keyword, so ``_mode_: "callable"`` partials of
            the attack classes work) returns an attack ``(x, y) -> x_adv`` (or ``(x_adv, records)``). Each is
            built once per ε > 0 here; ε = 0 is the clean row and runs nothing.
        eps_values: attack strengths in input units (≥ 0).
        num_classes: classes of the label maps including background (channels for ``output="sigmoid"``).
        output_dir: where ``per_case.csv``, ``summary.json``, ``summary.md``, ``dice_vs_eps.png`` go; checked
            for writability and free space before any case is evaluated.
        class_names, include_background, regions: see :func:`common.metrics.segmentation_scores`.
        data_range: input dynamic range for PSNR / SSIM.
        eps_scale: input units per display unit: ``eps_display = eps / eps_scale`` (e.g. 1/255 for ε on the
            0–255 scale of He et al., AAAI 2019 with inputs in [0, 1]).
        eps_unit: name of the display unit, used in the table header and the plot's x label.
        metric_for_plot: metric drawn against ε.
        title: title of the table and the plot.
        progress: progress over batches (stderr; rank 0 only under ``torchrun``).
        alpha, correction: significance level and correction ("bonferroni" as in Liu et al., J. Digit.
            Imaging 2021, or "holm") marked with an asterisk in the table; both adjustments are in
            ``summary.json``.
        output: ``"softmax"`` (class maps) or ``"sigmoid"`` (multi-label outputs and C-channel masks).
    """

    def __init__(
        self,
        forward: Callable,
        attacks: Mapping[str, Callable[[float], Callable]],
        eps_values: Sequence[float],
        num_classes: int,
        output_dir: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        include_background: bool = False,
        regions: Mapping[str, Sequence[int]] | None = None,
        data_range: float = 1.0,
        eps_scale: float = 1.0,
        eps_unit: str = "input units",
        metric_for_plot: str = "dice_mean",
        title: str = "",
        progress: bool = True,
        alpha: float = 0.05,
        correction: str = "bonferroni",
        output: str = "softmax",
    ) -> None:
        if not callable(forward):
            raise ValueError("forward: expected a callable forward(x) -> logits")
        if not isinstance(attacks, Mapping) or not all(
            isinstance(k, str) and callable(f) for k, f in attacks.items()
        ):
            raise ValueError("attacks: expected a mapping name -> factory(eps) -> attack")
        if CLEAN in attacks:
            raise ValueError(f"attacks: {CLEAN!r} is reserved for the unattacked row")
        if isinstance(eps_values, (str, bytes)) or not isinstance(eps_values, Sequence) or not eps_values:
            raise ValueError(f"eps_values: expected a non-empty sequence of numbers, got {eps_values!r}")
        self.eps_values = sorted({check_nonnegative(e, "eps_values") for e in eps_values})
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.data_range = check_nonnegative(data_range, "data_range")
        if self.data_range == 0:
            raise ValueError("data_range: must be > 0")
        self.eps_scale = check_nonnegative(eps_scale, "eps_scale")
        if self.eps_scale == 0:
            raise ValueError("eps_scale: must be > 0")
        if correction not in CORRECTIONS:
            raise ValueError(f"correction: expected one of {CORRECTIONS}, got {correction!r}")
        self.alpha = check_probability(alpha, "alpha")
        self.forward, self.output_dir = forward, Path(output_dir)
        self.seg_kwargs = dict(include_background=include_background, regions=regions, class_names=class_names,
                               output=output)
        # Naming and config checks on a one-voxel probe, so a bad metric_for_plot fails before any work.
        scoring = Scoring(self.num_classes, include_background, regions, class_names, output)
        metrics = scoring.metric_names() + list(PERTURBATION_METRICS)
        if metric_for_plot not in metrics:
            raise ValueError(f"metric_for_plot: {metric_for_plot!r} not among {metrics}")
        self.metric_for_plot, self.eps_unit, self.title = metric_for_plot, str(eps_unit), str(title)
        self.correction, self.progress = correction, bool(progress)
        self.attacks = [
            (name, eps, factory(eps=eps)) for name, factory in attacks.items() for eps in self.eps_values if eps > 0
        ]
        for name, eps, attack in self.attacks:
            if not callable(attack):
                raise ValueError(f"attacks: {name!r}({eps}) did not return a callable attack")

    def run(self, data: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Evaluate every batch of ``data``, write the four reports, return the summary dict.

        Under ``torchrun`` every rank evaluates its shard, every rank returns the summary of all cases, and
        rank 0 alone writes the reports; every rank returns once they are written.
        """
        rows, summary = run_and_write(self.output_dir, lambda: self._evaluate(data), lambda result: write_reports(
            self.output_dir, *result, self.metric_for_plot, self.eps_unit, self.correction, self.alpha, self.title))
        return summary

    def _evaluate(self, data: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        rows = evaluate_cases(
            self.forward, data, self.attacks, self.num_classes, data_range=self.data_range,
            eps_scale=self.eps_scale, progress=self.progress, desc=self.title or "robustness sweep",
            **self.seg_kwargs,
        )
        summary = summarise(rows)
        summary.update(
            eps_unit=self.eps_unit, eps_scale=self.eps_scale, alpha=self.alpha, correction=self.correction,
            attacks=list(dict.fromkeys(a for a, _, _ in self.attacks)), eps_values=self.eps_values,
        )
        return rows, summary
