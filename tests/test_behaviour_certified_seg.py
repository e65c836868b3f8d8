"""Behaviour on a briefly trained tiny model (certified_seg; Laousy et al., MICCAI 2023): SegCertify abstains
on more pixels as σ grows, and the certified (non-abstained) pixels agree with the clean prediction."""

from __future__ import annotations

import functools

import torch
from monai.networks.nets import UNet

from common.certify import certified_metrics, certify
from common.data.synthetic import chest_xray_phantom
from common.studies import core


def test_abstention_grows_with_sigma():
    gen = functools.partial(chest_xray_phantom, size=(32, 32), target="classes")
    lut = torch.tensor([0, 1, 1, 2, 3])
    x_tr, y_tr = core.phantom_tensors(gen, 24, 0)
    x_te, y_te = core.phantom_tensors(gen, 8, 1000)
    y_tr, y_te = lut[y_tr], lut[y_te]
    g = core.seed_everything(0)

    def noisy(net, xb, yb):  # trained with σ = 0.25 noise, as the SegCertify baseline
        return core.dicece_objective(net, xb + 0.25 * torch.randn(xb.shape, generator=g), yb)

    net = core.train(UNet(2, 1, 4, (8, 16, 32), (2, 2)), x_tr, y_tr, 20, 1e-2, 8, g, noisy)
    abstained, dice = {}, {}
    for sigma in (0.1, 0.25, 0.5):
        cert = certify(net, x_te, sigma, n0=8, n=100, alpha=0.001, tau=0.75, generator=torch.Generator().manual_seed(0))
        m = certified_metrics(cert, y_te, 4, include_background=False)
        abstained[sigma], dice[sigma] = m["abstained_fraction"].numpy(), m["dice_strict_mean"].numpy()
    assert (abstained[0.5] > abstained[0.1]).all(), (abstained[0.1], abstained[0.5])
    assert abstained[0.1].mean() < abstained[0.25].mean() < abstained[0.5].mean()
    assert core.paired_wilcoxon(abstained[0.5], abstained[0.1], "greater") < 0.01  # 8 of 8: exact p = 2^-8
    assert dice[0.5].mean() < dice[0.1].mean()
