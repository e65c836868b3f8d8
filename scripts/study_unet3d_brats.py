"""Phantom study of the ``unet3d_brats_distill`` bundle: the whole chain of Liu et al. 2021 at small sizes.

    python -m scripts.study_unet3d_brats --out_dir bundles/unet3d_brats_distill/demo/study

Trains, through the bundle's own configs (``monai.bundle.run`` in this process), the undefended 3D-UNet,
defensive distillation at two temperatures (teacher + student each), FGSM adversarial training (Eq. 9)
and uniform-noise augmentation on brain phantoms (``common.data.synthetic``, kind "brain"); runs
``attack.json`` (Table 1) and ``ifgsm_steps.json`` (Fig. 3 / 4) on the undefended model and
``defense_sweep.json`` on every model; then assembles, in ``out_dir``:

- ``table1.md``: the attacks' Dice (WT / TC / ET), PSNR / SSIM / RMSE, Wilcoxon + Bonferroni;
- ``fig3_steps.png`` / ``fig3_steps.md``: Dice and PSNR against the number of i-FGSM / ti-FGSM steps;
- ``fig5_8_defences.png``: Dice of each region against FGSM ε ∈ [0, 0.01] for every model;
- ``table2.md``: Dice at ε = 0, 0.05, 0.1 for every model and region, with the two-sided Wilcoxon
  signed-rank p-value of each defence against the undefended model at the same ε (paired by case),
  asterisk where the Bonferroni-adjusted p (over the defences) is ≤ 0.05 — Table 2's shape;
- ``table3.md``: the same for the 2D-UNet (``train_2d.json``: trained on axial slices, evaluated on the
  re-assembled volumes) — Table 3's shape; ``defences_2d`` adds its defences (each config composed with
  ``train_2d.json``), otherwise the 2D table has the undefended 2D model only;
- ``masking_aware.md``: for every model (each distillation temperature included), mean Dice per region
  under the paper's FGSM and under the masking-aware per-case worst case of
  :class:`common.attacks.WorstCase` (default ensemble: APGD on soft Dice and on the Jensen–Shannon
  loss) at ``masking_eps`` — defensive distillation is the classic case of gradient masking (Carlini &
  Wagner 2016), so a gap between the two columns shows robustness that only FGSM sees;
- ``study.json``: the settings and every number above.

The study deviates from the paper in size only
(phantoms, ``size``³ voxels, few epochs, a small network and one learning rate for every model, which
``--learning_rate`` sets because 1e-4 does not converge in a few epochs); the docs say so.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.report import markdown_table
from common.reporting.paper_tables import at_eps, defence_table, read_per_case, steps_table
from common.reporting.plots import render_lines
from common.validation import check_positive_int
from scripts.bundle_run import run_bundle

__all__ = ["REGIONS", "TABLE_EPS", "run_config", "read_per_case", "defence_table", "steps_table", "main"]

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "unet3d_brats_distill"
REGIONS = ("WT", "TC", "ET")
TABLE_EPS = (0.0, 0.05, 0.1)
UNDEFENDED = "No defense"
logger = logging.getLogger(__name__)


def run_config(configs: Sequence[str], **overrides: Any) -> None:
    """The bundle's ``configs`` (file names in ``configs/``) through ``monai.bundle.run``, in-process."""
    run_bundle(BUNDLE, configs, overrides, in_process=True)


def _plot_steps(path: Path, rows: Sequence[Mapping[str, Any]], regions: Sequence[str] = REGIONS) -> None:
    kinds = (("ifgsm", "-"), ("ti_fgsm", "--"))
    dice = [{"label": f"{k} {r}", "x": [row["steps"] for row in rows if row["attack"] == k],
             "y": [row[r] for row in rows if row["attack"] == k], "linestyle": style} for k, style in kinds for r in regions]
    psnr = [{"label": k, "x": [row["steps"] for row in rows if row["attack"] == k and row["psnr"] is not None],
             "y": [row["psnr"] for row in rows if row["attack"] == k and row["psnr"] is not None], "linestyle": style}
            for k, style in kinds]
    atomic_write_bytes(path, render_lines([
        {"title": "Fig. 3: Dice vs steps", "xlabel": "steps N (α N = ε = 0.05)", "ylabel": "Dice", "series": dice},
        {"title": "Fig. 4: PSNR vs steps", "xlabel": "steps N", "ylabel": "PSNR (dB)", "series": psnr},
    ]))


def _plot_defences(
    path: Path, models: Mapping[str, Mapping[tuple[str, float], Mapping[str, Any]]], max_eps: float = 0.01,
    regions: Sequence[str] = REGIONS,
) -> None:
    panels = []
    for region in regions:
        series = []
        for name, per_case in models.items():
            eps = sorted({e for (_, e) in per_case if e <= max_eps + 1e-12})
            series.append({"label": name, "x": eps,
                           "y": [at_eps(per_case, e)[f"dice_{region}"].mean() for e in eps]})
        panels.append({"title": f"{region}: Dice vs ε (Fig. 5–8)", "xlabel": "FGSM ε", "ylabel": "Dice",
                       "series": series})
    atomic_write_bytes(path, render_lines(panels))


def main(
    out_dir: str = str(BUNDLE / "demo" / "study"),
    size: int = 24,
    num_cases: int = 14,
    fractions: Sequence[float] = (0.43, 0.07, 0.5),
    epochs: int = 6,
    learning_rate: float = 3e-3,
    base_filters: int = 4,
    depth: int = 3,
    temperatures: Sequence[float] = (20, 100),
    adv_eps: float = 0.05,
    seed: int = 0,
    sweep_eps: Sequence[float] | None = (0.002, 0.004, 0.006, 0.008, 0.01, 0.05, 0.1),
    threads: int = 1,
    unet2d: bool = True,
    defences_2d: bool = False,
    masking_eps: Sequence[float] | None = (0.01, 0.05),
) -> dict[str, Any]:
    """Run the phantom study and write its tables and figures to ``out_dir``; return ``study.json``'s dict.

    ``unet2d``: also train and sweep the 2D-UNet (``table3.md``); ``defences_2d``: with its defences too.

    ``sweep_eps``: FGSM ε of the defence sweeps; ``None`` runs ``defense_sweep.json``'s 0.001 … 0.01,
    0.05, 0.1 (the default, every other 0.001 step, halves the time). ``threads``: torch CPU threads.
    ``masking_eps``: ε of the FGSM vs worst-case comparison of every model (``None``: skipped).
    """
    import torch

    torch.set_num_threads(check_positive_int(threads, "threads"))
    size = check_positive_int(size, "size")
    epochs = check_positive_int(epochs, "epochs")
    if len(temperatures) < 1 or any(not float(t) > 0 for t in temperatures):
        raise ValueError(f"temperatures: expected positive values, got {temperatures!r}")
    out = Path(out_dir)
    start = time.time()
    common = {
        "demo_dir": str(out / "work"),
        "image_size": [size] * 3,
        "phantom_cases": check_positive_int(num_cases, "num_cases"),
        "phantom_fractions": list(fractions),
        "network_def#base_filters": check_positive_int(base_filters, "base_filters"),
        "network_def#depth": check_positive_int(depth, "depth"),
        "network_def#seg_levels": min(3, depth - 1),
        "seed": seed,
    }
    train = {**common, "max_epochs": epochs, "learning_rate": learning_rate}
    variants: dict[str, tuple[list[str], dict[str, Any]]] = {
        UNDEFENDED: (["train.json"], {"run_name": "unet3d"}),
    }
    for t in temperatures:
        variants[f"Distillation (T={t:g})"] = (
            ["train.json", "distill.json"], {"temperature": float(t), "run_name": f"distill_T{t:g}"},
        )
    variants[f"Adversarial training—{adv_eps:g}"] = (
        ["train.json", "adv_train.json"], {"adv_eps": adv_eps, "run_name": f"adv_train_eps{adv_eps:g}"},
    )
    variants["Noise augmentation—0.01"] = (["train.json", "noise_aug.json"], {"run_name": "noise_aug"})
    variants_2d = {  # the same models with train_2d.json: folders unet2d, unet2d_<defence>
        name: (["train.json", "train_2d.json", *configs[1:]],
               {**extra, "run_name": "unet2d" + ("" if extra["run_name"] == "unet3d" else "_" + extra["run_name"])})
        for name, (configs, extra) in variants.items()
        if unet2d and (defences_2d or name == UNDEFENDED)
    }

    timings: dict[str, float] = {}
    for label, group in (("", variants), (" (2D)", variants_2d)):
        for name, (configs, extra) in group.items():
            t0 = time.time()
            run_config([*configs, "demo.json"], **{**train, **extra})
            timings[f"train {name}{label}"] = time.time() - t0
    eval_dir = out / "work" / "eval"

    t0 = time.time()
    run_config(["train.json", "attack.json", "demo.json"], **common, run_name="unet3d")
    run_config(["train.json", "attack.json", "ifgsm_steps.json", "demo.json"], **common, run_name="unet3d")
    timings["attacks (Table 1, Fig. 3)"] = time.time() - t0
    sweeps = {}
    t0 = time.time()
    sweep = {} if sweep_eps is None else {"attack#eps_values": [float(e) for e in sweep_eps]}
    if sweep and not {0.05, 0.1} <= set(sweep["attack#eps_values"]):
        raise ValueError(f"sweep_eps: must contain 0.05 and 0.1 (Table 2), got {sweep_eps!r}")
    for name, (configs, extra) in variants.items():
        run_config(["train.json", "attack.json", "defense_sweep.json", "demo.json"], **common, **sweep, run_name=extra["run_name"])
        sweeps[name] = read_per_case(eval_dir / extra["run_name"] / "defense_sweep" / "per_case.csv")
    sweeps_2d = {}
    for name, (configs, extra) in variants_2d.items():
        run_config([*configs, "attack.json", "defense_sweep.json", "demo.json"], **common, **sweep,
                   run_name=extra["run_name"])
        sweeps_2d[name] = read_per_case(eval_dir / extra["run_name"] / "defense_sweep" / "per_case.csv")
    timings["defence sweeps"] = time.time() - t0
    masking_rows: list[dict[str, Any]] = []
    if masking_eps:
        t0 = time.time()
        masking = {
            "attack#eps_values": [float(e) for e in masking_eps],
            "attack#attack_names": ["fgsm", "worst_case"],
            "attack#output_dir": "$@output_dir + '/masking_aware'",
            "attack#title": "FGSM and the masking-aware worst case",
        }
        for name, (configs, extra) in variants.items():
            run_config(["train.json", "attack.json", "defense_sweep.json", "demo.json"], **common, **masking,
                       run_name=extra["run_name"])
            groups = read_per_case(eval_dir / extra["run_name"] / "masking_aware" / "per_case.csv")
            for (attack, eps), group in groups.items():
                if attack != "clean":
                    masking_rows.append({"model": name, "eps": eps, "attack": attack,
                                         **{r: float(group[f"dice_{r}"].mean()) for r in REGIONS}})
        atomic_write_text(out / "masking_aware.md", markdown_table(
            masking_rows, ["model", "eps", "attack", *REGIONS],
            headers=["Model", "ε", "Attack", *(f"Dice {r}" for r in REGIONS)]))
        timings["masking-aware attacks"] = time.time() - t0

    table1 = (eval_dir / "unet3d" / "attack" / "summary.md").read_text(encoding="utf-8")
    atomic_write_text(out / "table1.md", table1)
    steps_summary = json.loads((eval_dir / "unet3d" / "ifgsm_steps" / "summary.json").read_text(encoding="utf-8"))
    steps = steps_table(steps_summary)
    atomic_write_text(
        out / "fig3_steps.md",
        markdown_table(steps, ["attack", "steps", *REGIONS, "psnr"], headers=["Attack", "Steps", *(f"Dice {r}" for r in REGIONS), "PSNR (dB)"]),
    )
    _plot_steps(out / "fig3_steps.png", steps)
    rows2, table2 = defence_table(sweeps)
    atomic_write_text(out / "table2.md", table2)
    rows3: list[dict[str, Any]] = []
    if sweeps_2d:
        rows3, table3 = defence_table(sweeps_2d)
        atomic_write_text(out / "table3.md", table3)
    _plot_defences(out / "fig5_8_defences.png", sweeps)
    result: dict[str, Any] = {
        "settings": {
            "size": size, "num_cases": num_cases, "fractions": list(fractions), "epochs": epochs,
            "learning_rate": learning_rate, "base_filters": base_filters, "depth": depth,
            "temperatures": [float(t) for t in temperatures], "adv_eps": adv_eps, "seed": seed,
            "sweep_eps": sweep_eps, "threads": threads, "unet2d": unet2d, "defences_2d": defences_2d,
            "masking_eps": list(masking_eps) if masking_eps else None,
        },
        "table1": json.loads((eval_dir / "unet3d" / "attack" / "summary.json").read_text(encoding="utf-8")),
        "fig3": steps,
        "table2": rows2,
        "table3": rows3,
        "masking_aware": masking_rows,
    }
    timings["total"] = time.time() - start
    result["timings_s"] = timings
    atomic_write_json(out / "study.json", result)
    logger.info("study written to %s in %.0f s", out, timings["total"])
    return result


if __name__ == "__main__":
    from scripts.cli import run

    run(main, ranges={"adv_eps": (0.0, 1.0), "sweep_eps": (0.0, 1.0), "masking_eps": (0.0, 1.0)})  # inputs scaled to [0, 1]
