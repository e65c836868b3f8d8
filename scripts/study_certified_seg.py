"""Phantom study of the certified_seg bundle (Laousy et al., MICCAI 2023, Tables 1-2 in shape).

Runs the bundle's own configs in-process with ``monai.bundle.run`` on chest phantoms:

1. ``train.json``               the base UNet (lungs, heart, clavicles; 5 classes)
2. ``train_noise.json``         the SegCertify baseline, trained with Gaussian noise σ = 0.25
3. ``train_denoiser.json``      the DDPM (DiffusionModelUNet + linear DDPMScheduler, 1000 steps) and one
                                UNet denoiser per σ, on the training images
4. ``certify.json``             SegCertify (noise model) and plain smoothing of the base model
5. ``certify_denoised.json``    the base model behind the one-step DDPM denoiser and behind the UNet denoisers

then merges the four summaries into one table (``study.md`` / ``study.json`` / ``study.csv`` in
``out_dir``) and prints it::

    python -m scripts.study_certified_seg --out_dir /tmp/certified_seg_study

Defaults are sized for ≈ 10 min on 2 CPU cores (64×64 images, 4 test images, n0 = 10, n = 100).
"""

from __future__ import annotations

import json
from pathlib import Path


from common.reporting.paper_tables import certification_tables
from common.data.synthetic import write_phantom_dataset
from common.io import atomic_write_json, atomic_write_text
from common.report import write_csv
from scripts.bundle_run import run_bundle

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "certified_seg"


def _run(configs: list[str], **overrides) -> None:
    """``python -m monai.bundle run`` in-process on the bundle's configs."""
    run_bundle(BUNDLE, configs, overrides, in_process=True)


def main(
    out_dir: str = "certified_seg_study",
    num_cases: int = 44,
    size: int = 64,
    fractions: tuple[float, float, float] = (0.73, 0.18, 0.09),
    seg_epochs: int = 25,
    diffusion_epochs: int = 25,
    diffusion_lr: float = 1e-3,
    denoiser_epochs: int = 10,
    sigmas: tuple[float, ...] = (0.25, 0.5, 1.0),
    n0: int = 10,
    n: int = 100,
    seed: int = 0,
) -> str:
    """Run the study; returns the Markdown table (also written to ``out_dir/study.md``)."""
    out = Path(out_dir).resolve()
    data = out / "data"
    if not (data / "datalist.json").exists():
        write_phantom_dataset("chest", data, num_cases=num_cases, size=(size, size), seed=seed,
                              fractions=tuple(fractions), target="classes")  # the certification overlap rule
    common = {
        "dataset_dir": str(data),
        "models_dir": str(out / "models"),
        "output_dir": f"$'{out}/eval/' + @variant",
        "image_size": [size, size],
        "seed": seed,
        "sigmas": [float(s) for s in sigmas],
        "network_def#channels": [16, 32, 64, 128],
        "network_def#strides": [2, 2, 2],
        "network_def#num_res_units": 1,
        "diffusion_channels": [16, 32, 32],
        "diffusion_attention_levels": [False, False, False],
        "diffusion_norm_num_groups": 8,
        "diffusion_num_head_channels": 8,
        "denoiser_channels": [16, 32, 64],
        "denoiser_strides": [2, 2],
        "n0": n0,
        "n": n,
    }
    _run(["train.json"], max_epochs=seg_epochs, **common)
    _run(["train.json", "train_noise.json"], max_epochs=seg_epochs, **common)
    _run(["train.json", "train_denoiser.json"], diffusion_max_epochs=diffusion_epochs,
         diffusion_learning_rate=diffusion_lr, denoiser_max_epochs=denoiser_epochs, **common)
    _run(["train.json", "train_noise.json", "certify.json"], **common)
    _run(["train.json", "certify.json"], **common)
    _run(["train.json", "train_denoiser.json", "certify.json", "certify_denoised.json"], **common)

    entries = []
    for part in ("noise/certify", "base/certify", "base/certify_denoised"):
        entries += json.loads((out / "eval" / part / "summary.json").read_text())["entries"]
    class_names = ["left_lung", "right_lung", "heart", "clavicles"]
    paper, strict = certification_tables(entries, class_names)
    text = (f"Chest phantoms {size}x{size}, n0={n0}, n={n}, alpha=0.001, tau=0.75, Holm; "
            f"rows with sigma 0 are the plain (uncertified) prediction.\n\n"
            f"Certified scores, abstentions ignored:\n\n{paper}\n"
            f"Strict (abstentions count as errors):\n\n{strict}")
    atomic_write_text(out / "study.md", text)
    atomic_write_json(out / "study.json", {"entries": entries})
    write_csv(out / "study.csv", entries)
    print(text)
    return text


if __name__ == "__main__":
    from scripts.cli import run

    run(main, ranges={"sigmas": (0.0, 1.0)})  # inputs scaled to [0, 1]
