"""Training-time defences as plain PyTorch functions: adversarial training objectives, noise augmentation, distillation.

The training-loop glue that bundle configs instantiate lives in :mod:`common.handlers`; the adversarial
data augmentation of Pervin et al., arXiv:2105.12106 (offline / online example generation) lives in
:mod:`common.defenses.advaug`.

Shapes: x (B, C, *spatial) float, y (B, 1, *spatial) integer labels; ``loss_fn(pred, y) -> scalar``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from monai.networks.utils import eval_mode

from common.losses import temperature_softmax
from common.validation import check_image, check_nonnegative, check_probability, main_output

__all__ = ["adversarial_examples", "adversarial_objective", "uniform_noise", "teacher_soft_labels"]


def adversarial_examples(network: nn.Module, attack: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Adversarial examples of the *current* model, crafted in eval mode (dropout off, no batch-norm
    statistics updates), after which the network's previous mode is restored. ``attack`` must have been
    built on ``network`` (its ``forward``)."""
    with eval_mode(network):
        return attack(x, y)


def adversarial_objective(
    network: nn.Module,
    loss_fn: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Callable,
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 9 of Liu et al., J. Digit. Imaging 2021: L̃ = β·L(x, y) + (1 − β)·L(x_adv, y), x_adv = attack(x, y) from the current model.

    β = 0.5 with FGSM is the BraTS paper's adversarial training; β = 0 with PGD is the ResDSN paper's
    (train on the adversarial batch only). Returns ``(loss, pred_clean, x_adv)``; ``pred_clean`` is
    ``None`` when β = 0 (the clean pass is skipped).
    """
    beta = check_probability(beta, "beta", open_interval=False)
    x_adv = adversarial_examples(network, attack, x, y)
    loss_adv = loss_fn(network(x_adv), y)
    if beta == 0.0:
        return loss_adv, None, x_adv
    pred = network(x)
    return beta * loss_fn(pred, y) + (1.0 - beta) * loss_adv, pred, x_adv


def uniform_noise(x: torch.Tensor, radius: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + U(−r, r) voxel-wise: random perturbation of L∞ radius r (Liu et al., J. Digit. Imaging 2021's noise augmentation, r = 0.01)."""
    check_image(x, "x")
    radius = check_nonnegative(radius, "radius")
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    return x + (2.0 * noise - 1.0) * radius


@torch.no_grad()
def teacher_soft_labels(teacher: Callable, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 4 soft labels F(X) = softmax(z(X) / T) of the trained teacher, in eval mode, without gradients."""
    if isinstance(teacher, nn.Module):
        with eval_mode(teacher):
            logits = main_output(teacher(x))
    else:
        logits = main_output(teacher(x))
    return temperature_softmax(logits, temperature)
