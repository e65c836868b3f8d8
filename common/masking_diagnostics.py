"""Gradient-masking diagnostics for a robustness claim (Athalye, Carlini, Wagner, ICML 2018; Carlini et
al. 2019, "On Evaluating Adversarial Robustness", arXiv:1902.06705, §5 checklist).

A defence that only hides its gradients looks robust to gradient attacks without being robust. The
classic case is defensive distillation (Papernot et al., IEEE S&P 2016): trained at temperature T and
deployed at T = 1, the network's logits are about T times larger, its float32 softmax saturates to
exactly 1.0 and the cross-entropy gradient vanishes there (Carlini & Wagner 2016, arXiv:1607.04311);
attacking the logits divided by T, or a scale-invariant margin loss, removes the effect.

:func:`masking_diagnostics` runs, on one batch and an ε grid, six checks, each with every attack loss in
``losses`` — by default ``"ce"`` (cross-entropy: the loss a saturated softmax starves, so masking shows)
and ``"margin"`` (the masked logit margin of :class:`common.losses.SegmentationLoss`, invariant to any
rescaling of the logits):

(a) ``monotone``: mean Dice under the attack does not increase with ε (clean Dice at ε = 0 included);
(b) ``large_eps``: at an ε covering the whole input range the strongest attack reaches its goal (mean
    Dice ≤ ``goal_dice``) — an unbounded attacker can draw any image. Besides ``losses`` it runs the
    Jensen–Shannon loss of Croce et al. (ECCV 2024) with ``large_eps_steps`` (≥ ``steps``) iterations:
    cross-entropy keeps pushing pixels that are already wrong and can stall far from the goal even
    without masking (measured on the demo's NLCEN at ε = 1: CE leaves Dice 0.27 after 100 steps, JS 0.04);
    the check flags only when every loss leaves Dice above the goal;
(c) ``iterative_vs_single_step``: the iterative attack is at least as strong as one FGSM step;
(d) ``noise_weaker``: uniform noise U(−ε, ε) of the same size is weaker than the attack;
(e) ``transfer_weaker``: the attack crafted on a surrogate and evaluated on the network is weaker than
    the white-box one. Surrogate: ``surrogate`` (e.g. a distilled network's teacher), else the network's
    logits / ``temperature``, else — when check (f) finds a saturated softmax — the logits rescaled so
    that their median top-2 margin is ``RESCALED_MARGIN`` (a "rescaled-logits" attack à la Carlini &
    Wagner); else not run;
(f) ``gradient_health``: the fraction of pixels whose softmax probability of the labelled class is
    exactly 1.0 in the logits' dtype (their cross-entropy gradient through that logit is exactly 0) is at
    most ``saturation_threshold``, and no case has an exactly zero cross-entropy input gradient (a
    gradient attack cannot move it); also reported: pixels with an exactly zero cross-entropy gradient
    with respect to all logits, and the median top-2 logit margin.

Each check is ``{"passed": bool | None, "reason": one sentence, ...its numbers}`` (``None``: not run); a
check with several losses fails when any loss fails it (``"failed_losses"``). ``flagged`` is true when any
check failed. "Stronger" and "weaker" allow ``tolerance`` of mean Dice. Every attack is
:class:`common.attacks.APGD` (``steps`` steps, lowest-Dice iterate per case); a factory
``attack(forward, eps, loss) -> attack`` can replace it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from common.attacks import APGD, FGSM, case_dice
from common.losses import LOSS_NAMES, RESCALED_MARGIN, SegmentationLoss
from common.validation import (
    check_clip,
    check_image,
    check_nonnegative,
    check_positive_int,
    check_probability,
    main_output,
)

__all__ = ["masking_diagnostics", "gradient_health", "CHECKS", "RESCALED_MARGIN"]

CHECKS = (
    "monotone", "large_eps", "iterative_vs_single_step", "noise_weaker", "transfer_weaker", "gradient_health",
)


def _mean_dice(forward: Callable, x: torch.Tensor, y: torch.Tensor, output: str, classes) -> float:
    with torch.no_grad():
        logits = main_output(forward(x))
    return float(case_dice(logits, y, output=output, classes=classes).mean())


def gradient_health(forward: Callable, x: torch.Tensor, y: torch.Tensor, output: str = "auto") -> dict:
    """Saturation of the network's output on ``(x, y)``, computed in the logits' own dtype.

    Returns ``{"saturated_fraction"``: pixels (softmax; sigmoid: channel-pixels) whose probability of the
    labelled class is exactly 1.0; ``"zero_logit_gradient_fraction"``: pixels whose cross-entropy gradient
    with respect to every logit is exactly 0; ``"zero_input_gradient_cases"``: fraction of cases whose
    mean cross-entropy has an exactly zero gradient with respect to the input; ``"median_margin"``: median
    over pixels of the top-2 logit margin |z_(1) − z_(2)| (sigmoid: |z|)}.
    """
    xg = x.detach().requires_grad_(True)
    logits = main_output(forward(xg))
    mode = SegmentationLoss("ce", output=output)
    z = logits.detach().requires_grad_(True)
    if mode.mode(logits) == "softmax":
        labels = y[:, :1].long()
        p_true = torch.softmax(z.detach(), 1).gather(1, labels)[:, 0]
        ce = F.cross_entropy(z, labels[:, 0], reduction="none")
        top2 = z.detach().topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
    else:
        t = mode.binary_labels(logits, y)
        p_true = torch.sigmoid(torch.where(t > 0.5, z.detach(), -z.detach()))
        ce = F.binary_cross_entropy_with_logits(z, t, reduction="none")
        margin = z.detach().abs()
    (g_logits,) = torch.autograd.grad(ce.sum(), [z])
    zero_logit = (g_logits == 0).all(1) if mode.mode(logits) == "softmax" else g_logits == 0
    ce_x = (F.cross_entropy(logits, y[:, 0].long(), reduction="none") if mode.mode(logits) == "softmax"
            else F.binary_cross_entropy_with_logits(logits, t, reduction="none"))
    (g_x,) = torch.autograd.grad(ce_x.flatten(1).mean(1).sum(), [xg])
    return {
        "saturated_fraction": float((p_true == 1.0).double().mean()),
        "zero_logit_gradient_fraction": float(zero_logit.double().mean()),
        "zero_input_gradient_cases": float((g_x.flatten(1).abs().amax(1) == 0).double().mean()),
        "median_margin": float(margin.double().median()),
    }


def masking_diagnostics(
    forward: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_values: Sequence[float],
    clip: Sequence[float] | None = (0.0, 1.0),
    losses: Sequence[str] = ("ce", "margin"),
    steps: int = 20,
    large_eps_steps: int = 50,
    attack: Callable[[Callable, float, Any], Callable] | None = None,
    surrogate: Callable | None = None,
    temperature: float | None = None,
    large_eps: float | None = None,
    goal_dice: float = 0.1,
    tolerance: float = 0.01,
    saturation_threshold: float = 0.5,
    output: str = "auto",
    classes: int | Sequence[int] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The six checks (module docstring) for ``forward`` on the batch ``x`` (B, C, *spatial), ``y``.

    Args:
        eps_values: ε grid in input units (> 0).
        clip: valid input range; ``large_eps`` defaults to its width.
        losses: attack losses, each run through every check: names of :data:`common.losses.LOSS_NAMES`.
        steps: APGD iterations of the default attack.
        attack: ``attack(forward, eps, loss) -> (x, y) -> x_adv`` (``loss`` a name or a loss object);
            default APGD (``steps``, lowest-Dice iterate per case).
        surrogate: ``x -> logits`` of a surrogate model for check (e) (e.g. the teacher); or
            ``temperature`` T: the surrogate is the network's logits / T.
        goal_dice: mean Dice the unbounded attacker must reach in check (b).
        tolerance: slack in mean Dice for (a), (c), (d), (e).
        saturation_threshold: largest fraction of saturated pixels check (f) accepts.
        output, classes: what the Dice is computed on (:func:`common.attacks.case_dice`).
        seed: the uniform noise of check (d).

    Returns:
        ``{"eps", "clean_dice", "losses", "attack_dice", "single_step_dice", "noise_dice", "transfer_dice",
        "gradient_health", "surrogate", "checks": {name: {"passed", "reason", ...}}, "flagged",
        "settings"}``; ``attack_dice`` etc. map each loss to its list over ε — floats, lists, bools, ``None``.
    """
    if not callable(forward):
        raise ValueError(f"forward: expected a callable returning logits, got {type(forward).__name__}")
    check_image(x, "x")
    eps_grid = sorted(check_nonnegative(e, "eps_values") for e in eps_values)
    if not eps_grid or eps_grid[0] <= 0:
        raise ValueError(f"eps_values: expected a non-empty list of values > 0, got {list(eps_values)}")
    clip = check_clip(clip)
    if large_eps is None:
        if clip is None:
            raise ValueError("large_eps: needed when clip is None (no input range to cover)")
        large_eps = clip[1] - clip[0]
    large_eps = check_nonnegative(large_eps, "large_eps")
    goal_dice = check_probability(goal_dice, "goal_dice", open_interval=False)
    tolerance = check_nonnegative(tolerance, "tolerance")
    saturation_threshold = check_probability(saturation_threshold, "saturation_threshold", False)
    steps = check_positive_int(steps, "steps")
    large_eps_steps = max(steps, check_positive_int(large_eps_steps, "large_eps_steps"))
    if isinstance(losses, str) or not losses:
        raise ValueError(f"losses: expected a non-empty list of loss names, got {losses!r}")
    unknown = [name for name in losses if name not in LOSS_NAMES]
    if unknown:
        raise ValueError(f"losses: expected names of {LOSS_NAMES}, got {unknown[0]!r}")
    if temperature is not None:
        temperature = check_nonnegative(temperature, "temperature")
        if temperature == 0:
            raise ValueError("temperature: must be > 0")
    if surrogate is not None and not callable(surrogate):
        raise ValueError(f"surrogate: expected a callable returning logits, got {type(surrogate).__name__}")
    if attack is not None and not callable(attack):
        raise ValueError(f"attack: expected a factory (forward, eps, loss) -> attack, got {type(attack)}")
    metric = lambda logits, t: case_dice(logits, t, output=output, classes=classes)  # noqa: E731
    large_attack = attack
    if attack is None:
        def attack(f, e, loss, n=steps):
            return APGD(f, e, steps=n, loss=loss, clip=clip, output=output, metric=metric)

        large_attack = functools.partial(attack, n=large_eps_steps)
    dice = lambda v: _mean_dice(forward, v, y, output, classes)  # noqa: E731

    health = gradient_health(forward, x, y, output)
    saturated = health["saturated_fraction"] > saturation_threshold
    surrogate_kind = "given" if surrogate is not None else None
    if surrogate is None:
        scale = temperature
        if scale is not None:
            surrogate_kind = f"logits / {scale:g} (temperature)"
        elif saturated and health["median_margin"] > RESCALED_MARGIN:
            scale = health["median_margin"] / RESCALED_MARGIN
            surrogate_kind = f"logits / {scale:.4g} (rescaled to median margin {RESCALED_MARGIN:g})"
        if scale is not None:
            surrogate = lambda v, s=scale: main_output(forward(v)) / s  # noqa: E731

    clean = dice(x)
    attacked = {n: [] for n in losses}
    single = {n: [] for n in losses}
    transfer = {n: [] for n in losses}
    large = {}
    noisy = []
    generator = torch.Generator().manual_seed(int(seed))
    for eps in eps_grid:
        noise = (2 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1).to(x.device) * eps
        x_noise = x + noise
        noisy.append(dice(x_noise.clamp(*clip) if clip is not None else x_noise))
        for name in losses:
            attacked[name].append(dice(attack(forward, eps, name)(x, y)))
            single[name].append(dice(FGSM(forward, eps, loss=name, clip=clip, output=output)(x, y)))
            if surrogate is not None:
                transfer[name].append(dice(attack(surrogate, eps, name)(x, y)))
    for name in dict.fromkeys([*losses, "js"]):
        large[name] = dice(large_attack(forward, large_eps, name)(x, y))

    grid = [0.0, *eps_grid]
    rises = {}
    for name in losses:
        curve = [clean, *attacked[name]]
        found = [
            {"eps_low": grid[i], "eps_high": grid[j], "dice_low": curve[i], "dice_high": curve[j]}
            for i in range(len(curve)) for j in range(i + 1, len(curve)) if curve[j] > curve[i] + tolerance
        ]
        if found:
            rises[name] = found

    def beaten(worse: dict, better: dict | list) -> dict[str, list[float]]:
        """Per loss, the ε where ``better`` (a list over ε, or one per loss) beats ``worse`` (lower Dice)."""
        out = {}
        for n in losses:
            ref = better[n] if isinstance(better, dict) else better
            at = [e for e, w, b in zip(eps_grid, worse[n], ref) if b < w - tolerance]
            if at:
                out[n] = at
        return out

    weaker = beaten(attacked, single)
    noise_stronger = beaten(attacked, noisy)
    transfer_stronger = beaten(attacked, transfer) if surrogate is not None else {}
    fail_large = dict(large) if min(large.values()) > goal_dice else {}

    def verdict(found: dict, good: str, bad: str) -> dict[str, Any]:
        names = ", ".join(sorted(found))
        reason = bad.format(names) if found else good
        return {"passed": not found, "failed_losses": sorted(found), "reason": reason}

    sat, dead = health["saturated_fraction"], health["zero_input_gradient_cases"]
    limit = f"{saturation_threshold:.0%}"
    if dead:
        health_reason = (f"{dead:.0%} of the cases have an exactly zero cross-entropy input gradient: "
                         "a gradient attack cannot move them.")
    elif saturated:
        health_reason = (f"{sat:.1%} of pixels have a softmax saturated to exactly 1.0 (> {limit}): their "
                         "cross-entropy gradient vanishes, an attack on it sees only the unsaturated pixels.")
    else:
        health_reason = (f"{sat:.1%} of pixels have a softmax saturated to exactly 1.0 (≤ {limit}) and every "
                         "case has a non-zero input gradient.")
    checks: dict[str, dict[str, Any]] = {
        "monotone": {
            **verdict(rises, "Mean Dice under every attack loss is non-increasing in ε.",
                      "Mean Dice rises with ε under the {} attack, which a working attack never allows."),
            "rises": rises},
        "large_eps": {
            **verdict(fail_large, f"At ε = {large_eps:g} the strongest attack drives mean Dice to ≤ {goal_dice:g}.",
                      f"At ε = {large_eps:g} every attack ({{}}) leaves mean Dice above {goal_dice:g}, "
                      "though an unbounded attacker can draw any image."),
            "eps": large_eps, "dice": large, "goal_dice": goal_dice},
        "iterative_vs_single_step": {
            **verdict(weaker, "The iterative attack is at least as strong as one FGSM step for every loss.",
                      "One FGSM step beats the iterative {} attack: its iterations follow bad gradients."),
            "weaker_at_eps": weaker},
        "noise_weaker": {
            **verdict(noise_stronger, "Uniform noise of the same size is weaker than every attack.",
                      "Uniform noise of the same size beats the {} attack: its gradients are uninformative."),
            "noise_stronger_at_eps": noise_stronger},
        "transfer_weaker": {
            **(verdict(transfer_stronger,
                       f"The attack from the surrogate ({surrogate_kind}) is weaker than the white-box one.",
                       f"The attack from the surrogate ({surrogate_kind}) beats the white-box {{}} attack: "
                       "the network's own gradients mislead.")
               if surrogate is not None else
               {"passed": None, "failed_losses": [],
                "reason": "Not run: no surrogate, no temperature, and the softmax is not saturated."}),
            "transfer_stronger_at_eps": transfer_stronger},
        "gradient_health": {
            "passed": not saturated and not dead, "failed_losses": [], "threshold": saturation_threshold,
            **health,
            "reason": health_reason,
        },
    }
    return {
        "eps": eps_grid,
        "clean_dice": clean,
        "losses": list(losses),
        "attack_dice": attacked,
        "single_step_dice": single,
        "noise_dice": noisy,
        "transfer_dice": transfer if surrogate is not None else None,
        "large_eps_dice": large,
        "gradient_health": health,
        "surrogate": surrogate_kind,
        "checks": checks,
        "flagged": any(c["passed"] is False for c in checks.values()),
        "settings": {"tolerance": tolerance, "goal_dice": goal_dice, "large_eps": large_eps, "steps": steps, "large_eps_steps": large_eps_steps,
                     "saturation_threshold": saturation_threshold,
                     "clip": list(clip) if clip is not None else None},
    }

