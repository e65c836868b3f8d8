"""A robustness card for any MONAI bundle (issue #9): clean Dice, FGSM / I-FGSM / targeted I-FGSM with Dice
and cross-entropy losses over an ε grid, randomized-smoothing certification over a σ grid, Wilcoxon tests
against clean, and the cost of each part, written as ``card.md``, a self-contained ``card.html``, plots and
``card.json`` with every number.

    python -m scripts.robustness_card --bundle_root bundles/nlcen_lung --datalist data/chest/datalist.json \\
        --output_dir eval/card --eps 0.01,0.02,0.04,0.08 --sigmas 0.25,0.5 --n0 10 --n 100 --max_cases 20

ε and σ are fractions of the input range the bundle's preprocessing produces (e.g. ``b_min``..``b_max`` of
``ScaleIntensityRanged``); the card states the range and the values in input units. ``--overrides`` sets
ids of the bundle's config before it is parsed, as ``monai.bundle run --key value`` would (e.g.
``--overrides '{"image_size": [64, 64]}'``). ``--label_values "[0,1,2,4]"`` gives the label-file value of
each output channel when the files do not hold channel indices (raw BraTS labels); a list per channel merges
labels (``"[[0,3,4],[1,2]]"``); with ``--output sigmoid`` (or a bundle whose postprocessing has
``Activationsd(sigmoid=True)``) the lists may overlap (``"[[1,4],[1,2,4],[4]]"``: BraTS TC, WT, ET).
``--inferer ID`` names the config id of the inferer. ``--budget quick|standard|thorough`` sets the attacks,
the worst-case ensemble, the steps and the certification n (``--steps``, ``--n0``, ``--n`` override them).
``--compare OTHER/card.json`` adds the other card side by side with paired Wilcoxon tests on shared cases. An interrupted run restarted with the same settings reuses
the finished cases (``<output_dir>/.card_cache``). The same run as a bundle config::

    python -m monai.bundle run --config_file scripts/robustness_card.json --bundle_root DIR --datalist FILE \
        [--meta_file DIR/configs/metadata.json] [--eps "[0.01,0.02]"] \\
        [--bundle_overrides '{"image_size": [64, 64]}']

(``--meta_file`` only silences MONAI's complaint that ``scripts/`` has no ``metadata.json``.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import fire

from common.card.runner import DEFAULT_EPS, DEFAULT_SIGMAS, run_card

__all__ = ["main"]


def main(
    bundle_root: str,
    datalist: str,
    config: str = "inference.json",
    ckpt: str | None = None,
    output_dir: str | None = None,
    eps: Sequence[float] = DEFAULT_EPS,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    n0: int | None = None,
    n: int | None = None,
    steps: int | None = None,
    max_cases: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    overrides: Mapping[str, Any] | str | None = None,
    label_values: Sequence[int | Sequence[int]] | None = None,
    budget: str = "standard",
    output: str | None = None,
    inferer: str | None = None,
    compare: str | None = None,
    ensemble_steps: int | None = None,
) -> str:
    """Write the card of the bundle at ``bundle_root`` on the cases of ``datalist``; return the card's
    HTML path. ``overrides`` is a dict or its JSON text (the bundle config passes JSON text, so that
    ``$``/``@`` values reach the target bundle's parser unparsed). See :func:`common.card.runner.run_card`
    for every argument."""
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides) if overrides.strip() else None
        except json.JSONDecodeError as err:
            raise ValueError(f"overrides: expected a JSON object, got {overrides!r} ({err})") from err
    paths = run_card(
        bundle_root, datalist, config=config, ckpt=ckpt, output_dir=output_dir, eps=eps, sigmas=sigmas, n0=n0,
        n=n, steps=steps, max_cases=max_cases, seed=seed, device=device, overrides=overrides,
        label_values=label_values, budget=budget, output=output, inferer=inferer, compare=compare,
        ensemble_steps=ensemble_steps,
    )
    return str(paths["html"])


if __name__ == "__main__":
    from scripts.cli import run

    run(main, ranges={"eps": (0.0, 1.0), "sigmas": (0.0, 1.0)})
