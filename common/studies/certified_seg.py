"""Certification study (Laousy et al., MICCAI 2023) on chest X-ray phantoms: SegCertify randomized smoothing
(Fischer et al., ICML 2021) of a noise-trained UNet, of the plain UNet, and of the plain UNet behind a
one-step DDPM denoiser (Carlini et al., ICLR 2023) and behind per-σ UNet denoisers, for several σ.
Classes as the paper's JSRT ones: lung (both fields), heart, clavicles."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import DiffusionModelUNet, UNet
from monai.networks.schedulers import DDPMScheduler

from common.certify import certified_metrics, certify
from common.data.synthetic import chest_xray_phantom
from common.denoise import DiffusionDenoiser, UNetDenoiser, train_diffusion, train_unet_denoiser
from common.studies import core
from common.studies.report import line_plot, table

PAPER = "Laousy et al. (MICCAI 2023)"
CLASSES = ["lung", "heart", "clavicles"]
FLOOR = (0.85, CLASSES)  # issue #18: clean Dice floor of the segmenter, every class


def _settings(quick: bool) -> dict[str, Any]:
    return {
        "size": 64, "train": 96 if quick else 144, "test": 12 if quick else 24, "epochs": 60 if quick else 80,
        "lr": 1e-3, "batch": 8, "sigmas": [0.125, 0.25, 0.5] if quick else [0.125, 0.25, 0.5, 1.0],
        "noise_sigma": 0.25, "denoiser_epochs": 10 if quick else 20, "diffusion_epochs": 40 if quick else 100,
        "diffusion_lr": 1e-3, "n0": 10, "n": 100, "alpha": 0.001, "tau": 0.75,
    }


def _unet(out_channels: int, channels=(16, 32, 64, 128)) -> UNet:
    return UNet(2, 1, out_channels, channels, (2,) * (len(channels) - 1), num_res_units=1)


def run(quick: bool, out_dir: Path, seed: int = 0) -> dict[str, Any]:
    s = _settings(quick)
    gen = functools.partial(chest_xray_phantom, size=(s["size"], s["size"]), target="classes")
    x_tr, y_tr = core.phantom_tensors(gen, s["train"], seed)
    x_te, y_te = core.phantom_tensors(gen, s["test"], seed + 10_000)
    lut = torch.tensor([0, 1, 1, 2, 3])  # SCR codes (0 bg, 1/2 lungs, 3 heart, 4 clavicles) -> the paper's classes
    y_tr, y_te = lut[y_tr], lut[y_te]

    g = core.seed_everything(seed)
    base = core.train(_unet(4), x_tr, y_tr, s["epochs"], s["lr"], s["batch"], g)
    g = core.seed_everything(seed)
    sn = s["noise_sigma"]

    def noisy_objective(net, xb, yb):
        return core.dicece_objective(net, xb + sn * torch.randn(xb.shape, generator=g), yb)

    noise_model = core.train(_unet(4), x_tr, y_tr, s["epochs"], s["lr"], s["batch"], g, noisy_objective)

    loader = [x_tr[i : i + s["batch"]] for i in range(0, len(x_tr), s["batch"])]
    g = core.seed_everything(seed)
    ddpm = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32, 32),
                              attention_levels=(False, False, False), num_res_blocks=1, norm_num_groups=8,
                              num_head_channels=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", prediction_type="epsilon")
    train_diffusion(ddpm, scheduler, loader, s["diffusion_epochs"], s["diffusion_lr"], generator=g)
    ddpm.eval()
    diffusion = DiffusionDenoiser(ddpm, scheduler)
    unet_denoisers = {}
    for sigma in s["sigmas"]:
        g = core.seed_everything(seed)
        net = _unet(1, (16, 32, 64))
        train_unet_denoiser(net, loader, sigma, s["denoiser_epochs"], generator=g)
        unet_denoisers[sigma] = UNetDenoiser(net.eval(), sigma)

    clean = core.case_scores(base, x_te, y_te, 4, names=CLASSES)
    clean_noise = core.case_scores(noise_model, x_te, y_te, 4, names=CLASSES)
    setups = {
        "SegCertify (noise-trained UNet)": (noise_model, None),
        "plain UNet, no denoiser": (base, None),
        "plain UNet + UNet denoiser": (base, "unet"),
        "plain UNet + DDPM denoiser (one step)": (base, "ddpm"),
    }
    res: dict[str, dict[float, dict[str, np.ndarray]]] = {k: {} for k in setups}
    for name, (net, den) in setups.items():
        for sigma in s["sigmas"]:
            denoiser = {"unet": unet_denoisers[sigma], "ddpm": diffusion, None: None}[den]
            gen_c = torch.Generator().manual_seed(seed)
            cert = certify(net, x_te, sigma, n0=s["n0"], n=s["n"], alpha=s["alpha"], tau=s["tau"], batch_size=32,
                           denoiser=denoiser, generator=gen_c)
            m = certified_metrics(cert, y_te, 4, include_background=False)
            res[name][sigma] = {
                "dice": np.mean([m[f"dice_{c}"].numpy() for c in ("1", "2", "3")], 0),
                "dice_strict": np.mean([m[f"dice_strict_{c}"].numpy() for c in ("1", "2", "3")], 0),
                "abstain": m["abstained_fraction"].numpy(),
            }

    rows = []
    for name in setups:
        for sigma in s["sigmas"]:
            r = res[name][sigma]
            rows.append([name, sigma, float(r["dice"].mean()), float(r["dice_strict"].mean()),
                         float(100 * r["abstain"].mean())])
    tab = table(f"Certified mean foreground Dice (lung, heart, clavicles) and abstention, {s['test']} test images",
                ["setup", "σ", "certified Dice (abstentions ignored)", "certified Dice (strict)", "abstained %"], rows)
    plot = "reproduce_certified_vs_sigma.png"
    line_plot(out_dir / plot, "Certified Dice (strict) vs σ", "σ (input units, images in [0, 1])",
              "certified Dice, abstentions as errors",
              {n: (s["sigmas"], [float(res[n][sg]["dice_strict"].mean()) for sg in s["sigmas"]]) for n in setups})

    lo, hi = s["sigmas"][0], s["sigmas"][-1]
    nm = "SegCertify (noise-trained UNet)"
    findings = [
        core.compare(f"{PAPER}, Tables 1-2 (and Cohen et al. 2019): the abstained fraction grows with the noise level σ",
                     res[nm][hi]["abstain"], res[nm][lo]["abstain"], f"σ = {hi}", f"σ = {lo}",
                     f"{nm}, abstained pixel fraction"),
        core.compare(f"{PAPER}, Tables 1-2: certified Dice decreases as σ grows",
                     res[nm][lo]["dice_strict"], res[nm][hi]["dice_strict"], f"σ = {lo}", f"σ = {hi}",
                     f"{nm}, strict certified Dice"),
    ]
    dd, pu = "plain UNet + DDPM denoiser (one step)", "plain UNet, no denoiser"
    for sigma in (s["sigmas"][1], hi):
        findings.append(core.compare(
            f"{PAPER}: denoising with a diffusion model lets an off-the-shelf segmenter be certified (better than "
            f"smoothing it without a denoiser), at σ = {sigma}",
            res[dd][sigma]["dice_strict"], res[pu][sigma]["dice_strict"], "DDPM-denoised", "no denoiser",
            f"strict certified Dice at σ = {sigma}"))
    findings.append(core.compare(
        f"{PAPER}, Tables 1-2: the DDPM denoiser beats the SegCertify baseline (noise-trained model) at high σ",
        res[dd][hi]["dice_strict"], res[nm][hi]["dice_strict"], "DDPM-denoised", "SegCertify",
        f"strict certified Dice at σ = {hi}"))
    findings.append(core.compare(
        f"{PAPER}: the DDPM denoiser beats the per-σ UNet denoiser",
        res[dd][hi]["dice_strict"], res["plain UNet + UNet denoiser"][hi]["dice_strict"], "DDPM", "UNet denoiser",
        f"strict certified Dice at σ = {hi}"))
    settings = {
        "data": f"chest X-ray phantoms (common.data.synthetic.chest_xray_phantom, target 'classes'), "
                f"{s['size']}x{s['size']}, {s['train']} train / {s['test']} test images; classes lung, heart, "
                "clavicles; not JSRT",
        "segmenter": f"MONAI UNet (16, 32, 64, 128), 1 residual unit, Adam lr {s['lr']}, batch {s['batch']}, "
                     f"{s['epochs']} epochs, Dice+CE; SegCertify model trained on x + N(0, {sn}²)",
        "denoisers": f"DiffusionModelUNet (16, 32, 32), linear DDPM 1000 steps, {s['diffusion_epochs']} epochs lr "
                     f"{s['diffusion_lr']}, one-step x̂0 at t*; UNet (16, 32, 64) per σ, {s['denoiser_epochs']} epochs",
        "certification": f"n0 = {s['n0']}, n = {s['n']}, α = {s['alpha']}, τ = {s['tau']}, Holm; σ {s['sigmas']}",
        "worst-case attack": "none (certification study)",
        "seed": seed,
    }
    clean_dice = {c: float(clean[c].mean()) for c in CLASSES}
    clean_dice.update({f"{c} (noise-trained)": float(clean_noise[c].mean()) for c in CLASSES})
    return {"clean_dice": clean_dice, "findings": findings, "tables": [tab], "plots": [plot], "settings": settings}
