"""Robustness sweeps: every case under every (attack, ε), per-case metrics, statistics, reports.

The evaluation of all five papers: Dice / Jaccard of the segmentation of clean and attacked inputs per
case, PSNR / SSIM / RMSE of the perturbations (Table 1 of Liu et al., J. Digit. Imaging 2021), paired two-sided
Wilcoxon signed-rank tests of each (attack, ε) against the clean input with Bonferroni or Holm
correction over the (attack, ε) family of each metric (same paper, §3), a Markdown table shaped like
the papers' tables and a plot of a metric against ε (He et al., AAAI 2019, Fig. 5).

Outputs of :class:`RobustnessSweep` (all written at the end, each atomically; nothing on error):
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
import torch
from scipy.stats import wilcoxon
from tqdm.auto import tqdm

from common.distributed import barrier, gather_objects, is_main_process, num_local_batches, shard_batches
from common.io import atomic_write_text
from common.metrics import perturbation_scores, segmentation_scores
from common.report import CLEAN, csv_text, format_mean_sd, markdown_table, render_metric_vs_eps, write_bytes
from common.stats import bonferroni_adjust, holm_adjust
from common.validation import (
    check_image,
    check_label_map,
    check_nonnegative,
    check_positive_int,
    check_probability,
    main_output,
)

__all__ = [
    "paired_wilcoxon",
    "compare_with_clean",
    "summarise",
    "summary_markdown",
    "write_reports",
    "predict_labels",
    "evaluate_cases",
    "RobustnessSweep",
]

KEY_COLUMNS = ("case_id", "attack", "eps", "eps_display")
PERTURBATION_METRICS = ("psnr", "ssim", "rmse")
CORRECTIONS = ("bonferroni", "holm")


# ----------------------------------------------------------------------------------------- statistics
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
        ``{"p_wilcoxon", "p_bonferroni", "p_holm"}``, each (M, k); the family of each metric is its k
        tests (``common.stats``).
    """
    clean = np.asarray(clean, dtype=np.float64)
    attacked = np.asarray(attacked, dtype=np.float64)
    if clean.ndim != 2 or attacked.ndim != 3 or attacked.shape[::2] != clean.shape:
        raise ValueError(
            f"attacked: expected shape (M, k, n) for clean (M, n) = {clean.shape}, got {attacked.shape}"
        )
    p = paired_wilcoxon(clean[:, None, :], attacked)
    return {"p_wilcoxon": p, "p_bonferroni": bonferroni_adjust(p), "p_holm": holm_adjust(p)}


def _json_number(value: float) -> float | None:
    """JSON has no inf/NaN: non-finite values (PSNR of an unchanged input, sd of one case) become null."""
    value = float(value)
    return value if math.isfinite(value) else None


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
        ``{"n_cases", "metrics", "tested_metrics", "test", "entries"}``; ``entries`` lists the clean
        entry then each (attack, ε) in row order, each ``{"attack", "eps", "eps_display", "n", "mean": {m},
        "sd": {m}}``, and for attacked entries ``"p_wilcoxon"``, ``"p_bonferroni"``, ``"p_holm"``: {m}.
        Non-finite means / sds are null.
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
            "attack": name,
            "eps": eps,
            "eps_display": float(grp[0]["eps_display"]),
            "n": len(grp),
            "mean": {m: _json_number(a) for m, a in zip(metrics, mean)},
            "sd": {m: _json_number(s) for m, s in zip(metrics, sd)},
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
        "entries": entries,
    }


def summary_markdown(
    summary: Mapping[str, Any],
    eps_unit: str = "input units",
    correction: str = "bonferroni",
    alpha: float = 0.05,
    title: str = "",
    digits: int = 3,
) -> str:
    """A Markdown table shaped like the papers' tables (e.g. Table 1 of Liu et al., J. Digit. Imaging 2021).

    Rows: clean, then attack × ε. Columns: every metric as mean ± sd (PSNR / SSIM / RMSE shown as ``-`` for
    the clean row, as in the paper), then the raw Wilcoxon p-value of each tested metric. An asterisk
    marks a tested metric whose ``correction``-adjusted p-value is ≤ ``alpha``.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction: expected one of {CORRECTIONS}, got {correction!r}")
    alpha = check_probability(alpha, "alpha")
    metrics, tested = list(summary["metrics"]), list(summary["tested_metrics"])
    columns = ["attack", "eps", *metrics, *(f"p {m}" for m in tested)]
    headers = ["Attack", f"ε ({eps_unit})", *metrics, *(f"p ({m})" for m in tested)]
    table_rows = []
    for e in summary["entries"]:
        clean = e["attack"] == CLEAN
        row: dict[str, Any] = {"attack": e["attack"], "eps": f"{e['eps_display']:g}"}
        for m in metrics:
            if clean and m in PERTURBATION_METRICS:
                row[m] = "-"
                continue
            cell = format_mean_sd(e["mean"][m], e["sd"][m], digits)
            if not clean and m in tested and e[f"p_{correction}"][m] <= alpha:
                cell += "*"
            row[m] = cell
        for m in tested:
            row[f"p {m}"] = "-" if clean else f"{e['p_wilcoxon'][m]:.4g}"
        table_rows.append(row)
    note = (
        f"\n{summary['n_cases']} cases; mean ± sd (ddof 1). p: two-sided Wilcoxon signed-rank test against "
        f"clean, paired by case. * {correction.capitalize()}-adjusted p ≤ {alpha:g} over the (attack, ε) "
        "tests of each metric.\n"
    )
    heading = f"# {title}\n\n" if title else ""
    return heading + markdown_table(table_rows, columns, headers=headers) + note


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
    """Render the four reports in memory, then write each atomically to ``output_dir``.

    Rendering everything first means an error (an unknown metric, a non-serialisable value) leaves no file.
    """
    contents: dict[str, str | bytes] = {
        "per_case.csv": csv_text(rows),
        "summary.json": json.dumps(summary, indent=2, allow_nan=False) + "\n",
        "summary.md": summary_markdown(summary, eps_unit, correction, alpha, title),
        "dice_vs_eps.png": render_metric_vs_eps(summary, metric_for_plot, f"ε ({eps_unit})", title),
    }
    out = Path(output_dir)
    paths = {}
    for name, content in contents.items():
        if isinstance(content, str):
            paths[name] = atomic_write_text(out / name, content)
        else:
            paths[name] = write_bytes(out / name, content)
    return paths


# ----------------------------------------------------------------------------------------- inference
def predict_labels(forward: Callable, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label map (B, 1, *spatial), int64, of ``forward(x)`` under ``torch.no_grad()``.

    ``forward`` returns logits (B, K, *spatial) (or a list whose first element is the main head). K =
    ``num_classes``: argmax over channels; K = 1 with ``num_classes`` = 2: a binary logit, foreground
    where it is > 0.
    """
    with torch.no_grad():
        out = main_output(forward(x))
    matches = isinstance(out, torch.Tensor) and out.ndim == x.ndim and out.shape[0] == x.shape[0]
    if not matches or out.shape[2:] != x.shape[2:]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"forward: expected logits (B, K, *spatial) matching input {tuple(x.shape)}, got {shape}"
        )
    out = torch.as_tensor(out)
    if out.shape[1] == num_classes:
        return out.argmax(dim=1, keepdim=True)
    if out.shape[1] == 1 and num_classes == 2:
        return (out > 0).long()
    raise ValueError(f"forward: returned {out.shape[1]} channels for num_classes={num_classes}")


def _plain(t: Any) -> Any:
    """A MetaTensor as a plain tensor (metadata is not wanted in attacks and metric arithmetic)."""
    return t.as_tensor() if hasattr(t, "as_tensor") and isinstance(t, torch.Tensor) else t


def _case_ids(batch: Mapping[str, Any], batch_size: int, start: int) -> list[str]:
    """``case_id`` from the batch, else the image file names from MONAI metadata, else running indices."""
    ids = batch.get("case_id")
    if ids is None:
        meta = getattr(batch["image"], "meta", None) or batch.get("image_meta_dict") or {}
        names = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
        if names is not None:
            names = [names] if isinstance(names, (str, os.PathLike)) else list(names)
            ids = [Path(str(n)).name for n in names]
    if ids is None:
        return [str(start + i) for i in range(batch_size)]
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    elif isinstance(ids, (str, int)):
        ids = [ids]
    ids = [str(i) for i in ids]
    if len(ids) != batch_size:
        raise ValueError(f"case_id: expected {batch_size} ids for the batch, got {len(ids)}")
    return ids


def _rows(
    case_ids: Sequence[str], attack: str, eps: float, eps_scale: float, scores: Mapping[str, torch.Tensor]
) -> list[dict[str, Any]]:
    columns = {k: torch.as_tensor(v).reshape(-1).tolist() for k, v in scores.items()}
    return [
        {
            "case_id": cid,
            "attack": attack,
            "eps": eps,
            "eps_display": eps / eps_scale,
            **{k: v[i] for k, v in columns.items()},
        }
        for i, cid in enumerate(case_ids)
    ]


def _evaluate_batch(
    forward: Callable,
    batch: Mapping[str, Any],
    offset: int,
    attacks: Sequence[tuple[str, float, Callable]],
    num_classes: int,
    seg_kwargs: Mapping[str, Any],
    data_range: float,
    eps_scale: float,
) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Rows of one batch, per (attack, ε) block (clean first); ``offset``: cases before this batch."""
    if not isinstance(batch, Mapping) or "image" not in batch or "label" not in batch:
        raise ValueError("data: each item must be a dict with 'image' and 'label'")
    x, y = batch["image"], batch["label"]
    check_image(x, "image")
    check_label_map(y, x, "label", num_classes)
    ids = _case_ids(batch, x.shape[0], offset)
    x, y = _plain(x), _plain(y).long()
    clean_pred = predict_labels(forward, x, num_classes)
    ones = torch.ones(x.shape[0], dtype=torch.float64)
    clean_pert = {"psnr": ones * math.inf, "ssim": ones, "rmse": ones * 0.0}
    clean_scores = {**segmentation_scores(clean_pred, y, num_classes, **seg_kwargs), **clean_pert}
    blocks = {(CLEAN, 0.0): _rows(ids, CLEAN, 0.0, eps_scale, clean_scores)}
    for name, eps, attack in attacks:
        x_adv = _plain(attack(x, y))
        if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
            got = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
            raise ValueError(f"attacks: {name!r} at eps={eps} returned {got}, expected {tuple(x.shape)}")
        check_image(x_adv, f"attacks: {name!r} at eps={eps} output")
        pred = predict_labels(forward, x_adv, num_classes)
        scores = {
            **segmentation_scores(pred, y, num_classes, **seg_kwargs),
            **perturbation_scores(x_adv.detach(), x, data_range),
        }
        blocks[(name, eps)] = _rows(ids, name, eps, eps_scale, scores)
    return blocks


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
) -> list[dict[str, Any]]:
    """Per-case rows for clean inputs and for every built attack, ordered clean first, then by attack.

    Args:
        forward: ``forward(x) -> logits`` (see :func:`predict_labels`).
        data: batches ``{"image": (B, C, *sp) float, "label": (B, 1, *sp), optional "case_id"}``.
        attacks: ``(name, eps, attack)`` triples, each attack built once and called ``attack(x, y) -> x_adv``
            with the true labels; ε > 0 (the clean row stands for ε = 0).
        eps_scale: ``eps_display = eps / eps_scale`` (the paper's units).
        progress: a tqdm bar over batches (stderr, rank 0 only).

    Returns:
        one dict per case and setting: ``case_id, attack, eps, eps_display``, the
        :func:`~common.metrics.segmentation_scores` and ``psnr, ssim, rmse``. Clean rows have PSNR = inf,
        SSIM = 1, RMSE = 0 (the exact values for an unchanged input, not recomputed).

    Under ``torchrun`` (an initialised process group) each rank evaluates its block of batches
    (:func:`common.distributed.shard_batches`) and every rank returns all rows, in the same order and with
    the same values as one process (attacks whose random start draws from a shared generator excepted:
    their draws depend on which batches a process sees).
    """
    seg_kwargs = dict(include_background=include_background, regions=regions, class_names=class_names)
    local = []
    bar = tqdm(
        shard_batches(data), desc=desc, total=num_local_batches(data), unit="batch", leave=True,
        disable=not (progress and is_main_process()),
    )
    for k, offset, batch in bar:
        local.append((k, _evaluate_batch(forward, batch, offset, attacks, num_classes, seg_kwargs, data_range,
                                         eps_scale)))
    results = sorted((r for part in gather_objects(local) for r in part), key=lambda r: r[0])
    blocks: dict[tuple[str, float], list[dict[str, Any]]] = {(CLEAN, 0.0): []}
    for name, eps, _ in attacks:
        blocks[(name, eps)] = []
    for _, batch_blocks in results:
        for key, rows in batch_blocks.items():
            blocks[key] += rows
    if not blocks[(CLEAN, 0.0)]:
        raise ValueError("data: no cases")
    return [row for block in blocks.values() for row in block]


# ----------------------------------------------------------------------------------------- the sweep
class RobustnessSweep:
    """Evaluate a model on clean inputs and under every attack at every ε, and write the reports.

    Args:
        forward: ``forward(x) -> logits (B, K, *sp)`` (or a list, main head first).
        attacks: name -> factory; ``attacks[name](eps=eps)`` (keyword, so ``_mode_: "callable"`` partials of the attack classes work) returns an attack ``(x, y) -> x_adv``. Each is
            built once per ε > 0 here; ε = 0 is the clean row and runs nothing.
        eps_values: attack strengths in input units (≥ 0).
        num_classes: classes of the label maps including background.
        output_dir: where ``per_case.csv``, ``summary.json``, ``summary.md``, ``dice_vs_eps.png`` go.
        class_names, include_background, regions: see :func:`common.metrics.segmentation_scores`.
        data_range: input dynamic range for PSNR / SSIM.
        eps_scale: input units per display unit: ``eps_display = eps / eps_scale`` (e.g. 1/255 for ε on the
            0–255 scale of He et al., AAAI 2019 with inputs in [0, 1]).
        eps_unit: name of the display unit, used in the table header and the plot's x label.
        metric_for_plot: metric drawn against ε.
        title: title of the table and the plot.
        progress: tqdm progress bar over batches (stderr; rank 0 only under ``torchrun``).
        alpha, correction: significance level and correction ("bonferroni" as in Liu et al., J. Digit. Imaging 2021,
            or "holm") marked with an asterisk in the table; both adjustments are in ``summary.json``.
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
        self.seg_kwargs = dict(
            include_background=include_background, regions=regions, class_names=class_names
        )
        # Naming and config checks on a one-voxel map, so a bad metric_for_plot fails before any work.
        probe = torch.zeros(1, 1, 1, 1, dtype=torch.long)
        metrics = [*segmentation_scores(probe, probe, self.num_classes, **self.seg_kwargs)]
        metrics += PERTURBATION_METRICS
        if metric_for_plot not in metrics:
            raise ValueError(f"metric_for_plot: {metric_for_plot!r} not among {metrics}")
        self.metric_for_plot, self.eps_unit, self.title = metric_for_plot, str(eps_unit), str(title)
        self.correction, self.progress = correction, bool(progress)
        self.attacks = [
            (name, eps, factory(eps=eps))
            for name, factory in attacks.items()
            for eps in self.eps_values
            if eps > 0
        ]
        for name, eps, attack in self.attacks:
            if not callable(attack):
                raise ValueError(f"attacks: {name!r}({eps}) did not return a callable attack")

    def run(self, data: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Evaluate every batch of ``data``, write the four reports, return the summary dict.

        Under ``torchrun`` every rank evaluates its shard (:func:`evaluate_cases`), every rank returns the
        summary of all cases, and rank 0 alone writes the reports; every rank returns once they are written.
        """
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
        if is_main_process():
            write_reports(
                self.output_dir, rows, summary, self.metric_for_plot, self.eps_unit, self.correction,
                self.alpha, self.title,
            )
        barrier()
        return summary
