"""Behaviour of the resdsn_c2f_pancreas defence (Li et al., Springer 2019, Table 8: PGD adversarial training on
adversarial batches only, β = 0, via common.defenses.training.adversarial_objective) on a briefly trained
tiny model: it raises the Dice under PGD at its ε over the undefended model — shown on 2D chest phantoms with a
MONAI UNet (the defence is network-agnostic; a PGD-trained 3D ResDSN does not fit a test's budget) — and the
paper's whole-volume I-FGSM (ε = 0.03 Λ, α = 0.01 Λ, N = 5, CE) lowers the Dice of a briefly trained 3D ResDSN
on abdominal CT phantoms."""

from __future__ import annotations

import functools

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from common.attacks import IFGSM, PGD
from common.data.synthetic import chest_xray_phantom
from common.networks.resdsn import ResDSN
from common.studies.resdsn_c2f_pancreas import _volumes
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


def test_whole_volume_ifgsm_lowers_resdsn_dice():
    x_tr, y_tr = _volumes(16, 0, [32, 32, 32])  # HU window [-100, 240] scaled to [0, 1]; label 1 = pancreas
    x_te, y_te = _volumes(8, 10_000, [32, 32, 32])
    g = core.seed_everything(0)
    net = core.train(ResDSN(1, 2, [8, 16, 32, 64]), x_tr, y_tr, 30, 2e-3, 2, g)
    clean = core.case_scores(net, x_te, y_te, 2, ["pancreas"], batch_size=2)["pancreas"]
    attack = IFGSM(net, eps=0.03, alpha=0.01, steps=5, loss="ce", clip=(0.0, 1.0))  # Λ = 1 after scaling
    attacked = core.case_scores(net, core.run_attack(attack, x_te, y_te, 2), y_te, 2, ["pancreas"], batch_size=2)["pancreas"]
    assert clean.mean() > 0.5  # the model segments the pancreas before the attack
    # every case drops (n = 8: the smallest one-sided Wilcoxon p is 1/256) and by a visible margin
    assert core.paired_wilcoxon(clean, attacked, "greater") < 0.01 and clean.mean() - attacked.mean() > 0.15
