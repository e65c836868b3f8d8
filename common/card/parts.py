"""The measured parts of a robustness card, as a configuration of the evaluation engine.

:func:`card_perturbations` lists what every case goes through — clean (the median of
:data:`CLEAN_REPEATS` timed passes), each attack of :data:`ATTACKS` at each ε (built by
:func:`common.evaluation.engine.build_attack` from :data:`common.attacks.ATTACKS` with the attack classes'
own defaults, e.g. I-FGSM's α = ε / N), the SEA-style worst-case ensemble (:class:`common.attacks.WorstCase`, Croce, Singh, Hein, ECCV 2024) of the
budget (:data:`BUDGETS`) at each ε, and randomized smoothing at each σ (Laousy et al., MICCAI 2023) —
and :func:`common.evaluation.engine.evaluate` runs them, one row per case and part.
:func:`example_observer` keeps the example slices of the first case.

Randomness: certification noise comes from a ``torch.Generator`` seeded by :func:`part_seed` from the
card's seed, the case id and the part name, so a case gives the same numbers whatever its position in
the datalist and whether it was computed in this run or an earlier one. The attacks are deterministic.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.attacks import DEFAULT_ENSEMBLE, inverted_target
from common.evaluation.engine import Perturbation, attacked, build_attack, clean, smoothed
from common.stats import mean_or_none, sd_or_none  # noqa: F401 (re-exported: the card's summaries)

__all__ = [
    "ATTACKS",
    "BUDGETS",
    "WORST_CASE",
    "CLEAN_REPEATS",
    "PartSettings",
    "attack_settings",
    "card_perturbations",
    "part_seed",
    "part_generator",
    "cert_part",
    "example_observer",
    "example_slice",
    "mean_or_none",
    "sd_or_none",
]

#: name -> (attack class in common.attacks.ATTACKS, loss, targeted); steps come from :class:`PartSettings`.
ATTACKS: dict[str, tuple[str, str, bool]] = {
    "FGSM-dice": ("FGSM", "dice", False),
    "FGSM-ce": ("FGSM", "ce", False),
    "IFGSM-dice": ("IFGSM", "dice", False),
    "IFGSM-ce": ("IFGSM", "ce", False),
    "targeted-IFGSM-dice": ("IFGSM", "dice", True),
    "targeted-IFGSM-ce": ("IFGSM", "ce", True),
}
#: the card's name of the SEA-style ensemble (:class:`common.attacks.WorstCase`), a part like any attack
WORST_CASE = "WorstCase"

#: ``--budget``: the card's attacks, I-FGSM steps, the ensemble's members (``None``: no ensemble) and the
#: certification's n0 / n. ``standard`` uses :data:`common.attacks.DEFAULT_ENSEMBLE` as it is.
BUDGETS: dict[str, dict[str, Any]] = {
    "quick": {"attacks": ("FGSM-ce", "IFGSM-ce", "IFGSM-dice"), "steps": 5, "ensemble": None, "n0": 8, "n": 32},
    "standard": {"attacks": tuple(ATTACKS), "steps": 10, "ensemble": DEFAULT_ENSEMBLE, "n0": 10, "n": 100},
    "thorough": {"attacks": tuple(ATTACKS), "steps": 20,
                 "ensemble": (("APGD", {"loss": "dice", "steps": 100}), ("APGD", {"loss": "rescaled_dice", "steps": 100}),
                              ("APGD", {"loss": "rescaled_js", "steps": 100}), ("APGD", {"loss": "js", "steps": 200}),
                              ("SegPGD", {"loss": "ce", "steps": 100}), ("CosPGD", {"loss": "ce", "steps": 100})),
                 "n0": 20, "n": 500},
}
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
    output: str = "softmax"
    ensemble: tuple[tuple[str, Mapping[str, Any]], ...] | None = None


def attack_settings(steps: int, attacks: Sequence[str] = tuple(ATTACKS),
                    ensemble: Sequence[tuple[str, Mapping[str, Any]]] | None = None) -> dict[str, dict[str, Any]]:
    """The card's description of every attack (``settings.attacks`` of the card schema); the ensemble (if
    any) is the entry :data:`WORST_CASE` with its members."""
    out: dict[str, dict[str, Any]] = {}
    if ensemble:
        out[WORST_CASE] = {"attack": "WorstCase", "loss": "per member", "targeted": False,
                           "steps": int(sum(int(kw.get("steps", 1)) for _, kw in ensemble)), "alpha": "per member",
                           "target": None,
                           "members": [{"attack": name, **{k: v for k, v in kw.items()}} for name, kw in ensemble],
                           "selection": "per case, the member input with the lowest mean foreground Dice"}
    for name in attacks:
        kind, loss, targeted = ATTACKS[name]
        iterative = kind != "FGSM"
        out[name] = {
            "attack": kind,
            "loss": loss,
            "targeted": targeted,
            "steps": steps if iterative else 1,
            "alpha": "eps/steps" if iterative else "eps",
            "target": TARGET if targeted else None,
        }
    return out


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


def card_perturbations(
    forward: Callable, settings: PartSettings, sigma_names: Sequence[float], certify: bool = True
) -> list[Perturbation]:
    """Clean, every attack of ``settings.attacks`` at every ε, and (with ``certify``) smoothing at every σ
    (named :func:`cert_part` of ``sigma_names``, the σ grid in the card's unit)."""
    perts = [clean()]
    for name in settings.attacks:
        kind, loss, targeted = ATTACKS[name]
        kwargs: dict[str, Any] = {"loss": loss, "clip": settings.clip, "output": settings.output}
        if kind != "FGSM":
            kwargs.update(steps=settings.steps, targeted=targeted,
                          target_fn=functools.partial(inverted_target, foreground=1) if targeted else None)
        perts += [attacked(name, eps, build_attack(kind, forward, eps, **kwargs)) for eps in settings.eps]
    if settings.ensemble:
        members = [(name, dict(kw)) for name, kw in settings.ensemble]
        perts += [attacked(WORST_CASE, eps, build_attack("WorstCase", forward, eps, clip=settings.clip,
                                                         attacks=members, output=settings.output,
                                                         seed=settings.seed))
                  for eps in settings.eps]
    if certify:
        for sigma, label in zip(settings.sigmas, sigma_names):
            part, seed = cert_part(label), settings.seed
            gen = functools.partial(_case_generator, seed, part)
            perts.append(smoothed(sigma, settings.n0, settings.n, settings.alpha, settings.tau, settings.correction,
                                  settings.batch_size, gen, name=part))
    return perts


def _case_generator(seed: int, part: str, ids: Sequence[str], device: torch.device) -> torch.Generator:
    return part_generator(seed, ids[0], part, device)


def example_slice(y: torch.Tensor) -> tuple[int | None, int | None]:
    """For a 3D label (1, C, X, Y, Z): the last spatial axis (2) and the slice with the most foreground;
    ``(None, None)`` for 2D."""
    if y.ndim == 4:
        return None, None
    counts = (y[0] > 0).any(0).sum(dim=(0, 1))
    return 2, int(torch.argmax(counts))


def composite_labels(t: torch.Tensor) -> torch.Tensor:
    """(1, K, *spatial) multi-label masks (sigmoid outputs; -1 = abstained) → (1, 1, *spatial) one map for
    display: the last channel that is on, plus 1 (0: none on; -1 where any channel abstained). A one-channel
    map is returned as it is."""
    if t.shape[1] == 1:
        return t
    k = torch.arange(1, t.shape[1] + 1, device=t.device).view(1, -1, *([1] * (t.ndim - 2)))
    out = torch.where(t == 1, k, torch.zeros_like(k)).amax(1, keepdim=True)
    return torch.where((t < 0).any(1, keepdim=True), torch.full_like(out, -1), out)


def _plane(t: torch.Tensor, axis: int | None, index: int | None) -> np.ndarray:
    """(1, C, *spatial) → the 2-D (H, W) plane of channel 0 (for 3D, ``index`` along spatial ``axis``)."""
    a = t[0, 0]
    if axis is not None:
        a = a.select(axis, index)
    return a.detach().cpu().numpy()


def example_observer(first_case: str, attack: str, eps: float, sigma: float) -> Callable:
    """An engine observer keeping the card's example planes of ``first_case``: the clean image and prediction,
    the ``attack`` at ``eps`` and its prediction, the certified map at ``sigma`` (input units) — keyed
    ``"<case_id>/<array>"`` so the engine caches them with the case."""

    def keep(k, ids, model, pert, x, y, outcome) -> dict[str, np.ndarray] | None:
        if ids[0] != first_case:
            return None
        axis, index = example_slice(y)
        out = {"slice": np.array([-1 if axis is None else axis, -1 if index is None else index])}
        labels = (lambda t: _plane(composite_labels(t), axis, index).astype(np.int64))
        if pert.kind == "clean":
            out.update(image=_plane(x, axis, index).astype(np.float32), label=labels(y),
                       pred_clean=labels(outcome["pred"]))
        elif pert.kind == "attack" and (pert.name, pert.eps) == (attack, eps):
            out.update(adversarial=_plane(outcome["x"], axis, index).astype(np.float32),
                       pred_adversarial=labels(outcome["pred"]))
        elif pert.kind == "smoothing" and pert.sigma == sigma:
            out["pred_certified"] = labels(outcome["pred"])
        return {f"{ids[0]}/{name}": value for name, value in out.items()}

    return keep


def rows_by_part(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, float, float], dict[str, Mapping]]:
    """{(perturbation, ε, σ): {case_id: row}} of engine rows."""
    out: dict[tuple[str, float, float], dict[str, Mapping]] = {}
    for r in rows:
        out.setdefault((r["perturbation"], r["eps"], r["sigma"]), {})[r["case_id"]] = r
    return out
