"""Run a robustness card on any MONAI bundle (issue #9) and write it whole or not at all.

:func:`run_card` reads the bundle (:mod:`common.card.bundle_reader`) and the datalist
(:mod:`common.card.cases`), validates everything first (every case is loaded and its label checked, the
forward is checked on the first case) so that bad input raises before anything is written, then
evaluates every case with the evaluation engine (:func:`common.evaluation.engine.evaluate` with the
parts of :mod:`common.card.parts`), aggregates the engine's rows (means, sd, two-sided Wilcoxon
signed-rank tests of each (attack, ε) against clean with Holm correction over the (attack, ε) family of
each class, :func:`common.stats.compare_with_clean`), and writes ``card.json``, ``examples.npz`` and the
rendered card (:func:`common.reporting.card.render_card_files`) as one report set
(:func:`common.io.write_report_set`: rendered and staged first, moved in, ``manifest.json`` written last,
so a reader trusts a folder whose manifest matches, :func:`common.io.read_manifest`). The output folder
is checked for writability and free space before any case is evaluated.

Resume: each case's rows are cached by the engine (:class:`common.evaluation.engine.CaseCache`) as
``output_dir/.card_cache/<key>/<case_id>.json`` (atomically), ``<key>`` a hash of every setting that
changes the numbers (grids, seed, attack and certification parameters, the config file, overrides and
checkpoint hashes). A cached entry is reused when it parses and the image and label files still have the
hashes it was computed from; an unreadable entry is recomputed with a warning naming it. The cache is not
part of the card and survives a failed run.

Verdict (schema 2, ``docs/card_schema.md``): the headline is the per-case worst case over all the card's
attacks at each ε (:func:`common.card.headline.worst_case_entries`; the budget's
:class:`common.attacks.WorstCase` ensemble is one of them), with Dice / HD95 (mm when the cases share a voxel
spacing) / NSD per class, a 95 % t interval, Wilcoxon against clean and the smallest reachable p;
ground-truth components detected by size bin; the gradient-masking checks on the first case (cached as
``masking.json``); ``budget`` (:data:`common.card.parts.BUDGETS`) sets attacks, steps and n; ``compare``
adds another card side by side (:mod:`common.card.compare`). Sigmoid (multi-label) bundles are attacked
with per-channel losses and certified one channel at a time.

Units: ε and σ are given as fractions of the input range (the intensity range of the network input,
from the preprocessing); the card states both that and the values in input units.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.card.compare import compare_cards, read_other_card
from common.card.headline import component_observer, masking_flags, worst_case_entries
from common.card.bundle_reader import Bundle, check_forward, read_bundle, sha256_file
from common.card.cases import CaseRef, load_case, read_case, read_datalist
from common.card.parts import (
    BUDGETS,
    CLEAN_REPEATS,
    WORST_CASE,
    PartSettings,
    attack_settings,
    card_perturbations,
    cert_part,
    example_observer,
    rows_by_part,
)
from common.evaluation.engine import CaseCache, Scoring, evaluate, progress_bar, settings_hash
from common.io import atomic_write_npz, check_writable, write_report_set
from common.metrics import EMPTY_CLASS_RULE
from common.stats import compare_with_clean, mean_or_none, median_or_none, sd_or_none
from common.validation import check_nonnegative, check_positive_int, check_probability

__all__ = ["run_card", "DEFAULT_EPS", "DEFAULT_SIGMAS", "CACHE_DIR", "SCHEMA_VERSION", "EXAMPLE_ATTACK"]

DEFAULT_EPS = (0.01, 0.02, 0.04, 0.08)
DEFAULT_SIGMAS = (0.25, 0.5)
CACHE_DIR = ".card_cache"
SCHEMA_VERSION = 2
EXAMPLE_ATTACK = "IFGSM-ce"
EPS_UNIT = "fraction of the input range"
#: a ground-truth component counts as detected when the prediction covers at least this fraction of it
DETECTED_OVERLAP = 0.5


def _grid(values: Any, name: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name}: expected a non-empty list of numbers > 0, got {values!r}")
    grid = tuple(check_nonnegative(v, name) for v in values)
    if any(v <= 0 for v in grid):
        raise ValueError(f"{name}: every value must be > 0, got {list(grid)}")
    return grid


def _versions() -> dict[str, str]:
    import monai

    try:
        own = importlib.metadata.version("robust-seg-monai")
    except importlib.metadata.PackageNotFoundError:
        own = "unknown"
    return {"python": sys.version.split()[0], "torch": torch.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "robust_seg_monai": own, "platform": platform.platform()}


def _validate_cases(bundle: Bundle, cases: Sequence[CaseRef], progress: bool) -> tuple[float, float, int, list]:
    """Load and check every case, check the forward on the first; return the measured input min and max,
    the number of spatial dims and each case's voxel spacing after preprocessing (``None`` if unknown)."""
    low, high = float("inf"), float("-inf")
    spatial, spacings = None, []
    for i, case in enumerate(progress_bar(cases, "checking cases", len(cases), progress)):
        data = read_case(bundle, case)
        x = data.x
        spacings.append(None if data.spacing is None else tuple(float(v) for v in data.spacing))
        if spatial is None:
            spatial = x.ndim
            check_forward(bundle, x, f"'image' file {case.image}")
        elif x.ndim != spatial:
            raise ValueError(f"datalist {case.datalist}: 'image' file {case.image} has {x.ndim - 2} spatial "
                             f"dims, the first case {spatial - 2}")
        low, high = min(low, float(x.min())), max(high, float(x.max()))
    return low, high, spatial - 2, spacings


def _cache_key(bundle: Bundle, settings: Mapping[str, Any]) -> str:
    return settings_hash({
        "settings": settings,
        "config_sha256": sha256_file(bundle.config_path),
        "checkpoint_sha256": bundle.checkpoint_sha256,
        "extra_checkpoints": {k: v["sha256"] for k, v in bundle.extra_checkpoints.items()},
        "overrides": bundle.overrides,
        "class_names": bundle.class_names,
    })


def _attack_entries(parts: Mapping, run: _Run) -> list[dict]:
    """One entry per (attack, ε): mean, sd, per-case Dice, Wilcoxon p against clean and its Holm
    adjustment over the (attack, ε) family of each class."""
    ids, classes = _ids(run), run.bundle.foreground_names
    clean = parts[("clean", 0.0, 0.0)]
    keys = [(a, j) for a in run.attack_names for j in range(len(run.eps))]
    dice = {(a, j): parts[(a, run.eps_input[j], 0.0)] for a, j in keys}
    tests = compare_with_clean(
        np.array([[clean[c][f"dice_{k}"] for c in ids] for k in classes], dtype=np.float64),  # (M, n)
        np.array([[[dice[key][c][f"dice_{k}"] for c in ids] for key in keys] for k in classes], dtype=np.float64),
    )
    out = []
    for t, (a, j) in enumerate(keys):
        per_case = {c: {k: dice[(a, j)][c][f"dice_{k}"] for k in classes} for c in ids}
        hd = {k: [dice[(a, j)][c].get(f"hd95_{k}") for c in ids] for k in classes}
        nsd = {k: [dice[(a, j)][c].get(f"nsd_{k}") for c in ids] for k in classes}
        out.append({
            "name": a, "eps": run.eps[j], "eps_input_units": run.eps_input[j],
            "mean": {k: mean_or_none([per_case[c][k] for c in ids]) for k in classes},
            "sd": {k: sd_or_none([per_case[c][k] for c in ids]) for k in classes},
            "hd95_median": {k: median_or_none(hd[k]) for k in classes},
            "nsd_mean": {k: mean_or_none(nsd[k]) for k in classes},
            "p_wilcoxon": {k: float(tests["p_wilcoxon"][m, t]) for m, k in enumerate(classes)},
            "p_adjusted": {k: float(tests["p_holm"][m, t]) for m, k in enumerate(classes)},
            "per_case": per_case,
        })
    return out


def _cert_entries(parts: Mapping, run: _Run) -> list[dict]:
    """One entry per σ: mean certified Dice (abstained pixels ignored), abstained fraction, radius."""
    ids, classes = _ids(run), run.bundle.foreground_names
    out = []
    for i, sigma in enumerate(run.sigmas):
        rows = parts[(cert_part(sigma), 0.0, run.sigmas_input[i])]
        per_case = {c: {"certified_dice": {k: rows[c][f"dice_{k}"] for k in classes},
                        "abstain_fraction": float(rows[c]["abstained_fraction"])} for c in ids}
        out.append({
            "sigma": sigma, "sigma_input_units": run.sigmas_input[i],
            "certified_dice": {k: mean_or_none([per_case[c]["certified_dice"][k] for c in ids]) for k in classes},
            "abstain_fraction": float(np.mean([per_case[c]["abstain_fraction"] for c in ids])),
            "certified_radius": float(rows[ids[0]]["radius"]),
            "per_case": per_case,
        })
    return out


def _cost(parts: Mapping, run: _Run, masking: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Mean seconds per case of the clean forward and of every part (an attack: mean over its ε grid),
    and each part's ratio to the clean forward."""
    ids = _ids(run)
    forward_s = float(np.mean([parts[("clean", 0.0, 0.0)][c]["seconds"] for c in ids]))
    cost = {a: float(np.mean([parts[(a, e, 0.0)][c]["seconds"] for c in ids for e in run.eps_input]))
            for a in run.attack_names}
    for sigma, sigma_input in zip(run.sigmas, run.sigmas_input):
        cost[cert_part(sigma)] = float(np.mean([parts[(cert_part(sigma), 0.0, sigma_input)][c]["seconds"] for c in ids]))
    if masking is not None:
        cost["masking diagnostics (first case)"] = float(masking["seconds"])
    per_case = forward_s * CLEAN_REPEATS + sum(v * (len(run.eps) if k in run.attack_names else 1)
                                               for k, v in cost.items() if not k.startswith("masking"))
    return {"clean_forward_s_per_case": forward_s, "total_s_per_case": per_case,
            "total_ratio_to_forward": per_case / forward_s if forward_s > 0 else None,
            "parts": {p: {"s_per_case": s, "ratio_to_forward": s / forward_s if forward_s > 0 else None}
                      for p, s in cost.items()}}


def _ids(run: _Run) -> list[str]:
    return [c.case_id for c in run.cases]


def _command(args: Mapping[str, Any]) -> str:
    """The command line that reproduces the card."""
    parts = ["python -m scripts.robustness_card"]
    for key, value in args.items():
        if value is None:
            continue
        text = json.dumps(value) if not isinstance(value, str) else value
        parts.append(f"--{key} '{text}'" if any(ch in text for ch in " []{}\"$") else f"--{key} {text}")
    return " ".join(parts)


@dataclass
class _Run:
    """A validated run: the bundle, its cases, the grids (card unit and input units) and the cache folder."""

    bundle: Bundle
    cases: list[CaseRef]
    section: str
    input_range: tuple[float, float]
    spatial_dims: int
    eps: list[float]
    sigmas: list[float]
    eps_input: list[float]
    sigmas_input: list[float]
    parts: PartSettings
    settings: dict[str, Any]
    cache: Path
    args: dict[str, Any]

    @property
    def attack_names(self) -> list[str]:
        """The card's attacks in page order: the ensemble (if any) first."""
        return ([WORST_CASE] if self.parts.ensemble else []) + list(self.parts.attacks)


def _prepare(args: dict[str, Any], progress: bool) -> _Run:
    """Check the arguments, read the bundle and the datalist, load and check every case (nothing written)."""
    eps, sigmas = _grid(args["eps"], "eps"), _grid(args["sigmas"], "sigmas")
    if args["budget"] not in BUDGETS:
        raise ValueError(f"budget: expected one of {sorted(BUDGETS)}, got {args['budget']!r}")
    budget = BUDGETS[args["budget"]]
    n0, n, steps = (check_positive_int(budget[k] if args[k] is None else args[k], k) for k in ("n0", "n", "steps"))
    ensemble = budget["ensemble"]
    if ensemble and args.get("ensemble_steps") is not None:
        member_steps = check_positive_int(args["ensemble_steps"], "ensemble_steps")
        ensemble = tuple((name, {**kw, "steps": member_steps}) for name, kw in ensemble)
    if args.get("output") is not None and args["output"] not in ("softmax", "sigmoid"):
        raise ValueError(f"output: expected 'softmax' or 'sigmoid', got {args['output']!r}")
    batch_size = check_positive_int(args["batch_size"], "batch_size")
    alpha = check_probability(args["alpha"], "alpha")
    if args["max_cases"] is not None:
        check_positive_int(args["max_cases"], "max_cases")
    seed = args["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    bundle = read_bundle(args["bundle_root"], args["config"], args["ckpt"], args["device"], args["overrides"],
                         args["label_values"], output=args.get("output"), inferer_key=args.get("inferer") or "inferer")
    cases, section = read_datalist(args["datalist"], args["max_cases"])
    *measured, spatial_dims, spacings = _validate_cases(bundle, cases, progress)
    rng = bundle.input_range
    low, high = measured if rng.measured else (rng.low, rng.high)
    if not high > low:
        raise ValueError(f"datalist {args['datalist']}: the input range {low}..{high} is empty")
    eps_input, sigmas_input = [e * (high - low) for e in eps], [s * (high - low) for s in sigmas]
    parts = PartSettings(tuple(eps_input), tuple(sigmas_input), steps, n0, n, alpha, args["tau"], "holm",
                         batch_size, seed, rng.clip, attacks=tuple(budget["attacks"]), output=bundle.output,
                         ensemble=ensemble)
    settings = {
        "seed": seed,
        "budget": {"name": args["budget"], "attacks": [WORST_CASE] * bool(ensemble) + list(budget["attacks"]),
                   "steps": steps, "n0": n0, "n": n},
        "attacks": attack_settings(steps, budget["attacks"], ensemble),
        "certification": {"sigmas": list(sigmas), "sigmas_input_units": sigmas_input, "n0": n0, "n": n,
                          "alpha": alpha, "tau": parts.tau, "correction": "holm", "batch_size": batch_size},
        "wilcoxon": {"alternative": "two-sided", "correction": "holm"},
        "clip": list(rng.clip) if rng.clip else None,
        "label_values": [list(g) for g in bundle.label_values] if bundle.label_values else None,
        "output": bundle.output,
        "channel_labels": [list(g) for g in bundle.channel_labels],
        "inferer_key": args.get("inferer") or "inferer",
        "spacing": _common_spacing(spacings),
        "detected_overlap": DETECTED_OVERLAP,
    }
    key = _cache_key(bundle, {**settings, "eps_input": eps_input, "input_range": [low, high]})
    return _Run(bundle, cases, section, (float(low), float(high)), spatial_dims, list(eps), list(sigmas),
                eps_input, sigmas_input, parts, {**settings, "device": str(bundle.device)},
                Path(args["output_dir"]) / CACHE_DIR / key, args)


def _common_spacing(spacings: Sequence) -> list[float] | None:
    """The voxel spacing shared by every case (HD95 in mm), ``None`` when unknown or when cases differ
    (HD95 then in voxels)."""
    first = spacings[0] if spacings else None
    if first is None or any(s != first for s in spacings):
        return None
    return list(first)


def _evaluate(run: _Run, progress: bool) -> tuple[dict, dict[str, np.ndarray], int, dict[str, np.ndarray]]:
    """Every case through the engine, from the cache when it holds the case for the same files; returns
    the rows by part (:func:`common.card.parts.rows_by_part`), the example arrays and the reused count."""
    first = run.cases[0].case_id

    def batches():
        for case in run.cases:
            x, y = load_case(run.bundle, case)
            yield {"image": x, "label": y, "case_id": [case.case_id], "need_arrays": True,
                   "fingerprint": {"files_sha256": [sha256_file(f) for f in case.files]}}

    b = run.bundle
    spacing = run.settings["spacing"]
    scoring = Scoring(b.num_classes, class_names=b.class_names, output=b.output, surface=True,
                      spacing=tuple(spacing) if spacing else None)
    examples = example_observer(first, _example_attack(run), run.eps_input[-1], run.sigmas_input[0])
    components = component_observer(b.output, b.foreground_names, DETECTED_OVERLAP)

    def observer(*a):
        return {**(examples(*a) or {}), **(components(*a) or {})}

    result = evaluate(b.forward, batches(), card_perturbations(b.forward, run.parts, run.sigmas), scoring,
                      clean_repeats=CLEAN_REPEATS, progress=progress, desc=f"robustness card {b.name}",
                      cache=CaseCache(run.cache, run.cache.name), observer=observer)
    prefix = f"{first}/"
    arrays = {k[len(prefix):]: v for k, v in result.artifacts.items()
              if k.startswith(prefix) and "/components:" not in k}
    comps = {k: v for k, v in result.artifacts.items() if "/components:" in k}
    return rows_by_part(result.rows), arrays, result.reused, comps


def _example_attack(run: _Run) -> str:
    return EXAMPLE_ATTACK if EXAMPLE_ATTACK in run.attack_names else run.attack_names[0]


def _notes(run: _Run, reused: int) -> list[str]:
    rng, (low, high) = run.bundle.input_range, run.input_range
    notes = list(run.bundle.notes)
    if rng.measured:
        notes.append(f"Input range measured on the {len(run.cases)} cases: {low:g}..{high:g} ({rng.source}).")
    return notes + [
        f"Dice per foreground class (MONAI compute_dice); empty classes: {EMPTY_CLASS_RULE}.",
        f"I-FGSM: steps = {run.parts.steps}, alpha = eps / steps, no random start; the targeted I-FGSM "
        "aims at the inverted mask (background -> class 1, foreground -> background).",
        "Cost: the clean forward is the median of 3 passes per case; an attack's cost is per case and per "
        "eps (crafting plus the prediction), mean over the eps grid; certification is per case and sigma "
        "(n0 + n passes).",
        "Certified Dice ignores abstained pixels (Laousy et al. 2023); sigma is in the unit of eps; the "
        "certified radius is in input units.",
        f"{reused} of {len(run.cases)} cases were reused from the cache {run.cache}.",
    ]


def _card(run: _Run, parts: Mapping, slice_: np.ndarray, reused: int, comps: Mapping[str, np.ndarray],
          masking: Mapping[str, Any] | None) -> dict[str, Any]:
    """The card dict of SCHEMA.md (plus ``command``, ``cache`` and a few documented extra keys)."""
    b, ids, classes = run.bundle, _ids(run), run.bundle.foreground_names
    clean = {c: {k: parts[("clean", 0.0, 0.0)][c][f"dice_{k}"] for k in classes} for c in ids}
    first = ids[0]
    axis, index = (None if int(v) < 0 else int(v) for v in slice_)
    command_args = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in run.args.items()
                    if k not in ("alpha", "tau", "batch_size")}
    return {
        "schema_version": SCHEMA_VERSION,
        "title": f"Robustness card: {b.name}" + (f" {b.version}" if b.version else ""),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(command_args),
        "bundle": {
            "root": str(b.root), "name": b.name, "version": b.version, "config": str(b.config_path),
            "checkpoint": str(b.checkpoint) if b.checkpoint else None,
            "checkpoint_sha256": b.checkpoint_sha256,
            "network": b.network_target, "inferer": b.inferer, "spatial_dims": run.spatial_dims,
            "output": b.output, "output_source": b.output_source,
            "num_classes": b.num_classes, "class_names": classes, "channel_names": b.class_names,
            "display_name": b.display_name, "extra_checkpoints": b.extra_checkpoints,
        },
        "data": {"datalist": str(Path(run.args["datalist"]).resolve()), "section": run.section,
                 "num_cases": len(ids), "case_ids": ids},
        "units": {"input_range": list(run.input_range), "range_source": b.input_range.source,
                  "eps_unit": EPS_UNIT, "eps": run.eps, "eps_input_units": run.eps_input,
                  "sigma_unit": EPS_UNIT,
                  "sigma_input_units": run.sigmas_input},
        "settings": run.settings,
        "versions": _versions(),
        "clean": {"mean": {k: mean_or_none([clean[c][k] for c in ids]) for k in classes},
                  "sd": {k: sd_or_none([clean[c][k] for c in ids]) for k in classes},
                  "per_case": clean},
        "headline": worst_case_entries(parts, ids, classes, run.attack_names, run.eps, run.eps_input, comps),
        "masking": masking,
        "attacks": _attack_entries(parts, run),
        "certification": _cert_entries(parts, run),
        "cost": _cost(parts, run, masking),
        "examples": {"case_id": first, "slice_axis": axis, "slice_index": index, "attack": _example_attack(run),
                     "eps": run.eps[-1], "sigma": run.sigmas[0]},
        "cache": {"dir": str(run.cache), "reused_cases": reused, "computed_cases": len(ids) - reused},
        "notes": _notes(run, reused),
    }


def run_card(
    bundle_root: str | os.PathLike,
    datalist: str | os.PathLike,
    config: str = "inference.json",
    ckpt: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    eps: Sequence[float] = DEFAULT_EPS,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    n0: int | None = None,
    n: int | None = None,
    steps: int | None = None,
    max_cases: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    overrides: Mapping[str, Any] | None = None,
    label_values: Sequence[int | Sequence[int]] | None = None,
    alpha: float = 0.001,
    tau: float = 0.75,
    batch_size: int = 8,
    progress: bool = True,
    budget: str = "standard",
    output: str | None = None,
    inferer: str | None = None,
    ensemble_steps: int | None = None,
    masking_check: bool = True,
    compare: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Compute and write the robustness card of the bundle at ``bundle_root`` on the cases of ``datalist``.

    Args:
        config: the bundle's inference config (a file name under ``configs/`` or a path).
        ckpt: checkpoint for ``network_def`` (default: see :mod:`common.card.bundle_reader`).
        output_dir: where the card goes (default ``<bundle_root>/eval/robustness_card``).
        eps: ε grid, fractions of the input range; ``sigmas``: σ grid, in the same unit.
        n0, n, alpha, tau, batch_size: certification (:func:`common.certify.certify`, Holm correction);
            n0 / n default to the budget's.
        steps: iterations of the I-FGSM attacks (IFGSM's default α = ε / steps; default: the budget's).
        budget: ``quick`` / ``standard`` / ``thorough`` (:data:`common.card.parts.BUDGETS`): the attacks, the
            worst-case ensemble, steps and n.
        output: ``"softmax"`` or ``"sigmoid"`` (default: from the bundle's postprocessing).
        inferer: the config id of the inferer (default ``"inferer"``).
        ensemble_steps: every ensemble member's steps (default: the budget's).
        masking_check: run the gradient-masking diagnostics on the first case.
        compare: another card's ``card.json``: its numbers side by side, paired tests on shared case ids
            (:func:`common.card.compare.compare_cards`).
        max_cases: use at most this many cases of the datalist section.
        seed: seeds MONAI (``set_determinism``) and the certification noise.
        overrides: config ids of the bundle's config to set before parsing (``{"image_size": [64, 64]}``).
        label_values: the label-file value (or list of values) of each output channel (``[0, 1, 2, 4]`` for
            raw BraTS labels, ``[[0, 3, 4], [1, 2]]`` to merge labels); default: a label value is its channel.

    Returns:
        paths of the written files: ``json``, ``examples_npz`` and the renderer's ``md``, ``html`` and PNGs.
    """
    if output_dir is None:
        output_dir = Path(bundle_root) / "eval" / "robustness_card"
    # every argument that sets the numbers, in signature order (the reproduce command lists them so)
    args = {k: v for k, v in locals().items() if k not in ("progress", "masking_check", "compare")}
    args.update(device=str(device), overrides=dict(overrides) if overrides else None)
    from monai.utils import set_determinism

    if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
        set_determinism(seed=seed)
    other = read_other_card(compare) if compare is not None else None
    run = _prepare(args, progress)
    check_writable(output_dir)
    parts, arrays, reused, comps = _evaluate(run, progress)
    slice_ = arrays.pop("slice")
    arrays["perturbation"] = arrays["adversarial"] - arrays["image"]
    masking = _masking(run) if masking_check else None
    card = _card(run, parts, slice_, reused, comps, masking)
    card["comparison"] = compare_cards(card, other, str(compare)) if other is not None else None
    return _write(card, arrays, Path(output_dir))


def _masking(run: _Run) -> dict[str, Any]:
    """The gradient-masking checks on the first case (:func:`common.card.headline.masking_flags`), cached in
    the card's cache folder as ``masking.json`` by the engine's :class:`common.evaluation.engine.CaseCache`
    with the case id and file hashes as fingerprint (reused when they match, recomputed when unreadable)."""
    case = run.cases[0]
    cache, fingerprint = CaseCache(run.cache, "masking"), {"case": case.case_id,
                                                           "files_sha256": [sha256_file(f) for f in case.files]}
    cached = cache.load("masking", fingerprint, need_arrays=False)
    if cached is not None and len(cached[0]) == 1:
        return cached[0][0]
    x, y = load_case(run.bundle, case)
    out = masking_flags(run.bundle.forward, x, y, run.eps_input, run.parts.clip, run.input_range,
                        run.bundle.output, run.parts.steps, run.parts.seed)
    result = {**out, "case": case.case_id}
    cache.save("masking", fingerprint, [result], None)
    return result


def _write(card: dict[str, Any], examples: Mapping[str, np.ndarray], out_dir: Path) -> dict[str, Path]:
    """card.json, examples.npz and the rendered card, rendered in memory, then written as one report set
    with ``manifest.json`` last."""
    from common.reporting.card import FILES, render_card_files

    text = json.dumps(card, indent=2, allow_nan=False) + "\n"  # serialise first: a bad value fails before any write
    files: dict[str, Any] = {"card.json": text,
                             "examples.npz": lambda path: atomic_write_npz(path, dict(examples))}
    files.update(render_card_files(card, dict(examples)))
    write_report_set(out_dir, files, manifest=True)
    names = {"json": "card.json", "examples_npz": "examples.npz", **FILES}
    return {k: out_dir / name for k, name in names.items()}
