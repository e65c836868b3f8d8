"""Gradient-masking diagnostics for a robustness claim (Athalye, Carlini, Wagner, ICML 2018; Carlini et
al. 2019, "On Evaluating Adversarial Robustness", arXiv:1902.06705, §5 checklist).

A defence that only hides its gradients (saturated softmax, distillation, non-differentiable steps)
looks robust to gradient attacks without being robust. :func:`masking_diagnostics` runs, on one batch
and an ε grid, the five sanity checks of that checklist and returns plain JSON-able dicts:

(a) ``monotone``: mean Dice under the attack does not increase with ε (clean Dice at ε = 0 included);
(b) ``large_eps``: at an ε covering the whole input range the attack reaches its goal (mean Dice ≤
    ``goal_dice``) — an unbounded attacker can draw any image;
(c) ``iterative_vs_single_step``: the iterative attack is at least as strong as one FGSM step;
(d) ``noise_weaker``: uniform noise U(−ε, ε) of the same size is weaker than the attack;
(e) ``transfer_weaker``: the attack crafted on a surrogate (for a distilled network the teacher, or
    the network's logits divided by a temperature T) and evaluated on the network is weaker than the
    white-box attack — a black-box transfer beating the white box means the white-box gradients mislead.

Each check is ``{"passed": bool | None, ...its numbers}`` (``None``: not run); ``flagged`` is true when
any check failed. "Stronger" and "weaker" allow ``tolerance`` of mean Dice. The default iterative attack
is :class:`common.attacks.APGD` (cross-entropy, 20 steps, lowest-Dice iterate per case); any factory
``(forward, eps) -> attack`` can replace it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from common.attacks import APGD, FGSM, case_dice
from common.validation import check_clip, check_image, check_nonnegative, check_probability, main_output

__all__ = ["masking_diagnostics", "CHECKS"]

CHECKS = ("monotone", "large_eps", "iterative_vs_single_step", "noise_weaker", "transfer_weaker")


def _mean_dice(forward: Callable, x: torch.Tensor, y: torch.Tensor, output: str, classes) -> float:
    with torch.no_grad():
        logits = main_output(forward(x))
    return float(case_dice(logits, y, output=output, classes=classes).mean())


def masking_diagnostics(
    forward: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_values: Sequence[float],
    clip: Sequence[float] | None = (0.0, 1.0),
    attack: Callable[[Callable, float], Callable] | None = None,
    surrogate: Callable | None = None,
    temperature: float | None = None,
    large_eps: float | None = None,
    goal_dice: float = 0.1,
    tolerance: float = 0.01,
    output: str = "auto",
    classes: int | Sequence[int] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The five checks (module docstring) for ``forward`` on the batch ``x`` (B, C, *spatial), ``y``.

    Args:
        eps_values: ε grid in input units (> 0).
        clip: valid input range; ``large_eps`` defaults to its width.
        attack: ``attack(forward, eps) -> (x, y) -> x_adv``; default APGD (CE, 20 steps, lowest-Dice iterate).
        surrogate: ``x -> logits`` of a surrogate model for check (e); or ``temperature`` T: the surrogate
            is the network's logits / T. Neither: check (e) is not run.
        goal_dice: mean Dice the unbounded attacker must reach in check (b).
        tolerance: slack in mean Dice for (a), (c), (d), (e).
        output, classes: what the Dice is computed on (:func:`common.attacks.case_dice`).
        seed: the uniform noise of check (d).

    Returns:
        ``{"eps", "clean_dice", "attack_dice", "single_step_dice", "noise_dice", "transfer_dice",
        "checks": {name: {"passed", ...}}, "flagged", "settings"}`` — floats, lists, bools, ``None``.
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
    if temperature is not None and surrogate is None:
        t = check_nonnegative(temperature, "temperature")
        if t == 0:
            raise ValueError("temperature: must be > 0")
        surrogate = lambda v: main_output(forward(v)) / t  # noqa: E731
    if surrogate is not None and not callable(surrogate):
        raise ValueError(f"surrogate: expected a callable returning logits, got {type(surrogate).__name__}")
    metric = lambda logits, t: case_dice(logits, t, output=output, classes=classes)  # noqa: E731
    if attack is None:
        attack = lambda f, e: APGD(f, e, steps=20, loss="ce", clip=clip, output=output, metric=metric)  # noqa: E731
    dice = lambda v: _mean_dice(forward, v, y, output, classes)  # noqa: E731

    clean = dice(x)
    generator = torch.Generator().manual_seed(int(seed))
    attacked, single, noisy, transfer = [], [], [], []
    for eps in eps_grid:
        attacked.append(dice(attack(forward, eps)(x, y)))
        single.append(dice(FGSM(forward, eps, loss="ce", clip=clip, output=output)(x, y)))
        noise = (2 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1).to(x.device) * eps
        x_noise = x + noise
        noisy.append(dice(x_noise.clamp(*clip) if clip is not None else x_noise))
        if surrogate is not None:
            transfer.append(dice(attack(surrogate, eps)(x, y)))
    large = dice(attack(forward, large_eps)(x, y))

    curve = [clean, *attacked]
    grid = [0.0, *eps_grid]
    rises = [
        {"eps_low": grid[i], "eps_high": grid[j], "dice_low": curve[i], "dice_high": curve[j]}
        for i in range(len(curve)) for j in range(i + 1, len(curve)) if curve[j] > curve[i] + tolerance
    ]
    checks: dict[str, dict[str, Any]] = {
        "monotone": {"passed": not rises, "rises": rises},
        "large_eps": {"passed": large <= goal_dice, "eps": large_eps, "dice": large, "goal_dice": goal_dice},
        "iterative_vs_single_step": {
            "passed": all(a <= s + tolerance for a, s in zip(attacked, single)),
            "weaker_at_eps": [e for e, a, s in zip(eps_grid, attacked, single) if a > s + tolerance],
        },
        "noise_weaker": {
            "passed": all(n >= a - tolerance for n, a in zip(noisy, attacked)),
            "noise_stronger_at_eps": [e for e, n, a in zip(eps_grid, noisy, attacked) if n < a - tolerance],
        },
        "transfer_weaker": {
            "passed": None if surrogate is None else all(t >= a - tolerance for t, a in zip(transfer, attacked)),
            "transfer_stronger_at_eps": [e for e, t, a in zip(eps_grid, transfer, attacked) if t < a - tolerance],
        },
    }
    return {
        "eps": eps_grid,
        "clean_dice": clean,
        "attack_dice": attacked,
        "single_step_dice": single,
        "noise_dice": noisy,
        "transfer_dice": transfer if surrogate is not None else None,
        "checks": checks,
        "flagged": any(c["passed"] is False for c in checks.values()),
        "settings": {"tolerance": tolerance, "goal_dice": goal_dice, "large_eps": large_eps,
                     "clip": list(clip) if clip is not None else None, "surrogate": surrogate is not None},
    }
