"""Behaviour on a briefly trained tiny model (unet3d_brats_distill; Liu et al., J. Digit. Imaging 2021), with
the 2D U-Net on tumour slices of brain phantoms: i-FGSM is stronger than FGSM at the same ε, and the targeted
ti-FGSM moves the prediction toward its target label."""

from __future__ import annotations

import functools

from common.attacks import FGSM, IFGSM, constant_target
from common.networks.unet_brats import UNetBraTS
from common.studies import core
from common.studies.unet3d_brats_distill import REGIONS, _data, _slices


def test_ifgsm_beats_fgsm_and_ti_fgsm_reaches_its_target():
    x_tr, y_tr = _slices(*_data(6, 0, (32, 32, 32), 16))
    x_te, y_te = _slices(*_data(3, 1000, (32, 32, 32), 16))
    eps = 0.05

    def fit(objective):
        g = core.seed_everything(0)
        net = UNetBraTS(2, 4, 4, base_filters=8, depth=3, seg_levels=2, dropout=0.0)
        return core.train(net, x_tr, y_tr, 25, 3e-3, 16, g, objective)

    def wt(net, x):
        return core.case_scores(net, x, y_te, 4, regions=REGIONS, batch_size=64)["WT"]

    base = fit(core.dicece_objective)
    clean = wt(base, x_te)
    assert clean.mean() > 0.7, f"the tiny model did not train: WT Dice {clean.mean():.3f}"
    fgsm = wt(base, core.run_attack(FGSM(base, eps, loss="dice", clip=(0, 1)), x_te, y_te, 64))
    ifgsm = wt(base, core.run_attack(IFGSM(base, eps, steps=10, loss="dice", clip=(0, 1)), x_te, y_te, 64))
    n = len(clean)
    assert core.paired_wilcoxon(fgsm, ifgsm, "greater") < 0.01, (fgsm.mean(), ifgsm.mean(), n)
    # ti-FGSM (targeted at label 1, necrosis / non-enhancing core) moves the prediction toward label 1
    ti = IFGSM(base, eps, steps=10, loss="dice", clip=(0, 1), targeted=True,
               target_fn=functools.partial(constant_target, label=1))
    x_ti = core.run_attack(ti, x_te, y_te, 64)
    ones_clean = (core.predict(base, x_te, 64) == 1).flatten(1).double().mean(1).numpy()
    ones_ti = (core.predict(base, x_ti, 64) == 1).flatten(1).double().mean(1).numpy()
    assert core.paired_wilcoxon(ones_ti, ones_clean, "greater") < 0.01 and ones_ti.mean() > 2 * ones_clean.mean()
