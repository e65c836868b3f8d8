"""Sliding-window forward and gradient aggregation against plain per-window loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference

from common.attacks import FGSM, IFGSM
from common.losses import cross_entropy
from common.sliding_window import SlidingWindowForward, window_slices


def tiny_net(spatial_dims: int = 3) -> nn.Module:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    torch.manual_seed(0)
    return nn.Sequential(conv(1, 4, 3, padding=1), nn.Tanh(), conv(4, 2, 3, padding=1)).double().eval()


def per_window_loop_gradient(net, x, y, roi, overlap, skip_background):
    """Oracle: one window at a time, each window's own CE gradient, averaged over covering windows."""
    grad = torch.zeros_like(x)
    count = torch.zeros_like(x[:, :1])
    for b in range(x.shape[0]):
        for s in window_slices(x.shape[2:], roi, overlap):
            yw = y[(slice(b, b + 1), slice(None), *s)]
            if skip_background and not yw.any():
                continue
            xw = x[(slice(b, b + 1), slice(None), *s)].clone().requires_grad_(True)
            cross_entropy(net(xw), yw).backward()
            grad[(slice(b, b + 1), slice(None), *s)] += xw.grad
            count[(slice(b, b + 1), slice(None), *s)] += 1
    return grad / count.clamp_min(1)


@pytest.mark.parametrize("skip_background", [False, True])
@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_window_mean_equals_a_per_window_loop(skip_background, sw_batch_size):
    net = tiny_net()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 20, 16, 12, generator=g, dtype=torch.float64)
    y = torch.zeros(2, 1, 20, 16, 12, dtype=torch.long)
    y[0, :, 2:6, 3:9, 2:5] = 1  # background-only windows exist in both cases
    y[1, :, 14:19, 10:15, 7:11] = 1
    roi, overlap = (8, 8, 8), 0.5
    fwd = SlidingWindowForward(net, roi, overlap, sw_batch_size, aggregation="window_mean", skip_background=skip_background)
    got = fwd.input_gradient(x, y, cross_entropy)
    expected = per_window_loop_gradient(net, x, y, roi, overlap, skip_background)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    if skip_background:
        assert (got == 0).any() and (got != 0).any()


def test_window_mean_pads_volumes_smaller_than_the_window():
    net = tiny_net()
    x = torch.rand(1, 1, 6, 12, 10, dtype=torch.float64)
    y = (x > 0.5).long()
    fwd = SlidingWindowForward(net, (8, 8, 8), 0.25, 2, aggregation="window_mean")
    grad = fwd.input_gradient(x, y, cross_entropy)
    assert grad.shape == x.shape and bool(torch.isfinite(grad).all()) and (grad != 0).float().mean() > 0.9


def test_exact_forward_equals_monai_and_gradients_reach_every_voxel():
    net = tiny_net()
    x = torch.rand(1, 1, 24, 20, 16, dtype=torch.float64)
    y = (x > 0.5).long()
    fwd = SlidingWindowForward(net, (12, 12, 12), 0.5, 4)
    with torch.no_grad():
        torch.testing.assert_close(fwd(x), sliding_window_inference(x, (12, 12, 12), 4, net, overlap=0.5))
    xr = x.clone().requires_grad_(True)
    cross_entropy(fwd(xr), y).backward()
    assert xr.grad.shape == x.shape
    assert bool((xr.grad != 0).all()), "every voxel of a volume larger than one window gets a gradient"


def test_exact_gradient_equals_autograd_through_manual_stitching():
    """Oracle: average the overlapping windows' logits by hand, then differentiate the whole-volume loss."""
    net = tiny_net(2)
    x = torch.rand(1, 1, 14, 10, dtype=torch.float64)
    y = (x > 0.4).long()
    roi, overlap = (8, 8), 0.5
    xr = x.clone().requires_grad_(True)
    out = torch.zeros(1, 2, 14, 10, dtype=x.dtype)
    cnt = torch.zeros(1, 1, 14, 10, dtype=x.dtype)
    for s in window_slices(x.shape[2:], roi, overlap):
        out[(slice(None), slice(None), *s)] += net(xr[(slice(None), slice(None), *s)])
        cnt[(slice(None), slice(None), *s)] += 1
    (expected,) = torch.autograd.grad(cross_entropy(out / cnt, y), [xr])
    fwd = SlidingWindowForward(net, roi, overlap, 3)
    xg = x.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(cross_entropy(fwd(xg), y), [xg])
    torch.testing.assert_close(got, expected)


def test_attacks_use_either_aggregation():
    net = tiny_net()
    x = torch.rand(1, 1, 16, 16, 16, dtype=torch.float64)
    y = (x > 0.5).long()
    for aggregation in ("exact", "window_mean"):
        fwd = SlidingWindowForward(net, 8, 0.5, 4, aggregation=aggregation)
        for attack in (FGSM(fwd, 0.02), IFGSM(fwd, 0.02, 0.01, 3)):
            delta = attack(x, y) - x
            assert delta.abs().max() <= 0.02 + 1e-12 and delta.abs().max() > 0
    # FGSM with window_mean follows the sign of the aggregated gradient
    fwd = SlidingWindowForward(net, 8, 0.5, 4, aggregation="window_mean")
    expected = x + 0.02 * fwd.input_gradient(x, y, cross_entropy).sign()
    torch.testing.assert_close(FGSM(fwd, 0.02)(x, y), expected)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"aggregation": "median"}, "aggregation"),
        ({"overlap": 1.0}, "overlap"),
        ({"sw_batch_size": 0}, "sw_batch_size"),
        ({"mode": "max"}, "mode"),
    ],
)
def test_bad_configuration(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}"):
        SlidingWindowForward(tiny_net(), 8, **{"overlap": 0.5, **kwargs})


def test_bad_input():
    fwd = SlidingWindowForward(tiny_net(), (8, 8, 8), 0.5, aggregation="window_mean")
    x = torch.rand(1, 1, 10, 10, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="^y"):
        fwd.input_gradient(x, torch.zeros(1, 1, 10, 10, 9, dtype=torch.long), cross_entropy)
    with pytest.raises(ValueError, match="^x"):
        fwd(x.masked_fill(x > 0.9, float("nan")))
    with pytest.raises(ValueError, match="^roi_size"):
        SlidingWindowForward(tiny_net(), (8, 8), 0.5)(x)
