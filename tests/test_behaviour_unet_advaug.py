"""Behaviour on a briefly trained tiny model (unet_advaug; Pervin et al., arXiv:2105.12106): FGSM (loss up,
Eq. 1) at the paper's ε = 0.1 lowers the lesion IoU of every slice set significantly. (Inverse FGSM of the same
size lowers it too on these phantoms — a step this large leaves the loss's linear regime — so no claim about
it is made here; the study reports it.)"""

from __future__ import annotations

from monai.networks.nets import BasicUNet

from common.attacks import FGSM
from common.studies import core
from common.studies.unet_advaug import lesion_slices


def test_fgsm_lowers_lesion_iou():
    x_tr, y_tr = lesion_slices(6, 0, (80, 80, 80), 32)
    x_te, y_te = lesion_slices(4, 1000, (80, 80, 80), 32)

    def fit(x, y):
        g = core.seed_everything(0)
        return core.train(BasicUNet(2, 1, 2, features=(8, 8, 16, 32, 32, 8)), x, y, 25, 3e-3, 16, g)

    def iou(net, x):
        return core.case_scores(net, x, y_te, 2, ["lesion"], metric="iou")["lesion"]

    base = fit(x_tr, y_tr)
    clean = iou(base, x_te)
    assert clean.mean() > 0.4, f"the tiny model did not train: IoU {clean.mean():.3f}"
    fgsm = iou(base, core.run_attack(FGSM(base, 0.1, clip=(0.0, 1.0)), x_te, y_te, 64))
    assert core.paired_wilcoxon(clean, fgsm, "greater") < 1e-3 and clean.mean() - fgsm.mean() > 0.2
