"""Per-case worst case over an ensemble of attacks (the SEA / AutoAttack convention: Croce, Singh, Hein,
ECCV 2024; Croce & Hein, ICML 2020): robust Dice at ε is, per case, the lowest Dice any attack reached.

:class:`WorstCase` runs its attacks one after the other on the same clean batch and keeps, per case, the
adversarial input with the lowest :func:`case_dice` (mean foreground Dice, or the Dice of one named class
or region). Cheap attacks run first and a case whose Dice reached ``stop_dice`` (0 by default) is not
attacked further. Every member is built per call with ``metric=case_dice`` so it returns its own
lowest-Dice iterate. Deterministic given ``seed`` (members with a random start draw from
``torch.Generator().manual_seed(seed + k)``).

:data:`DEFAULT_ENSEMBLE` is the configuration sweeps and the robustness card use; its strength and cost
against an independent SEA-style reference are measured by ``scripts/bench_attack.py`` and reported in
``docs/threat_model.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from common.attacks.apgd import APGD
from common.attacks.base import Attack, Number, PixelwiseAttack
from common.attacks.classic import FGSM, IFGSM, PGD, InvFGSM, KurakinIFGSM
from common.attacks.segmentation import CosPGD, SegPGD
from common.losses import unpack_bits
from common.validation import main_output

__all__ = ["WorstCase", "worst_case_attack", "case_dice", "select_attacks", "DEFAULT_ENSEMBLE", "ATTACKS"]

#: every attack class by name (bundle configs and the robustness card select attacks by these names)
ATTACKS: dict[str, type] = {
    "FGSM": FGSM,
    "InvFGSM": InvFGSM,
    "IFGSM": IFGSM,
    "PGD": PGD,
    "KurakinIFGSM": KurakinIFGSM,
    "APGD": APGD,
    "SegPGD": SegPGD,
    "CosPGD": CosPGD,
}

#: the default worst case: (name, keyword arguments) in running order — 250 gradient evaluations per case at
#: most. APGD on soft Dice and on JS were chosen on the chest-phantom UNet against an independent SEA-style
#: reference of 400 (APGD × {masked CE, balanced masked CE, JS}, SegPGD, CosPGD; docs/threat_model.md).
#: Both are losses of the softmax probabilities, whose gradient vanishes where a large-logit network
#: (defensive distillation) saturates float32; the same two losses of the logits rescaled per image
#: (``"rescaled_dice"``, ``"rescaled_js"``) are invariant to the logit scale and close that gap
#: (docs/threat_model.md, "The default ensemble and the logit scale"). The old members stay, so per case
#: the default is never weaker than before.
DEFAULT_ENSEMBLE: tuple[tuple[str, dict[str, Any]], ...] = (
    ("APGD", {"loss": "dice", "steps": 50}),
    ("APGD", {"loss": "rescaled_dice", "steps": 50}),
    ("APGD", {"loss": "rescaled_js", "steps": 50}),
    ("APGD", {"loss": "js", "steps": 100}),
)


def case_dice(
    logits: torch.Tensor,
    y: torch.Tensor,
    output: str = "auto",
    classes: int | Sequence[int] | Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Dice of the predicted segmentation per case (B,), float64.

    Softmax (or ``"auto"`` with K ≥ 2): prediction = argmax; ``classes`` None → mean over the foreground
    classes 1 … K − 1; an int → that class; a list → the region (union) of those labels; a list of lists →
    the mean over those regions (BraTS WT / TC / ET: ``[[1, 2, 3], [1, 3], [3]]``). One channel
    (``"auto"``) or ``"sigmoid"``: prediction = logit > 0 per channel against the 0/1 target (a
    K-channel mask, or packed bits); ``classes`` None → mean over channels, an int → that channel.
    A class absent from both prediction and label is left out of the mean; a case with none left
    scores 1.
    """
    k = logits.shape[1]
    sigmoid = output == "sigmoid" or (output == "auto" and k == 1)
    if sigmoid:
        pred = logits > 0
        target = (y if y.shape[1] == k else unpack_bits(y, k)) > 0.5
        channels = range(k) if classes is None else [int(classes)] if isinstance(classes, int) else list(classes)
        if any(isinstance(c, Sequence) for c in channels):
            raise ValueError(f"classes: a sigmoid output takes channel indices, got {classes!r}")
        pairs = [(pred[:, c], target[:, c]) for c in channels]
    else:
        pred, labels = logits.argmax(1), y[:, 0].long()
        if classes is None:
            pairs = [(pred == c, labels == c) for c in range(1, k)]
        elif isinstance(classes, int):
            pairs = [(pred == classes, labels == classes)]
        else:
            regions = list(classes)
            if not all(isinstance(r, Sequence) for r in regions):
                regions = [regions]
            pairs = []
            for r in regions:
                region = torch.as_tensor(list(r), device=labels.device)
                pairs.append((torch.isin(pred, region), torch.isin(labels, region)))
    scores = []
    for p, t in pairs:
        inter = (p & t).flatten(1).sum(1).double()
        total = p.flatten(1).sum(1).double() + t.flatten(1).sum(1).double()
        scores.append(torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.full_like(total, math.nan)))
    stacked = torch.stack(scores, 1)
    valid = ~torch.isnan(stacked)
    mean = torch.where(valid, stacked, torch.zeros_like(stacked)).sum(1) / valid.sum(1).clamp_min(1)
    return torch.where(valid.any(1), mean, torch.ones_like(mean))


class WorstCase(Attack):
    """Per-case worst case over a list of attacks (SEA-style ensemble).

    Args:
        forward, eps, clip, output, clip_input: as :class:`~common.attacks.base.Attack`.
        attacks: the members, run in this order: ``(name or class, kwargs)`` pairs built per call with
            ``forward``, ``eps``, ``clip``, ``output`` (and, for APGD / SegPGD / CosPGD, ``metric=case_dice``
            and ``stop_metric``), or ready :class:`Attack` objects (used as they are, per-sample values
            re-indexed for the cases still attacked). ``None``: :data:`DEFAULT_ENSEMBLE`.
        classes: what the Dice is computed on (:func:`case_dice`): ``None`` mean foreground Dice, an int one
            class (sigmoid: one channel), a list of labels one region, a list of such lists the mean over
            those regions.
        stop_dice: a case whose Dice is ≤ this value is not attacked further (``None``: run everything).
        seed: seeds the random starts of the members.

    ``attack(x, y)`` returns x_adv; :meth:`run` returns ``(x_adv, records)`` with records
    ``{"attacks": [names], "dice": (B, M) float64 (NaN where a member did not run), "chosen": (B,) index of
    the member whose input was kept (−1: no member ran, x_adv = x), "clean_dice": (B,)}``.
    """

    def __init__(
        self,
        forward: Callable,
        eps: Number | torch.Tensor,
        clip: Sequence[float] | None = None,
        attacks: Sequence[tuple[str | type, Mapping[str, Any]] | Attack] | None = None,
        classes: int | Sequence[int] | None = None,
        stop_dice: float | None = 0.0,
        seed: int = 0,
        output: str = "auto",
        clip_input: bool = False,
    ) -> None:
        super().__init__(forward, eps, loss="ce", clip=clip, output=output, clip_input=clip_input)
        members = DEFAULT_ENSEMBLE if attacks is None else attacks
        if isinstance(members, (str, bytes)) or not isinstance(members, Sequence) or not members:
            raise ValueError("attacks: expected a non-empty list of (name, kwargs) pairs or Attack objects")
        self.members: list[tuple[str, Any]] = []
        for k, member in enumerate(members):
            if isinstance(member, Attack):
                self.members.append((type(member).__name__, member))
                continue
            try:
                kind, kwargs = member
                kwargs = dict(kwargs)
            except (TypeError, ValueError):
                raise ValueError(f"attacks: item {k} is neither an Attack nor a (name, kwargs) pair: {member!r}") from None
            cls = ATTACKS.get(kind) if isinstance(kind, str) else kind
            if not (isinstance(cls, type) and issubclass(cls, Attack)):
                raise ValueError(f"attacks: item {k}: unknown attack {kind!r}; known: {sorted(ATTACKS)}")
            reserved = {"forward", "eps", "clip", "output"} & set(kwargs)
            if reserved:
                raise ValueError(f"attacks: item {k} sets {sorted(reserved)}, which the ensemble sets itself")
            label = f"{cls.__name__}({kwargs.get('loss', 'ce')}, {kwargs.get('steps', 1)})"
            self.members.append((label, (cls, kwargs)))
        self.classes = classes
        self.stop_dice = None if stop_dice is None else float(stop_dice)
        self.seed = int(seed)
        self.metric = functools.partial(case_dice, output=output, classes=classes)
        # validate every member's arguments now, not after the first expensive one ran
        for k in range(len(self.members)):
            self._build(k, torch.arange(1), probe=True)
        self.last_records: dict[str, Any] = {}

    def _build(self, k: int, index: torch.Tensor, probe: bool = False) -> Attack:
        label, spec = self.members[k]
        if isinstance(spec, Attack):
            return spec if probe else spec.subset(index)
        cls, kwargs = spec
        kwargs = dict(kwargs)
        eps = self.eps if not isinstance(self.eps, torch.Tensor) or probe else self.eps[index.to(self.eps.device)]
        if probe and isinstance(eps, torch.Tensor):
            eps = float(eps.max())
        if issubclass(cls, PixelwiseAttack):
            kwargs.setdefault("metric", self.metric)
            if self.stop_dice is not None:
                kwargs.setdefault("stop_metric", self.stop_dice)
        if "generator" in cls.__init__.__code__.co_varnames and "generator" not in kwargs:
            kwargs["generator"] = torch.Generator().manual_seed(self.seed + k)
        try:
            return cls(self.forward, eps=eps, clip=self.clip, output=self.output, clip_input=self.clip_input, **kwargs)
        except TypeError as err:
            raise ValueError(f"attacks: item {k} ({label}): {err}") from None

    def _dice(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = main_output(self.forward(x))
        self.check_output(logits)
        return self.metric(logits, y).to("cpu", torch.float64)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        clean = self._dice(x, y)
        best_x, best = x.clone(), clean.clone()
        dice = torch.full((b, len(self.members)), math.nan, dtype=torch.float64)
        chosen = torch.full((b,), -1, dtype=torch.long)
        for k in range(len(self.members)):
            active = torch.arange(b) if self.stop_dice is None else torch.nonzero(best > self.stop_dice).flatten()
            if active.numel() == 0:
                break
            index = active.to(x.device)
            x_adv = self._build(k, active)(x[index], y[index])
            d = self._dice(x_adv, y[index])
            dice[active, k] = d
            better = d < best[active] if k else torch.ones_like(d, dtype=torch.bool)
            better |= chosen[active] < 0
            keep = active[better]
            best[keep] = d[better]
            best_x[keep.to(x.device)] = x_adv[better.to(x.device)]
            chosen[keep] = k
        self.last_records = {
            "attacks": [label for label, _ in self.members],
            "dice": dice,
            "chosen": chosen,
            "clean_dice": clean,
        }
        return best_x

    def run(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(x_adv, records)`` (see the class docstring)."""
        x_adv = self(x, y)
        return x_adv, self.last_records

    def __repr__(self) -> str:
        names = ", ".join(label for label, _ in self.members)
        return f"WorstCase(eps={self.eps}, clip={self.clip}, attacks=[{names}], classes={self.classes})"


ATTACKS["WorstCase"] = WorstCase


def worst_case_attack(
    forward: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Number | torch.Tensor,
    clip: Sequence[float] | None = (0.0, 1.0),
    attacks: Sequence | None = None,
    return_records: bool = False,
    **kwargs: Any,
):
    """The default per-case worst case of ``forward`` at ε: ``x_adv`` (or ``(x_adv, records)`` with
    ``return_records=True``); ``kwargs`` go to :class:`WorstCase` (``classes``, ``stop_dice``, ``seed``,
    ``output``, ``clip_input``)."""
    attack = WorstCase(forward, eps, clip=clip, attacks=attacks, **kwargs)
    x_adv, records = attack.run(x, y)
    return (x_adv, records) if return_records else x_adv


def select_attacks(
    attacks: Mapping[str, Callable], names: Sequence[str] | None = None, **extra: Callable
) -> dict[str, Callable]:
    """The attacks of a bundle config chosen by name: ``names`` from ``attacks`` and ``extra`` (e.g.
    ``worst_case=<WorstCase factory>``), in the order given; ``None`` keeps ``attacks`` as they are.

    Bundle configs call it as ``common.attacks.select_attacks(@attack#attacks, @attack#attack_names,
    worst_case=@attack#worst_case)``, so ``--attack#attack_names "['fgsm', 'worst_case']"`` adds the
    worst case to a run."""
    if names is None:
        return dict(attacks)
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"attack_names: expected a non-empty list of attack names or null, got {names!r}")
    catalogue = {**attacks, **extra}
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        raise ValueError(f"attack_names: unknown {unknown}; this config defines {sorted(catalogue)}")
    return {n: catalogue[n] for n in names}
