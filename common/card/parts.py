"""The measured parts of a robustness card for one case: clean Dice, attacks, certification, timing.

Everything runs on ``common``: :func:`common.evaluation.predict_labels` and
:func:`common.metrics.segmentation_scores` (MONAI ``DiceMetric``) for Dice, :mod:`common.attacks` for
FGSM / I-FGSM and the targeted I-FGSM toward the inverted mask (NLCEN, He et al., AAAI 2019), :func:`common.certify.
certify` and :func:`common.certify.certified_metrics` for randomized smoothing (Laousy et al. 2023).
One case's result is a plain JSON record (:func:`evaluate_case`), so it can be cached and reused.

Randomness: certification noise comes from a ``torch.Generator`` seeded by :func:`part_seed` from the
card's seed, the case id and the part name, so a case gives the same numbers whatever its position in
the datalist and whether it was computed in this run or an earlier one. The attacks are deterministic.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.attacks import FGSM, IFGSM, Attack, inverted_target
from common.certify import certified_metrics, certify
from common.evaluation import predict_labels
from common.metrics import segmentation_scores

__all__ = [
    "ATTACKS",
    "PartSettings",
    "attack_settings",
    "build_attack",
    "part_seed",
    "part_generator",
    "cert_part",
    "evaluate_case",
    "example_slice",
    "mean_or_none",
    "sd_or_none",
    "timings",
]

#: name -> (class, loss, targeted); I-FGSM steps and α come from :class:`PartSettings`.
ATTACKS: dict[str, tuple[str, str, bool]] = {
    "FGSM-dice": ("FGSM", "dice", False),
    "FGSM-ce": ("FGSM", "ce", False),
    "IFGSM-dice": ("IFGSM", "dice", False),
    "IFGSM-ce": ("IFGSM", "ce", False),
    "targeted-IFGSM-dice": ("IFGSM", "dice", True),
    "targeted-IFGSM-ce": ("IFGSM", "ce", True),
}
#: α of I-FGSM as a multiple of ε / steps (Madry et al. 2018's 2.5 ε / N)
ALPHA_FACTOR = 2.5
#: clean forward passes per case; their median time is the card's unit of cost
CLEAN_REPEATS = 3
TARGET = "inverted mask (background -> class 1, every other class -> background)"


@dataclass(frozen=True)
class PartSettings:
    """What one case is evaluated with. ε and σ are in network-input units; ``clip`` is the valid input
    range of the attacks (or ``None``)."""

    eps: tuple[float, ...]
    sigmas: tuple[float, ...]
    steps: int
    n0: int
    n: int
    alpha: float
    tau: float
    correction: str
    batch_size: int
    seed: int
    clip: tuple[float, float] | None
    attacks: tuple[str, ...] = tuple(ATTACKS)


def attack_settings(steps: int, attacks: Sequence[str] = tuple(ATTACKS)) -> dict[str, dict[str, Any]]:
    """The card's description of every attack (``settings.attacks`` of SCHEMA.md)."""
    out = {}
    for name in attacks:
        kind, loss, targeted = ATTACKS[name]
        iterative = kind != "FGSM"
        out[name] = {
            "attack": kind,
            "loss": loss,
            "targeted": targeted,
            "steps": steps if iterative else 1,
            "alpha": f"{ALPHA_FACTOR:g}*eps/steps" if iterative else "eps",
            "target": TARGET if targeted else None,
        }
    return out


def build_attack(name: str, forward: Callable, eps: float, steps: int, clip) -> Attack:
    """The attack ``name`` of :data:`ATTACKS` at ε (input units)."""
    kind, loss, targeted = ATTACKS[name]
    if kind == "FGSM":
        return FGSM(forward, eps, loss=loss, clip=clip)
    target_fn = functools.partial(inverted_target, foreground=1) if targeted else None
    return IFGSM(forward, eps, alpha=ALPHA_FACTOR * eps / steps, steps=steps, loss=loss, targeted=targeted,
                 clip=clip, target_fn=target_fn)


def part_seed(seed: int, case_id: str, part: str) -> int:
    """A 63-bit seed from the card's seed, the case id and the part name (stable across runs and orders)."""
    digest = hashlib.sha256(f"{seed}|{case_id}|{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def part_generator(seed: int, case_id: str, part: str, device: torch.device | str = "cpu") -> torch.Generator:
    """``torch.Generator`` on ``device`` seeded with :func:`part_seed`."""
    return torch.Generator(device=device).manual_seed(part_seed(seed, case_id, part))


def cert_part(sigma_fraction: float) -> str:
    """The part name of certification at σ (given in the card's σ unit)."""
    return f"certification@sigma={sigma_fraction:g}"


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _dice(pred: torch.Tensor, y: torch.Tensor, num_classes: int, names: Sequence[str]) -> dict[str, float]:
    scores = segmentation_scores(pred, y, num_classes, include_background=False, class_names=list(names))
    return {c: float(scores[f"dice_{c}"][0]) for c in names[1:]}


def example_slice(y: torch.Tensor) -> tuple[int | None, int | None]:
    """For a 3D label (1, 1, X, Y, Z): the last spatial axis (2) and the slice with the most foreground;
    ``(None, None)`` for 2D."""
    if y.ndim == 4:
        return None, None
    counts = (y[0, 0] > 0).sum(dim=(0, 1))
    return 2, int(torch.argmax(counts))


def _plane(t: torch.Tensor, axis: int | None, index: int | None) -> np.ndarray:
    """(1, C, *spatial) → the 2-D (H, W) plane of channel 0 (for 3D, ``index`` along spatial ``axis``)."""
    a = t[0, 0]
    if axis is not None:
        a = a.select(axis, index)
    return a.detach().cpu().numpy()


def evaluate_case(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    case_id: str,
    class_names: Sequence[str],
    settings: PartSettings,
    sigma_names: Sequence[float],
    example: tuple[str, int, int] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Evaluate one case: x (1, C, *spatial) float, y (1, 1, *spatial) int64.

    Args:
        sigma_names: the σ grid in the card's unit (names the certification parts; ``settings.sigmas`` are
            the same values in input units).
        example: ``(attack name, ε index, σ index)`` to keep as the card's example slices, or ``None``.

    Returns:
        the JSON record ``{"case_id", "clean": {class: Dice}, "attacks": {name: [{class: Dice} per ε]},
        "certification": [{"certified_dice": {class: Dice | None}, "abstain_fraction"} per σ],
        "timing": {"clean_forward": s (median of 3 passes), <attack name>: s per ε (mean),
        <certification part>: s}}``, and the
        example arrays of SCHEMA.md (or ``None``).
    """
    k = len(class_names)
    timing: dict[str, float] = {}
    spent = []
    for _ in range(CLEAN_REPEATS):  # the median of a few passes: the reference of every cost ratio
        start = time.perf_counter()
        clean_pred = predict_labels(forward, x, k)
        spent.append(time.perf_counter() - start)
    timing["clean_forward"] = float(np.median(spent))
    record: dict[str, Any] = {"case_id": case_id, "clean": _dice(clean_pred, y, k, class_names),
                              "attacks": {}, "certification": []}
    kept: dict[str, torch.Tensor] = {}
    for name in settings.attacks:
        per_eps, spent = [], 0.0
        for j, eps in enumerate(settings.eps):
            start = time.perf_counter()
            x_adv = build_attack(name, forward, eps, settings.steps, settings.clip)(x, y)
            pred = predict_labels(forward, x_adv, k)
            spent += time.perf_counter() - start
            per_eps.append(_dice(pred, y, k, class_names))
            if example is not None and (name, j) == example[:2]:
                kept["adversarial"], kept["pred_adversarial"] = x_adv, pred
        record["attacks"][name] = per_eps
        timing[name] = spent / len(settings.eps)
    for i, (sigma, label) in enumerate(zip(settings.sigmas, sigma_names)):
        part = cert_part(label)
        start = time.perf_counter()
        cert = certify(forward, x, sigma, n0=settings.n0, n=settings.n, alpha=settings.alpha,
                       tau=settings.tau, correction=settings.correction, batch_size=settings.batch_size,
                       generator=part_generator(settings.seed, case_id, part, x.device))
        timing[part] = time.perf_counter() - start
        scores = certified_metrics(cert, y, k, include_background=False)
        record["certification"].append({
            "certified_dice": {c: _finite_or_none(scores[f"dice_{i_c}"][0])
                               for i_c, c in enumerate(class_names) if i_c > 0},
            "abstain_fraction": float(scores["abstained_fraction"][0]),
            "certified_radius": float(cert.radius),
        })
        if example is not None and i == example[2]:
            kept["pred_certified"] = cert.labels[:, None]
    record["timing"] = timing
    if example is None:
        return record, None
    axis, index = example_slice(y)
    arrays = {
        "image": _plane(x, axis, index).astype(np.float32),
        "adversarial": _plane(kept["adversarial"], axis, index).astype(np.float32),
        "label": _plane(y, axis, index).astype(np.int64),
        "pred_clean": _plane(clean_pred, axis, index).astype(np.int64),
        "pred_adversarial": _plane(kept["pred_adversarial"], axis, index).astype(np.int64),
        "pred_certified": _plane(kept["pred_certified"], axis, index).astype(np.int64),
    }
    arrays["perturbation"] = arrays["adversarial"] - arrays["image"]
    record["example"] = {"slice_axis": axis, "slice_index": index}
    return record, arrays


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of the defined values, ``None`` when there is none."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def sd_or_none(values: Sequence[float | None]) -> float | None:
    """Sample sd (ddof 1) of the defined values, ``None`` with fewer than two."""
    vals = [v for v in values if v is not None]
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else None


def timings(records: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Mean seconds per case of every timed part over the records."""
    parts = list(next(iter(records.values()))["timing"])
    return {p: float(np.mean([r["timing"][p] for r in records.values()])) for p in parts}
