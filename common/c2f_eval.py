"""Reports of the ResDSN paper (Li et al. 2019, ResDSN C2F): Table 6 (DSC and test time per case of several whole-volume
pipelines measured in one run) and Table 8 (clean and attacked DSC with the maximum drop).

- :func:`timed_evaluation`: every case through every named ``forward`` (coarse only, fine only, C2F …),
  wall-clock seconds per case with ``time.perf_counter`` around the complete prediction, Dice per case;
  writes ``per_case.csv``, ``summary.json`` and ``summary.md``.
- :func:`drop_table`: rows of Table 8 from the ``summary.json`` files written by
  :class:`common.evaluation.RobustnessSweep`: clean Dice, Dice under each attack, and the maximum drop
  (clean minus the worst attacked Dice, the paper's "Drop" column).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.evaluation import predict_labels
from common.io import atomic_write_json, atomic_write_text
from common.metrics import segmentation_scores
from common.report import csv_text, format_mean_sd, markdown_table
from common.validation import check_image, check_label_map, check_positive_int

__all__ = ["timed_evaluation", "drop_table", "write_drop_table"]


def _plain(t: Any) -> Any:
    return t.as_tensor() if hasattr(t, "as_tensor") and isinstance(t, torch.Tensor) else t


def timed_evaluation(
    forwards: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    data: Iterable[Mapping[str, Any]],
    num_classes: int,
    output_dir: str | os.PathLike,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    metric: str = "dice_mean",
    title: str = "",
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Table 6: mean ± sd Dice and mean seconds per case of every pipeline in ``forwards``.

    Args:
        forwards: name → ``forward(x) -> logits or labels`` (see ``common.evaluation.predict_labels``),
            run on each batch in the mapping's order under ``torch.no_grad()``.
        data: batches ``{"image": (B, C, *spatial), "label": (B, 1, *spatial)}``, typically B = 1.
        postprocess: applied to every pipeline's labels (B, 1, *spatial) inside the timed region, e.g.
            ``functools.partial(common.c2f.remove_small_components, min_fraction=0.2)``.
        metric: the ``segmentation_scores`` key reported (``dice_mean``: foreground classes).
        settings: extra entries stored per pipeline in ``summary.json`` (e.g. each one's n).

    Seconds are per batch divided by its size: wall-clock (``seconds``, the paper's testing time) and the
    CPU time of this process over all its threads (``cpu_seconds``, ``time.process_time``), which other
    processes on a shared machine disturb far less than the wall clock. Writes ``per_case.csv`` (case, pipeline, seconds, every
    score), ``summary.json`` and ``summary.md`` to ``output_dir`` atomically; returns the summary.
    """
    if not isinstance(forwards, Mapping) or not forwards or not all(callable(f) for f in forwards.values()):
        raise ValueError("forwards: expected a non-empty mapping name -> forward(x)")
    num_classes = check_positive_int(num_classes, "num_classes")
    rows: list[dict[str, Any]] = []
    n = 0
    for batch in data:
        x, y = _plain(batch["image"]), _plain(batch["label"]).long()
        check_image(x, "image")
        check_label_map(y, x, "label", num_classes)
        ids = [str(n + i) for i in range(x.shape[0])]
        for name, forward in forwards.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            with torch.no_grad():
                pred = predict_labels(forward, x, num_classes)
                if postprocess is not None:
                    pred = postprocess(pred)
            seconds = (time.perf_counter() - start) / x.shape[0]
            cpu_seconds = (time.process_time() - start_cpu) / x.shape[0]
            scores = segmentation_scores(_plain(pred).long(), y, num_classes)
            if metric not in scores:
                raise ValueError(f"metric: {metric!r} not among {sorted(scores)}")
            for i, cid in enumerate(ids):
                rows.append({"case_id": cid, "pipeline": name, "seconds": seconds, "cpu_seconds": cpu_seconds,
                             **{k: float(v[i]) for k, v in scores.items()}})
        n += x.shape[0]
    if n == 0:
        raise ValueError("data: no cases")
    entries = []
    for name in forwards:
        own = [r for r in rows if r["pipeline"] == name]
        values = np.array([r[metric] for r in own], dtype=np.float64)
        secs = np.array([r["seconds"] for r in own], dtype=np.float64)
        cpu = np.array([r["cpu_seconds"] for r in own], dtype=np.float64)
        entries.append({
            "pipeline": name, "n": len(own), f"{metric}_mean": float(values.mean()),
            f"{metric}_sd": float(values.std(ddof=1)) if len(own) > 1 else None,
            f"{metric}_max": float(values.max()), f"{metric}_min": float(values.min()),
            "seconds_mean": float(secs.mean()), "cpu_seconds_mean": float(cpu.mean()), **dict((settings or {}).get(name, {})),
        })
    summary = {"n_cases": n, "metric": metric, "entries": entries}
    table = [
        {"pipeline": e["pipeline"], "dice": format_mean_sd(e[f"{metric}_mean"], e[f"{metric}_sd"]),
         "max": e[f"{metric}_max"], "min": e[f"{metric}_min"], "seconds": e["seconds_mean"],
        }
        for e in entries
    ]
    columns = ["pipeline", "dice", "max", "min", "seconds"]
    text = (f"# {title}\n\n" if title else "") + markdown_table(
        table, columns, headers=["Method", f"Mean {metric}", "Max", "Min", "Testing time (s / case)"]
    ) + f"\n{n} cases, measured in one run; time per case includes all stages and post-processing.\n"
    out = Path(output_dir)
    atomic_write_text(out / "per_case.csv", csv_text(rows))
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", text)
    return summary


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
