"""Tables and number formats of every report: per-case CSV, Markdown tables, mean ± sd strings.

Text is rendered whole in memory; :func:`write_csv` writes through :mod:`common.io` (whole or not at
all). Figures are in :mod:`common.reporting.plots`, the papers' tables in
:mod:`common.reporting.paper_tables`.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.io import atomic_write_text

__all__ = ["csv_text", "write_csv", "format_mean_sd", "markdown_table"]

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
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def format_mean_sd(mean: float | None, sd: float | None = None, digits: int = 3, missing: str = "-") -> str:
    """``"0.821 ± 0.042"`` as in the papers' tables (and the card); the sd is left out when missing or not
    finite (one case), ``"inf"`` / ``"-inf"`` for an infinite mean (PSNR of an unchanged input),
    ``missing`` when there is no mean (None or NaN)."""
    if mean is None or (isinstance(mean, numbers.Real) and math.isnan(float(mean))):
        return missing
    if not _finite(mean):
        return "inf" if float(mean) > 0 else "-inf"
    text = f"{float(mean):.{digits}f}"
    if _finite(sd):
        text += f" ± {float(sd):.{digits}f}"
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
