"""The nlcen_lung phantom study: NLCEN, its three ablations, UNet and UNet + NLCE, each trained on chest
phantoms and attacked with the full targeted I-FGSM ε grid of the NLCEN paper.

    python -m scripts.study_nlcen_lung --output_dir runs/nlcen_study      # ≈ 30–40 minutes on 2 cores

Writes ``<output_dir>/REPORT.md`` (DIC / JSC for every model and ε, Wilcoxon p against clean) and
``dice_vs_eps.png``; per-model details under ``<output_dir>/eval/<model>/attack/``.
"""

from __future__ import annotations


from scripts.demo import VARIANT_CONFIGS
from scripts.demo import main as run_variants

PAPER_EPS = (0.5, 1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32)


def main(
    output_dir: str = "runs/nlcen_study",
    variants: str | tuple = tuple(VARIANT_CONFIGS),
    phantom_cases: int = 40,
    image_size: int = 64,
    max_epochs: int = 30,
    eps_pixels: tuple = PAPER_EPS,
    seed: int = 0,
) -> str:
    """Train and attack every variant; return the report's path."""
    return run_variants(output_dir, variants, phantom_cases, image_size, max_epochs, eps_pixels, seed)


if __name__ == "__main__":
    from scripts.cli import run

    run(main, serialize=lambda _: None)
