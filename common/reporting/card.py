"""Render a robustness card (issue #9): ``card.md``, a self-contained ``card.html`` and three PNGs.

The card dict and the example arrays follow the runner/renderer contract (``SCHEMA.md``, schema
version 1). The page is built once as a list of blocks (headings, paragraphs, tables, figures, code),
then written twice: as GitHub-flavoured Markdown (user strings backslash-escaped, ``|`` escaped in
tables) and as HTML (every user string through :func:`html.escape`, CSS inline, images as base64
``data:`` URIs, a Content-Security-Policy that forbids scripts and any non-``data:`` resource), so both
pages carry the same content. Every file goes through :mod:`common.io` (written whole or not at all).

Number formats (the same in both pages): Dice ``0.812`` / ``0.812 ± 0.034`` (3 decimals), differences
``+0.012``, p-values ``0.042`` (3 decimals) or ``3.2e-05`` below 0.001, ε and σ with 4 significant
digits, seconds with 4 significant digits, ratios with 1 decimal; undefined numbers (``None``/NaN) ``–``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.io import write_report_set
from common.report import format_mean_sd
from common.reporting.plots import ABSTAIN, certified_dice_vs_sigma_png, dice_vs_eps_png, examples_png

__all__ = [
    "DASH",
    "FILES",
    "card_blocks",
    "fmt_delta",
    "fmt_mean_sd",
    "fmt_num",
    "fmt_p",
    "fmt_ratio",
    "fmt_seconds",
    "fmt_value",
    "render_card",
    "render_card_files",
    "to_html",
    "to_markdown",
    "validate_card",
    "validate_examples",
]

SCHEMA_VERSION = 2
#: schema versions the renderer reads (1: no headline, masking or comparison; docs/card_schema.md)
SCHEMA_VERSIONS = (1, 2)
DASH = "–"  # shown for undefined numbers (None / NaN)
FILES = {
    "md": "card.md",
    "html": "card.html",
    "dice_vs_eps": "dice_vs_eps.png",
    "certified_dice_vs_sigma": "certified_dice_vs_sigma.png",
    "examples": "examples.png",
}
EXAMPLE_FLOATS = ("image", "adversarial", "perturbation")
EXAMPLE_LABELS = ("label", "pred_clean", "pred_adversarial", "pred_certified")

# Required keys, as nested dicts ending in None; "[]" marks "every element of this list".
_REQUIRED: dict[str, Any] = {
    "schema_version": None,
    "title": None,
    "created": None,
    "bundle": {
        k: None
        for k in (
            "root",
            "name",
            "version",
            "config",
            "checkpoint",
            "checkpoint_sha256",
            "network",
            "spatial_dims",
            "num_classes",
        )
    }
    | {"inferer": {"type": None, "roi_size": None, "overlap": None, "mode": None}, "class_names": None},
    "data": {"datalist": None, "num_cases": None, "case_ids": None},
    "units": {k: None for k in ("input_range", "range_source", "eps_unit", "eps", "eps_input_units")},
    "settings": {
        "seed": None,
        "attacks": None,
        "certification": {k: None for k in ("sigmas", "n0", "n", "alpha", "tau", "correction", "batch_size")},
        "wilcoxon": {"alternative": None, "correction": None},
    },
    "versions": {k: None for k in ("python", "torch", "monai", "numpy", "robust_seg_monai", "platform")},
    "clean": {"mean": None, "per_case": None},
    "attacks": {
        "[]": {
            k: None
            for k in ("name", "eps", "eps_input_units", "mean", "sd", "p_wilcoxon", "p_adjusted", "per_case")
        }
    },
    "certification": {
        "[]": {
            k: None for k in ("sigma", "certified_dice", "abstain_fraction", "certified_radius", "per_case")
        }
    },
    "cost": {"clean_forward_s_per_case": None, "parts": None},
    "examples": {k: None for k in ("case_id", "slice_axis", "slice_index", "attack", "eps", "sigma")},
    "notes": None,
}


# Added in schema 2 (the verdict): the per-case worst case, masking flags (or null), comparison (or null).
_REQUIRED_V2: dict[str, Any] = {
    "headline": {
        "clean": {k: None for k in ("mean", "ci95", "hd95_median", "nsd_mean", "detection")},
        "eps": {"[]": {k: None for k in ("eps", "eps_input_units", "mean", "ci95", "hd95_median", "nsd_mean",
                                          "detection", "p_wilcoxon", "p_adjusted", "per_case")}},
        **{k: None for k in ("n_cases", "interval", "selection", "test", "min_p", "min_p_holm")},
    },
    "masking": None,
    "comparison": None,
    "settings": {"budget": {k: None for k in ("name", "attacks", "steps", "n0", "n")}},
    "cost": {"total_s_per_case": None, "total_ratio_to_forward": None},
}


@dataclass
class Fold:
    """Blocks folded away (HTML ``<details>``; Markdown: a heading and the blocks)."""

    title: str
    blocks: list[Any]


def _check_keys(obj: Any, spec: Mapping[str, Any], where: str) -> None:
    if "[]" in spec:
        if not isinstance(obj, list):
            raise ValueError(f"{where}: expected a list, got {type(obj).__name__}")
        for i, item in enumerate(obj):
            _check_keys(item, spec["[]"], f"{where}[{i}]")
        return
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(obj).__name__}")
    for key, sub in spec.items():
        if key not in obj:
            raise ValueError(f"{where}: missing required key {key!r}")
        if sub is not None:
            _check_keys(obj[key], sub, f"{where}[{key!r}]")


def validate_card(card: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first missing key (e.g. ``card['attacks'][1]: missing required key
    'sd'``) or wrong container type; check the schema version and that class names are strings."""
    _check_keys(card, _REQUIRED, "card")
    if card["schema_version"] not in SCHEMA_VERSIONS:
        raise ValueError(f"card['schema_version']: expected one of {SCHEMA_VERSIONS}, got {card['schema_version']!r}")
    if card["schema_version"] >= 2:
        _check_keys(card, _REQUIRED_V2, "card")
    names = card["bundle"]["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError("card['bundle']['class_names']: expected a non-empty list of strings")
    for key in ("notes",):
        if not isinstance(card[key], list):
            raise ValueError(f"card[{key!r}]: expected a list")
    for key in ("attacks", "parts"):
        container = card["settings"]["attacks"] if key == "attacks" else card["cost"]["parts"]
        if not isinstance(container, Mapping):
            raise ValueError(f"card[...][{key!r}]: expected a dict")
    for name, part in card["cost"]["parts"].items():
        for k in ("s_per_case", "ratio_to_forward"):
            if k not in part:
                raise ValueError(f"card['cost']['parts'][{name!r}]: missing required key {k!r}")


def validate_examples(examples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check the example arrays of SCHEMA.md: all present, 2-D, one shape; images finite floats; label
    maps integers ≥ 0 (``pred_certified`` ≥ -1, the abstain label). Returns them as numpy arrays."""
    if not isinstance(examples, Mapping):
        raise ValueError("examples: expected a dict of arrays")
    out: dict[str, np.ndarray] = {}
    for key in EXAMPLE_FLOATS + EXAMPLE_LABELS:
        if key not in examples:
            raise ValueError(f"examples: missing required array {key!r}")
        arr = np.asarray(examples[key])
        if arr.ndim != 2 or arr.size == 0:
            raise ValueError(
                f"examples[{key!r}]: expected a non-empty 2-D (H, W) array, got shape {arr.shape}"
            )
        if key in EXAMPLE_FLOATS:
            if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
                raise ValueError(f"examples[{key!r}]: expected finite numbers")
        else:
            if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
                raise ValueError(f"examples[{key!r}]: expected an integer label map, got dtype {arr.dtype}")
            low = ABSTAIN if key == "pred_certified" else 0
            if int(arr.min()) < low:
                raise ValueError(f"examples[{key!r}]: labels must be ≥ {low}, got {int(arr.min())}")
        out[key] = arr
    shapes = {k: a.shape for k, a in out.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"examples: arrays must share one (H, W) shape, got {shapes}")
    return out


# ---------------------------------------------------------------------------------------------- formats


def _undefined(x: Any) -> bool:
    return x is None or (isinstance(x, numbers.Real) and math.isnan(float(x)))


def fmt_value(x: float | None) -> str:
    """A Dice-like value in [0, 1]: 3 decimals."""
    return DASH if _undefined(x) else f"{float(x):.3f}"


def fmt_mean_sd(mean: float | None, sd: float | None) -> str:
    """``mean ± sd`` with 3 decimals (:func:`common.report.format_mean_sd`); the mean alone when sd is
    undefined (one case)."""
    return format_mean_sd(mean, sd, 3, DASH)


def fmt_delta(x: float | None) -> str:
    """A signed difference with 3 decimals."""
    return DASH if _undefined(x) else f"{float(x):+.3f}"


def fmt_p(p: float | None) -> str:
    """A p-value: 3 decimals from 0.001 up, else 2 significant digits in scientific notation."""
    if _undefined(p):
        return DASH
    p = float(p)
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def fmt_num(x: float | None) -> str:
    """ε, σ, radii and ranges: 4 significant digits."""
    return DASH if _undefined(x) else f"{float(x):.4g}"


def fmt_seconds(x: float | None) -> str:
    """Seconds per case: 4 significant digits."""
    return DASH if _undefined(x) else f"{float(x):.4g}"


def fmt_ratio(x: float | None) -> str:
    """Cost relative to one clean forward pass: 1 decimal."""
    return DASH if _undefined(x) else f"{float(x):.1f}"


# ---------------------------------------------------------------------------------------------- blocks


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    """Inline runs: (style, text) with style "" (plain), "code" or "b" (bold)."""

    runs: list[tuple[str, str]]


@dataclass
class Bullets:
    items: list[list[tuple[str, str]]]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Image:
    key: str  # a key of FILES
    alt: str
    data: bytes = field(repr=False, default=b"")


@dataclass
class Code:
    text: str


def _plain(text: str) -> tuple[str, str]:
    return ("", text)


def _code(text: Any) -> tuple[str, str]:
    return ("code", str(text))


def _bold(text: str) -> tuple[str, str]:
    return ("b", text)


def _sigma_unit(card: Mapping[str, Any]) -> str:
    """The unit of σ: ``units.sigma_unit`` when the card gives one, else network-input units."""
    return card["units"].get("sigma_unit") or "network-input units"


def _mean(values: Mapping[str, Any], classes: Sequence[str]) -> str:
    return "; ".join(f"{c} {fmt_value(values.get(c))}" for c in classes)


def _summary_blocks(card: Mapping[str, Any]) -> list[Any]:
    b, d, u = card["bundle"], card["data"], card["units"]
    inf = b["inferer"]
    classes = b["class_names"]
    shown = (
        b["name"]
        if not b.get("display_name") or b["display_name"] == b["name"]
        else f"{b['display_name']} ({b['name']})"
    )
    bundle_runs = [
        _plain("Bundle "),
        _bold(shown),
        _plain(f" version {b['version'] or DASH}, network "),
        _code(b["network"]),
        _plain(
            f", {b['spatial_dims']}-D, {b['num_classes']} classes "
            f"(foreground scored: {', '.join(classes)}); config "
        ),
        _code(b["config"]),
        _plain(", checkpoint "),
        _code(b["checkpoint"]) if b["checkpoint"] else _plain("none (weights as initialised)"),
    ]
    if b["checkpoint_sha256"]:
        bundle_runs += [_plain(", SHA-256 "), _code(b["checkpoint_sha256"])]
    bundle_runs.append(_plain(". Inferer: "))
    bundle_runs.append(_code(inf["type"]))
    details = [f"{k} {inf[k]}" for k in ("roi_size", "overlap", "mode") if inf.get(k) is not None]
    bundle_runs.append(_plain(f" ({', '.join(details)})." if details else "."))
    section = [_plain(", section "), _code(d["section"])] if d.get("section") else []
    data_runs = [
        _plain(f"Data: {d['num_cases']} cases from "),
        _code(d["datalist"]),
        *section,
        _plain(": "),
        _plain(", ".join(str(c) for c in d["case_ids"])),
        _plain("."),
    ]
    unit_runs = [
        _plain(
            f"Units: the network input lies in [{fmt_num(u['input_range'][0])}, "
            f"{fmt_num(u['input_range'][1])}] ("
        ),
        _code(u["range_source"]),
        _plain(
            f"). ε is given as {u['eps_unit']}: ε ∈ {{{', '.join(fmt_num(e) for e in u['eps'])}}}, "
            f"i.e. {{{', '.join(fmt_num(e) for e in u['eps_input_units'])}}} in network-input units "
            f"(what the attacks use). σ is given as {_sigma_unit(card)}; certified radii are ℓ2 "
            "distances in network-input units."
        ),
    ]
    glance = [[_plain("Clean Dice (mean over cases): " + _mean(card["clean"]["mean"], classes) + ".")]]
    worst = []
    for c in classes:
        scored = [(a["mean"].get(c), a) for a in card["attacks"] if not _undefined(a["mean"].get(c))]
        if scored:
            value, a = min(scored, key=lambda t: t[0])
            worst.append(f"{c} {fmt_value(value)} ({a['name']}, ε = {fmt_num(a['eps'])})")
    if worst:
        glance.append([_plain("Lowest attacked Dice: " + "; ".join(worst) + ".")])
    for r in sorted(card["certification"], key=lambda r: r["sigma"]):
        glance.append(
            [
                _plain(
                    f"σ = {fmt_num(r['sigma'])}: certified Dice {_mean(r['certified_dice'], classes)}; "
                    f"abstain fraction {fmt_value(r['abstain_fraction'])}; "
                    f"certified radius {fmt_num(r['certified_radius'])}."
                )
            ]
        )
    return [Para(bundle_runs), Para(data_runs), Para(unit_runs), Heading(3, "At a glance"), Bullets(glance)]


def _clean_table(card: Mapping[str, Any]) -> list[Any]:
    classes = card["bundle"]["class_names"]
    per_case = card["clean"]["per_case"]
    sd = card["clean"].get("sd")
    if isinstance(sd, Mapping):
        mean = Table(
            ["Class", f"Dice mean ± sd over {card['data']['num_cases']} cases"],
            [[c, fmt_mean_sd(card["clean"]["mean"].get(c), sd.get(c))] for c in classes],
        )
    else:
        mean = Table(
            ["Class", f"Dice (mean over {card['data']['num_cases']} cases)"],
            [[c, fmt_value(card["clean"]["mean"].get(c))] for c in classes],
        )
    cases = Table(
        ["Case", *(f"Dice {c}" for c in classes)],
        [[str(case), *(fmt_value(v.get(c)) for c in classes)] for case, v in per_case.items()],
        caption="Per case",
    )
    return [Heading(2, "Clean Dice"), mean, cases]


def _attack_tables(card: Mapping[str, Any]) -> list[Any]:
    classes = card["bundle"]["class_names"]
    s = card["settings"]
    unit = card["units"]["eps_unit"]
    corr = s["wilcoxon"]["correction"]
    clean = card["clean"]["mean"]
    rows = []
    for a in card["attacks"]:
        for c in classes:
            m, cm = a["mean"].get(c), clean.get(c)
            delta = None if _undefined(m) or _undefined(cm) else float(m) - float(cm)
            rows.append(
                [
                    a["name"],
                    fmt_num(a["eps"]),
                    fmt_num(a["eps_input_units"]),
                    c,
                    fmt_mean_sd(m, a["sd"].get(c)),
                    fmt_delta(delta),
                    fmt_p(a["p_wilcoxon"].get(c)),
                    fmt_p(a["p_adjusted"].get(c)),
                ]
            )
    main = Table(
        [
            "Attack",
            f"ε ({unit})",
            "ε (input units)",
            "Class",
            "Dice mean ± sd",
            "Δ vs clean",
            "p (Wilcoxon)",
            f"p ({corr}-adjusted)",
        ],
        rows,
    )
    defs = Table(
        ["Attack", "Method", "Loss", "Targeted", "Steps", "Step size α", "Target"],
        [
            [
                name,
                str(cfg.get("attack", DASH)),
                str(cfg.get("loss", DASH)),
                str(cfg.get("targeted", DASH)),
                str(cfg.get("steps", DASH)),
                str(cfg.get("alpha", DASH)),
                str(cfg.get("target") or DASH),
            ]
            for name, cfg in s["attacks"].items()
        ],
        caption="Attack settings",
    )
    note = Para(
        [
            _plain(
                f"Wilcoxon signed-rank test of attacked against clean per-case Dice "
                f"(alternative: {s['wilcoxon']['alternative']}); adjusted p-values use the {corr} "
                "correction for multiple comparisons; – where a number is undefined (e.g. no non-zero "
                "difference, too few cases, or a class absent)."
            )
        ]
    )
    # the strongest ε of every attack, per case
    strongest = {}
    for a in card["attacks"]:
        if a["name"] not in strongest or a["eps"] > strongest[a["name"]]["eps"]:
            strongest[a["name"]] = a
    per_case_rows = []
    for case in card["clean"]["per_case"]:
        row = [str(case)]
        for a in strongest.values():
            vals = a["per_case"].get(case, {})
            row += [fmt_value(vals.get(c)) for c in classes]
        per_case_rows.append(row)
    per_case = Table(
        ["Case", *(f"{a['name']} ε={fmt_num(a['eps'])}: {c}" for a in strongest.values() for c in classes)],
        per_case_rows,
        caption="Per case, strongest ε of each attack",
    )
    return [
        Heading(2, "Adversarial attacks"),
        main,
        note,
        defs,
        per_case,
        Image("dice_vs_eps", "Dice against ε, one line per attack"),
    ]


def _cert_tables(card: Mapping[str, Any]) -> list[Any]:
    classes = card["bundle"]["class_names"]
    c = card["settings"]["certification"]
    entries = sorted(card["certification"], key=lambda r: r["sigma"])
    in_input = "sigma_input_units" in card["units"] and all("sigma_input_units" in r for r in entries)
    rows = [
        [
            fmt_num(r["sigma"]),
            *([fmt_num(r["sigma_input_units"])] if in_input else []),
            *(fmt_value(r["certified_dice"].get(k)) for k in classes),
            fmt_value(r["abstain_fraction"]),
            fmt_num(r["certified_radius"]),
        ]
        for r in entries
    ]
    sigma_headers = (
        [f"σ ({_sigma_unit(card)})", "σ (input units)"] if in_input else [f"σ ({_sigma_unit(card)})"]
    )
    table = Table(
        [
            *sigma_headers,
            *(f"Certified Dice {k}" for k in classes),
            "Abstain fraction",
            "Certified radius (ℓ2, input units)",
        ],
        rows,
    )
    note = Para(
        [
            _plain(
                f"Randomized smoothing (SegCertify): n0 = {c['n0']} selection draws, n = {c['n']} "
                f"estimation draws, α = {c['alpha']}, τ = {c['tau']}, {c['correction']} correction over "
                f"pixels, batch size {c['batch_size']}. Certified Dice ignores abstained pixels; the "
                "radius R = σ·Φ⁻¹(τ) holds for every certified pixel."
            )
        ]
    )
    return [
        Heading(2, "Certification"),
        table,
        note,
        Image("certified_dice_vs_sigma", "Certified Dice and abstain fraction against σ"),
    ]


def _cost_table(card: Mapping[str, Any]) -> list[Any]:
    cost = card["cost"]
    rows = [["clean forward", fmt_seconds(cost["clean_forward_s_per_case"]), fmt_ratio(1.0)]]
    rows += [
        [name, fmt_seconds(p["s_per_case"]), fmt_ratio(p["ratio_to_forward"])]
        for name, p in cost["parts"].items()
    ]
    return [
        Heading(2, "Cost"),
        Table(["Part", "Seconds per case", "× clean forward"], rows),
        Para([_plain("Wall-clock time on the machine that produced the card (see Versions).")]),
    ]


def _examples_blocks(card: Mapping[str, Any]) -> list[Any]:
    e = card["examples"]
    where = f"Case {e['case_id']}"
    if e.get("slice_axis") is not None:
        where += (
            f", slice {e['slice_index']} along axis {e['slice_axis']} (the slice with the most foreground)"
        )
    return [
        Heading(2, "Examples"),
        Para(
            [
                _plain(
                    f"{where}; attack {e['attack']} at ε = {fmt_num(e['eps'])}; certification at "
                    f"σ = {fmt_num(e['sigma'])}. Abstained pixels (label −1) are magenta."
                )
            ]
        ),
        Image("examples", "Clean, adversarial, perturbation, label, predictions and abstentions"),
    ]


def _reproduce_blocks(card: Mapping[str, Any]) -> list[Any]:
    v = card["versions"]
    out: list[Any] = [Heading(2, "Settings and versions for reproduction")]
    command = card.get("command") or card["settings"].get("command")
    if command:
        out += [
            Para([_plain("Command:")]),
            Code(command if isinstance(command, str) else " ".join(map(str, command))),
        ]
    out += [
        Para(
            [
                _plain(f"Seed {card['settings']['seed']}; bundle root "),
                _code(card["bundle"]["root"]),
                _plain(f"; card created {card['created']} (schema version {card['schema_version']})."),
            ]
        ),
        Table(["Component", "Version"], [[k, str(v[k])] for k in v]),
    ]
    cache = card.get("cache")
    if isinstance(cache, Mapping) and cache.get("dir"):
        out.append(
            Para(
                [
                    _plain("Per-case results are cached in "),
                    _code(cache["dir"]),
                    _plain(
                        f" ({cache.get('reused_cases', DASH)} reused, {cache.get('computed_cases', DASH)} "
                        "computed for this card)."
                    ),
                ]
            )
        )
    out += [Para([_plain("Settings (exactly as run):")]), Code(_compact_json(card["settings"]))]
    return out


def _compact_json(obj: Any, indent: int = 2, expand_depth: int = 2, _depth: int = 0) -> str:
    """JSON with the outer ``expand_depth`` levels of dicts one key a line and everything deeper inline."""
    if not isinstance(obj, Mapping) or not obj or _depth >= expand_depth:
        return json.dumps(obj, ensure_ascii=False)
    pad = " " * (indent * (_depth + 1))
    items = [
        f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {_compact_json(v, indent, expand_depth, _depth + 1)}"
        for k, v in obj.items()
    ]
    return "{\n" + ",\n".join(items) + "\n" + " " * (indent * _depth) + "}"


def _ci(ci: Any) -> str:
    return DASH if not ci else f"[{fmt_value(ci[0])}, {fmt_value(ci[1])}]"


def _verdict_blocks(card: Mapping[str, Any]) -> list[Any]:
    """The first screen: clean against worst-case Dice per ε and class, certified Dice and abstention per σ,
    the masking flags, the cost per case, the budget, the statistics' reach (schema 2)."""
    h, classes, s = card["headline"], card["bundle"]["class_names"], card["settings"]
    budget, n = s["budget"], h["n_cases"]
    out: list[Any] = [
        Heading(2, "Verdict"),
        Para([_bold(f"{card['bundle']['name']}: "),
              _plain(f"{n} cases; budget {budget['name']} (attacks: {', '.join(budget['attacks'])}; I-FGSM "
                     f"steps {budget['steps']};{_members(s)} certification n0 = {budget['n0']}, n = {budget['n']})."
                     " Robust "
                     f"Dice = {h['selection']}. Intervals: {h['interval']}. Tests: {h['test']}; with {n} cases "
                     f"the smallest p reachable is {fmt_p(h['min_p'])} (exact two-sided Wilcoxon: 2/2^{n}), "
                     f"{fmt_p(h['min_p_holm'])} after Holm over the {len(h['eps'])} ε values.")]),
    ]
    out.append(Image("dice_vs_eps", "Dice against ε: the per-case worst case (black, 95 % interval) and "
                                        "each attack (mean ± sd)"))
    rows = []
    for k in classes:
        rows.append([k, "0 (clean)", f"{fmt_value(h['clean']['mean'][k])} {_ci(h['clean']['ci95'][k])}", DASH,
                     fmt_num(h["clean"]["hd95_median"][k]), fmt_value(h["clean"]["nsd_mean"][k]), DASH, DASH])
        for e in h["eps"]:
            cm, m = h["clean"]["mean"][k], e["mean"][k]
            rows.append([k, fmt_num(e["eps"]), f"{fmt_value(m)} {_ci(e['ci95'][k])}", fmt_delta(m - cm),
                         fmt_num(e["hd95_median"][k]), fmt_value(e["nsd_mean"][k]), fmt_p(e["p_wilcoxon"][k]),
                         fmt_p(e["p_adjusted"][k])])
    spacing = s.get("spacing")
    out.append(Table(["Class", f"ε ({card['units']['eps_unit']})", "Dice mean [95 % CI]", "Δ vs clean",
                      "HD95 median" + (" (mm)" if spacing else " (voxels)"), "NSD mean", "p (Wilcoxon)",
                      "p (Holm)"], rows, caption="Clean and worst-case robust Dice per class"))
    cert = sorted(card["certification"], key=lambda r: r["sigma"])
    if cert:
        out.append(Table([f"σ ({_sigma_unit(card)})", *(f"Certified Dice {k}" for k in classes), "Abstain fraction"],
                         [[fmt_num(r["sigma"]),
                           *(fmt_value(r["certified_dice"].get(k)) if r["abstain_fraction"] < 1 else
                             f"{DASH} (every pixel abstained)" for k in classes),
                           fmt_value(r["abstain_fraction"])] for r in cert],
                         caption="Randomized-smoothing certification (abstained pixels ignored)"))
    m = card.get("masking")
    if m:
        items = [[_bold("FLAG " if c["passed"] is False else "pass " if c["passed"] else "not run "),
                  _plain(f"{name}: {c['reason']}")] for name, c in m["checks"].items()]
        out += [Para([_bold("Gradient-masking checks: " + ("FLAGGED" if m["flagged"] else "no flag")),
                      _plain(f" (APGD, {m['steps']} steps, on case {m['case']}; clean Dice "
                             f"{fmt_value(m.get('clean_dice'))}; {_masking_numbers(m)}).")]), Bullets(items)]
    else:
        out.append(Para([_plain("Gradient-masking checks: not run.")]))
    cost = card["cost"]
    out.append(Para([_bold("Cost per case: "),
                     _plain(f"{fmt_seconds(cost['total_s_per_case'])} s = {fmt_ratio(cost['total_ratio_to_forward'])}"
                            f" clean forwards of {fmt_seconds(cost['clean_forward_s_per_case'])} s; per part in "
                            "the Cost section.")]))
    det = _detection_table(card)
    if det:
        out.append(det)
    if card.get("comparison"):
        out += _comparison_blocks(card["comparison"])
    return out


def _masking_numbers(m: Mapping[str, Any]) -> str:
    """Mean Dice per loss over the ε grid for the attack, one FGSM step and uniform noise."""
    eps = ", ".join(fmt_num(e) for e in m.get("eps_input_units", []))
    parts = []
    for what, key in (("attack", "attack_dice"), ("single step", "single_step_dice"), ("noise", "noise_dice")):
        got = m.get(key)
        for loss, values in (got.items() if isinstance(got, Mapping) else [("", got)]):
            if isinstance(values, list):
                parts.append(f"{what}{' ' + loss if loss else ''}: {', '.join(fmt_value(v) for v in values)}")
    return f"mean Dice at ε = {eps} (input units): " + "; ".join(parts) if parts else "no numbers"


def _members(settings: Mapping[str, Any]) -> str:
    wc = settings["attacks"].get("WorstCase")
    if not wc or not wc.get("members"):
        return ""
    parts = [f"{m['attack']}-{m.get('loss', '')} {m.get('steps', 1)} steps" for m in wc["members"]]
    return f" WorstCase ensemble: {', '.join(parts)};"


def _detection_table(card: Mapping[str, Any]) -> Table | None:
    """Detected fraction of ground-truth components per size bin: clean and worst case at the largest ε."""
    h = card["headline"]
    if not h["eps"] or not h["clean"]["detection"] or not h["eps"][-1]["detection"]:
        return None
    last, rows = h["eps"][-1], []
    for k, bins in h["clean"]["detection"].items():
        for b, wb in zip(bins, last["detection"][k]):
            if b["components"]:
                hi = b["bin_voxels"][1]
                rows.append([k, f"{b['bin_voxels'][0]}–{hi - 1 if hi else '∞'}", str(b["components"]),
                             fmt_value(b["detected_fraction"]), fmt_value(wb["detected_fraction"])])
    overlap = card["settings"].get("detected_overlap")
    return Table(["Class", "Component size (voxels)", "Components", "Detected, clean",
                  f"Detected, worst case ε = {fmt_num(last['eps'])}"], rows,
                 caption=f"Ground-truth connected components detected (prediction covers ≥ {overlap} of the "
                         "component; Halmosi et al., ECCV 2024)") if rows else None


def _comparison_blocks(cmp: Mapping[str, Any]) -> list[Any]:
    rows = [[r["what"], DASH if r["eps"] is None else fmt_num(r["eps"]), r["class"], fmt_value(r["this"]),
             fmt_value(r["other"]), fmt_delta(r["difference"]), fmt_p(r["p_wilcoxon"]), fmt_p(r["p_adjusted"])]
            for r in cmp["rows"]]
    n = len(cmp["shared_cases"])
    return [Para([_bold("Compared with "), _code(cmp["other"]["card"]),
                  _plain(f" ({cmp['other'].get('title') or DASH}) on {n} shared cases: {cmp['test']}; smallest "
                         f"p reachable {fmt_p(cmp['min_p'])}, after Holm {fmt_p(cmp['min_p_holm'])}.")]),
            Table(["Metric", "ε", "Class", "This model", "Other model", "Δ (this − other)", "p (Wilcoxon)",
                   "p (Holm)"], rows, caption="Side by side, paired on shared case ids")]


def _headline_per_case(card: Mapping[str, Any]) -> list[Any]:
    h, classes = card["headline"], card["bundle"]["class_names"]
    rows = [[str(c), fmt_num(e["eps"]), v["attack"], *(fmt_value(v["dice"][k]) for k in classes)]
            for e in h["eps"] for c, v in e["per_case"].items()]
    return [Table(["Case", "ε", "Worst attack", *(f"Dice {k}" for k in classes)], rows,
                  caption="Worst case per case: the attack chosen and its Dice")]


def card_blocks(card: Mapping[str, Any], images: Mapping[str, bytes] | None = None) -> list[Any]:
    """The card as an ordered list of blocks; ``images`` maps FILES keys to PNG bytes (for the HTML).
    Schema 2: the verdict first, every detail folded below it."""
    images = images or {}
    notes = card["notes"]
    details = [
        Fold("Bundle, data and units", [*_summary_blocks(card)]),
        Fold("Notes and caveats", [Bullets([[_plain(str(n))] for n in notes]) if notes else Para([_plain("None.")])]),
        Fold("Clean Dice", _clean_table(card)[1:]),
        Fold("Each attack", [b for b in _attack_tables(card)[1:]
                             if not (isinstance(b, Image) and "headline" in card)]),
        Fold("Certification", _cert_tables(card)[1:]),
        Fold("Cost", _cost_table(card)[1:]),
        Fold("Examples", _examples_blocks(card)[1:]),
        Fold("Settings and versions for reproduction", _reproduce_blocks(card)[1:]),
    ]
    if "headline" in card:
        details.insert(3, Fold("Worst case per case", _headline_per_case(card)))
        blocks: list[Any] = [Heading(1, card["title"]), *_verdict_blocks(card), Heading(2, "Details"), *details]
    else:
        blocks = [Heading(1, card["title"]), *_summary_blocks(card), Heading(3, "Notes and caveats"),
                  *details[1].blocks, *_clean_table(card), *_attack_tables(card), *_cert_tables(card),
                  *_cost_table(card), *_examples_blocks(card), *_reproduce_blocks(card)]
    for block in _flat(blocks):
        if isinstance(block, Image):
            block.data = images.get(block.key, b"")
    return blocks


def _flat(blocks: Sequence[Any]) -> list[Any]:
    out = []
    for b in blocks:
        out += _flat(b.blocks) if isinstance(b, Fold) else [b]
    return out


# ---------------------------------------------------------------------------------------------- markdown

# Always special: \ ` * [ ] < > & | ~; "_" only where it can open or close emphasis (not inside a word).
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>&|~]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z]))")


def _md_text(text: str) -> str:
    """Backslash-escape Markdown punctuation (CommonMark: any ASCII punctuation may be escaped)."""
    return _MD_SPECIAL.sub(r"\\\1", text).replace("\n", " ")


def _md_code(text: str) -> str:
    """An inline code span whose fence is longer than any backtick run inside; ``|`` escaped (GFM tables)."""
    runs = [len(r) for r in re.findall(r"`+", text)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|").replace("\n", " ")


def _md_bold(text: str) -> str:
    """``**text**`` with surrounding white space kept outside the markers (``**pass **`` is not bold)."""
    core = text.strip()
    if not core:
        return text
    lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()):]
    return f"{lead}**{_md_text(core)}**{trail}"


def _md_runs(runs: Sequence[tuple[str, str]]) -> str:
    out = []
    for style, text in runs:
        out.append(_md_code(text) if style == "code" else _md_bold(text) if style == "b" else _md_text(text))
    return "".join(out)


def _md_cell(text: str) -> str:
    # numbers and "–" pass through unchanged; user strings are escaped
    return _md_text(text)


def to_markdown(blocks: Sequence[Any]) -> str:
    """GitHub-flavoured Markdown of ``blocks``; images reference the PNG files beside the page."""
    parts: list[str] = []
    for blk in blocks:
        if isinstance(blk, Heading):
            parts.append("#" * blk.level + " " + _md_text(blk.text))
        elif isinstance(blk, Para):
            parts.append(_md_runs(blk.runs))
        elif isinstance(blk, Bullets):
            parts.append("\n".join("- " + _md_runs(item) for item in blk.items))
        elif isinstance(blk, Table):
            lines = [f"*{_md_text(blk.caption)}*", ""] if blk.caption else []
            lines.append("| " + " | ".join(_md_cell(h) for h in blk.headers) + " |")
            lines.append("|" + "|".join("---" for _ in blk.headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in blk.rows]
            parts.append("\n".join(lines))
        elif isinstance(blk, Image):
            parts.append(f"![{_md_text(blk.alt)}]({FILES[blk.key]})")
        elif isinstance(blk, Code):
            fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", blk.text)), default=0))
            parts.append(f"{fence}\n{blk.text}\n{fence}")
        elif isinstance(blk, Fold):
            parts.append("### " + _md_text(blk.title) + "\n\n" + to_markdown(blk.blocks).rstrip("\n"))
        else:
            raise TypeError(f"unknown block {blk!r}")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------- html

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1b1f24;line-height:1.45}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3em}
h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa}tr:nth-child(even) td{background:#fbfcfd}
caption{caption-side:top;text-align:left;font-style:italic;padding:.2em 0}
code,pre{font-family:SFMono-Regular,Consolas,"Liberation Mono",monospace;font-size:.88em;background:#f6f8fa}
code{padding:.1em .3em;border-radius:3px;overflow-wrap:anywhere}pre code{overflow-wrap:normal}
pre{padding:.8em;overflow-x:auto;border-radius:4px}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #d0d7de}
figcaption{font-size:.85em;color:#57606a}
details{margin:.6em 0;border:1px solid #d0d7de;border-radius:4px;padding:.3em .8em}
summary{cursor:pointer;font-weight:600}
""".strip()

# No scripts, no fonts, no frames, no network: only inline styles and data: images may load.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_runs(runs: Sequence[tuple[str, str]]) -> str:
    out = []
    for style, text in runs:
        out.append(
            f"<code>{_h(text)}</code>"
            if style == "code"
            else f"<strong>{_h(text)}</strong>"
            if style == "b"
            else _h(text)
        )
    return "".join(out)


def to_html(blocks: Sequence[Any], title: str) -> str:
    """A self-contained HTML5 page of ``blocks``: inline CSS, images as base64 data URIs, no scripts."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_h(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
        + _html_body(blocks)
        + "\n</body>\n</html>\n"
    )


def _html_body(blocks: Sequence[Any]) -> str:
    body: list[str] = []
    for blk in blocks:
        if isinstance(blk, Heading):
            body.append(f"<h{blk.level}>{_h(blk.text)}</h{blk.level}>")
        elif isinstance(blk, Para):
            body.append(f"<p>{_html_runs(blk.runs)}</p>")
        elif isinstance(blk, Bullets):
            body.append("<ul>" + "".join(f"<li>{_html_runs(i)}</li>" for i in blk.items) + "</ul>")
        elif isinstance(blk, Table):
            cap = f"<caption>{_h(blk.caption)}</caption>" if blk.caption else ""
            head = "<tr>" + "".join(f"<th>{_h(x)}</th>" for x in blk.headers) + "</tr>"
            rows = "".join("<tr>" + "".join(f"<td>{_h(x)}</td>" for x in row) + "</tr>" for row in blk.rows)
            body.append(f"<table>{cap}<thead>{head}</thead><tbody>{rows}</tbody></table>")
        elif isinstance(blk, Image):
            if not blk.data:
                raise ValueError(f"images: no PNG bytes for {blk.key!r}")
            uri = "data:image/png;base64," + base64.b64encode(blk.data).decode("ascii")
            body.append(
                f'<figure><img src="{uri}" alt="{_h(blk.alt)}"><figcaption>{_h(blk.alt)}</figcaption>'
                "</figure>"
            )
        elif isinstance(blk, Code):
            body.append(f"<pre><code>{_h(blk.text)}</code></pre>")
        elif isinstance(blk, Fold):
            body.append(f"<details><summary>{_h(blk.title)}</summary>\n{_html_body(blk.blocks)}\n</details>")
        else:
            raise TypeError(f"unknown block {blk!r}")
    return "\n".join(body)


# ---------------------------------------------------------------------------------------------- entry


def render_card_files(card: dict, examples: dict[str, np.ndarray]) -> dict[str, str | bytes]:
    """``card.md``, ``card.html`` and the three PNGs of FILES, in memory: file name -> content.

    Args:
        card: the card dict of SCHEMA.md (schema version 1); validated first, ValueError names the key.
        examples: the (H, W) arrays of SCHEMA.md (``image``, ``adversarial``, ``perturbation``, ``label``,
            ``pred_clean``, ``pred_adversarial``, ``pred_certified`` with -1 = abstain).
    """
    validate_card(card)
    arrays = validate_examples(examples)
    images = {
        "dice_vs_eps": dice_vs_eps_png(card),
        "certified_dice_vs_sigma": certified_dice_vs_sigma_png(card),
        "examples": examples_png(card, arrays),
    }
    blocks = card_blocks(card, images)
    files: dict[str, str | bytes] = {FILES[key]: data for key, data in images.items()}
    files[FILES["md"]], files[FILES["html"]] = to_markdown(blocks), to_html(blocks, card["title"])
    return files


def render_card(
    card: dict, examples: dict[str, np.ndarray], output_dir: str | os.PathLike
) -> dict[str, Path]:
    """Write :func:`render_card_files` into ``output_dir`` as one report set (:func:`common.io.write_report_set`:
    everything rendered first, staged, moved in, manifest last). Returns {key of FILES: path}."""
    write_report_set(output_dir, render_card_files(card, examples))
    return {key: Path(output_dir) / name for key, name in FILES.items()}
