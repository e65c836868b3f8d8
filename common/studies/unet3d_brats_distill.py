"""BraTS defences study (Liu et al., J. Digit. Imaging 2021) on brain MRI phantoms: a 3D U-Net attacked with
FGSM, i-FGSM and ti-FGSM (soft-Dice loss, ε as a fraction of the maximum intensity, inputs in [0, 1]),
Dice against the number of i-FGSM steps, and the defences — defensive distillation at several
temperatures T (teacher and student trained at T, the student used at T = 1), FGSM adversarial training
(Eq. 9, β = 0.5) and uniform-noise augmentation — in 3D and, for the last two, with the 2D U-Net on axial
slices. Every model is also attacked with the worst-case attack, which is not fooled by gradient masking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.attacks import FGSM, IFGSM, constant_target
from common.data.synthetic import brain_mri_phantom
from common.defenses.training import uniform_noise
from common.losses import DistillationDiceLoss, SoftDiceLoss, temperature_softmax
from common.networks.unet_brats import UNetBraTS
from common.studies import core
from common.studies.report import line_plot, table

PAPER = "Liu et al. (J. Digit. Imaging 2021)"
REGIONS = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}  # after the label map {0, 1, 2, 4} -> {0, 1, 2, 3}
FLOOR = (0.8, None)  # issue #18: clean Dice floor, WT / TC / ET of the 3D and the 2D U-Net


def _settings(quick: bool) -> dict[str, Any]:
    return {"phantom": [48, 48, 48], "crop": 24, "train": 24 if quick else 40, "test": 8 if quick else 16,
            "epochs": 20 if quick else 50, "test_slices_2d": 48 if quick else None, "epochs_2d": 20 if quick else 30,
            "lr": 2e-3, "batch": 2, "batch_2d": 16,
            "base_filters": 8, "depth": 3, "temperatures": [10, 100], "eps": 0.05, "eps_grid": [0.01, 0.02, 0.05],
            "steps": 10, "steps_grid": [1, 2, 5, 10], "adv_eps": 0.05, "beta": 0.5, "noise_radius": 0.01}


class LogitScale(torch.nn.Module):
    """``z = T · u(x)``: the logits of ``net`` multiplied by ``scale`` = T (every deep-supervision head too).

    A network trained at temperature T has softmax(z / T) = softmax(u): written this way Adam trains it
    at T = 100 as fast as at T = 1 (without it the last layer must grow T-fold, and neither teacher nor
    student trained in the quick budget: student WT Dice 0.16 at T = 10). The model family and the deployed
    network (z at T = 1, logits T times larger, as Carlini & Wagner 2016 observed of distilled networks) are
    those of defensive distillation (Papernot et al., S&P 2016); only the parametrisation differs."""

    def __init__(self, net: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.net, self.scale = net, float(scale)

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        return [o * self.scale for o in out] if isinstance(out, (list, tuple)) else out * self.scale


def _data(n: int, seed: int, size, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Phantoms cropped to crop³ around the tumour centroid (shifted by up to crop/8), each channel divided
    by its maximum (inputs in [0, 1]), labels mapped {0, 1, 2, 4} -> {0, 1, 2, 3}."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        img, lab = brain_mri_phantom(tuple(size), seed=seed + i)
        centre = np.argwhere(lab > 0).mean(0) + rng.uniform(-0.125, 0.125, 3) * crop
        start = np.clip(np.round(centre - crop / 2).astype(int), 0, np.array(lab.shape) - crop)
        box = tuple(slice(a, a + crop) for a in start)
        img = img[(slice(None), *box)]
        img = img / np.maximum(img.reshape(4, -1).max(1), 1e-6)[:, None, None, None]
        xs.append(img)
        ys.append(np.searchsorted([0, 1, 2, 4], lab[box]))
    return torch.from_numpy(np.stack(xs)).float(), torch.from_numpy(np.stack(ys))[:, None].long()


def _slices(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The axial slices (last axis) that hold tumour."""
    xs = x.permute(0, 4, 1, 2, 3).reshape(-1, *x.shape[1:4])
    ys = y.permute(0, 4, 1, 2, 3).reshape(-1, 1, *y.shape[2:4])
    keep = (ys > 0).flatten(1).any(1)
    return xs[keep], ys[keep]


def run(quick: bool, out_dir: Path, seed: int = 0) -> dict[str, Any]:
    s = _settings(quick)
    x_tr, y_tr = _data(s["train"], seed, s["phantom"], s["crop"])
    x_te, y_te = _data(s["test"], seed + 10_000, s["phantom"], s["crop"])

    def unet(dims: int) -> UNetBraTS:
        return UNetBraTS(dims, 4, 4, base_filters=s["base_filters"], depth=s["depth"], seg_levels=2, dropout=0.0)

    def fgsm_objective(net, xb, yb):
        net.eval()
        x_adv = FGSM(net, s["adv_eps"], loss="dice", clip=(0.0, 1.0))(xb, yb)
        net.train()
        return s["beta"] * core.dicece_objective(net, xb, yb) + (1 - s["beta"]) * core.dicece_objective(net, x_adv, yb)

    def noise_objective_factory(g):
        def objective(net, xb, yb):
            xn = uniform_noise(xb, s["noise_radius"], generator=g).clamp(0, 1)
            return s["beta"] * core.dicece_objective(net, xb, yb) + (1 - s["beta"]) * core.dicece_objective(net, xn, yb)
        return objective

    models: dict[str, torch.nn.Module] = {}
    g = core.seed_everything(seed)
    models["3D U-Net"] = core.train(unet(3), x_tr, y_tr, s["epochs"], s["lr"], s["batch"], g)
    g = core.seed_everything(seed)
    models["3D FGSM adv. training"] = core.train(unet(3), x_tr, y_tr, s["epochs"], s["lr"], s["batch"], g, fgsm_objective)
    g = core.seed_everything(seed)
    models["3D noise augmentation"] = core.train(unet(3), x_tr, y_tr, s["epochs"], s["lr"], s["batch"], g,
                                                 noise_objective_factory(g))
    for T in s["temperatures"]:
        teacher_loss = SoftDiceLoss(include_background=False, temperature=T)

        def teacher_objective(net, xb, yb, T=T, teacher_loss=teacher_loss):  # Eq. 4-6 at T, plus CE at T
            z = core.main_output(net(xb))
            return teacher_loss(z, yb) + F.cross_entropy(z / T, yb[:, 0])

        g = core.seed_everything(seed)
        teacher = core.train(LogitScale(unet(3), T), x_tr, y_tr, s["epochs"], s["lr"], s["batch"], g, teacher_objective)
        student_loss = DistillationDiceLoss(T)

        def distill_objective(net, xb, yb, T=T, teacher=teacher, student_loss=student_loss):  # Eq. 7, plus soft CE
            with torch.no_grad():
                z = core.main_output(teacher(xb))
            zs = core.main_output(net(xb))
            return student_loss(zs, z) + F.cross_entropy(zs / T, temperature_softmax(z, T))

        g = core.seed_everything(seed)
        models[f"3D distilled T={T}"] = core.train(LogitScale(unet(3), T), x_tr, y_tr, s["epochs"], s["lr"], s["batch"],
                                                  g, distill_objective)
    xs_tr, ys_tr = _slices(x_tr, y_tr)
    xs_te, ys_te = _slices(x_te, y_te)
    if s["test_slices_2d"] is not None and len(xs_te) > s["test_slices_2d"]:  # evenly spaced subset (quick budget)
        keep = torch.linspace(0, len(xs_te) - 1, s["test_slices_2d"]).round().long()
        xs_te, ys_te = xs_te[keep], ys_te[keep]
    for name, objective in (("2D U-Net", None), ("2D FGSM adv. training", fgsm_objective), ("2D noise augmentation", "noise")):
        g = core.seed_everything(seed)
        obj = core.dicece_objective if objective is None else noise_objective_factory(g) if objective == "noise" else objective
        models[name] = core.train(unet(2), xs_tr, ys_tr, s["epochs_2d"], s["lr"], s["batch_2d"], g, obj)

    def scores(net, x, y):
        return core.case_scores(net, x, y, 4, regions=REGIONS, batch_size=4)

    res: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    eps = s["eps"]
    regions = list(REGIONS.values())  # the worst case keeps, per case, the input with the lowest mean region Dice
    for name, net in models.items():
        x, y = (x_te, y_te) if name.startswith("3D") else (xs_te, ys_te)
        r = {"clean": scores(net, x, y)}
        r[f"FGSM {eps:g}"] = scores(net, core.run_attack(FGSM(net, eps, loss="dice", clip=(0, 1)), x, y, 4), y)
        r[f"i-FGSM {eps:g}"] = scores(net, core.run_attack(IFGSM(net, eps, steps=s["steps"], loss="dice", clip=(0, 1)),
                                                           x, y, 4), y)
        r[f"worst {eps:g}"] = scores(net, core.worst_case(net, x, y, eps, batch_size=4, seed=seed, classes=regions), y)
        if isinstance(net, LogitScale):  # the same attack on z / T = u: no saturated softmax to hide behind
            r[f"worst {eps:g}, logits/T"] = scores(net, core.worst_case(net.net, x, y, eps, batch_size=4, seed=seed,
                                                                        classes=regions), y)
            r[f"worst {eps:g}, per-case min"] = {k: np.minimum(r[f"worst {eps:g}"][k], r[f"worst {eps:g}, logits/T"][k])
                                                 for k in r[f"worst {eps:g}"]}
        res[name] = r
    base = models["3D U-Net"]
    rb = res["3D U-Net"]
    for e in s["eps_grid"]:
        if e != eps:
            rb[f"FGSM {e:g}"] = scores(base, core.run_attack(FGSM(base, e, loss="dice", clip=(0, 1)), x_te, y_te, 4), y_te)
            rb[f"i-FGSM {e:g}"] = scores(base, core.run_attack(IFGSM(base, e, steps=s["steps"], loss="dice", clip=(0, 1)),
                                                               x_te, y_te, 4), y_te)
    steps_rows, steps_curves = [], {"i-FGSM": [], "ti-FGSM": []}
    for n in s["steps_grid"]:
        i = scores(base, core.run_attack(IFGSM(base, eps, steps=n, loss="dice", clip=(0, 1)), x_te, y_te, 4), y_te)
        ti_atk = IFGSM(base, eps, steps=n, loss="dice", clip=(0, 1), targeted=True,
                       target_fn=lambda t: constant_target(t, label=1))
        ti = scores(base, core.run_attack(ti_atk, x_te, y_te, 4), y_te)
        rb[f"i-FGSM N={n}"], rb[f"ti-FGSM N={n}"] = i, ti
        steps_curves["i-FGSM"].append(float(i["mean"].mean()))
        steps_curves["ti-FGSM"].append(float(ti["mean"].mean()))
        steps_rows.append([n, *[float(i[k].mean()) for k in REGIONS], *[float(ti[k].mean()) for k in REGIONS]])

    def row(name, col):
        return [name, col, *[float(res[name][col][k].mean()) for k in REGIONS]]

    rows = []
    for name in models:
        for col in ("clean", f"FGSM {eps:g}", f"i-FGSM {eps:g}", f"worst {eps:g}", f"worst {eps:g}, logits/T"):
            if col in res[name]:
                rows.append(row(name, col))
    t_models = table(f"Dice per region (mean of {s['test']} test volumes; 2D: {len(xs_te)} tumour slices) at ε = {eps}",
                     ["model", "input", *REGIONS], rows)
    t_eps = table("3D U-Net: Dice per region against ε (FGSM and 10-step i-FGSM)", ["attack", *REGIONS],
                  [[f"{a} {e:g}", *[float(rb[f'{a} {e:g}'][k].mean()) for k in REGIONS]]
                   for a in ("FGSM", "i-FGSM") for e in s["eps_grid"]])
    t_steps = table(f"3D U-Net: Dice against the number of steps N at ε = {eps} (α = ε/N; Fig. 3 in shape)",
                    ["N", *[f"i-FGSM {k}" for k in REGIONS], *[f"ti-FGSM {k}" for k in REGIONS]], steps_rows)
    plot = "reproduce_dice_vs_steps.png"
    line_plot(out_dir / plot, f"3D U-Net, mean region Dice vs steps (ε = {eps})", "steps N", "mean Dice (WT, TC, ET)",
              {k: (s["steps_grid"], v) for k, v in steps_curves.items()})

    m = "mean"
    findings = [
        core.compare(f"{PAPER}, Table 1: i-FGSM is a stronger attack than FGSM (lower Dice at the same ε)",
                     rb[f"FGSM {eps:g}"][m], rb[f"i-FGSM {eps:g}"][m], "FGSM", "i-FGSM",
                     f"3D U-Net mean region Dice at ε = {eps}"),
        core.compare(f"{PAPER}, Fig. 3: Dice decreases as the number of i-FGSM steps grows",
                     rb["i-FGSM N=1"][m], rb[f"i-FGSM N={s['steps_grid'][-1]}"][m], "N = 1", f"N = {s['steps_grid'][-1]}",
                     f"3D U-Net mean region Dice under i-FGSM at ε = {eps}"),
        core.compare(f"{PAPER}, Table 1: the targeted ti-FGSM (every voxel pushed to label 1) lowers Dice",
                     rb["clean"][m], rb[f"ti-FGSM N={s['steps_grid'][-1]}"][m], "clean", "ti-FGSM",
                     f"3D U-Net mean region Dice, ti-FGSM {s['steps_grid'][-1]} steps ε = {eps}"),
    ]
    for T in s["temperatures"]:
        d = f"3D distilled T={T}"
        findings.append(core.compare(
            f"{PAPER}, Table 3: defensive distillation (T = {T}) makes the 3D U-Net more robust to the paper's i-FGSM",
            res[d][f"i-FGSM {eps:g}"][m], rb[f"i-FGSM {eps:g}"][m], d, "3D U-Net", f"mean region Dice under i-FGSM ε = {eps}"))
        findings.append(core.compare(
            f"{PAPER}, Table 3: defensive distillation (T = {T}) makes the 3D U-Net more robust — checked under the "
            "masking-aware worst-case attack (Carlini & Wagner 2016: distillation masks gradients)",
            res[d][f"worst {eps:g}, per-case min"][m], rb[f"worst {eps:g}"][m], d, "3D U-Net",
            f"mean region Dice under the worst-case attack ε = {eps}, per case the worse of it on the logits z and "
            f"on z / T ({res[d][f'worst {eps:g}'][m].mean():.3f} and {res[d][f'worst {eps:g}, logits/T'][m].mean():.3f})"))
    lo, hi = (f"3D distilled T={T}" for T in (s["temperatures"][0], s["temperatures"][-1]))
    findings.append(core.compare(
        f"{PAPER}, Table 3 / Papernot et al. (S&P 2016): robustness to the paper's attack grows with the temperature T",
        res[hi][f"i-FGSM {eps:g}"][m], res[lo][f"i-FGSM {eps:g}"][m], hi, lo, f"mean region Dice under i-FGSM ε = {eps}"))
    for dims in ("3D", "2D"):
        for defence in ("FGSM adv. training", "noise augmentation"):
            d = f"{dims} {defence}"
            findings.append(core.compare(
                f"{PAPER}, Table 3{' and Figs. 6, 8' if dims == '2D' else ''}: {defence} makes the {dims} U-Net more "
                "robust to FGSM", res[d][f"FGSM {eps:g}"][m], res[f"{dims} U-Net"][f"FGSM {eps:g}"][m], d,
                f"{dims} U-Net", f"mean region Dice under FGSM ε = {eps}"))
        d = f"{dims} FGSM adv. training"
        findings.append(core.compare(
            f"{PAPER}: FGSM adversarial training makes the {dims} U-Net more robust — checked under the worst-case attack",
            res[d][f"worst {eps:g}"][m], res[f"{dims} U-Net"][f"worst {eps:g}"][m], d, f"{dims} U-Net",
            f"mean region Dice under the worst-case attack ε = {eps}"))
    settings = {
        "data": f"brain MRI phantoms (common.data.synthetic.brain_mri_phantom) {s['phantom']}, cropped to {s['crop']}³ "
                f"around the tumour, channels divided by their maximum; {s['train']} train / {s['test']} test "
                f"volumes; 2D: their axial tumour slices ({len(xs_tr)} / {len(xs_te)}"
                f"{', an evenly spaced subset of the test slices' if s['test_slices_2d'] else ''}); not BraTS",
        "networks": f"UNetBraTS base_filters {s['base_filters']}, depth {s['depth']}, 2 segmentation levels, no dropout; "
                    "3D and 2D",
        "training": f"Adam lr {s['lr']}; 3D {s['epochs']} epochs batch {s['batch']}, 2D {s['epochs_2d']} epochs batch "
                    f"{s['batch_2d']}; Dice+CE (teachers: soft Dice + CE at T; students: distillation soft Dice, Eq. 7, + CE "
                    "against the teacher's soft labels at T; both with logits T·u, see LogitScale); "
                    f"FGSM training Eq. 9 β = {s['beta']}, ε = {s['adv_eps']}; noise augmentation U(±{s['noise_radius']}), "
                    f"β = {s['beta']}",
        "paper attacks": f"FGSM, i-FGSM ({s['steps']} steps, α = ε/N), ti-FGSM (target label 1), soft-Dice loss, "
                         "ε as a fraction of the maximum intensity",
        "worst-case attack": core.worst_case_name() + ", each case's input chosen by its mean region Dice (WT, TC, "
                             "ET); distilled models also attacked on z / T (their logits divided by the temperature) "
                             "and scored per case by the worse of the two",
        "seed": seed,
    }
    clean = {k: float(rb["clean"][k].mean()) for k in REGIONS}
    clean.update({f"{k} (2D U-Net)": float(res["2D U-Net"]["clean"][k].mean()) for k in REGIONS})
    return {"clean_dice": clean, "findings": findings, "tables": [t_models, t_eps, t_steps], "plots": [plot],
            "settings": settings}
