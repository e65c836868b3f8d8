"""Losses of the papers, built on MONAI's losses.

- :class:`SoftDiceLoss`: the soft Dice loss of Eq. 5–6 in Liu et al., J. Digit. Imaging 2021 (the BraTS robustness paper),
  background (class 0) excluded, as used to craft FGSM / i-FGSM / ti-FGSM.
- :func:`temperature_softmax` and :class:`DistillationDiceLoss`: Eq. 4 and Eq. 7 (defensive distillation).
- :class:`SegmentationLoss`: the attack losses with a per-image value and optional per-pixel weights —
  CE, soft Dice, Dice + CE and the SEA losses of Croce, Singh, Hein, ECCV 2024 (masked CE, class-balanced
  masked CE, Jensen–Shannon divergence to the one-hot label) and a masked logit margin (invariant to the
  scale of the logits), for softmax networks and, channel by channel in binary form, for sigmoid
  multi-label networks.
- :func:`resolve_loss`: turns a name of :data:`LOSS_NAMES` or a callable into ``(logits, y) -> scalar``.

Shapes: logits (B, K, *spatial) with K ≥ 2 (softmax) or K = 1 (binary, sigmoid); labels are integer maps
(B, 1, *spatial). Sigmoid multi-label networks (``output="sigmoid"``, K independent channels) take a
K-channel binary mask (B, K, *spatial).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss

__all__ = [
    "SoftDiceLoss",
    "DistillationDiceLoss",
    "temperature_softmax",
    "cross_entropy",
    "resolve_loss",
    "SegmentationLoss",
    "LOSS_NAMES",
    "RESCALED_MARGIN",
    "OUTPUTS",
    "pack_bits",
    "unpack_bits",
]

_PROBABILITY_LOSSES = ("ce", "dice", "dicece", "masked_ce", "balanced_masked_ce", "js")
#: every loss name: the losses of the probabilities, the logit margin, and each probability loss of the logits
#: rescaled per image (``"rescaled_<name>"``, :meth:`SegmentationLoss.rescaled`)
LOSS_NAMES = (*_PROBABILITY_LOSSES, "margin", *(f"rescaled_{n}" for n in _PROBABILITY_LOSSES))
#: median top-2 logit margin the ``"rescaled_*"`` losses rescale every image's logits to: softmax probability
#: 1 / (1 + e^-4) = 0.982 for the median pixel, far from float32 saturation (margin 24 ln 2 ≈ 16.6).
RESCALED_MARGIN = 4.0
#: how logits become probabilities: "auto" (softmax for K ≥ 2, sigmoid for K = 1), "softmax", "sigmoid" (K
#: independent binary channels).
OUTPUTS = ("auto", "softmax", "sigmoid")


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


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A K-channel binary mask (B, K, *spatial) as one integer map (B, 1, *spatial): bit k is channel k.

    Lets a multi-label target travel where a one-channel label map is expected (e.g. the windows of
    :class:`common.sliding_window.SlidingWindowForward`); :func:`unpack_bits` inverts it."""
    weights = (2 ** torch.arange(mask.shape[1], device=mask.device)).view(1, -1, *([1] * (mask.ndim - 2)))
    return (mask.long() * weights).sum(1, keepdim=True)


def unpack_bits(packed: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (B, 1, *spatial) integers -> (B, channels, *spatial) 0/1 (long)."""
    bits = 2 ** torch.arange(channels, device=packed.device).view(1, -1, *([1] * (packed.ndim - 2)))
    return (packed.long() // bits) % 2


def _js_to_one_hot(log_p_true: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence JS(p ‖ e_y) (natural log) as a function of log p_y alone:

    with m = (p + e_y) / 2, KL(p ‖ m) = (1 − p_y) log 2 + p_y log(2 p_y / (1 + p_y)) and
    KL(e_y ‖ m) = −log((1 + p_y) / 2); JS is half their sum (0 when p_y = 1, log 2 when p_y = 0).
    log p_y is used directly so the gradient stays finite (0) where p_y underflows to 0 in float32."""
    p_true = log_p_true.exp()
    kl_pm = (1 - p_true) * math.log(2.0) + p_true * (math.log(2.0) + log_p_true - torch.log1p(p_true))
    kl_ym = -torch.log((1 + p_true) / 2)
    return 0.5 * (kl_pm + kl_ym)


class SegmentationLoss(nn.Module):
    """An attack loss with a per-image value and optional per-pixel weights.

    Names (``name``), per pixel (or per channel and pixel for sigmoid networks), reduced per image:

    - ``"ce"``: cross-entropy, mean over pixels (binary CE for a sigmoid channel).
    - ``"masked_ce"``: CE of the pixels still classified correctly only, summed and divided by the number
      of pixels (SEA's Mask-CE, Croce, Singh, Hein, ECCV 2024): pixels already fooled stop pulling.
    - ``"balanced_masked_ce"``: masked CE with every class weighted equally: (1/|C|) Σ_{c∈C} (1/n_c)
      Σ_{i: y_i = c, correct} CE_i, C the classes present in the image, n_c their pixel counts.
    - ``"js"``: Jensen–Shannon divergence between the predicted distribution and the one-hot label,
      mean over pixels (SEA's JS loss; bounded by log 2, saturates for pixels already fooled).
    - ``"dice"``: soft Dice loss; softmax: :class:`SoftDiceLoss` (Eq. 5–6 of Liu et al., J. Digit. Imaging
      2021, background excluded, γ = 1e-5), equal to it in value; sigmoid: 1 − mean over channels of
      (2 Σ p y + γ) / (Σ p + Σ y + γ).
    - ``"dicece"``: CE + Dice as MONAI's ``DiceCELoss`` (softmax: background excluded from the Dice term).
    - ``"margin"``: −(z_y − max_{k≠y} z_k) on the pixels still classified correctly, 0 elsewhere, mean over
      pixels (the logit margin of Carlini & Wagner, IEEE S&P 2017, masked as SEA's Mask-CE); sigmoid:
      −(2t − 1) z per channel. Logits multiplied by s > 0 multiply it by s, so a sign-gradient attack on
      it (FGSM, I-FGSM, APGD) does the same thing at any logit scale: a saturated softmax, whose
      probability losses above have a vanishing gradient, cannot hide from it.
    - ``"rescaled_<name>"`` (``"rescaled_dice"``, ``"rescaled_js"``, …): loss ``<name>`` of the logits
      rescaled per image to a median top-2 margin of :data:`RESCALED_MARGIN` (:meth:`rescaled`; the
      "rescaled logits" of Carlini & Wagner, arXiv:1607.04311, with the scale read from the image instead
      of a known temperature): invariant to the logit scale like ``"margin"``, with the shape of ``<name>``.

    ``output``: ``"auto"`` (softmax over K ≥ 2 channels; a single channel is one sigmoid, i.e. the
    two-class distribution [1 − p, p]), ``"softmax"`` or ``"sigmoid"`` (K independent binary channels,
    each loss in its binary form and averaged over channels). Labels: an integer map (B, 1, *spatial), or
    for ``"sigmoid"`` a K-channel 0/1 mask (a one-channel integer map is read as :func:`pack_bits`).

    ``per_image(logits, y, weight)`` returns (B,) values; ``weight`` (B, *spatial) — or (B, K, *spatial)
    for sigmoid — multiplies every pixel's term (SegPGD, CosPGD); for Dice it weights every pixel's share
    of the intersection and of the sums. ``forward(logits, y)`` is the batch mean of ``per_image``.
    """

    def __init__(self, name: str = "ce", output: str = "auto", gamma: float = 1e-5) -> None:
        super().__init__()
        if name not in LOSS_NAMES:
            raise ValueError(f"loss: expected one of {LOSS_NAMES} or a callable, got {name!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        if not gamma > 0:
            raise ValueError(f"gamma: must be > 0, got {gamma}")
        self.name, self.output, self.gamma = name, output, float(gamma)
        self.__name__ = name
        self.rescale = name.startswith("rescaled_")
        self.base = name[len("rescaled_"):] if self.rescale else name

    def mode(self, logits: torch.Tensor) -> str:
        """``"softmax"`` or ``"sigmoid"`` for these logits."""
        if self.output == "auto":
            return "softmax" if logits.shape[1] > 1 else "sigmoid"
        if self.output == "softmax" and logits.shape[1] < 2:
            raise ValueError(f"output: softmax needs at least 2 channels, the network gives {logits.shape[1]}")
        return self.output

    def binary_labels(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The (B, K, *spatial) 0/1 targets of a sigmoid network (from a mask or packed bits)."""
        k = logits.shape[1]
        if y.shape[1] == k:
            return y.to(logits.dtype)
        if y.shape[1] == 1:
            return unpack_bits(y, k).to(logits.dtype)
        raise ValueError(f"y: {y.shape[1]} label channels for a sigmoid network with {k} channels")

    def pixel_terms(self, logits: torch.Tensor, y: torch.Tensor):
        """``(log_p_true, correct)``: the log-probability of the true class and whether the prediction is
        right, per pixel (B, *spatial) for softmax or per channel and pixel (B, K, *spatial) for sigmoid."""
        if self.mode(logits) == "softmax":
            logp = torch.log_softmax(logits, dim=1)
            labels = y[:, :1].long()
            log_p_true = logp.gather(1, labels)[:, 0]
            correct = logits.argmax(1) == labels[:, 0]
            return log_p_true, correct
        t = self.binary_labels(logits, y)
        log_p_true = torch.where(t > 0.5, F.logsigmoid(logits), F.logsigmoid(-logits))
        correct = (logits > 0) == (t > 0.5)
        return log_p_true, correct

    def margin(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The logit margin per pixel, positive where the prediction is right: z_y − max_{k≠y} z_k
        (B, *spatial) for softmax, (2t − 1) z (B, K, *spatial) for sigmoid channels."""
        if self.mode(logits) == "softmax":
            labels = y[:, :1].long()
            z_true = logits.gather(1, labels)[:, 0]
            return z_true - logits.scatter(1, labels, float("-inf")).amax(1)
        return (2 * self.binary_labels(logits, y) - 1) * logits

    def rescaled(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``logits`` multiplied, per image, by RESCALED_MARGIN / (median over pixels of |:meth:`margin`|; the
        lower median for an even count, as ``torch.median``), the factor detached (a per-image temperature):
        the same logits at every scale s > 0, the median pixel far from float32 saturation."""
        spread = self.margin(logits, y).detach().abs().flatten(1).median(1).values
        factor = RESCALED_MARGIN / spread.clamp_min(torch.finfo(logits.dtype).tiny)
        return logits * factor.view(-1, *([1] * (logits.ndim - 1)))

    def per_image(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.rescale:
            logits = self.rescaled(logits, y)
        if self.base == "margin":
            term = -self.margin(logits, y).clamp_min(0)
            w = 1.0 if weight is None else weight.to(term.dtype).expand_as(term)
            return (term * w).flatten(1).mean(1)
        if self.base == "dice":
            return self._dice(logits, y, weight, paper=True)
        if self.base == "dicece":
            return self._per_pixel("ce", logits, y, weight) + self._dice(logits, y, weight, paper=False)
        return self._per_pixel(self.base, logits, y, weight)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.per_image(logits, y).mean()

    def _per_pixel(self, name: str, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        log_p_true, correct = self.pixel_terms(logits, y)
        w = torch.ones_like(log_p_true) if weight is None else weight.to(log_p_true.dtype).expand_as(log_p_true)
        ce = -log_p_true
        if name == "ce":
            term = ce
        elif name == "masked_ce":
            term = ce * correct.to(ce.dtype)
        elif name == "js":
            term = _js_to_one_hot(log_p_true)
        else:  # balanced_masked_ce
            return self._balanced(ce * correct.to(ce.dtype) * w, logits, y)
        return (term * w).flatten(1).mean(1)

    def _balanced(self, masked: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(1/|C|) Σ_c (1/n_c) Σ_{y_i = c} masked_i per image (sigmoid: per channel, then channel mean)."""
        if self.mode(logits) == "softmax":
            labels = y[:, 0].long()
            onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(masked.dtype)  # (B, K, *sp)
            sums = (onehot * masked[:, None]).flatten(2).sum(2)  # (B, K)
            counts = onehot.flatten(2).sum(2)
            present = counts > 0
            per_class = torch.where(present, sums / counts.clamp_min(1), torch.zeros_like(sums))
            return per_class.sum(1) / present.sum(1)
        t = self.binary_labels(logits, y)
        per_class = []
        for value in (t, 1 - t):  # class 1 and class 0 of every channel
            count = value.flatten(2).sum(2)  # (B, K)
            total = (value * masked).flatten(2).sum(2)
            per_class.append((torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)), count > 0))
        num = per_class[0][0] + per_class[1][0]
        den = per_class[0][1].to(num.dtype) + per_class[1][1].to(num.dtype)
        return (num / den).mean(1)

    def _dice(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, paper: bool) -> torch.Tensor:
        """Soft Dice loss per image over the foreground channels (see the class docstring)."""
        g = self.gamma
        if self.mode(logits) == "softmax" or (self.output == "auto" and paper):
            probs = _probabilities(logits)
            onehot = F.one_hot(y[:, 0].long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
            w = 1.0 if weight is None else weight.to(probs.dtype)[:, None]
            p, t = probs[:, 1:], onehot[:, 1:]
            n = probs.shape[1]
        else:
            p, t = torch.sigmoid(logits), self.binary_labels(logits, y)
            w = 1.0 if weight is None else weight.to(p.dtype).expand_as(p)
            n = None
        inter = (w * p * t).flatten(2).sum(2)
        denom = (w * p).flatten(2).sum(2) + (w * t).flatten(2).sum(2)
        dice = ((2 * inter + g) / (denom + g)).mean(1)  # mean over foreground channels (MONAI's L_M = 1 - this)
        if paper and n is not None:
            return 1 - (n - 1) / n * dice
        return 1 - dice

    def extra_repr(self) -> str:
        return f"name={self.name!r}, output={self.output!r}"


def resolve_loss(loss: str | Callable, output: str = "auto") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A name of :data:`LOSS_NAMES` (:class:`SegmentationLoss`) or a callable ``(logits, y) -> scalar``."""
    if callable(loss):
        return loss
    if not isinstance(loss, str) or loss not in LOSS_NAMES:
        raise ValueError(f"loss: expected one of {LOSS_NAMES} or a callable, got {loss!r}")
    return SegmentationLoss(loss, output=output)
