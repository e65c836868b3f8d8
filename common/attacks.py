"""First-order L∞ attacks on segmentation networks: FGSM, I-FGSM (BIM), PGD, targeted variants, inverse FGSM.

Design (after torchattacks): one small class per attack on a shared :class:`Attack` base that validates
input, resolves the loss, computes input gradients without touching the model, projects and clips; an
attack's own code is only its update rule. An attack is built once and called per batch::

    attack = IFGSM(forward, eps=0.05, alpha=0.005, steps=10, loss="dice", clip=(0.0, 1.0))
    x_adv = attack(x, y)          # x (B, C, *spatial) float, y (B, 1, *spatial) integer labels

``forward`` is any callable returning logits (B, K, *spatial) — a network, a MONAI inferer wrapped as
a callable, :class:`common.sliding_window.SlidingWindowForward` — or a list/tuple of heads whose first
element is the main output. If ``forward`` has a method ``input_gradient(x, y, loss)`` (as
``SlidingWindowForward(aggregation="window_mean")`` does) the attack asks it for the gradient instead of
back-propagating through ``forward(x)``.

Guarantees: the model's mode (train/eval), its parameters and their ``.grad`` are left untouched (only
``torch.autograd.grad`` with respect to the input is used); the result is detached, has the input's
dtype, satisfies ‖x_adv − x‖∞ ≤ ε and lies inside ``clip``. Note that a model left in train mode keeps
its train-mode behaviour (dropout, batch-norm statistics updates) during the attack: put it in eval mode
first if that is not wanted.

Units: ε, α and ``clip`` are in the units of the tensor the network sees. The ``eps_from_*`` helpers
convert each paper's units.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence

import torch

from common.losses import resolve_loss
from common.validation import (
    check_clip,
    check_image,
    check_label_map,
    check_nonnegative,
    check_positive_int,
    main_output,
)

__all__ = [
    "Attack",
    "FGSM",
    "IFGSM",
    "PGD",
    "InvFGSM",
    "KurakinIFGSM",
    "inverted_target",
    "constant_target",
    "kurakin_steps",
    "eps_from_pixel_scale",
    "eps_from_max_fraction",
    "eps_from_hu_window",
]

Number = float | int


def _as_eps(value: Number | torch.Tensor | Sequence[Number], name: str) -> float | torch.Tensor:
    """A non-negative number, or a 1-D tensor of per-sample values (B,) — e.g. ε in z-units per CT case."""
    if isinstance(value, (torch.Tensor, list, tuple)):
        t = torch.as_tensor(value, dtype=torch.float32).flatten()
        if t.numel() == 1:
            return check_nonnegative(float(t), name)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{name}: per-sample values must be finite and >= 0, got {t.tolist()}")
        return t
    return check_nonnegative(value, name)


def _broadcast(value: float | torch.Tensor, x: torch.Tensor, name: str) -> float | torch.Tensor:
    """A per-sample tensor (B,) reshaped to (B, 1, ..., 1) for ``x``; a number unchanged."""
    if isinstance(value, torch.Tensor):
        if value.numel() != x.shape[0]:
            raise ValueError(f"{name}: {value.numel()} per-sample values for a batch of {x.shape[0]}")
        return value.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return value


class Attack(abc.ABC):
    """Base class: validation, loss, input gradient, projection onto the ε-ball and ``clip``.

    Args:
        forward: callable ``x -> logits`` (or a list of heads, main first).
        eps: L∞ radius ε ≥ 0 (a number, or per-sample values of shape (B,)).
        loss: ``"ce"``, ``"dice"`` (soft Dice of Liu et al., J. Digit. Imaging 2021, Eq. 5–6, background excluded), ``"dicece"``,
            or a callable ``(logits, y) -> scalar``.
        targeted: descend the loss toward target labels instead of ascending it away from ``y``.
        clip: ``(low, high)`` valid input range, or ``None``.
        target_fn: with ``targeted=True``, maps the true labels (B, 1, *spatial) to the target labels, so
            the attack is called with true labels like any other (e.g. :func:`inverted_target`, NLCEN;
            ``functools.partial(constant_target, label=1)``, the BraTS ti-FGSM). Without it, ``y`` passed to
            a targeted attack *is* the target.
    """

    #: +1 ascends the loss (untargeted), −1 descends it (targeted, inverse FGSM); set by ``__init__``.
    direction: int

    def __init__(
        self,
        forward: Callable,
        eps: Number | torch.Tensor,
        loss: str | Callable = "ce",
        targeted: bool = False,
        clip: Sequence[float] | None = None,
        target_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not callable(forward):
            raise ValueError(f"forward: expected a callable returning logits, got {type(forward).__name__}")
        self.forward = forward
        self.eps = _as_eps(eps, "eps")
        self.loss_fn = resolve_loss(loss)
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
        self.targeted = bool(targeted)
        self.clip = check_clip(clip)
        self.direction = -1 if self.targeted else 1
        if target_fn is not None and not self.targeted:
            raise ValueError("target_fn: only a targeted attack (targeted=True) takes a target function")
        if target_fn is not None and not callable(target_fn):
            raise ValueError(f"target_fn: expected a callable, got {type(target_fn).__name__}")
        self.target_fn = target_fn

    # -- the one thing a subclass writes -------------------------------------------------------------
    @abc.abstractmethod
    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The update rule: return x_adv from the clean ``x`` (detached) and labels ``y``."""

    # -- shared machinery ------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_image(x, "x")
        check_label_map(y, x, "y")
        x = x.detach()
        if self.target_fn is not None:
            y = self.target_fn(y)
            check_label_map(y, x, "target_fn(y)")
        with torch.enable_grad():
            x_adv = self.perturb(x, y)
        return x_adv.detach().to(x.dtype)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack's loss of ``forward(x)`` against ``y`` (a scalar tensor)."""
        return self.loss_fn(main_output(self.forward(x)), y)

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∇_x loss(forward(x), y), without accumulating parameter gradients."""
        custom = getattr(self.forward, "input_gradient", None)
        if callable(custom):
            grad = custom(x, y, self.loss_fn)
        else:
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.loss(x, y), [x])
        if grad is None or not bool(torch.isfinite(grad).all()):
            raise ValueError("forward: the loss gradient with respect to x is not finite")
        return grad

    def step(self, x_adv: torch.Tensor, y: torch.Tensor, size: float | torch.Tensor) -> torch.Tensor:
        """One signed-gradient step of ``size`` in the attack's direction."""
        return x_adv + self.direction * _broadcast(size, x_adv, "alpha") * self.gradient(x_adv, y).sign()

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Project onto the L∞ ball of radius ε around ``x``, then into ``clip``."""
        eps = _broadcast(self.eps, x, "eps")
        x_adv = torch.max(torch.min(x_adv, x + eps), x - eps)
        if self.clip is not None:
            x_adv = x_adv.clamp(*self.clip)
        return x_adv

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps}, loss={self.loss_name!r}, targeted={self.targeted}, clip={self.clip})"


class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al. 2015; Liu et al., J. Digit. Imaging 2021 Eq. 1): x + ε·sign(∇_x L(x, y)).

    With ``targeted=True``: x − ε·sign(∇_x L(x, y_target)).
    """

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.project(self.step(x, y, self.eps), x)


class InvFGSM(Attack):
    """Inverse FGSM (Pervin et al., arXiv:2105.12106): one step *down* the loss of the true labels, x − ε·sign(∇_x L(x, y))."""

    def __init__(
        self, forward: Callable, eps: Number | torch.Tensor, loss: str | Callable = "ce", clip: Sequence[float] | None = None
    ) -> None:
        super().__init__(forward, eps, loss=loss, targeted=False, clip=clip)
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
    """

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
    ) -> None:
        super().__init__(forward, eps, loss=loss, targeted=targeted, clip=clip, target_fn=target_fn)
        self.steps = check_positive_int(steps, "steps")
        self.alpha = self.eps / self.steps if alpha is None else _as_eps(alpha, "alpha")
        self.random_start = bool(random_start)
        self.generator = generator

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = x
        if self.random_start:
            eps = _broadcast(self.eps, x, "eps")
            noise = torch.rand(x.shape, generator=self.generator, dtype=x.dtype, device="cpu").to(x.device)
            x_adv = self.project(x + (2 * noise - 1) * eps, x)
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
    ) -> None:
        super().__init__(
            forward, eps, alpha, steps, loss, targeted, clip, random_start=True, generator=generator, target_fn=target_fn
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


def eps_from_max_fraction(fraction: float, max_intensity: float = 1.0) -> float:
    """ε as a fraction of the maximum intensity (BraTS paper: 0.05 of inputs on [0, 1])."""
    return check_nonnegative(fraction, "fraction") * check_nonnegative(max_intensity, "max_intensity")


def eps_from_hu_window(
    fraction: float, std_hu: float | torch.Tensor, window: float = 340.0
) -> float | torch.Tensor:
    """ε as a fraction of the HU window Λ (ResDSN paper: ε = 0.03 Λ, Λ = 340 for [−100, 240]) in
    z-normalised units: a perturbation of δ HU becomes δ / σ_case after ``(x − μ) / σ_case``.

    ``std_hu`` is each case's normalisation standard deviation in HU (a number or a (B,) tensor).
    """
    eps_hu = check_nonnegative(fraction, "fraction") * check_nonnegative(window, "window")
    if isinstance(std_hu, torch.Tensor):
        if bool((std_hu <= 0).any()):
            raise ValueError("std_hu: must be > 0")
        return eps_hu / std_hu.float()
    if not std_hu > 0:
        raise ValueError(f"std_hu: must be > 0, got {std_hu}")
    return eps_hu / float(std_hu)
