"""Report writers: per-case CSV, Markdown tables, mean ± sd strings, metric-vs-ε plots.

Every writer renders its whole content in memory first and then writes it through :mod:`common.io`,
so a file appears whole or not at all. Plots use matplotlib's object API (``Figure`` +
``FigureCanvasAgg``) rather than ``pyplot``: no global backend switch, no global figure state, safe to
call from any program.

The plot reads a *summary* as built by :func:`common.evaluation.summarise`::

    {"entries": [{"attack": "clean" | name, "eps": float, "eps_display": float, "n": int,
                  "mean": {metric: float | None}, "sd": {metric: float | None}, ...}, ...], ...}
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.io import atomic_path, atomic_write_text

__all__ = [
    "csv_text",
    "write_csv",
    "format_mean_sd",
    "markdown_table",
    "render_metric_vs_eps",
    "plot_metric_vs_eps",
    "write_bytes",
]

CLEAN = "clean"


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Union of the rows' keys in order of first appearance (a stable column order)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """CSV text of ``rows`` (one dict per row); missing cells are empty, floats keep full precision."""
    if isinstance(rows, Mapping) or not all(isinstance(r, Mapping) for r in rows):
        raise ValueError("rows: expected a list of dicts")
    columns = list(columns) if columns is not None else _columns(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> Path:
    """Write ``rows`` to ``path`` as CSV, atomically; columns in first-appearance order unless given."""
    return atomic_write_text(path, csv_text(rows, columns))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_mean_sd(mean: float | None, sd: float | None = None, digits: int = 3) -> str:
    """``"0.821 ± 0.042"`` as in the papers' tables; the sd is left out when missing or not finite
    (one case), ``"inf"`` / ``"-inf"`` for an infinite mean (PSNR of an unchanged input), ``"-"`` when
    there is no mean."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if not _finite(mean):
        return "inf" if float(mean) > 0 else "-inf"
    text = f"{mean:.{digits}f}"
    if _finite(sd):
        text += f" ± {sd:.{digits}f}"
    return text


def _cell(value: Any, float_format: str) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = format(value, float_format) if math.isfinite(value) else str(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    float_format: str = ".3f",
    headers: Sequence[str] | None = None,
) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` restricted to ``columns``.

    Floats are formatted with ``format(value, float_format)``, ``None`` and missing cells print as
    ``-``; ``headers`` (default the column keys) name the columns.
    """
    columns = list(columns)
    if not columns:
        raise ValueError("columns: expected at least one column")
    headers = list(headers) if headers is not None else columns
    if len(headers) != len(columns):
        raise ValueError(f"headers: expected {len(columns)} headers, got {len(headers)}")
    try:
        format(1.0, float_format)
    except ValueError as err:
        raise ValueError(f"float_format: not a float format spec: {float_format!r}") from err
    lines = [
        "| " + " | ".join(_cell(h, float_format) for h in headers) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), float_format) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def render_metric_vs_eps(
    summary: Mapping[str, Any],
    metric: str,
    eps_label: str = "ε",
    title: str = "",
    ylabel: str | None = None,
    dpi: int = 120,
) -> bytes:
    """PNG bytes of ``metric`` (mean ± sd band) against ε in display units, one line per attack.

    Every attack's line starts at the clean entry (ε = 0) when the summary has one: an attack of
    strength 0 is the clean input.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries = list(summary.get("entries", []))
    if not any(metric in e.get("mean", {}) for e in entries):
        raise ValueError(f"metric: {metric!r} not in the summary")
    clean = next((e for e in entries if e["attack"] == CLEAN), None)
    attacks = list(dict.fromkeys(e["attack"] for e in entries if e["attack"] != CLEAN))

    fig = Figure(figsize=(5.5, 4.0), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    def _value(v: Any) -> float:
        return float(v) if v is not None else math.nan

    for name in attacks:
        points = sorted((e for e in entries if e["attack"] == name), key=lambda e: e["eps_display"])
        if clean is not None:
            points = [clean, *points]
        xs = [0.0 if e is clean else float(e["eps_display"]) for e in points]
        means = [_value(e["mean"].get(metric)) for e in points]
        sds = [_value(e["sd"].get(metric)) for e in points]
        sds = [0.0 if math.isnan(s) else s for s in sds]
        (line,) = ax.plot(xs, means, marker="o", label=name)
        ax.fill_between(
            xs, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
            color=line.get_color(), alpha=0.2, linewidth=0,
        )
    if not attacks and clean is not None:
        ax.plot([0.0], [_value(clean["mean"].get(metric))], marker="o", label=CLEAN)
    ax.set_xlabel(eps_label)
    ax.set_ylabel(ylabel or metric)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_metric_vs_eps(
    path: str | os.PathLike,
    summary: Mapping[str, Any],
    metric: str,
    eps_label: str = "ε",
    title: str = "",
    ylabel: str | None = None,
    dpi: int = 120,
) -> Path:
    """Write :func:`render_metric_vs_eps`'s PNG to ``path`` atomically."""
    return write_bytes(path, render_metric_vs_eps(summary, metric, eps_label, title, ylabel, dpi))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
