"""The classic first-order L∞ attacks: FGSM, I-FGSM (BIM), PGD, targeted variants, inverse FGSM, and the
papers' unit conversions of ε. Every class adds only its update rule to :class:`~common.attacks.base.Attack`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from common.attacks.base import Attack, Number, _as_eps
from common.validation import check_clip, check_nonnegative, check_positive_int

__all__ = [
    "FGSM",
    "IFGSM",
    "PGD",
    "InvFGSM",
    "KurakinIFGSM",
    "inverted_target",
    "constant_target",
    "kurakin_steps",
    "eps_from_pixel_scale",
]


class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al. 2015; Liu et al., J. Digit. Imaging 2021 Eq. 1): x + ε·sign(∇_x L(x, y)).

    With ``targeted=True``: x − ε·sign(∇_x L(x, y_target)).
    """

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.project(self.step(x, y, self.eps), x)


class InvFGSM(Attack):
    """Inverse FGSM (Pervin et al., arXiv:2105.12106): one step *down* the loss of the true labels, x − ε·sign(∇_x L(x, y))."""

    def __init__(
        self,
        forward: Callable,
        eps: Number | torch.Tensor,
        loss: str | Callable = "ce",
        clip: Sequence[float] | None = None,
        **options,
    ) -> None:
        super().__init__(forward, eps, loss=loss, targeted=False, clip=clip, **options)
        self.direction = -1

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.project(self.step(x, y, self.eps), x)


class IFGSM(Attack):
    """Iterative FGSM / basic iterative method (Kurakin et al. 2017; Liu et al., J. Digit. Imaging 2021 Eq. 2–3):

        x_0 = x (or x + U(−ε, ε) with ``random_start``),
        x_{k+1} = Clip_{x,ε}{ x_k ± α·sign(∇_x L(x_k, y)) },   k = 0 … steps − 1,

    "+" untargeted, "−" targeted; Clip_{x,ε} projects onto the ε-ball around x and into ``clip``
    after every step.

    Args:
        alpha: step size α ≥ 0 (number or per-sample (B,)); ``None`` gives α = ε / N, the BraTS paper's
            αN = ε budget.
        steps: number of iterations N ≥ 1.
        random_start: start from a uniform point in the ε-ball (PGD, Madry et al. 2018).
        generator: optional ``torch.Generator`` for the random start.
        options: ``output``, ``clip_input`` of :class:`~common.attacks.base.Attack`.
    """

    per_sample_attributes = ("eps", "alpha")

    def __init__(
        self,
        forward: Callable,
        eps: Number | torch.Tensor,
        alpha: Number | torch.Tensor | None = None,
        steps: int = 10,
        loss: str | Callable = "ce",
        targeted: bool = False,
        clip: Sequence[float] | None = None,
        random_start: bool = False,
        generator: torch.Generator | None = None,
        target_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **options,
    ) -> None:
        super().__init__(forward, eps, loss=loss, targeted=targeted, clip=clip, target_fn=target_fn, **options)
        self.steps = check_positive_int(steps, "steps")
        self.alpha = self.eps / self.steps if alpha is None else _as_eps(alpha, "alpha")
        self.random_start = bool(random_start)
        self.generator = generator

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = x
        if self.random_start:
            x_adv = self.uniform_start(x, self.generator)
        for _ in range(self.steps):
            x_adv = self.project(self.step(x_adv, y, self.alpha), x)
        return x_adv

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eps={self.eps}, alpha={self.alpha}, steps={self.steps}, loss={self.loss_name!r}, "
            f"targeted={self.targeted}, random_start={self.random_start}, clip={self.clip})"
        )


class PGD(IFGSM):
    """Projected gradient descent (Madry et al. 2018): :class:`IFGSM` with a uniform random start in the ε-ball."""

    def __init__(
        self,
        forward: Callable,
        eps: Number | torch.Tensor,
        alpha: Number | torch.Tensor | None = None,
        steps: int = 10,
        loss: str | Callable = "ce",
        targeted: bool = False,
        clip: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        target_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **options,
    ) -> None:
        super().__init__(
            forward, eps, alpha, steps, loss, targeted, clip, random_start=True, generator=generator, target_fn=target_fn,
            **options,
        )


class KurakinIFGSM(IFGSM):
    """The basic iterative method with Kurakin et al.'s schedule, as the NLCEN paper (He et al., AAAI 2019) runs it:
    α = 1 and N = min(ε + 4, ⌈1.25 ε⌉) on the 0–255 pixel scale (:func:`kurakin_steps`).

    ``eps`` is in input units like every attack; ``input_range`` (the span that 0–255 maps to) converts
    between the two scales, e.g. (0, 1) for inputs scaled to [0, 1].
    """

    def __init__(
        self,
        forward: Callable,
        eps: Number,
        input_range: Sequence[float] = (0.0, 1.0),
        alpha_pixels: float = 1.0,
        loss: str | Callable = "ce",
        targeted: bool = False,
        clip: Sequence[float] | None = None,
        target_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **options,
    ) -> None:
        low, high = check_clip(input_range, "input_range")
        eps_pixels = check_nonnegative(eps, "eps") * 255.0 / (high - low)
        super().__init__(
            forward,
            eps,
            alpha=eps_from_pixel_scale(alpha_pixels, (low, high)),
            steps=kurakin_steps(round(eps_pixels, 6)),
            loss=loss,
            targeted=targeted,
            clip=clip,
            target_fn=target_fn,
            **options,
        )


def inverted_target(y: torch.Tensor, foreground: int = 1) -> torch.Tensor:
    """The inverted mask (NLCEN's target): background becomes ``foreground``, every other label background."""
    return torch.where(y == 0, torch.full_like(y, foreground), torch.zeros_like(y))


def constant_target(y: torch.Tensor, label: int = 1) -> torch.Tensor:
    """Every voxel labelled ``label`` (the BraTS paper's ti-FGSM target)."""
    return torch.full_like(y, label)


def kurakin_steps(eps_pixels: float) -> int:
    """Iterations of the basic iterative method for ε on the 0–255 scale with α = 1:
    min(ε + 4, ⌈1.25 ε⌉) (Kurakin et al. 2017; NLCEN paper, He et al., AAAI 2019). At least 1."""
    eps_pixels = check_nonnegative(eps_pixels, "eps_pixels")
    return max(1, int(min(eps_pixels + 4, math.ceil(1.25 * eps_pixels))))


def eps_from_pixel_scale(eps_pixels: float, input_range: Sequence[float] = (0.0, 1.0)) -> float:
    """ε given on the 0–255 pixel scale (NLCEN) in the units of inputs spanning ``input_range``."""
    low, high = check_clip(input_range, "input_range")
    return check_nonnegative(eps_pixels, "eps_pixels") * (high - low) / 255.0
