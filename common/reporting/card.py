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
from collections.abc import Callable, Mapping, Sequence
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

def _keys(names: str, **nested: Any) -> dict[str, Any]:
    """A spec of required keys: the space-separated ``names`` (leaves, ``None``), then ``nested`` specs."""
    return {**dict.fromkeys(names.split()), **nested}


# Required keys, as nested dicts ending in None; "[]" marks "every element of this list".
_REQUIRED: dict[str, Any] = _keys(
    "schema_version title created",
    bundle=_keys("root name version config checkpoint checkpoint_sha256 network spatial_dims num_classes",
                 inferer=_keys("type roi_size overlap mode"), class_names=None),
    data=_keys("datalist num_cases case_ids"),
    units=_keys("input_range range_source eps_unit eps eps_input_units"),
    settings=_keys("seed attacks", certification=_keys("sigmas n0 n alpha tau correction batch_size"),
                   wilcoxon=_keys("alternative correction")),
    versions=_keys("python torch monai numpy robust_seg_monai platform"),
    clean=_keys("mean per_case"),
    attacks={"[]": _keys("name eps eps_input_units mean sd p_wilcoxon p_adjusted per_case")},
    certification={"[]": _keys("sigma certified_dice abstain_fraction certified_radius per_case")},
    cost=_keys("clean_forward_s_per_case parts"),
    examples=_keys("case_id slice_axis slice_index attack eps sigma"),
    notes=None,
)

# Added in schema 2 (the verdict): the per-case worst case, masking flags (or null), comparison (or null).
_REQUIRED_V2: dict[str, Any] = _keys(
    "",
    headline=_keys("", clean=_keys("mean ci95 hd95_median nsd_mean detection"),
                   eps={"[]": _keys("eps eps_input_units mean ci95 hd95_median nsd_mean detection p_wilcoxon "
                                    "p_adjusted per_case")},
                   **_keys("n_cases interval selection test min_p min_p_holm")),
    masking=None,
    comparison=None,
    settings={"budget": _keys("name attacks steps n0 n")},
    cost=_keys("total_s_per_case total_ratio_to_forward"),
)


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
        raise ValueError(
            f"card['schema_version']: expected one of {SCHEMA_VERSIONS}, got {card['schema_version']!r}"
        )
    if card["schema_version"] >= 2:
        _check_keys(card, _REQUIRED_V2, "card")
    names = card["bundle"]["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError("card['bundle']['class_names']: expected a non-empty list of strings")
    if not isinstance(card["notes"], list):
        raise ValueError("card['notes']: expected a list")
    for key, container in (("attacks", card["settings"]["attacks"]), ("parts", card["cost"]["parts"])):
        if not isinstance(container, Mapping):
            raise ValueError(f"card[...][{key!r}]: expected a dict")
    for name, part in card["cost"]["parts"].items():
        _check_keys(part, _keys("s_per_case ratio_to_forward"), f"card['cost']['parts'][{name!r}]")


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


def _formatter(spec: str, doc: str) -> Callable[[float | None], str]:
    """A number format: ``format(x, spec)``, :data:`DASH` for an undefined number."""

    def fmt(x: float | None) -> str:
        return DASH if _undefined(x) else format(float(x), spec)

    fmt.__doc__ = doc
    return fmt


fmt_value = _formatter(".3f", "A Dice-like value in [0, 1]: 3 decimals.")
fmt_delta = _formatter("+.3f", "A signed difference with 3 decimals.")
fmt_num = _formatter(".4g", "ε, σ, radii and ranges: 4 significant digits.")
fmt_seconds = _formatter(".4g", "Seconds per case: 4 significant digits.")
fmt_ratio = _formatter(".1f", "Cost relative to one clean forward pass: 1 decimal.")


def fmt_mean_sd(mean: float | None, sd: float | None) -> str:
    """``mean ± sd`` with 3 decimals (:func:`common.report.format_mean_sd`); the mean alone when sd is
    undefined (one case)."""
    return format_mean_sd(mean, sd, 3, DASH)


def fmt_p(p: float | None) -> str:
    """A p-value: 3 decimals from 0.001 up, else 2 significant digits in scientific notation."""
    return DASH if _undefined(p) else f"{float(p):.3f}" if float(p) >= 1e-3 else f"{float(p):.1e}"


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


def _runs(*parts: str | tuple[str, str]) -> list[tuple[str, str]]:
    """Inline runs: a string is a plain run, a tuple an already styled one (:func:`_code`, :func:`_bold`)."""
    return [("", p) if isinstance(p, str) else p for p in parts]


def _p(*parts: str | tuple[str, str]) -> Para:
    return Para(_runs(*parts))


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
    inf, classes = b["inferer"], b["class_names"]
    shown = (b["name"] if not b.get("display_name") or b["display_name"] == b["name"]
             else f"{b['display_name']} ({b['name']})")
    details = [f"{k} {inf[k]}" for k in ("roi_size", "overlap", "mode") if inf.get(k) is not None]
    bundle = _p("Bundle ", _bold(shown), f" version {b['version'] or DASH}, network ", _code(b["network"]),
                f", {b['spatial_dims']}-D, {b['num_classes']} classes (foreground scored: "
                f"{', '.join(classes)}); config ", _code(b["config"]), ", checkpoint ",
                _code(b["checkpoint"]) if b["checkpoint"] else "none (weights as initialised)",
                *([", SHA-256 ", _code(b["checkpoint_sha256"])] if b["checkpoint_sha256"] else []),
                ". Inferer: ", _code(inf["type"]), f" ({', '.join(details)})." if details else ".")
    section = [", section ", _code(d["section"])] if d.get("section") else []
    data = _p(f"Data: {d['num_cases']} cases from ", _code(d["datalist"]), *section, ": ",
              ", ".join(str(c) for c in d["case_ids"]), ".")
    grid = lambda key: ", ".join(fmt_num(e) for e in u[key])  # noqa: E731
    low, high = (fmt_num(v) for v in u["input_range"][:2])
    units = _p(f"Units: the network input lies in [{low}, {high}] (", _code(u["range_source"]),
               f"). ε is given as {u['eps_unit']}: ε ∈ {{{grid('eps')}}}, i.e. "
               f"{{{grid('eps_input_units')}}} in network-input units (what the attacks use). σ is given as "
               f"{_sigma_unit(card)}; certified radii are ℓ2 distances in network-input units.")
    glance = [_runs("Clean Dice (mean over cases): " + _mean(card["clean"]["mean"], classes) + ".")]
    worst = []
    for c in classes:
        scored = [(a["mean"].get(c), a) for a in card["attacks"] if not _undefined(a["mean"].get(c))]
        if scored:
            value, a = min(scored, key=lambda t: t[0])
            worst.append(f"{c} {fmt_value(value)} ({a['name']}, ε = {fmt_num(a['eps'])})")
    if worst:
        glance.append(_runs("Lowest attacked Dice: " + "; ".join(worst) + "."))
    glance += [_runs(f"σ = {fmt_num(r['sigma'])}: certified Dice {_mean(r['certified_dice'], classes)}; "
                     f"abstain fraction {fmt_value(r['abstain_fraction'])}; "
                     f"certified radius {fmt_num(r['certified_radius'])}.")
               for r in sorted(card["certification"], key=lambda r: r["sigma"])]
    return [bundle, data, units, Heading(3, "At a glance"), Bullets(glance)]


def _clean_table(card: Mapping[str, Any]) -> list[Any]:
    classes, clean, n = card["bundle"]["class_names"], card["clean"], card["data"]["num_cases"]
    sd = clean.get("sd")
    with_sd = isinstance(sd, Mapping)
    means = clean["mean"]
    mean = Table(["Class", f"Dice mean ± sd over {n} cases" if with_sd else f"Dice (mean over {n} cases)"],
                 [[c, fmt_mean_sd(means.get(c), sd.get(c)) if with_sd else fmt_value(means.get(c))]
                  for c in classes])
    cases = Table(["Case", *(f"Dice {c}" for c in classes)],
                  [[str(case), *(fmt_value(v.get(c)) for c in classes)]
                   for case, v in clean["per_case"].items()], caption="Per case")
    return [mean, cases]


def _attack_tables(card: Mapping[str, Any]) -> list[Any]:
    classes, s, clean = card["bundle"]["class_names"], card["settings"], card["clean"]["mean"]
    corr = s["wilcoxon"]["correction"]

    def delta(m: Any, cm: Any) -> float | None:
        return None if _undefined(m) or _undefined(cm) else float(m) - float(cm)

    main = Table(["Attack", f"ε ({card['units']['eps_unit']})", "ε (input units)", "Class", "Dice mean ± sd",
                  "Δ vs clean", "p (Wilcoxon)", f"p ({corr}-adjusted)"],
                 [[a["name"], fmt_num(a["eps"]), fmt_num(a["eps_input_units"]), c,
                   fmt_mean_sd(a["mean"].get(c), a["sd"].get(c)),
                   fmt_delta(delta(a["mean"].get(c), clean.get(c))),
                   fmt_p(a["p_wilcoxon"].get(c)), fmt_p(a["p_adjusted"].get(c))]
                  for a in card["attacks"] for c in classes])
    keys = ("attack", "loss", "targeted", "steps", "alpha")
    defs = Table(["Attack", "Method", "Loss", "Targeted", "Steps", "Step size α", "Target"],
                 [[name, *(str(cfg.get(k, DASH)) for k in keys), str(cfg.get("target") or DASH)]
                  for name, cfg in s["attacks"].items()], caption="Attack settings")
    note = _p(f"Wilcoxon signed-rank test of attacked against clean per-case Dice (alternative: "
              f"{s['wilcoxon']['alternative']}); adjusted p-values use the {corr} correction for multiple "
              "comparisons; – where a number is undefined (e.g. no non-zero difference, too few cases, or a "
              "class absent).")
    strongest = {}  # the strongest ε of every attack, per case
    for a in card["attacks"]:
        if a["name"] not in strongest or a["eps"] > strongest[a["name"]]["eps"]:
            strongest[a["name"]] = a
    columns = [(a, c) for a in strongest.values() for c in classes]
    per_case = Table(["Case", *(f"{a['name']} ε={fmt_num(a['eps'])}: {c}" for a, c in columns)],
                     [[str(case), *(fmt_value(a["per_case"].get(case, {}).get(c)) for a, c in columns)]
                      for case in card["clean"]["per_case"]], caption="Per case, strongest ε of each attack")
    return [main, note, defs, per_case, Image("dice_vs_eps", "Dice against ε, one line per attack")]


def _cert_tables(card: Mapping[str, Any]) -> list[Any]:
    classes, c = card["bundle"]["class_names"], card["settings"]["certification"]
    entries = sorted(card["certification"], key=lambda r: r["sigma"])
    in_input = "sigma_input_units" in card["units"] and all("sigma_input_units" in r for r in entries)
    table = Table([f"σ ({_sigma_unit(card)})", *(["σ (input units)"] if in_input else []),
                   *(f"Certified Dice {k}" for k in classes), "Abstain fraction",
                   "Certified radius (ℓ2, input units)"],
                  [[fmt_num(r["sigma"]), *([fmt_num(r["sigma_input_units"])] if in_input else []),
                    *(fmt_value(r["certified_dice"].get(k)) for k in classes),
                    fmt_value(r["abstain_fraction"]), fmt_num(r["certified_radius"])] for r in entries])
    note = _p(f"Randomized smoothing (SegCertify): n0 = {c['n0']} selection draws, n = {c['n']} "
              f"estimation draws, α = {c['alpha']}, τ = {c['tau']}, {c['correction']} correction over "
              f"pixels, batch size {c['batch_size']}. Certified Dice ignores abstained pixels; the radius "
              "R = σ·Φ⁻¹(τ) holds for every certified pixel.")
    return [table, note, Image("certified_dice_vs_sigma", "Certified Dice and abstain fraction against σ")]


def _cost_table(card: Mapping[str, Any]) -> list[Any]:
    cost = card["cost"]
    rows = [["clean forward", fmt_seconds(cost["clean_forward_s_per_case"]), fmt_ratio(1.0)]]
    rows += [[name, fmt_seconds(p["s_per_case"]), fmt_ratio(p["ratio_to_forward"])]
             for name, p in cost["parts"].items()]
    return [Table(["Part", "Seconds per case", "× clean forward"], rows),
            _p("Wall-clock time on the machine that produced the card (see Versions).")]


def _examples_blocks(card: Mapping[str, Any]) -> list[Any]:
    e = card["examples"]
    where = f"Case {e['case_id']}"
    if e.get("slice_axis") is not None:
        where += (f", slice {e['slice_index']} along axis {e['slice_axis']} "
                  "(the slice with the most foreground)")
    return [_p(f"{where}; attack {e['attack']} at ε = {fmt_num(e['eps'])}; certification at σ = "
               f"{fmt_num(e['sigma'])}. Abstained pixels (label −1) are magenta."),
            Image("examples", "Clean, adversarial, perturbation, label, predictions and abstentions")]


def _reproduce_blocks(card: Mapping[str, Any]) -> list[Any]:
    out: list[Any] = []
    command = card.get("command") or card["settings"].get("command")
    if command:
        out += [_p("Command:"), Code(command if isinstance(command, str) else " ".join(map(str, command)))]
    out += [_p(f"Seed {card['settings']['seed']}; bundle root ", _code(card["bundle"]["root"]),
               f"; card created {card['created']} (schema version {card['schema_version']})."),
            Table(["Component", "Version"], [[k, str(v)] for k, v in card["versions"].items()])]
    cache = card.get("cache")
    if isinstance(cache, Mapping) and cache.get("dir"):
        out.append(_p("Per-case results are cached in ", _code(cache["dir"]),
                      f" ({cache.get('reused_cases', DASH)} reused, "
                      f"{cache.get('computed_cases', DASH)} computed for this card)."))
    return out + [_p("Settings (exactly as run):"), Code(_compact_json(card["settings"]))]
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
        _p(_bold(f"{card['bundle']['name']}: "),
           f"{n} cases; budget {budget['name']} (attacks: {', '.join(budget['attacks'])}; I-FGSM steps "
           f"{budget['steps']};{_members(s)} certification n0 = {budget['n0']}, n = {budget['n']}). "
           f"Robust Dice = {h['selection']}. Intervals: {h['interval']}. Tests: {h['test']}; with {n} cases "
           f"the smallest p reachable is {fmt_p(h['min_p'])} (exact two-sided Wilcoxon: 2/2^{n}), "
           f"{fmt_p(h['min_p_holm'])} after Holm over the {len(h['eps'])} ε values."),
        Image("dice_vs_eps", "Dice against ε: the per-case worst case (black, 95 % interval) and "
                             "each attack (mean ± sd)"),
    ]
    clean, rows = h["clean"], []
    for k in classes:
        rows.append([k, "0 (clean)", f"{fmt_value(clean['mean'][k])} {_ci(clean['ci95'][k])}", DASH,
                     fmt_num(clean["hd95_median"][k]), fmt_value(clean["nsd_mean"][k]), DASH, DASH])
        rows += [[k, fmt_num(e["eps"]), f"{fmt_value(e['mean'][k])} {_ci(e['ci95'][k])}",
                  fmt_delta(e["mean"][k] - clean["mean"][k]), fmt_num(e["hd95_median"][k]),
                  fmt_value(e["nsd_mean"][k]), fmt_p(e["p_wilcoxon"][k]), fmt_p(e["p_adjusted"][k])]
                 for e in h["eps"]]
    hd95 = "HD95 median" + (" (mm)" if s.get("spacing") else " (voxels)")
    out.append(Table(["Class", f"ε ({card['units']['eps_unit']})", "Dice mean [95 % CI]", "Δ vs clean", hd95,
                      "NSD mean", "p (Wilcoxon)", "p (Holm)"], rows,
                     caption="Clean and worst-case robust Dice per class"))
    cert = sorted(card["certification"], key=lambda r: r["sigma"])
    if cert:
        out.append(Table([f"σ ({_sigma_unit(card)})", *(f"Certified Dice {k}" for k in classes),
                          "Abstain fraction"],
                         [[fmt_num(r["sigma"]),
                           *(fmt_value(r["certified_dice"].get(k)) if r["abstain_fraction"] < 1 else
                             f"{DASH} (every pixel abstained)" for k in classes),
                           fmt_value(r["abstain_fraction"])] for r in cert],
                         caption="Randomized-smoothing certification (abstained pixels ignored)"))
    m = card.get("masking")
    if m:
        items = [_runs(_bold("FLAG " if c["passed"] is False else "pass " if c["passed"] else "not run "),
                       f"{name}: {c['reason']}") for name, c in m["checks"].items()]
        out += [_p(_bold("Gradient-masking checks: " + ("FLAGGED" if m["flagged"] else "no flag")),
                   f" (APGD, {m['steps']} steps, on case {m['case']}; clean Dice "
                   f"{fmt_value(m.get('clean_dice'))}; {_masking_numbers(m)})."), Bullets(items)]
    else:
        out.append(_p("Gradient-masking checks: not run."))
    cost = card["cost"]
    out.append(_p(_bold("Cost per case: "),
                  f"{fmt_seconds(cost['total_s_per_case'])} s = {fmt_ratio(cost['total_ratio_to_forward'])} "
                  f"clean forwards of {fmt_seconds(cost['clean_forward_s_per_case'])} s; per part in the "
                  "Cost section."))
    det = _detection_table(card)
    out += [det] if det else []
    return out + (_comparison_blocks(card["comparison"]) if card.get("comparison") else [])


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
             fmt_value(r["other"]), fmt_delta(r["difference"]), fmt_p(r["p_wilcoxon"]),
             fmt_p(r["p_adjusted"])] for r in cmp["rows"]]
    return [_p(_bold("Compared with "), _code(cmp["other"]["card"]),
               f" ({cmp['other'].get('title') or DASH}) on {len(cmp['shared_cases'])} shared cases: "
               f"{cmp['test']}; smallest p reachable {fmt_p(cmp['min_p'])}, after Holm "
               f"{fmt_p(cmp['min_p_holm'])}."),
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
    Schema 2: the verdict first, every detail folded below it; schema 1: one section after another."""
    notes = [Bullets([_runs(str(n)) for n in card["notes"]]) if card["notes"] else _p("None.")]
    attacks = _attack_tables(card)
    # (schema-1 heading, schema-2 fold title, blocks); the folds leave the attack plot to the verdict
    sections = [("Clean Dice", "Clean Dice", _clean_table(card)),
                (None, "Worst case per case", _headline_per_case(card) if "headline" in card else []),
                ("Adversarial attacks", "Each attack", attacks),
                ("Certification", "Certification", _cert_tables(card)),
                ("Cost", "Cost", _cost_table(card)), ("Examples", "Examples", _examples_blocks(card)),
                ("Settings and versions for reproduction",) * 2 + (_reproduce_blocks(card),)]
    if "headline" in card:
        folds = [Fold("Bundle, data and units", _summary_blocks(card)), Fold("Notes and caveats", notes)]
        folds += [Fold(title, body if body is not attacks else body[:-1]) for _, title, body in sections]
        blocks: list[Any] = [Heading(1, card["title"]), *_verdict_blocks(card), Heading(2, "Details"), *folds]
    else:
        blocks = [Heading(1, card["title"]), *_summary_blocks(card), Heading(3, "Notes and caveats"), *notes]
        blocks += [b for head, _, body in sections if head for b in (Heading(2, head), *body)]
    images = images or {}
    for block in _flat(blocks):
        if isinstance(block, Image):
            block.data = images.get(block.key, b"")
    return blocks


def _flat(blocks: Sequence[Any]) -> list[Any]:
    out = []
    for b in blocks:
        out += _flat(b.blocks) if isinstance(b, Fold) else [b]
    return out


def _render(formats: Mapping[type, Callable[[Any], str]], blk: Any) -> str:
    """``blk`` in one output format: ``formats`` maps each block type to its renderer."""
    if type(blk) not in formats:
        raise TypeError(f"unknown block {blk!r}")
    return formats[type(blk)](blk)


# ---------------------------------------------------------------------------------------------- markdown

# Always special: \ ` * [ ] < > & | ~; "_" only where it can open or close emphasis (not inside a word).
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>&|~]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z]))")


def _md_text(text: str) -> str:
    """Backslash-escape Markdown punctuation (CommonMark: any ASCII punctuation may be escaped)."""
    return _MD_SPECIAL.sub(r"\\\1", text).replace("\n", " ")


def _fence(text: str, shortest: int = 1) -> str:
    """A run of backticks longer than any inside ``text`` (and at least ``shortest``)."""
    return "`" * max(shortest, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))


def _md_code(text: str) -> str:
    """An inline code span whose fence is longer than any backtick run inside; ``|`` escaped (GFM tables)."""
    fence, pad = _fence(text), " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|").replace("\n", " ")


def _md_bold(text: str) -> str:
    """``**text**`` with surrounding white space kept outside the markers (``**pass **`` is not bold)."""
    core = text.strip()
    if not core:
        return text
    lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()):]
    return f"{lead}**{_md_text(core)}**{trail}"


def _md_runs(runs: Sequence[tuple[str, str]]) -> str:
    return "".join(_md_code(t) if style == "code" else _md_bold(t) if style == "b" else _md_text(t)
                   for style, t in runs)


def _md_table(blk: Table) -> str:
    # numbers and "–" pass through unchanged; user strings are escaped
    lines = [f"*{_md_text(blk.caption)}*", ""] if blk.caption else []
    lines += ["| " + " | ".join(map(_md_text, blk.headers)) + " |",
              "|" + "|".join("---" for _ in blk.headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(_md_text, row)) + " |" for row in blk.rows])


_MARKDOWN: dict[type, Callable[[Any], str]] = {
    Heading: lambda b: "#" * b.level + " " + _md_text(b.text),
    Para: lambda b: _md_runs(b.runs),
    Bullets: lambda b: "\n".join("- " + _md_runs(item) for item in b.items),
    Table: _md_table,
    Image: lambda b: f"![{_md_text(b.alt)}]({FILES[b.key]})",
    Code: lambda b: f"{_fence(b.text, 3)}\n{b.text}\n{_fence(b.text, 3)}",
    Fold: lambda b: "### " + _md_text(b.title) + "\n\n" + to_markdown(b.blocks).rstrip("\n"),
}


def to_markdown(blocks: Sequence[Any]) -> str:
    """GitHub-flavoured Markdown of ``blocks``; images reference the PNG files beside the page."""
    return "\n\n".join(_render(_MARKDOWN, blk) for blk in blocks) + "\n"


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
    tags = {"code": "code", "b": "strong"}
    return "".join(f"<{tags[s]}>{_h(t)}</{tags[s]}>" if s in tags else _h(t) for s, t in runs)


def _html_table(blk: Table) -> str:
    cap = f"<caption>{_h(blk.caption)}</caption>" if blk.caption else ""
    head = "<tr>" + "".join(f"<th>{_h(x)}</th>" for x in blk.headers) + "</tr>"
    rows = "".join("<tr>" + "".join(f"<td>{_h(x)}</td>" for x in row) + "</tr>" for row in blk.rows)
    return f"<table>{cap}<thead>{head}</thead><tbody>{rows}</tbody></table>"


def _html_image(blk: Image) -> str:
    if not blk.data:
        raise ValueError(f"images: no PNG bytes for {blk.key!r}")
    uri = "data:image/png;base64," + base64.b64encode(blk.data).decode("ascii")
    return f'<figure><img src="{uri}" alt="{_h(blk.alt)}"><figcaption>{_h(blk.alt)}</figcaption></figure>'


_HTML: dict[type, Callable[[Any], str]] = {
    Heading: lambda b: f"<h{b.level}>{_h(b.text)}</h{b.level}>",
    Para: lambda b: f"<p>{_html_runs(b.runs)}</p>",
    Bullets: lambda b: "<ul>" + "".join(f"<li>{_html_runs(i)}</li>" for i in b.items) + "</ul>",
    Table: _html_table,
    Image: _html_image,
    Code: lambda b: f"<pre><code>{_h(b.text)}</code></pre>",
    Fold: lambda b: f"<details><summary>{_h(b.title)}</summary>\n{_html_body(b.blocks)}\n</details>",
}


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
    return "\n".join(_render(_HTML, blk) for blk in blocks)


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
