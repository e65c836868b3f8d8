"""Tables 1 and 2 of Pervin et al., arXiv:2105.12106 in shape, from the ``unet_advaug`` bundle's outputs.

- :func:`iou_over_epochs_table` (Table 1: validation IoU of each model after selected epochs) reads the
  CSVs that :class:`common.handlers.MetricHistory` writes during training.
- :func:`robustness_table` (Table 2: IoU of each model under FGSM / inverse FGSM at each ε, ε = 0 the
  clean row) reads robustness-sweep summaries (``summary.json``).

Both return Markdown text; the caller writes it with :mod:`common.io`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.report import markdown_table

__all__ = ["iou_over_epochs_table", "robustness_table"]


def _read_history(path: Path, metric: str) -> dict[int, float]:
    if not path.is_file():
        raise FileNotFoundError(f"history: no such file {path}")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or metric not in rows[0]:
        raise ValueError(f"history {path}: no column '{metric}'")
    return {int(r["epoch"]): float(r[metric]) for r in rows}


def iou_over_epochs_table(
    histories: Mapping[str, str | os.PathLike], epochs: Sequence[int] | None = None,
    metric: str = "val_mean_iou", digits: int = 4,
) -> str:
    """Table 1 in shape: one row per model (``histories``: name → :class:`common.handlers.MetricHistory`
    CSV), one column per epoch in ``epochs`` (default every epoch recorded by all models) holding ``metric``."""
    data = {name: _read_history(Path(p), metric) for name, p in histories.items()}
    if not data:
        raise ValueError("histories: empty")
    if epochs is None:
        epochs = sorted(set.intersection(*(set(d) for d in data.values())))
    rows = [
        {"model": n, **{f"e{e}": (f"{d[e]:.{digits}f}" if e in d else "-") for e in epochs}}
        for n, d in data.items()
    ]
    headers = ["Model", *(f"epoch {e}" for e in epochs)]
    return markdown_table(rows, ["model", *(f"e{e}" for e in epochs)], headers=headers)


def robustness_table(
    summaries: Mapping[str, Mapping[str, Any]], attack: str, metric: str = "iou_lesion", digits: int = 4,
) -> str:
    """Table 2 in shape: one row per model (``summaries``: name → a robustness sweep's ``summary.json`` dict),
    one column per ε (ε = 0 is the clean row) holding the mean ``metric`` under ``attack``."""
    rows, eps_all = [], None
    for name, summary in summaries.items():
        values = {}
        for e in summary["entries"]:
            if e["attack"] in ("clean", attack):
                values[float(e["eps_display"])] = e["mean"].get(metric)
        if len(values) < 2:
            raise ValueError(f"summaries: {name!r} has no entries of attack {attack!r}")
        if all(v is None for v in values.values()):
            raise ValueError(f"metric: {metric!r} is not among the means of summaries[{name!r}]")
        eps_all = sorted(values) if eps_all is None else eps_all
        cells = {f"{k:g}": ("-" if values.get(k) is None else f"{values[k]:.{digits}f}") for k in eps_all}
        rows.append({"model": name, **cells})
    if not rows:
        raise ValueError("summaries: empty")
    cols = [f"{k:g}" for k in eps_all]
    return markdown_table(rows, ["model", *cols], headers=[f"Model ({attack}, ε →)", *cols])
