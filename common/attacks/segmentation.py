"""Segmentation-specific PGD attacks whose loss re-weights every pixel: SegPGD and CosPGD.

Both are L∞ PGD, x_{t+1} = P(x_t + α sign ∇_x L_t(x_t)) (P: the ε-ball and ``clip``), with a per-pixel
loss ℓ_i (any loss of :data:`common.losses.LOSS_NAMES`) weighted per pixel:

- SegPGD (Gu et al., ECCV 2022): L_t = 1/N [ (1 − λ_t) Σ_{i correct} ℓ_i + λ_t Σ_{i wrong} ℓ_i ],
  λ_t = t / (2T), t = 0 … T − 1: first push the pixels still correct, later also the ones already fooled.
- CosPGD (Agnihotri, Jung, Keuper, ICML 2024): L = 1/N Σ_i cos(softmax(z_i), e_{y_i}) ℓ_i — pixels already
  far from their label weigh less; targeted: weight 1 − cos toward the target. The cosine is per pixel
  and detached (it weights, it is not differentiated).

For sigmoid multi-label networks the weights are per channel and pixel (the binary distribution
[1 − p, p] of each channel against its 0/1 label). ``history`` holds the weights' parameters of the last
call (SegPGD: λ_t per step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from common.attacks.base import BestIterate, Number, PixelwiseAttack, _as_eps
from common.validation import check_positive_int

__all__ = ["SegPGD", "CosPGD", "segpgd_lambda", "cospgd_weight"]


def segpgd_lambda(t: int, steps: int) -> float:
    """λ_t = t / (2T) of SegPGD (Gu et al., ECCV 2022), t = 0 … T − 1."""
    return t / (2.0 * steps)


def cospgd_weight(logits: torch.Tensor, y: torch.Tensor, loss, targeted: bool = False) -> torch.Tensor:
    """CosPGD's per-pixel weight cos(p_i, e_{y_i}) = p_{i,y_i} / ‖p_i‖₂ (1 − cos when targeted).

    ``loss`` is the attack's :class:`common.losses.SegmentationLoss` (it knows softmax vs sigmoid): softmax
    gives (B, *spatial); sigmoid gives (B, K, *spatial) with p = (1 − σ(z), σ(z)) per channel."""
    log_p_true, _ = loss.pixel_terms(logits, y)
    p_true = log_p_true.exp()
    if loss.mode(logits) == "softmax":
        norm = torch.softmax(logits, dim=1).norm(dim=1)
    else:
        p = torch.sigmoid(logits)
        norm = torch.sqrt(p**2 + (1 - p) ** 2)
    cos = p_true / norm
    return 1 - cos if targeted else cos


class _WeightedPGD(PixelwiseAttack):
    """PGD on a per-pixel-weighted loss; subclasses give the weights of step t."""

    per_sample_attributes = ("eps", "alpha")

    def __init__(
        self,
        forward: Callable,
        eps: Number | torch.Tensor,
        steps: int = 20,
        alpha: Number | torch.Tensor | None = None,
        loss: str | Callable = "ce",
        clip: Sequence[float] | None = None,
        targeted: bool = False,
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
        self.alpha = 2.5 * self.eps / self.steps if alpha is None else _as_eps(alpha, "alpha")
        self.random_start_ = bool(random_start)
        self.generator = generator
        self.t = 0
        self.history: dict = {}

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = self.uniform_start(x, self.generator) if self.random_start_ else x.clone()
        best = BestIterate(self, x)
        self.history = {"lambda": []}
        for t in range(self.steps):
            self.t = t
            self.history["lambda"].append(self.step_parameter(t))
            _, grad, logits = self.evaluate(x_adv, y)
            best.update(x_adv, logits, y)
            if best.done():
                return best.x
            x_adv = self.project(x_adv + self._alpha(x) * grad.sign(), x)
        if self.metric is not None:
            _, _, logits = self.evaluate(x_adv, y, need_grad=False)
            best.update(x_adv, logits, y)
            return best.x
        return x_adv

    def _alpha(self, x: torch.Tensor):
        if isinstance(self.alpha, torch.Tensor):
            return self.alpha.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return self.alpha

    def step_parameter(self, t: int) -> float | None:
        return None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eps={self.eps}, alpha={self.alpha}, steps={self.steps}, loss={self.loss_name!r}, "
            f"targeted={self.targeted}, clip={self.clip})"
        )


class SegPGD(_WeightedPGD):
    """SegPGD (Gu et al., ECCV 2022): correct pixels weighted 1 − λ_t, wrong ones λ_t, λ_t = t / (2T).

    Args: ``steps`` T, ``alpha`` (default 2.5 ε / T), ``random_start``, ``generator``; ``metric``,
    ``stop_metric`` as :class:`~common.attacks.base.PixelwiseAttack`; the rest as :class:`Attack`.
    """

    def step_parameter(self, t: int) -> float:
        return segpgd_lambda(t, self.steps)

    def pixel_weight(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lam = segpgd_lambda(self.t, self.steps)
        _, correct = self.loss_fn.pixel_terms(logits, y)
        return torch.where(correct, 1.0 - lam, lam).to(logits.dtype)


class CosPGD(_WeightedPGD):
    """CosPGD (Agnihotri, Jung, Keuper, ICML 2024): every pixel's loss times the (detached) cosine
    similarity of its predicted distribution and its one-hot label (:func:`cospgd_weight`).

    Args: as :class:`SegPGD`.
    """

    def pixel_weight(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cospgd_weight(logits, y, self.loss_fn, self.targeted)
