"""ResDSN coarse-to-fine study (Li et al., Springer 2019; Zhu et al., 3DV 2018) on abdominal CT phantoms:
coarse ResDSN on whole volumes, fine ResDSN on pancreas-centred patches, C2F (coarse box + margin → fine,
de-cropped, small components removed); the whole-volume I-FGSM attack on the coarse model (the paper's,
ε = 0.03 Λ) and the worst-case attack on the differentiable C2F pipeline; PGD adversarial training of the
coarse model and its effect on the C2F drop (Table 8 in shape)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from common.attacks import IFGSM, PGD
from common.c2f import CoarseToFine, CoarseToFineLogits
from common.data.synthetic import abdomen_ct_phantom
from common.networks.resdsn import ResDSN
from common.studies import core
from common.studies.report import table

PAPER = "Li et al. (Springer 2019, ResDSN C2F)"
HU = (-100.0, 240.0)
FLOOR = (0.7, ["pancreas (C2F)"])  # issue #18: clean Dice floor of C2F


def _settings(quick: bool) -> dict[str, Any]:
    return {"volume": [48, 48, 48], "train": 20 if quick else 40, "test": 8 if quick else 16,
            "coarse_epochs": 40 if quick else 60, "fine_epochs": 30 if quick else 50, "patch": 24,
            "patches_per_case": 2, "margin": 4, "lr": 1e-3, "coarse_batch": 2, "fine_batch": 4,
            "coarse_channels": [8, 16, 32, 64], "fine_channels": [8, 16, 32, 64],
            "eps": 0.03, "alpha": 0.01, "steps": 5, "adv_epochs": 4 if quick else 10}


def _volumes(n: int, seed: int, size) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = core.phantom_tensors(abdomen_ct_phantom, n, seed, size=tuple(size))
    return ((x.clamp(*HU) - HU[0]) / (HU[1] - HU[0])), (y == 1).long()


def _patches(x: torch.Tensor, y: torch.Tensor, patch: int, per_case: int, rng: np.random.Generator):
    """``per_case`` patch³ crops per case centred on the pancreas centroid shifted by up to patch/4."""
    xs, ys = [], []
    shape = np.array(x.shape[2:])
    for b in range(x.shape[0]):
        centre = np.argwhere(y[b, 0].numpy() > 0).mean(0)
        for _ in range(per_case):
            c = centre + rng.uniform(-0.25, 0.25, 3) * patch
            start = np.clip(np.round(c - patch / 2).astype(int), 0, shape - patch)
            box = tuple(slice(a, a + patch) for a in start)
            xs.append(x[b][(slice(None), *box)])
            ys.append(y[b][(slice(None), *box)])
    return torch.stack(xs), torch.stack(ys)


def run(quick: bool, out_dir: Path, seed: int = 0) -> dict[str, Any]:
    s = _settings(quick)
    x_tr, y_tr = _volumes(s["train"], seed, s["volume"])
    x_te, y_te = _volumes(s["test"], seed + 10_000, s["volume"])
    g = core.seed_everything(seed)
    coarse = core.train(ResDSN(1, 2, s["coarse_channels"]), x_tr, y_tr, s["coarse_epochs"], s["lr"],
                        s["coarse_batch"], g)
    px, py = _patches(x_tr, y_tr, s["patch"], s["patches_per_case"], np.random.default_rng(seed))
    g = core.seed_everything(seed)
    fine = core.train(ResDSN(1, 2, s["fine_channels"]), px, py, s["fine_epochs"], s["lr"], s["fine_batch"], g)
    fine_sw = SlidingWindowInferer(roi_size=s["patch"], sw_batch_size=4, overlap=0.5, mode="gaussian")

    def fine_forward(v):
        return fine_sw(v, lambda t: core.main_output(fine(t)))

    # PGD adversarial training (β = 0: adversarial batch only, as the paper) — fine-tuning the trained coarse model
    g = core.seed_everything(seed)
    adv_coarse = ResDSN(1, 2, s["coarse_channels"])
    adv_coarse.load_state_dict(coarse.state_dict())

    def pgd_objective(net, xb, yb):
        net.eval()
        atk = PGD(net, eps=s["eps"], alpha=s["alpha"], steps=s["steps"], loss="ce", clip=(0.0, 1.0), generator=g)
        x_adv = atk(xb, yb)
        net.train()
        return core.dicece_objective(net, x_adv, yb)

    core.train(adv_coarse, x_tr, y_tr, s["adv_epochs"], s["lr"] / 2, s["coarse_batch"], g, pgd_objective)

    pipelines = {"standard": coarse, "PGD-trained coarse": adv_coarse}
    dice: dict[str, dict[str, np.ndarray]] = {}
    fine_only = core.case_scores(fine_forward, x_te, y_te, 2, ["pancreas"], batch_size=2)["pancreas"]
    for name, cnet in pipelines.items():
        # the crop at least one fine window wide: the phantom pancreas plus margin is shorter than the window
        # on some axis, and the sliding window would pad it with zeros the fine model never saw in training
        c2f = CoarseToFine(cnet, fine_forward, s["margin"], mask_input=False, min_size=s["patch"])
        c2f_logits = CoarseToFineLogits(cnet, fine_forward, s["margin"], mask_input=False, min_size=s["patch"])
        atk = IFGSM(cnet, eps=s["eps"], alpha=s["alpha"], steps=s["steps"], loss="ce", clip=(0.0, 1.0))
        x_adv = core.run_attack(atk, x_te, y_te, 2)
        x_worst = core.worst_case(c2f_logits, x_te, y_te, s["eps"], batch_size=2, seed=seed)
        d = {}
        d["coarse clean"] = core.case_scores(cnet, x_te, y_te, 2, ["pancreas"], batch_size=2)["pancreas"]
        d["C2F clean"] = core.case_scores(c2f, x_te, y_te, 2, ["pancreas"], batch_size=2)["pancreas"]
        d["coarse, I-FGSM"] = core.case_scores(cnet, x_adv, y_te, 2, ["pancreas"], batch_size=2)["pancreas"]
        d["C2F, I-FGSM on coarse"] = core.case_scores(c2f, x_adv, y_te, 2, ["pancreas"], batch_size=2)["pancreas"]
        d["C2F, worst case on C2F"] = core.case_scores(c2f, x_worst, y_te, 2, ["pancreas"], batch_size=2)["pancreas"]
        dice[name] = d

    cols = list(dice["standard"])
    tab = table(f"Pancreas Dice (mean of {s['test']} test volumes); attacks at ε = {s['eps']} of the HU window",
                ["coarse model", *cols], [[m, *[float(dice[m][c].mean()) for c in cols]] for m in pipelines])
    tab0 = table("Clean pancreas Dice of the three test-time pipelines (standard models)",
                 ["ResDSN coarse", "ResDSN fine only (sliding window on the whole volume)", "ResDSN C2F"],
                 [[float(dice["standard"]["coarse clean"].mean()), float(fine_only.mean()),
                   float(dice["standard"]["C2F clean"].mean())]])

    def drop(m, col):
        c = dice[m]["C2F clean"].mean()
        return 100 * (c - dice[m][col].mean()) / max(c, 1e-9)

    st, pg = dice["standard"], dice["PGD-trained coarse"]
    findings = [
        core.compare(f"{PAPER}, Tables 2-3: the coarse-to-fine C2F is more accurate than the coarse model alone",
                     st["C2F clean"], st["coarse clean"], "C2F", "coarse", "clean pancreas Dice"),
        core.compare(f"{PAPER}, Tables 2-3: C2F is more accurate than the fine model applied to the whole volume",
                     st["C2F clean"], fine_only, "C2F", "fine only", "clean pancreas Dice"),
        core.compare(f"{PAPER}, Table 8: a whole-volume I-FGSM attack on the coarse model collapses the C2F "
                     "segmentation (85.8 % relative Dice drop on NIH Pancreas-CT)",
                     st["C2F clean"], st["C2F, I-FGSM on coarse"], "clean", "attacked",
                     f"C2F Dice clean vs I-FGSM (relative drop {drop('standard', 'C2F, I-FGSM on coarse'):.1f} %; "
                     f"the attacked coarse model itself: {st['coarse clean'].mean():.3f} → "
                     f"{st['coarse, I-FGSM'].mean():.3f}, the fine model re-segments inside its box)"),
        core.compare(f"{PAPER}, Table 8: PGD adversarial training reduces the drop under the whole-volume attack "
                     "(85.8 % → 13.1 %)", pg["C2F, I-FGSM on coarse"], st["C2F, I-FGSM on coarse"],
                     "PGD-trained", "standard",
                     f"C2F Dice under I-FGSM (relative drops {drop('PGD-trained coarse', 'C2F, I-FGSM on coarse'):.1f} % "
                     f"vs {drop('standard', 'C2F, I-FGSM on coarse'):.1f} %)"),
        core.compare(f"{PAPER}, Table 8: PGD adversarial training makes C2F more robust — checked under the "
                     "worst-case attack on the whole differentiable C2F pipeline",
                     pg["C2F, worst case on C2F"], st["C2F, worst case on C2F"], "PGD-trained", "standard",
                     f"C2F Dice under the worst-case attack (relative drops "
                     f"{drop('PGD-trained coarse', 'C2F, worst case on C2F'):.1f} % vs "
                     f"{drop('standard', 'C2F, worst case on C2F'):.1f} %)"),
    ]
    settings = {
        "data": f"abdominal CT phantoms (common.data.synthetic.abdomen_ct_phantom) {s['volume']}, HU window "
                f"{list(HU)} scaled to [0, 1]; {s['train']} train / {s['test']} test volumes; not NIH Pancreas-CT",
        "networks": f"ResDSN (long residuals, deep supervision), coarse channels {s['coarse_channels']} on whole "
                    f"volumes, fine channels {s['fine_channels']} on {s['patch']}³ pancreas-centred patches "
                    f"({s['patches_per_case']} per case); C2F margin {s['margin']} voxels, the crop widened "
                    f"to at least one fine window ({s['patch']}³, min_size) inside the volume, raw (unmasked) crop",
        "training": f"Adam lr {s['lr']}, Dice+CE on every head; coarse {s['coarse_epochs']} epochs batch "
                    f"{s['coarse_batch']}, fine {s['fine_epochs']} epochs batch {s['fine_batch']}; PGD training: "
                    f"the trained coarse model fine-tuned {s['adv_epochs']} epochs at lr/2 on PGD examples only "
                    f"(β = 0, ε = {s['eps']}, α = {s['alpha']}, {s['steps']} steps, random start); fine model shared",
        "paper attack": f"I-FGSM on the coarse model over the whole volume, CE, ε = {s['eps']} (= 0.03 Λ), "
                        f"α = {s['alpha']}, {s['steps']} steps; C2F run on the attacked volume",
        "worst-case attack": core.worst_case_name() + "; on CoarseToFineLogits (white-box C2F)",
        "seed": seed,
    }
    clean = {"pancreas (C2F)": float(st["C2F clean"].mean()), "pancreas (coarse)": float(st["coarse clean"].mean()),
             "pancreas (fine only)": float(fine_only.mean())}
    return {"clean_dice": clean, "findings": findings, "tables": [tab0, tab], "plots": [], "settings": settings}
