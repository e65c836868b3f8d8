"""Evaluation: the one engine (:mod:`common.evaluation.engine`) and its configurations.

``engine`` runs the per-case loop ``(models, batches, perturbations) -> rows`` and imports no reporting
module; the configurations on top of it — the robustness sweep (:mod:`common.evaluation.sweep`), the
certification run (:mod:`common.certification_report`), the C2F timing evaluation
(:mod:`common.c2f_eval`) and the robustness card (:mod:`common.card.runner`) — choose models,
perturbations and scoring, and hand the rows to :mod:`common.reporting`.

Names that bundle configs and scripts use are importable from here.
"""

from common.evaluation.engine import (
    ROW_KEYS,
    CaseCache,
    Model,
    Perturbation,
    Result,
    Scoring,
    attacked,
    build_attack,
    clean,
    evaluate,
    predict_labels,
    progress_bar,
    settings_hash,
    smoothed,
)
from common.evaluation.sweep import KEY_COLUMNS, RobustnessSweep, evaluate_cases, summarise, write_reports
from common.stats import compare_with_clean, paired_wilcoxon

__all__ = [
    "ROW_KEYS", "KEY_COLUMNS", "CaseCache", "Model", "Perturbation", "Result", "Scoring", "attacked",
    "build_attack", "clean", "evaluate", "predict_labels", "progress_bar", "settings_hash", "smoothed",
    "RobustnessSweep", "evaluate_cases", "summarise", "write_reports",
    "compare_with_clean", "paired_wilcoxon",
]
