"""Behaviour of the resdsn_c2f_pancreas defence (Li et al., Springer 2019, Table 8: PGD adversarial training on
adversarial batches only, β = 0, via common.defenses.training.adversarial_objective) on a briefly trained
tiny model: it raises the Dice under PGD at its ε over the undefended model. Shown on 2D chest phantoms with a
MONAI UNet: the defence is network-agnostic and a 3D ResDSN does not train in a test's budget."""

from __future__ import annotations

import functools

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from common.attacks import PGD
from common.data.synthetic import chest_xray_phantom
from common.defenses.training import adversarial_objective
from common.studies import core


def test_pgd_training_raises_dice_under_pgd():
    gen = functools.partial(chest_xray_phantom, size=(32, 32), target="lungs")
    x_tr, y_tr = core.phantom_tensors(gen, 24, 0)
    x_te, y_te = core.phantom_tensors(gen, 12, 1000)
    y_tr, y_te = ((y_tr == 1) | (y_tr == 2)).long(), ((y_te == 1) | (y_te == 2)).long()
    eps, loss = 16 / 255, DiceCELoss(to_onehot_y=True, softmax=True)

    def fit(objective):
        g = core.seed_everything(0)
        return core.train(UNet(2, 1, 2, (8, 16, 32), (2, 2)), x_tr, y_tr, 20, 1e-2, 8, g, objective)

    gen_atk = torch.Generator().manual_seed(0)

    def pgd_objective(net, xb, yb):
        atk = PGD(net, eps, alpha=eps / 4, steps=5, clip=(0.0, 1.0), generator=gen_atk)
        return adversarial_objective(net, loss, xb, yb, atk, beta=0.0)[0]

    def under_pgd(net):
        torch.manual_seed(1)
        atk = PGD(net, eps, alpha=eps / 8, steps=20, clip=(0.0, 1.0), generator=torch.Generator().manual_seed(1))
        return core.case_scores(net, core.run_attack(atk, x_te, y_te, 12), y_te, 2, ["lung"])["lung"]

    base, adv = fit(core.dicece_objective), fit(pgd_objective)
    assert core.case_scores(adv, x_te, y_te, 2, ["lung"])["lung"].mean() > 0.8
    d_base, d_adv = under_pgd(base), under_pgd(adv)
    assert core.paired_wilcoxon(d_adv, d_base, "greater") < 0.01 and d_adv.mean() - d_base.mean() > 0.1
