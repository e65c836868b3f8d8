"""Qualitative attack figures in the shape of Fig. 9 of Liu et al. (2021, "Robustifying deep networks for
medical image segmentation", J. Digit. Imaging 34, doi:10.1007/s10278-021-00507-5): per case one row of
five panels — input slice, ground truth, clean prediction, perturbation δ = x_adv − x, attacked prediction.

3D cases (1, C, X, Y, Z) show the axial slice (last axis) with the most foreground; 2D cases (1, C, H, W)
are shown whole. The cases are evaluated by the engine (:func:`common.evaluation.engine.evaluate`), so the
Dice in each title is the engine's row for that case."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from common.evaluation import engine
from common.io import atomic_write_bytes
from common.reporting.plots import label_colours, new_figure, png_bytes

__all__ = ["evaluate_examples", "qualitative_panels", "render_qualitative", "write_qualitative"]

Panel = tuple[str, np.ndarray, Any, float, float]  # title, image, colour map (None: RGB), vmin, vmax


def _most_foreground_slice(y: torch.Tensor) -> int | None:
    """For a 3D label (1, C, X, Y, Z) the index of the last-axis slice with the most foreground; None for 2D."""
    return None if y.ndim == 4 else int(torch.argmax((y[0] > 0).any(0).sum(dim=(0, 1))))


def _plane(t: torch.Tensor, k: int | None, channel: int = 0) -> np.ndarray:
    """Channel ``channel`` of case 0 of ``t``, slice ``k`` of the last axis (3D) or whole (2D), float64."""
    plane = t[0, channel] if k is None else t[0, channel, ..., k]
    return plane.double().numpy()


def evaluate_examples(model: Callable, batches: Iterable, attack_name: str, eps: float, attack: Callable,
                      scoring: engine.Scoring) -> engine.Result:
    """Clean and attacked evaluation of ``batches`` (one case each) keeping, per case, the inputs, labels and
    predictions as artifacts ``{"<case>/clean" | "<case>/attack": {"x", "pred", "y"}}``."""

    def observer(k, ids, model, pert, x, y, outcome):
        return {f"{ids[0]}/{pert.kind}": {"x": outcome["x"].detach().cpu(), "pred": outcome["pred"].cpu(),
                                          "y": y.cpu()}}

    perturbations = [engine.clean(), engine.attacked(attack_name, eps, attack)]
    return engine.evaluate(model, list(batches), perturbations, scoring, observer=observer)


def qualitative_panels(clean: Mapping[str, torch.Tensor], adv: Mapping[str, torch.Tensor], num_classes: int,
                       input_range: Sequence[float] = (0.0, 1.0), channel: int = 0) -> list[Panel]:
    """The five panels of one case from its clean and attacked artifacts (``x``, ``pred``, ``y``): labels
    coloured by :func:`common.reporting.plots.label_colours`; δ on a symmetric colour scale ±max|δ|."""
    k = _most_foreground_slice(clean["y"])
    delta = _plane(adv["x"] - clean["x"], k, channel)
    lim = max(float(np.abs(delta).max()), 1e-12)
    lo, hi = (float(v) for v in input_range)
    return [
        (f"input (channel {channel})", _plane(clean["x"], k, channel), "gray", lo, hi),
        ("ground truth", label_colours(_plane(clean["y"], k), num_classes), None, 0, 1),
        ("clean prediction", label_colours(_plane(clean["pred"], k), num_classes), None, 0, 1),
        (f"perturbation, max |δ| = {lim:.3g}", delta, "RdBu_r", -lim, lim),
        ("attacked prediction", label_colours(_plane(adv["pred"], k), num_classes), None, 0, 1),
    ]


def render_qualitative(panels: Sequence[Panel], title: str) -> bytes:
    """One row of ``panels`` under ``title``, as PNG bytes (the project's plot style)."""
    fig = new_figure(2.4 * len(panels), 2.9)
    for ax, (name, data, cmap, lo, hi) in zip(fig.subplots(1, len(panels)), panels):
        ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return png_bytes(fig)


def _case_dice(result: engine.Result, case: str, kind: str) -> float:
    row = next(r for r in result.rows if r["case_id"] == case and r["kind"] == kind)
    return float(row.get("dice_WT", row.get("dice_mean")))


def write_qualitative(model: Callable, batches: Iterable, attack_name: str, eps: float, attack: Callable,
                      num_classes: int, output_dir: str, run_name: str, regions: Mapping | None = None,
                      input_range: Sequence[float] = (0.0, 1.0), channel: int = 0, num_cases: int = 3) -> list[str]:
    """Evaluate the first ``num_cases`` batches clean and under ``attack`` at ``eps`` and write one PNG per
    case, ``output_dir/<case>.png`` (atomic); the title gives ``run_name``, the attack and the Dice (WT when
    ``regions`` has it, else the mean) of both predictions. Returns the written paths."""
    if not isinstance(num_cases, int) or isinstance(num_cases, bool) or num_cases < 1:
        raise ValueError(f"num_cases: expected an integer >= 1, got {num_cases!r}")
    os.makedirs(output_dir, exist_ok=True)
    if not os.access(output_dir, os.W_OK):
        raise ValueError(f"output_dir: {output_dir} is not writable")
    chosen = [b for _, b in zip(range(num_cases), batches)]
    result = evaluate_examples(model, chosen, attack_name, eps, attack, engine.Scoring(num_classes, regions=regions))
    cases = list(dict.fromkeys(key.rsplit("/", 1)[0] for key in result.artifacts))
    paths = []
    for case in cases:
        clean, adv = result.artifacts[f"{case}/clean"], result.artifacts[f"{case}/attack"]
        title = (f"{run_name}, case {case}: {attack_name} at eps = {eps:g}; Dice "
                 f"{'WT' if regions and 'WT' in regions else 'mean'} clean {_case_dice(result, case, 'clean'):.3f}, "
                 f"attacked {_case_dice(result, case, 'attack'):.3f}")
        path = os.path.join(output_dir, f"{case}.png")
        atomic_write_bytes(path, render_qualitative(qualitative_panels(clean, adv, num_classes, input_range, channel),
                                                    title))
        paths.append(path)
    return paths
