"""Behaviour on a briefly trained tiny model (nlcen_lung; He et al., AAAI 2019): the paper's targeted I-FGSM
toward the inverted mask lowers lung Dice significantly, more at a larger ε."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from monai.networks.nets import UNet

from common.attacks import KurakinIFGSM, inverted_target
from common.data.synthetic import chest_xray_phantom
from common.networks.nlcen import UNetWithNLCE
from common.studies import core


@pytest.fixture(scope="module")
def lungs():
    gen = functools.partial(chest_xray_phantom, size=(32, 32), target="lungs")
    x_tr, y_tr = core.phantom_tensors(gen, 24, 0)
    x_te, y_te = core.phantom_tensors(gen, 12, 1000)
    return x_tr, ((y_tr == 1) | (y_tr == 2)).long(), x_te, ((y_te == 1) | (y_te == 2)).long()


@pytest.mark.parametrize("nlce", [False, True])
def test_targeted_ifgsm_lowers_lung_dice(lungs, nlce):
    x_tr, y_tr, x_te, y_te = lungs
    g = core.seed_everything(0)
    kw = dict(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2))
    net = core.train(UNetWithNLCE(**kw, num_codes=8) if nlce else UNet(**kw), x_tr, y_tr, 20, 1e-2, 8, g)
    clean = core.case_scores(net, x_te, y_te, 2, ["lung"])["lung"]
    assert clean.mean() > 0.85, f"the tiny model did not train: clean Dice {clean.mean():.3f}"
    attacked = {}
    for e in (4, 32):
        atk = KurakinIFGSM(net, e / 255, targeted=True, target_fn=inverted_target, clip=(0.0, 1.0))
        attacked[e] = core.case_scores(net, core.run_attack(atk, x_te, y_te), y_te, 2, ["lung"])["lung"]
    # every case loses Dice at 32/255 (scipy's exact one-sided Wilcoxon p for 12 of 12 positive differences: 2^-12)
    assert core.paired_wilcoxon(clean, attacked[32], "greater") < 1e-3
    assert clean.mean() - attacked[32].mean() > 0.2
    assert attacked[32].mean() < attacked[4].mean() <= clean.mean() + 1e-9
    assert np.all(attacked[32] <= clean + 1e-9)
