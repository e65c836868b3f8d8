"""Reproduce a bundle's paper findings on phantoms with one command (issue #18).

    python -m scripts.reproduce BUNDLE [--quick] [--out_dir DIR] [--seed 0] [--update_docs]

BUNDLE is one of ``nlcen_lung``, ``unet3d_brats_distill``, ``resdsn_c2f_pancreas``, ``unet_advaug``,
``certified_seg``. Trains the models the paper's experiments need (``common.studies.<bundle>``), attacks them
with the paper's attack and the worst-case attack, and writes ``DIR/results.json`` (clean Dice, findings
with their evidence, tables, settings, time, command, commit, date), ``DIR/results.md`` and PNG plots.
``--quick`` uses smaller phantoms and budgets (wall and CPU time, load and thread count of the run are in
each ``results.json``: ``seconds``, ``cpu_seconds``, ``load_average``, ``threads``; on an idle 2-core machine
every quick study takes 2-7.5 min). Results are seeded and repeat exactly on the same machine with the
same number of torch threads (two quick NLCEN runs: identical ``results.json`` numbers). A different thread
count, or another CPU (its vector kernels), changes float summation order: NLCEN's quick numbers moved in the
4th decimal between two machine instances, the small 3D ResDSN quick study's coarse Dice by 0.04 — the
training of 20 phantoms amplifies rounding; the findings' p-values say how much a difference means.
``--update_docs`` then copies
``results.json`` and the plots to ``bundles/BUNDLE/docs/`` and regenerates the README's section between
``<!-- reproduce:begin -->`` and ``<!-- reproduce:end -->`` and ``metadata.json``'s ``robustness_results``.
``--docs_only`` regenerates those from the committed ``bundles/BUNDLE/docs/results.json`` without running.

The same as a bundle config: ``python -m monai.bundle run --config_file bundles/BUNDLE/configs/reproduce.json``
(``--quick true`` / ``--out_dir DIR`` override its keys).
"""

from __future__ import annotations

from pathlib import Path

import fire

from common.studies import BUNDLES_DIR, check_bundle, run_study

__all__ = ["main"]


def main(bundle: str, quick: bool = False, out_dir: str | None = None, seed: int = 0, update_docs: bool = False,
         docs_only: bool = False) -> str:
    """Run the study of ``bundle``; returns the path of ``results.json``."""
    from common.studies.report import update_docs as write_docs

    check_bundle(bundle)
    for name, flag in (("quick", quick), ("update_docs", update_docs), ("docs_only", docs_only)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}: expected a flag (true/false), got {flag!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    docs = BUNDLES_DIR / bundle / "docs"
    if docs_only:
        if not (docs / "results.json").is_file():
            raise ValueError(f"docs_only: {docs / 'results.json'} does not exist; run without --docs_only first")
        write_docs(BUNDLES_DIR / bundle, docs)
        return str(docs / "results.json")
    out = Path(out_dir) if out_dir is not None else Path("runs") / "reproduce" / bundle
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {out} exists and is not a directory")
    run_study(bundle, quick=quick, out_dir=out, seed=seed)
    if update_docs:
        write_docs(BUNDLES_DIR / bundle, out)
    return str(out / "results.json")


if __name__ == "__main__":
    from scripts.cli import run

    run(main, serialize=lambda _: None)
