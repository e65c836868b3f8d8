"""Losses of the papers, built on MONAI's losses.

- :class:`SoftDiceLoss`: the soft Dice loss of Eq. 5–6 in Liu et al., J. Digit. Imaging 2021 (the BraTS robustness paper),
  background (class 0) excluded, as used to craft FGSM / i-FGSM / ti-FGSM.
- :func:`temperature_softmax` and :class:`DistillationDiceLoss`: Eq. 4 and Eq. 7 (defensive distillation).
- :func:`resolve_loss`: turns ``"ce"``, ``"dice"``, ``"dicece"`` or a callable into ``(logits, y) -> scalar``.

Shapes: logits (B, K, *spatial) with K ≥ 2 (softmax) or K = 1 (binary, sigmoid); labels are integer maps
(B, 1, *spatial).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

__all__ = [
    "SoftDiceLoss",
    "DistillationDiceLoss",
    "temperature_softmax",
    "cross_entropy",
    "resolve_loss",
    "LOSS_NAMES",
]

LOSS_NAMES = ("ce", "dice", "dicece")


def temperature_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Eq. 4: softmax(z / T) over the channel axis (dim 1). T = 1 is the usual softmax."""
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    return torch.softmax(logits / temperature, dim=1)


def _probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities (B, K', *spatial); a single-channel (sigmoid) output becomes [1 − p, p]."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits / temperature)
        return torch.cat([1 - p, p], dim=1)
    return temperature_softmax(logits, temperature)


def _one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, *spatial) integer labels -> (B, K, *spatial) float one-hot (MONAI's ``one_hot``)."""
    from monai.networks.utils import one_hot

    return one_hot(y.long(), num_classes=num_classes, dim=1, dtype=torch.float32)


class SoftDiceLoss(nn.Module):
    """Soft Dice loss of Eq. 5–6 (Liu et al., J. Digit. Imaging 2021): ``1 − D`` with

        D = 1/N · Σ_{i=1}^{N−1} (2 Σ_v p_iv y_iv + γ) / (Σ_v p_iv + Σ_v y_iv + γ)

    N classes, background i = 0 excluded (``include_background=False``, the paper's default), sums over
    every voxel v of one image, then averaged over the batch. p = softmax(logits / T).

    Computed with MONAI's ``DiceLoss`` (smooth_nr = smooth_dr = γ, per image and class, averaged). MONAI
    averages over the N − 1 foreground classes where Eq. 5 divides by N, so MONAI's loss L_M relates to
    the paper's by ``1 − D = 1 − (N − 1)/N · (1 − L_M)``; ``normalisation="paper"`` (default) applies that
    factor, ``"monai"`` returns L_M. The two differ by a positive scale and a constant, so the sign of
    their gradient (what FGSM uses) is the same.

    Args:
        include_background: count class 0 too (then the factor is 1 in both normalisations).
        gamma: the smoothing constant γ of Eq. 5.
        temperature: T of Eq. 4 applied to the logits before the softmax.
    """

    def __init__(
        self,
        include_background: bool = False,
        gamma: float = 1e-5,
        temperature: float = 1.0,
        normalisation: str = "paper",
    ) -> None:
        super().__init__()
        if normalisation not in ("paper", "monai"):
            raise ValueError(f"normalisation: expected 'paper' or 'monai', got {normalisation!r}")
        if not gamma > 0:
            raise ValueError(f"gamma: must be > 0, got {gamma}")
        self.include_background = include_background
        self.temperature = float(temperature)
        self.normalisation = normalisation
        self.dice = DiceLoss(
            include_background=include_background, smooth_nr=gamma, smooth_dr=gamma, reduction="mean"
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``target``: integer label map (B, 1, *spatial) or soft/one-hot labels (B, N, *spatial)."""
        probs = _probabilities(logits, self.temperature)
        n = probs.shape[1]
        if target.shape[1] == 1 and n > 1:
            target = _one_hot(target, n)
        if target.shape != probs.shape:
            raise ValueError(f"target: shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)}")
        loss = self.dice(probs, target.to(probs.dtype))
        if self.normalisation == "paper" and not self.include_background:
            loss = 1 - (n - 1) / n * (1 - loss)
        return loss


class DistillationDiceLoss(nn.Module):
    """Eq. 7: ``1 − D(X, F(X))``, the soft Dice between the student's temperature-T softmax F^d(X) and
    the teacher's soft labels F(X) = softmax(z_teacher / T) (Eq. 4), background excluded.

    ``forward(student_logits, teacher)`` takes the teacher's logits (``teacher_is_logits=True``, the
    default) or its precomputed soft labels (B, N, *spatial). At test time the distilled network is used
    at T = 1 (plain logits), as in defensive distillation.
    """

    def __init__(self, temperature: float, gamma: float = 1e-5, teacher_is_logits: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.teacher_is_logits = teacher_is_logits
        self.soft_dice = SoftDiceLoss(include_background=False, gamma=gamma, temperature=temperature)

    def forward(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if teacher.shape != student_logits.shape:
            raise ValueError(
                f"teacher: shape {tuple(teacher.shape)} differs from the student's {tuple(student_logits.shape)}"
            )
        soft_labels = temperature_softmax(teacher, self.temperature) if self.teacher_is_logits else teacher
        return self.soft_dice(student_logits, soft_labels.detach())


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean voxel-wise cross-entropy; binary cross-entropy with logits for a single-channel output."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
    return F.cross_entropy(logits, y[:, 0].long())


class _DiceCE(nn.Module):
    """Cross-entropy + soft Dice (background excluded) — MONAI's ``DiceCELoss`` on integer labels."""

    def __init__(self) -> None:
        super().__init__()
        self.softmax_loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
        self.sigmoid_loss = DiceCELoss(sigmoid=True)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == 1:
            return self.sigmoid_loss(logits, y.to(logits.dtype))
        return self.softmax_loss(logits, y.long())


def resolve_loss(loss: str | Callable) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``"ce"`` | ``"dice"`` (:class:`SoftDiceLoss`) | ``"dicece"`` | a callable ``(logits, y) -> scalar``."""
    if callable(loss):
        return loss
    if loss == "ce":
        return cross_entropy
    if loss == "dice":
        return SoftDiceLoss()
    if loss == "dicece":
        return _DiceCE()
    raise ValueError(f"loss: expected one of {LOSS_NAMES} or a callable, got {loss!r}")
