"""Auto-PGD (Croce & Hein, ICML 2020), L∞, with a step size and checkpoints of its own for every image.

Algorithm 1 of the paper, per image b of a batch (f = the attack's per-image loss, maximised; α = 0.75):

    x⁽⁰⁾ = x,  η = 2ε,  x⁽¹⁾ = P(x⁽⁰⁾ + η sign ∇f(x⁽⁰⁾)),
    z⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + η sign ∇f(x⁽ᵏ⁾)),
    x⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + α (z⁽ᵏ⁺¹⁾ − x⁽ᵏ⁾) + (1 − α)(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾)),      k = 1 … N − 1,

P the projection onto the ε-ball and ``clip``. Checkpoints w_j = ⌈p_j N⌉ with p₀ = 0, p₁ = 0.22,
p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) (:func:`apgd_checkpoints`). When x⁽ʷʲ⁾ is reached, η is
halved and the iterate restarts from the best point so far, x⁽ʷʲ⁾ ← x_max, if

1. f rose in fewer than ρ = 75 % of the steps since the last checkpoint:
   Σ_{i=w_{j−1}}^{w_j−1} 1[f(x⁽ⁱ⁺¹⁾) > f(x⁽ⁱ⁾)] < ρ (w_j − w_{j−1}), or
2. neither η nor the best loss changed since the last checkpoint: η was not halved at w_{j−1}
   (η⁽ʷʲ⁻¹⁾ = η⁽ʷʲ⁾, η⁽ᵏ⁾ the step size in force before checkpoint k's decision) and
   f_max⁽ʷʲ⁻¹⁾ = f_max⁽ʷʲ⁾ (f_max⁽ᵏ⁾ = max_{i ≤ k} f(x⁽ⁱ⁾)).

The point x_max of highest loss is returned per image (or the lowest-``metric`` iterate, see
:class:`~common.attacks.base.PixelwiseAttack`). N gradient evaluations and one more forward pass.
``history`` holds, after a call, the step sizes η used at every step (N, B), the loss of every iterate
(N + 1, B), the checkpoints and the restarts — the schedule a test can replay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from common.attacks.base import BestIterate, Number, PixelwiseAttack, _broadcast, _per_sample
from common.validation import check_positive_int

__all__ = ["APGD", "apgd_checkpoints"]


def apgd_checkpoints(steps: int) -> list[int]:
    """The checkpoints w_j = ⌈p_j · steps⌉ in 1 … steps − 1, distinct and increasing (Croce & Hein 2020, §3.2)."""
    steps = check_positive_int(steps, "steps")
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # round before the ceiling: 0.22 + 0.19 is 0.41000000000000003 in floating point
    points = sorted({math.ceil(round(q * steps, 9)) for q in p[1:]})
    return [w for w in points if 1 <= w <= steps - 1]


class APGD(PixelwiseAttack):
    """Auto-PGD (Croce & Hein, ICML 2020) with any per-image loss (the SEA losses of Croce, Singh, Hein,
    ECCV 2024: ``"masked_ce"``, ``"balanced_masked_ce"``, ``"js"``; the logit-scale-invariant ``"margin"`` and
    ``"rescaled_<name>"``; or ``"ce"``, ``"dice"``).

    Args:
        steps: iterations N (gradient evaluations).
        rho: fraction of increasing steps below which η is halved (0.75).
        momentum: α of the update (0.75).
        random_start: start from a uniform point of the ε-ball instead of x (``generator`` draws it).
        metric, stop_metric: see :class:`~common.attacks.base.PixelwiseAttack`.
    """

    def __init__(
        self,
        forward: Callable,
        eps: Number | torch.Tensor,
        steps: int = 100,
        loss: str | Callable = "ce",
        clip: Sequence[float] | None = None,
        targeted: bool = False,
        rho: float = 0.75,
        momentum: float = 0.75,
        random_start: bool = False,
        generator: torch.Generator | None = None,
        metric: Callable | None = None,
        stop_metric: float | None = None,
        target_fn: Callable | None = None,
        **options,
    ) -> None:
        super().__init__(
            forward, eps, loss=loss, targeted=targeted, clip=clip, target_fn=target_fn, metric=metric,
            stop_metric=stop_metric, **options,
        )
        self.steps = check_positive_int(steps, "steps")
        if not 0.0 < float(rho) <= 1.0:
            raise ValueError(f"rho: must lie in (0, 1], got {rho}")
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum: must lie in (0, 1], got {momentum}")
        self.rho, self.momentum = float(rho), float(momentum)
        self.random_start_ = bool(random_start)
        self.generator = generator
        self.checkpoints = apgd_checkpoints(self.steps)
        self.history: dict = {}

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, alpha = self.steps, self.momentum
        eta = 2 * _per_sample(self.eps, x, "eps")
        bcast = lambda v: _broadcast(v, x, "eta")  # noqa: E731
        x_k = self.uniform_start(x, self.generator) if self.random_start_ else x.clone()
        best = BestIterate(self, x)
        f_k, g_k, logits = self.evaluate(x_k, y)
        best.update(x_k, logits, y)
        x_max, f_max, g_max = x_k.clone(), f_k.clone(), g_k.clone()
        losses, etas, restarts = [f_k.clone()], [], []
        f_max_hist = [f_max.clone()]
        halved_last = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # η changed at w_{j-1}?
        x_prev, last_w = x_k, 0
        for k in range(n):
            if k in self.checkpoints:
                w, f_seq = k, torch.stack(losses)  # f(x^(0)) … f(x^(w))
                rises = (f_seq[last_w + 1 : w + 1] > f_seq[last_w:w]).sum(0)
                cond1 = rises.to(torch.float64) < self.rho * (w - last_w)
                cond2 = ~halved_last & (f_max_hist[last_w] == f_max)
                halve = cond1 | cond2
                eta = torch.where(halve, eta / 2, eta)
                if bool(halve.any()):
                    x_k, g_k = x_k.clone(), g_k.clone()
                    x_k[halve], g_k[halve], f_k = x_max[halve], g_max[halve], torch.where(halve, f_max, f_k)
                    losses[-1] = f_k.clone()
                restarts.append(halve.clone())
                halved_last, last_w = halve, w
            etas.append(eta.clone())
            z = self.project(x_k + bcast(eta) * g_k.sign(), x)
            a = 1.0 if k == 0 else alpha
            x_next = self.project(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev), x)
            x_prev, x_k = x_k, x_next
            f_k, g_k, logits = self.evaluate(x_k, y, need_grad=k < n - 1)
            best.update(x_k, logits, y)
            improved = f_k > f_max
            f_max = torch.where(improved, f_k, f_max)
            x_max[improved] = x_k[improved]
            if g_k is not None:
                g_max[improved] = g_k[improved]
            losses.append(f_k.clone())
            f_max_hist.append(f_max.clone())
            if best.done():
                break
        self.history = {
            "eta": torch.stack(etas),
            "loss": torch.stack(losses),
            "checkpoints": list(self.checkpoints),
            "restarts": restarts,
        }
        return best.x if self.metric is not None else x_max

    def __repr__(self) -> str:
        return f"APGD(eps={self.eps}, steps={self.steps}, loss={self.loss_name!r}, targeted={self.targeted}, clip={self.clip})"
