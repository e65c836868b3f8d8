"""Losses against hand-computed cases and the papers' formulas evaluated directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss

from common.losses import (
    DistillationDiceLoss,
    SoftDiceLoss,
    cross_entropy,
    resolve_loss,
    temperature_softmax,
)


def eq5_soft_dice_loss(probs: np.ndarray, onehot: np.ndarray, gamma: float) -> float:
    """Liu et al., J. Digit. Imaging 2021, Eq. 5–6 literally, per image (float64), averaged over the batch."""
    losses = []
    for p, y in zip(probs, onehot):
        n = p.shape[0]
        d = sum((2 * (p[i] * y[i]).sum() + gamma) / (p[i].sum() + y[i].sum() + gamma) for i in range(1, n)) / n
        losses.append(1 - d)
    return float(np.mean(losses))


def test_soft_dice_hand_computed_case():
    # two pixels, two classes; softmax gives p(class 1) = 0.8 and 0.2, truth class 1 then 0.
    probs = torch.tensor([[[0.2, 0.8], [0.8, 0.2]]]).permute(0, 2, 1)  # (B=1, K=2, N=2)
    logits = probs.log()
    y = torch.tensor([[[1, 0]]])
    # D = 1/2 · (2·0.8 + γ)/(1.0 + 1 + γ) ≈ 0.4 → loss 0.6
    loss = SoftDiceLoss(gamma=1e-5)(logits, y)
    assert loss.item() == pytest.approx(1 - 0.5 * (1.6 + 1e-5) / (2 + 1e-5), abs=1e-6)
    assert loss.item() == pytest.approx(0.6, abs=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (2, 3, 4, 4, 3)])
def test_soft_dice_equals_eq5_on_random_input(shape):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    gamma = 0.1
    probs = torch.softmax(logits, 1).numpy()
    onehot = np.moveaxis(np.eye(shape[1])[y[:, 0].numpy()], -1, 1)
    expected = eq5_soft_dice_loss(probs, onehot, gamma)
    assert SoftDiceLoss(gamma=gamma)(logits, y).item() == pytest.approx(expected, rel=1e-10)
    # MONAI's DiceLoss averages over N − 1 classes: the documented relation holds
    monai_loss = DiceLoss(include_background=False, softmax=True, to_onehot_y=True, smooth_nr=gamma, smooth_dr=gamma)(
        logits, y
    )
    n = shape[1]
    assert 1 - (n - 1) / n * (1 - monai_loss.item()) == pytest.approx(expected, rel=1e-10)
    assert SoftDiceLoss(gamma=gamma, normalisation="monai")(logits, y).item() == pytest.approx(monai_loss.item())


def test_temperature_softmax_eq4():
    z = torch.tensor([[[1.0], [2.0], [4.0]]])
    torch.testing.assert_close(temperature_softmax(z, 1.0), torch.softmax(z, 1))
    t = 20.0
    expected = np.exp(np.array([1, 2, 4]) / t) / np.exp(np.array([1, 2, 4]) / t).sum()
    np.testing.assert_allclose(temperature_softmax(z, t)[0, :, 0].numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="^temperature"):
        temperature_softmax(z, 0.0)


def test_distillation_loss_eq7_hand_computed():
    # one pixel pair, 2 classes; student and teacher logits; T = 2
    t, gamma = 2.0, 1e-5
    student = torch.tensor([[[0.0, 2.0], [2.0, 0.0]]]).permute(0, 2, 1)  # (1, 2, 2)
    teacher = torch.tensor([[[0.0, 4.0], [0.0, 0.0]]]).permute(0, 2, 1)
    ps = torch.softmax(student / t, 1)[0, 1].numpy()
    pt = torch.softmax(teacher / t, 1)[0, 1].numpy()
    d = 0.5 * (2 * (ps * pt).sum() + gamma) / (ps.sum() + pt.sum() + gamma)
    loss = DistillationDiceLoss(temperature=t, gamma=gamma)(student, teacher)
    assert loss.item() == pytest.approx(1 - d, rel=1e-6)
    # precomputed soft labels give the same loss
    soft = torch.softmax(teacher / t, 1)
    loss_soft = DistillationDiceLoss(temperature=t, gamma=gamma, teacher_is_logits=False)(student, soft)
    assert loss_soft.item() == pytest.approx(loss.item(), rel=1e-6)


def test_distillation_gradient_does_not_reach_the_teacher():
    student = torch.randn(1, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(1, 3, 4, 4, requires_grad=True)
    DistillationDiceLoss(temperature=5.0)(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


def test_cross_entropy_and_dicece_values():
    logits = torch.tensor([[[[2.0]], [[0.0]]]])  # (1, 2, 1, 1)
    y = torch.tensor([[[[0]]]])
    assert cross_entropy(logits, y).item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)))
    assert resolve_loss("dicece")(logits, y).item() > cross_entropy(logits, y).item()
    with pytest.raises(ValueError, match="^loss"):
        resolve_loss("l2")
    with pytest.raises(ValueError, match="^target"):
        SoftDiceLoss()(torch.randn(1, 3, 4, 4), torch.rand(1, 2, 4, 4))


@pytest.mark.parametrize("channels", [1, 3])
def test_resolved_dice_and_dicece_equal_monai(channels):
    """The attack losses' Dice / Dice+CE equal MONAI's DiceLoss (paper normalisation) and DiceCELoss."""
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, channels, 6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, max(channels, 2), (2, 1, 6, 5), generator=g)
    assert resolve_loss("dice")(logits, y).item() == pytest.approx(SoftDiceLoss()(logits, y).item(), rel=1e-10)
    monai = (DiceCELoss(sigmoid=True) if channels == 1 else DiceCELoss(include_background=False, to_onehot_y=True, softmax=True))
    target = y.double() if channels == 1 else y
    assert resolve_loss("dicece")(logits, y).item() == pytest.approx(monai(logits, target).item(), rel=1e-10)
    assert resolve_loss("ce")(logits, y).item() == pytest.approx(cross_entropy(logits, y).item(), rel=1e-10)
