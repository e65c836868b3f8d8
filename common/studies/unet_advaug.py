"""Adversarial-augmentation study (Pervin et al., arXiv:2105.12106) on liver-lesion slices of abdominal CT
phantoms: a U-Net trained on the original slices, then retrained from scratch on the original slices plus
FGSM, InvFGSM or FGSM + InvFGSM copies (ε = 0.1, made from the trained baseline, original masks), as in
the paper's Fig. 1. Lesion IoU over epochs (Table 1 in shape) and under FGSM / InvFGSM and the worst-case
attack (Table 2 in shape)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import BasicUNet

from common.attacks import FGSM, InvFGSM
from common.data.synthetic import abdomen_ct_phantom
from common.defenses.advaug import adversarial_examples
from common.studies import core
from common.studies.report import line_plot, table

PAPER = "Pervin et al. (arXiv:2105.12106, 2021)"
HU_WINDOW = (-100.0, 240.0)
FLOOR = (0.8, ["lesion (U-Net)"])  # issue #18: clean Dice floor of the U-Net (augmentation lowering it is a finding)
METHOD_SETS = {"FGSM": ("fgsm",), "InvFGSM": ("invfgsm",), "FGSM + InvFGSM": ("fgsm", "invfgsm")}


def _settings(quick: bool) -> dict[str, Any]:
    return {"volume": [80, 80, 80], "crop": 32, "train_volumes": 24 if quick else 40, "test_volumes": 8 if quick else 16,
            "epochs": 40 if quick else 60, "lr": 1e-3, "batch": 16, "aug_eps": 0.1,
            "features": (16, 16, 32, 64, 128, 16),
            "eval_eps": [0.01, 0.02, 0.05, 0.1, 0.2], "worst_eps": [8 / 255] if quick else [4 / 255, 8 / 255]}


def lesion_slices(n: int, seed: int, size, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every axial slice through the lesion of ``n`` CT phantoms, HU window [-100, 240] scaled to [0, 1],
    cropped to ``crop``² around the lesion centroid shifted by up to crop/4 (the bundle's
    ``volumes_to_slices`` rule); labels 1 = lesion."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        hu, lab = abdomen_ct_phantom(size, seed=seed + i, lesion=True)
        img = np.clip((hu[0] - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0]), 0, 1)
        for k in np.flatnonzero((lab == 2).any(axis=(0, 1))):
            im2, la2 = img[:, :, k], (lab[:, :, k] == 2)
            centre = np.argwhere(la2).mean(0) + rng.uniform(-0.25, 0.25, 2) * crop
            start = np.clip(np.round(centre - crop / 2).astype(int), 0, np.array(im2.shape) - crop)
            box = tuple(slice(a, a + crop) for a in start)
            xs.append(im2[box])
            ys.append(la2[box])
    return torch.from_numpy(np.stack(xs))[:, None].float(), torch.from_numpy(np.stack(ys))[:, None].long()


def _unet(features) -> BasicUNet:
    return BasicUNet(2, 1, 2, features=tuple(features))


def run(quick: bool, out_dir: Path, seed: int = 0) -> dict[str, Any]:
    s = _settings(quick)
    x_tr, y_tr = lesion_slices(s["train_volumes"], seed, s["volume"], s["crop"])
    x_te, y_te = lesion_slices(s["test_volumes"], seed + 10_000, s["volume"], s["crop"])
    history: dict[str, list[float]] = {}
    models: dict[str, torch.nn.Module] = {}

    def fit(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
        g = core.seed_everything(seed)
        net = _unet(s["features"])
        history[name] = []
        core.train(net, x, y, s["epochs"], s["lr"], s["batch"], g,
                   on_epoch=lambda e: history[name].append(float(core.case_scores(net, x_te, y_te, 2, ["lesion"],
                                                                                  metric="iou")["lesion"].mean())))
        return net

    models["U-Net"] = fit("U-Net", x_tr, y_tr)
    for name, methods in METHOD_SETS.items():
        copies = adversarial_examples(models["U-Net"], x_tr, y_tr, methods, s["aug_eps"], clip=(0.0, 1.0))
        x_aug = torch.cat([x_tr, *copies.values()])
        y_aug = torch.cat([y_tr] * (1 + len(methods)))
        models[f"U-Net + {name}"] = fit(f"U-Net + {name}", x_aug, y_aug)

    # the setting the augmentation copies come from: FGSM test inputs made with the undefended U-Net's gradient,
    # fed to every model (a transfer attack; for the U-Net itself it is its white-box FGSM)
    transfer = f"FGSM {s['aug_eps']:g} from U-Net"
    x_transfer = core.run_attack(FGSM(models["U-Net"], s["aug_eps"], clip=(0.0, 1.0)), x_te, y_te, 32)
    iou: dict[str, dict[str, np.ndarray]] = {m: {} for m in models}
    clean_dice = {}
    for name, net in models.items():
        iou[name]["clean"] = core.case_scores(net, x_te, y_te, 2, ["lesion"], metric="iou")["lesion"]
        clean_dice[f"lesion ({name})"] = float(core.case_scores(net, x_te, y_te, 2, ["lesion"])["lesion"].mean())
        for aname, cls in (("FGSM", FGSM), ("InvFGSM", InvFGSM)):
            for e in s["eval_eps"]:
                x_adv = core.run_attack(cls(net, e, clip=(0.0, 1.0)), x_te, y_te, 32)
                iou[name][f"{aname} {e:g}"] = core.case_scores(net, x_adv, y_te, 2, ["lesion"], metric="iou")["lesion"]
        iou[name][transfer] = core.case_scores(net, x_transfer, y_te, 2, ["lesion"], metric="iou")["lesion"]
        for e in s["worst_eps"]:
            x_adv = core.worst_case(net, x_te, y_te, e, batch_size=32, seed=seed)
            iou[name][f"worst {core.eps_label(e)}"] = core.case_scores(net, x_adv, y_te, 2, ["lesion"],
                                                                        metric="iou")["lesion"]
    shown = sorted({1, *range(5, s["epochs"] + 1, 5)})
    t1 = table("Test IoU (lesion) over epochs (Table 1 in shape)", ["model", *[f"epoch {e}" for e in shown]],
               [[m, *[history[m][e - 1] for e in shown]] for m in models])
    cols = list(iou["U-Net"])
    t2 = table(f"Test IoU (lesion), {len(x_te)} slices of {s['test_volumes']} volumes: clean, under FGSM / InvFGSM "
               "(Table 2 in shape) and the worst-case attack", ["model", *cols],
               [[m, *[float(iou[m][c].mean()) for c in cols]] for m in models])
    p1, p2 = "reproduce_iou_over_epochs.png", "reproduce_iou_vs_eps.png"
    line_plot(out_dir / p1, "Test IoU over epochs", "epoch", "lesion IoU",
              {m: (range(1, s["epochs"] + 1), history[m]) for m in models})
    line_plot(out_dir / p2, "Test IoU under FGSM", "ε (input units, window scaled to [0, 1])", "lesion IoU",
              {m: ([0, *s["eval_eps"]], [float(iou[m]["clean"].mean()),
                                         *[float(iou[m][f"FGSM {e:g}"].mean()) for e in s["eval_eps"]]]) for m in models})

    findings = []
    base = "U-Net"
    for name in METHOD_SETS:
        m = f"U-Net + {name}"
        findings.append(core.compare(
            f"{PAPER}, Table 1: training with {name} augmentation gives a higher IoU than the U-Net alone",
            iou[m]["clean"], iou[base]["clean"], m, base, "clean test IoU after the last epoch"))
    for name in METHOD_SETS:
        m = f"U-Net + {name}"
        p = core.paired_wilcoxon(history[m], history[base], "greater")
        findings.append(core.finding(
            f"{PAPER}, Table 1: with {name} augmentation the IoU is higher over the training epochs",
            p < 0.05,
            f"mean test IoU over epochs {np.mean(history[m]):.3f} vs {np.mean(history[base]):.3f}; one-sided paired "
            f"Wilcoxon over the {s['epochs']} epochs p = {core.fmt_p(p)}"))
    for name in METHOD_SETS:
        m = f"U-Net + {name}"
        findings.append(core.compare(
            f"{PAPER}, Table 2: {name} augmentation makes the U-Net more robust to FGSM (ε = {s['aug_eps']})",
            iou[m][f"FGSM {s['aug_eps']:g}"], iou[base][f"FGSM {s['aug_eps']:g}"], m, base,
            f"test IoU under FGSM ε = {s['aug_eps']}"))
    for name in METHOD_SETS:
        m = f"U-Net + {name}"
        findings.append(core.compare(
            f"{PAPER}, Table 2: {name} augmentation makes the U-Net more robust to FGSM (ε = {s['aug_eps']}) — "
            "checked as a transfer attack, FGSM inputs made with the undefended U-Net (the model that made the "
            "augmentation copies)", iou[m][transfer], iou[base][transfer], m, base,
            f"test IoU under FGSM ε = {s['aug_eps']} crafted on the U-Net"))
    we = f"worst {core.eps_label(s['worst_eps'][-1])}"
    m = "U-Net + FGSM + InvFGSM"
    findings.append(core.compare(
        f"{PAPER}, Table 2: FGSM + InvFGSM augmentation makes the U-Net more robust — checked under the worst-case "
        "attack rather than FGSM", iou[m][we], iou[base][we], m, base, f"test IoU under the worst-case attack at ε = {we[6:]}"))
    settings = {
        "data": f"liver-lesion slices of abdominal CT phantoms (common.data.synthetic.abdomen_ct_phantom, lesion=True, "
                f"{s['volume']}), HU window {list(HU_WINDOW)} → [0, 1], {s['crop']}² crops around the lesion; "
                f"{len(x_tr)} train slices from {s['train_volumes']} volumes, {len(x_te)} test slices from "
                f"{s['test_volumes']} volumes; not the paper's data",
        "network": f"MONAI BasicUNet features {tuple(s['features'])}",
        "training": f"Adam lr {s['lr']}, batch {s['batch']}, {s['epochs']} epochs, Dice+CE; augmented models retrained "
                    f"from scratch on originals + copies (ε = {s['aug_eps']}, from the trained baseline)",
        "paper attacks": "FGSM and InvFGSM (CE loss), ε in [0, 1] input units",
        "scale of ε": f"the phantom lesion is 30-50 HU below the liver, i.e. 0.09-0.15 of the window; the augmentation "
                      f"ε = {s['aug_eps']} is {s['aug_eps'] * (HU_WINDOW[1] - HU_WINDOW[0]):.0f} HU, enough for an FGSM "
                      "copy to erase much of the lesion's contrast while keeping its mask",
        "white-box vs transfer": "every attack uses the attacked model's own gradient (white box), except "
                                 f"the column '{transfer}': FGSM test inputs made once with the undefended U-Net "
                                 "and fed to every model, the setting in which the augmentation copies were made",
        "worst-case attack": core.worst_case_name(),
        "metric": "IoU (Jaccard) of the lesion per slice; Wilcoxon units are slices (not independent within a volume)",
        "seed": seed,
    }
    return {"clean_dice": clean_dice, "findings": findings, "tables": [t1, t2], "plots": [p1, p2], "settings": settings}
