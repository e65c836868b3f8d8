"""The forward-with-its-own-gradient contract (common.networks.forwards) and the wrappers that keep it.

The custom-gradient forward is a BPDA-style forward (Athalye, Carlini, Wagner, ICML 2018): its call
quantises the input (autograd gives a zero input gradient through ``round``) and its ``input_gradient``
back-propagates as if the quantiser were the identity. A wrapper that dropped that gradient would hand
attacks zeros, so every oracle below is the unwrapped forward's own gradient, chained by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.attacks import FGSM
from common.c2f import CoarseToFineLogits, SlidingWindowN
from common.networks.forwards import (
    InputGradientForward,
    InputTransformForward,
    check_autograd_forward,
    input_gradient,
    supplies_input_gradient,
)
from common.networks.normalise import PerCaseZNorm, per_case_znorm
from common.sliding_window import SlidingWindowForward


def loss(logits, y):
    return F.cross_entropy(logits, y[:, 0])


def net3d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv3d(3, 2, 1)).double()


class BPDAForward:
    """``net(round(4x) / 4)``; its input gradient is the gradient of ``net`` at the quantised input."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, x):
        return self.net(torch.round(x * 4) / 4)

    def input_gradient(self, x, y, loss_fn):
        q = (torch.round(x.detach() * 4) / 4).requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(self.net(q), y), [q])
        return grad


class Affine(InputTransformForward):
    """A wrapper that writes only its transform: t = 2x + 0.25 (no gradient code of its own)."""

    def transform(self, x):
        return 2.0 * x + 0.25


def data(b: int = 2, size: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, size, size, size, generator=g, dtype=torch.float64)
    return x, (torch.rand(b, 1, size, size, size, generator=g) > 0.5).long()


def test_the_custom_gradient_is_not_autograd():
    """The premise of the other tests: dropping the custom gradient would change it (to zeros)."""
    inner, (x, y) = BPDAForward(net3d()), data()
    assert isinstance(inner, InputGradientForward) and supplies_input_gradient(inner)
    assert not supplies_input_gradient(net3d()) and not isinstance(PerCaseZNorm(net3d()), InputGradientForward)
    own = input_gradient(inner, x, y, loss)
    xr = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(loss(inner(xr), y), [xr])
    assert (own != 0).double().mean() > 0.9 and not auto.any()


def test_transform_wrapper_keeps_the_inner_gradient_by_the_chain_rule():
    inner, (x, y) = BPDAForward(net3d()), data()
    wrapped = Affine(inner)
    assert isinstance(wrapped, InputGradientForward)
    expected = 2.0 * inner.input_gradient(2.0 * x + 0.25, y, loss)  # hand chain rule, dt/dx = 2
    torch.testing.assert_close(wrapped.input_gradient(x, y, loss), expected)
    torch.testing.assert_close(input_gradient(wrapped, x, y, loss), expected)


def test_per_case_znorm_keeps_the_inner_gradient():
    """Oracle: the vector-Jacobian product of per_case_znorm (float64 autograd) applied to the unwrapped
    forward's own gradient at z; PerCaseZNorm uses the closed form, so the two are independent."""
    inner, (x, y) = BPDAForward(net3d()), data()
    xr = x.clone().requires_grad_(True)
    z = per_case_znorm(xr)
    (expected,) = torch.autograd.grad(z, [xr], grad_outputs=inner.input_gradient(z.detach(), y, loss))
    got = PerCaseZNorm(inner).input_gradient(x, y, loss)
    torch.testing.assert_close(got, expected)
    assert (got != 0).double().mean() > 0.9
    # and an attack through the wrapper follows that gradient (FGSM: x + eps * sign)
    x_adv = FGSM(PerCaseZNorm(inner), 0.01)(x, y)
    torch.testing.assert_close(x_adv, x + 0.01 * expected.sign())


def test_window_mean_keeps_a_window_networks_own_gradient():
    """One window covering each case: the window-mean gradient is the unwrapped network's own gradient."""
    inner, (x, y) = BPDAForward(net3d()), data()
    wm = SlidingWindowForward(inner, 6, overlap=0.0, aggregation="window_mean")
    expected = torch.cat([inner.input_gradient(x[b : b + 1], y[b : b + 1], loss) for b in range(2)])
    torch.testing.assert_close(wm.input_gradient(x, y, loss), expected)
    assert not hasattr(SlidingWindowForward(net3d(), 6, aggregation="exact"), "input_gradient")


def test_autograd_only_wrappers_refuse_a_custom_gradient():
    inner = BPDAForward(net3d())
    with pytest.raises(ValueError, match="^network: BPDAForward supplies its own input_gradient"):
        SlidingWindowForward(inner, 6, aggregation="exact")
    with pytest.raises(ValueError, match="^network"):
        SlidingWindowN(inner, (6, 6, 6), n=1)
    wm = SlidingWindowForward(net3d(), 6, aggregation="window_mean")
    with pytest.raises(ValueError, match="^coarse_forward"):
        CoarseToFineLogits(wm, net3d(), margin=1)
    with pytest.raises(ValueError, match="^fine_forward"):
        CoarseToFineLogits(net3d(), wm, margin=1)
    assert check_autograd_forward(inner.net, "network", "x") is inner.net
    with pytest.raises(ValueError, match="^inner"):
        Affine(3)
