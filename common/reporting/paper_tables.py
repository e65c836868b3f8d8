"""The papers' tables, rendered from the engine's summaries as Markdown (and rows for JSON).

- :func:`sweep_table`: a robustness sweep as in Table 1 of Liu et al. (J. Digit. Imaging 2021): clean
  and attack × ε rows, mean ± sd per metric, Wilcoxon p-values, Bonferroni / Holm asterisks.
- :func:`defence_table`, :func:`steps_table`, :func:`read_per_case`: Table 2 (Dice per region and
  defence at each ε, p-values against the undefended model) and Fig. 3 / 4 of the same paper.
- :func:`certification_tables`: Tables 1-3 of Laousy et al. (MICCAI 2023): certified Dice / IoU per
  class, %⊘ abstained, with abstentions ignored and counted as errors.
- :func:`timing_table`: Table 6 of Li et al. (2019, ResDSN C2F): Dice and test time per pipeline.
- :func:`drop_table`, :func:`write_drop_table`: Table 8 of the same paper: clean and attacked Dice and
  the maximum drop.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.io import atomic_write_json, atomic_write_text
from common.metrics import EMPTY_CLASS_RULE
from common.report import CLEAN, format_mean_sd, markdown_table
from common.stats import bonferroni_adjust, paired_wilcoxon
from common.validation import check_probability

__all__ = [
    "CORRECTIONS",
    "PERTURBATION_METRICS",
    "sweep_table",
    "read_per_case",
    "at_eps",
    "defence_table",
    "steps_table",
    "certification_tables",
    "timing_table",
    "drop_table",
    "write_drop_table",
]

CORRECTIONS = ("bonferroni", "holm")
PERTURBATION_METRICS = ("psnr", "ssim", "rmse")


def sweep_table(
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
        f"tests of each metric. Empty classes: {EMPTY_CLASS_RULE}.\n"
    )
    heading = f"# {title}\n\n" if title else ""
    return heading + markdown_table(table_rows, columns, headers=headers) + note


def read_per_case(path: str | Path) -> dict[tuple[str, float], dict[str, np.ndarray]]:
    """``per_case.csv`` of a sweep → {(attack, eps): {metric: values in case order}} (float64)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"per_case: no such file {path}")
    groups: dict[tuple[str, float], dict[str, list[float]]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            key = (row["attack"], round(float(row["eps"]), 6))
            group = groups.setdefault(key, {"case_id": []})
            group["case_id"].append(row["case_id"])
            for k, v in row.items():
                if k.startswith(("dice_", "psnr", "ssim", "rmse")):
                    group.setdefault(k, []).append(float(v))
    return {k: {m: np.asarray(v) if m != "case_id" else v for m, v in g.items()} for k, g in groups.items()}



def at_eps(per_case: Mapping[tuple[str, float], Mapping[str, Any]], eps: float, attack: str = "fgsm"):
    """The group of the clean row (ε = 0) or of ``attack`` at ``eps``."""
    key = ("clean", 0.0) if eps == 0 else (attack, round(float(eps), 6))
    if key not in per_case:
        raise ValueError(f"per_case: no rows for {key}; found {sorted(per_case)}")
    return per_case[key]


def defence_table(
    models: Mapping[str, Mapping[tuple[str, float], Mapping[str, Any]]],
    reference: str = "No defense",
    eps_values: Sequence[float] = (0.0, 0.05, 0.1),
    regions: Sequence[str] = ("WT", "TC", "ET"),
    alpha: float = 0.05,
) -> tuple[list[dict[str, Any]], str]:
    """Tables 2–3 of the paper: Dice per region and model at each ε, and p-values against ``reference``.

    Args:
        models: model name → :func:`read_per_case` of its defence sweep; the same test cases in the
            same order for every model. ``reference`` is the undefended model.

    Returns:
        (rows, markdown). Each row: region, defence, ``dice_<eps>`` mean / sd, and for defences
        ``p_<eps>``: two-sided Wilcoxon signed-rank p-value of the defence's Dice against the
        reference's at the same ε, paired by case (:func:`common.stats.paired_wilcoxon`), and
        ``p_bonferroni_<eps>``: Bonferroni-adjusted over the defences of that region and ε.
    """
    if reference not in models:
        raise ValueError(f"models: the reference model {reference!r} is missing")
    names = [reference] + [m for m in models if m != reference]
    cases = at_eps(models[reference], 0.0)["case_id"]
    for m in names:
        if at_eps(models[m], 0.0)["case_id"] != cases:
            raise ValueError(f"models: {m!r} was evaluated on other cases than {reference!r}")
    rows: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []  # the Markdown table's text, one per row
    for region in regions:
        metric = f"dice_{region}"
        values = {m: {e: at_eps(models[m], e)[metric] for e in eps_values} for m in names}
        defended = names[1:]
        p = {
            e: np.array([paired_wilcoxon(values[reference][e], values[m][e]) for m in defended]).reshape(-1)
            for e in eps_values
        }
        p_adj = {e: bonferroni_adjust(p[e]) if len(defended) else p[e] for e in eps_values}
        for i, m in enumerate(names):  # i = 0: the reference, not tested
            row: dict[str, Any] = {"region": region, "defence": m}
            cell = dict(row)
            for e in eps_values:
                v = values[m][e]
                row[f"dice_{e:g}"] = float(v.mean())
                row[f"sd_{e:g}"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
                cell[f"d{e:g}"] = format_mean_sd(row[f"dice_{e:g}"], row[f"sd_{e:g}"])
                if i:
                    row[f"p_{e:g}"] = float(p[e][i - 1])
                    row[f"p_bonferroni_{e:g}"] = float(p_adj[e][i - 1])
                    cell[f"d{e:g}"] += "*" if row[f"p_bonferroni_{e:g}"] <= alpha else ""
                cell[f"p{e:g}"] = f"{row[f'p_{e:g}']:.4g}" if i else "-"
            rows.append(row)
            cells.append(cell)
    columns = ["region", "defence", *(f"d{e:g}" for e in eps_values), *(f"p{e:g}" for e in eps_values)]
    headers = [
        "Segmentation type", "Defense type", *(f"Dice ε = {e:g}" for e in eps_values),
        *(f"p (vs no defense) ε = {e:g}" for e in eps_values),
    ]
    note = (
        f"\n{len(cases)} test cases; mean ± sd (ddof 1) of the Dice under FGSM (loss: soft Dice) at each ε. "
        f"p: two-sided Wilcoxon signed-rank test of the defence's Dice against the undefended model's at "
        f"the same ε, paired by case. * Bonferroni-adjusted p ≤ {alpha:g} over the defences.\n"
    )
    return rows, markdown_table(cells, columns, headers=headers) + note


def steps_table(summary: Mapping[str, Any], regions: Sequence[str] = ("WT", "TC", "ET")) -> list[dict[str, Any]]:
    """Fig. 3 / 4 data from an ``ifgsm_steps`` sweep summary: one row per (attack kind, steps) with
    the mean Dice of each region and the mean PSNR; the clean row is steps = 0 of both kinds."""
    entries = summary["entries"]
    clean = next(e for e in entries if e["attack"] == "clean")
    rows = []
    for kind in ("ifgsm", "ti_fgsm"):
        rows.append({"attack": kind, "steps": 0, **{r: clean["mean"][f"dice_{r}"] for r in regions}, "psnr": None})
        for e in entries:
            head, _, steps = e["attack"].rpartition("_")
            if head == kind and steps.isdigit():
                rows.append({
                    "attack": kind, "steps": int(steps), **{r: e["mean"][f"dice_{r}"] for r in regions},
                    "psnr": e["mean"]["psnr"],
                })
    return rows


def certification_tables(entries: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> tuple[str, str]:
    """Markdown tables shaped like the paper's Tables 1-3: method, σ, R, Dice / IoU per class, %⊘.

    Returns (certified table with abstentions ignored, strict table).
    """
    tables = []
    for variant in ("", "_strict"):
        columns = ["method", "sigma", "radius"]
        headers = ["Method", "σ", "R"]
        for c in class_names:
            columns += [f"dice{variant}_{c}", f"iou{variant}_{c}"]
            headers += [f"{c} Dice", f"{c} IoU"]
        columns.append("abstained_pct")
        headers.append("%⊘")
        rows = [{**e, "sigma": f"{e['sigma']:.2f}", "radius": f"{e['radius']:.2f}"} for e in entries]
        tables.append(markdown_table(rows, columns, ".2f", headers))
    return tables[0], tables[1]


def timing_table(summary: Mapping[str, Any], title: str = "") -> str:
    """Table 6 of Li et al. (2019): mean ± sd, max and min of the summary's metric and seconds per case,
    one row per pipeline of a :func:`common.c2f_eval.timed_evaluation` summary."""
    metric = summary["metric"]
    table = [{"pipeline": e["pipeline"], "dice": format_mean_sd(e[f"{metric}_mean"], e[f"{metric}_sd"]),
              "max": e[f"{metric}_max"], "min": e[f"{metric}_min"], "seconds": e["seconds_mean"]}
             for e in summary["entries"]]
    return (f"# {title}\n\n" if title else "") + markdown_table(
        table, ["pipeline", "dice", "max", "min", "seconds"],
        headers=["Method", f"Mean {metric}", "Max", "Min", "Testing time (s / case)"],
    ) + (f"\n{summary['n_cases']} cases, measured in one run; time per case includes all stages and "
         f"post-processing. Empty classes: {EMPTY_CLASS_RULE}.\n")


def drop_table(
    summaries: Mapping[str, Mapping[str, Any] | str | os.PathLike],
    attacks: Sequence[str],
    metric: str = "dice_mean",
) -> list[dict[str, Any]]:
    """Table 8 rows: per model, the clean ``metric`` (mean ± sd), the mean under each of ``attacks`` (first
    ε of each in the summary) and ``drop`` = clean mean − the lowest attacked mean.

    ``summaries`` maps a row name to a ``RobustnessSweep`` summary dict or the path of its ``summary.json``.
    """
    rows = []
    for name, summary in summaries.items():
        if not isinstance(summary, Mapping):
            path = Path(summary)
            if not path.is_file():
                raise FileNotFoundError(f"summaries: no such file {path}")
            summary = json.loads(path.read_text())
        by_attack: dict[str, Mapping[str, Any]] = {}
        for e in summary["entries"]:
            by_attack.setdefault(e["attack"], e)
        missing = [a for a in ("clean", *attacks) if a not in by_attack]
        if missing:
            raise ValueError(f"summaries: {name!r} has no entries for {missing}")
        clean = by_attack["clean"]
        clean_cell = format_mean_sd(clean["mean"][metric], clean["sd"][metric])
        row: dict[str, Any] = {"model": name, "clean": clean_cell}
        attacked = []
        for a in attacks:
            mean = by_attack[a]["mean"][metric]
            row[a] = format_mean_sd(mean, by_attack[a]["sd"][metric])
            attacked.append(mean)
        row["drop"] = clean["mean"][metric] - min(attacked) if attacked else math.nan
        row["clean_mean"], row["attacked_means"] = clean["mean"][metric], dict(zip(attacks, attacked))
        rows.append(row)
    return rows


def write_drop_table(
    path: str | os.PathLike,
    summaries: Mapping[str, Mapping[str, Any] | str | os.PathLike],
    attacks: Sequence[str],
    metric: str = "dice_mean",
    title: str = "",
) -> Path:
    """:func:`drop_table` as Markdown at ``path`` (and the rows as JSON beside it, ``.json`` suffix)."""
    rows = drop_table(summaries, attacks, metric)
    columns = ["model", "clean", *attacks, "drop"]
    text = (f"# {title}\n\n" if title else "") + markdown_table(
        rows, columns, headers=["Model", "Clean", *attacks, "Max drop"]
    )
    atomic_write_json(Path(path).with_suffix(".json"), rows)
    return atomic_write_text(path, text)
