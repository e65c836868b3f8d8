"""Reports of the ResDSN paper (Li et al. 2019, ResDSN C2F): Table 6 (DSC and test time per case of several
whole-volume pipelines measured in one run) and Table 8 (clean and attacked DSC with the maximum drop).

- :func:`timed_evaluation`: every case through every named ``forward`` (coarse only, fine only, C2F …) —
  a configuration of the evaluation engine (:func:`common.evaluation.engine.evaluate`: one model per
  pipeline, the clean perturbation, wall-clock and CPU seconds per case around the complete prediction);
  writes ``per_case.csv``, ``summary.json`` and ``summary.md`` as one report set.
- :func:`drop_table` / :func:`write_drop_table` (:mod:`common.reporting.paper_tables`): rows of Table 8
  from the ``summary.json`` files written by :class:`common.evaluation.RobustnessSweep`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from common.evaluation.engine import Model, Scoring, clean, evaluate, run_and_write
from common.io import write_report_set
from common.metrics import EMPTY_CLASS_RULE
from common.report import csv_text
from common.reporting.paper_tables import drop_table, timing_table, write_drop_table

__all__ = ["timed_evaluation", "drop_table", "write_drop_table"]


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
        forwards: name → ``forward(x) -> logits`` (see :func:`common.evaluation.engine.predict_labels`),
            run on each batch in the mapping's order under ``torch.no_grad()``.
        data: batches ``{"image": (B, C, *spatial), "label": (B, 1, *spatial)}``, typically B = 1.
        postprocess: applied to every pipeline's labels (B, 1, *spatial) inside the timed region, e.g.
            ``functools.partial(common.c2f.remove_small_components, min_fraction=0.2)``.
        metric: the ``segmentation_scores`` key reported (``dice_mean``: foreground classes).
        settings: extra entries stored per pipeline in ``summary.json`` (e.g. each one's n).

    Seconds are per batch divided by its size: wall-clock (``seconds``, the paper's testing time) and the
    CPU time of this process over all its threads (``cpu_seconds``, ``time.process_time``), which other
    processes on a shared machine disturb far less than the wall clock. Writes ``per_case.csv`` (case_id,
    pipeline, seconds, cpu_seconds, every score), ``summary.json`` and ``summary.md`` to ``output_dir`` (rank 0
    under ``torchrun``); returns the summary.
    """
    if not isinstance(forwards, Mapping) or not forwards or not all(callable(f) for f in forwards.values()):
        raise ValueError("forwards: expected a non-empty mapping name -> forward(x)")
    scoring = Scoring(num_classes)
    known = scoring.metric_names()
    if metric not in known:
        raise ValueError(f"metric: {metric!r} not among {sorted(known)}")
    return run_and_write(output_dir, lambda: _timed_summary(forwards, data, scoring, postprocess, metric, settings),
                         lambda out: write_report_set(output_dir, {
                             "per_case.csv": csv_text(out[0]), "summary.json": json.dumps(out[1], indent=2) + "\n",
                             "summary.md": timing_table(out[1], title)}))[1]


def _timed_summary(forwards, data, scoring, postprocess, metric, settings) -> tuple[list[dict], dict[str, Any]]:
    """The per-case rows and the summary of :func:`timed_evaluation`."""
    models = {name: Model(f, postprocess=postprocess) for name, f in forwards.items()}
    result = evaluate(models, data, [clean()], scoring)
    rows = [{"case_id": r["case_id"], "pipeline": r["model"], "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"],
             **{k: v for k, v in r.items() if k.startswith(("dice_", "iou_"))}} for r in result.rows]
    entries = []
    for name in forwards:
        own = [r for r in rows if r["pipeline"] == name]
        values = np.array([r[metric] for r in own], dtype=np.float64)
        entries.append({
            "pipeline": name, "n": len(own), f"{metric}_mean": float(values.mean()),
            f"{metric}_sd": float(values.std(ddof=1)) if len(own) > 1 else None,
            f"{metric}_max": float(values.max()), f"{metric}_min": float(values.min()),
            "seconds_mean": float(np.mean([r["seconds"] for r in own])),
            "cpu_seconds_mean": float(np.mean([r["cpu_seconds"] for r in own])),
            **dict((settings or {}).get(name, {})),
        })
    summary = {"n_cases": len(rows) // len(forwards), "metric": metric, "empty_class_rule": EMPTY_CLASS_RULE,
               "entries": entries}
    return rows, summary
