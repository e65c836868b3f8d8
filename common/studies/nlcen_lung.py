"""NLCEN study (He et al., AAAI 2019) on chest X-ray phantoms: the paper's ablation protocol (train w/o NLCE,
fine-tune w/o NL, w/o CE and NLCEN from it with the shared layers frozen, then unfrozen) and UNet vs
UNet + NLCE, attacked with the paper's targeted I-FGSM toward the inverted lung mask (Kurakin schedule,
ε on the 0-255 scale) and with the worst-case attack. Lung Dice (lungs vs rest, binary as the bundle)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from common.attacks import KurakinIFGSM, inverted_target
from common.data.synthetic import chest_xray_phantom
from common.networks.nlcen import NLCEN, NLCENLoss, UNetWithNLCE
from common.studies import core
from common.studies.report import line_plot, table

PAPER = "He et al. (AAAI 2019)"
PRIMARY_EPS = 16 / 255
FLOOR = (0.85, None)  # issue #18: clean Dice floor, every model


def _settings(quick: bool) -> dict[str, Any]:
    return {
        "size": 64, "train": 48 if quick else 96, "test": 24 if quick else 48,
        "base_epochs": 30 if quick else 40, "frozen_epochs": 5, "unfrozen_epochs": 10 if quick else 15,
        "unet_epochs": 30 if quick else 40, "lr": 1e-3, "batch": 8,
        "eps_pixels": [2, 4, 8, 16, 32] if quick else [1, 2, 4, 8, 12, 16, 24, 32],
        "worst_eps_pixels": [16] if quick else [8, 16],
    }


def _nlcen(**kw) -> NLCEN:
    return NLCEN(1, 2, widen_factor=0.25, fpn_channels=64, num_codes=16, **kw)


def _unet(nlce: bool) -> UNet:
    kw = dict(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2))
    return UNetWithNLCE(**kw, num_codes=16) if nlce else UNet(**kw)


def run(quick: bool, out_dir: Path, seed: int = 0) -> dict[str, Any]:
    s = _settings(quick)
    lungs = functools.partial(chest_xray_phantom, size=(s["size"], s["size"]), target="lungs")
    x_tr, y_tr = core.phantom_tensors(lungs, s["train"], seed)
    x_te, y_te = core.phantom_tensors(lungs, s["test"], seed + 10_000)
    y_tr, y_te = ((y_tr == 1) | (y_tr == 2)).long(), ((y_te == 1) | (y_te == 2)).long()
    nlcen_loss = NLCENLoss(DiceCELoss(to_onehot_y=True, softmax=True))

    def objective(net, xb, yb):
        return nlcen_loss(net(xb), yb)

    models: dict[str, torch.nn.Module] = {}
    g = core.seed_everything(seed)
    base = core.train(_nlcen(use_nlce=False), x_tr, y_tr, s["base_epochs"], s["lr"], s["batch"], g, objective)
    variants = {"NLCEN": {}, "w/o NL": {"use_nl": False}, "w/o CE": {"use_ce": False}}
    for name, kw in variants.items():
        g = core.seed_everything(seed + 1)
        net = _nlcen(**kw)
        missing = net.load_state_dict(base.state_dict(), strict=False).missing_keys
        assert all(k.startswith("nlce.") for k in missing), missing
        core.train(net, x_tr, y_tr, s["frozen_epochs"], s["lr"], s["batch"], g, objective, params=net.nlce.parameters())
        models[name] = core.train(net, x_tr, y_tr, s["unfrozen_epochs"], s["lr"] / 10, s["batch"], g, objective)
    g = core.seed_everything(seed + 1)
    models["w/o NLCE"] = core.train(copy.deepcopy(base), x_tr, y_tr, s["unfrozen_epochs"], s["lr"] / 10, s["batch"], g,
                                    objective)
    for name, nlce in (("UNet", False), ("UNet + NLCE", True)):
        g = core.seed_everything(seed + 2)
        models[name] = core.train(_unet(nlce), x_tr, y_tr, s["unet_epochs"], s["lr"], s["batch"], g)

    dice: dict[str, dict[str, np.ndarray]] = {m: {} for m in models}
    for name, net in models.items():
        dice[name]["clean"] = core.case_scores(net, x_te, y_te, 2, names=["lung"])["lung"]
        for e in s["eps_pixels"]:
            atk = KurakinIFGSM(net, e / 255, targeted=True, target_fn=inverted_target, clip=(0.0, 1.0))
            x_adv = core.run_attack(atk, x_te, y_te)
            dice[name][f"I-FGSM {e}/255"] = core.case_scores(net, x_adv, y_te, 2, names=["lung"])["lung"]
        for e in s["worst_eps_pixels"]:
            x_adv = core.worst_case(net, x_te, y_te, e / 255, seed=seed)
            dice[name][f"worst {e}/255"] = core.case_scores(net, x_adv, y_te, 2, names=["lung"])["lung"]

    cols = list(dice["NLCEN"])
    order = ["NLCEN", "w/o NL", "w/o CE", "w/o NLCE", "UNet + NLCE", "UNet"]
    tab = table(f"Lung Dice (mean of {s['test']} test cases), clean, under the paper's targeted I-FGSM and the "
                "worst-case attack", ["model", *cols], [[m, *[float(dice[m][c].mean()) for c in cols]] for m in order])
    plot = "reproduce_dice_vs_eps.png"
    line_plot(out_dir / plot, "Lung Dice under targeted I-FGSM (He et al. 2019 attack)", "ε (0-255 scale)",
              "mean lung Dice",
              {m: ([0, *s["eps_pixels"]], [float(dice[m]["clean"].mean()),
                                            *[float(dice[m][f"I-FGSM {e}/255"].mean()) for e in s["eps_pixels"]]])
               for m in order})

    pe = f"I-FGSM {round(PRIMARY_EPS * 255)}/255"
    we = f"worst {round(PRIMARY_EPS * 255)}/255"
    findings = []
    for other, what in (("w/o NLCE", "the NLCE modules"), ("w/o NL", "the non-local block"),
                        ("w/o CE", "the context encoder")):
        findings.append(core.compare(
            f"{PAPER}, ablation (Fig. 7): NLCEN is more robust than its ablation {other}, i.e. {what} "
            "improves Dice under targeted I-FGSM (controlled protocol: ablations fine-tuned from one w/o NLCE model)",
            dice["NLCEN"][pe], dice[other][pe], "NLCEN", other, f"lung Dice under targeted I-FGSM at ε = {pe[7:]}"))
    findings.append(core.compare(
        f"{PAPER}, Generalization: adding NLCE to a U-Net improves its robustness to targeted I-FGSM",
        dice["UNet + NLCE"][pe], dice["UNet"][pe], "UNet + NLCE", "UNet", f"lung Dice under targeted I-FGSM at ε = {pe[7:]}"))
    for a, b in (("NLCEN", "w/o NLCE"), ("UNet + NLCE", "UNet")):
        findings.append(core.compare(
            f"{PAPER}: {a} is more robust than {b} — checked under the worst-case attack rather than the paper's",
            dice[a][we], dice[b][we], a, b, f"lung Dice under the worst-case attack at ε = {we[6:]}"))
    clean_drop = float(dice["w/o NLCE"]["clean"].mean() - dice["w/o NLCE"][pe].mean())
    findings.append(core.compare(
        f"{PAPER}, Sec. 1: targeted I-FGSM degrades an undefended segmentation network (w/o NLCE)",
        dice["w/o NLCE"]["clean"], dice["w/o NLCE"][pe], "clean", "attacked",
        f"w/o NLCE lung Dice clean vs I-FGSM ε = {pe[7:]} (drop {clean_drop:.3f})"))
    settings = {
        "data": f"chest X-ray phantoms (common.data.synthetic.chest_xray_phantom, target 'lungs'), "
                f"{s['size']}x{s['size']}, {s['train']} train / {s['test']} test cases; not JSRT",
        "networks": "NLCEN ResNet-18 widen 0.25, FPN 64, 16 codewords; MONAI UNet (16, 32, 64, 128) with/without NLCE",
        "training": f"Adam lr {s['lr']}, batch {s['batch']}, Dice+CE (NLCENLoss λ = 0.25 for NLCEN); w/o NLCE "
                    f"{s['base_epochs']} epochs, then each variant {s['frozen_epochs']} epochs with shared layers "
                    f"frozen + {s['unfrozen_epochs']} epochs unfrozen at lr/10 (w/o NLCE continues the same "
                    f"{s['unfrozen_epochs']} epochs); UNets {s['unet_epochs']} epochs",
        "paper attack": "targeted I-FGSM toward the inverted mask, Kurakin schedule (α = 1/255, "
                        "min(ε+4, 1.25ε) steps), ε on the 0-255 scale, inputs in [0, 1]",
        "worst-case attack": core.worst_case_name(),
        "eps": [f"{e}/255" for e in s["eps_pixels"]],
        "seed": seed,
    }
    clean = {"lung (NLCEN)": float(dice["NLCEN"]["clean"].mean()),
             **{f"lung ({m})": float(dice[m]["clean"].mean()) for m in order[1:]}}
    return {"clean_dice": clean, "findings": findings, "tables": [tab], "plots": [plot], "settings": settings}
