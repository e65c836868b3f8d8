"""The project's figures, in one plot style: metric vs ε, certified Dice vs σ, examples panels, line plots.

Every function returns PNG bytes (written by :mod:`common.io` or embedded in the card's HTML). One
style: matplotlib's object API (``Figure`` + ``FigureCanvasAgg``: no ``pyplot`` global state, no backend
switch), :data:`DPI`, a light grid, mean ± sd as a band, the class palette of :func:`label_colours`
(background black, abstentions magenta). The card's figures take the card dict (validated by
:mod:`common.reporting.card`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = [
    "DPI",
    "new_figure",
    "png_bytes",
    "render_lines",
    "render_metric_vs_eps",
    "render_certified_figure",
    "ABSTAIN",
    "ABSTAIN_COLOUR",
    "certified_dice_vs_sigma_png",
    "dice_vs_eps_png",
    "examples_png",
    "label_colours",
    "label_names",
]

ABSTAIN = -1
ABSTAIN_COLOUR = (1.0, 0.0, 1.0)  # magenta: absent from the class palette below, visible on black
_CLASS_COLOURS = [
    "#000000",
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#17becf",
    "#bcbd22",
    "#8c564b",
    "#7f7f7f",
    "#9467bd",
]
_MAX_CLASS_PANELS = 4  # more foreground classes than this: plot the mean over classes instead
DPI = 110


def _num(value: Any) -> float:
    """A card number as float; ``None`` (undefined) becomes NaN, which matplotlib leaves as a gap."""
    return math.nan if value is None else float(value)


def _text(value: Any) -> str:
    """A user string (class name, case id) safe for matplotlib: ``$`` would start mathtext and a leading
    ``_`` hides a legend entry."""
    text = str(value).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def new_figure(width: float, height: float, dpi: int = DPI) -> Figure:
    """A figure of the project's style, detached from ``pyplot``."""
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (after ``tight_layout``)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _style(ax: Any, xlabel: str, ylabel: str, title: str = "", legend: bool = True) -> None:
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(_text(title))
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=7)


def _band(ax: Any, xs: Sequence[float], means: Sequence[float], sds: Sequence[float] | None, label: str,
          alpha: float = 0.15, **kwargs: Any) -> None:
    """A line with markers and its ± sd band of opacity ``alpha`` (undefined sds: no band)."""
    means = np.asarray(means, dtype=np.float64)
    (line,) = ax.plot(xs, means, marker=kwargs.pop("marker", "o"), label=_text(label), **kwargs)
    if sds is not None:
        sds = np.nan_to_num(np.asarray(sds, dtype=np.float64), nan=0.0)
        ax.fill_between(xs, means - sds, means + sds, color=line.get_color(), alpha=alpha, linewidth=0)


def render_lines(panels: Sequence[Mapping[str, Any]], width: float = 5.0, height: float = 4.0) -> bytes:
    """One row of panels, each ``{"title", "xlabel", "ylabel", "series": [{"label", "x", "y", "sd"?,
    "linestyle"?}]}`` (e.g. Dice vs steps, Dice vs ε per model) as PNG bytes."""
    if not panels:
        raise ValueError("panels: expected at least one panel")
    fig = new_figure(width * len(panels), height)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for series in panel["series"]:
            _band(ax, series["x"], series["y"], series.get("sd"), series["label"],
                  linestyle=series.get("linestyle", "-"))
        _style(ax, panel["xlabel"], panel["ylabel"], panel.get("title", ""))
    return png_bytes(fig)


def render_metric_vs_eps(
    summary: Mapping[str, Any], metric: str, eps_label: str = "ε", title: str = "", ylabel: str | None = None,
) -> bytes:
    """``metric`` (mean ± sd band) against ε in display units, one line per attack, from a sweep summary
    (``{"entries": [{"attack", "eps_display", "mean": {m}, "sd": {m}}]}``); every line starts at the
    clean entry (ε = 0): an attack of strength 0 is the clean input."""
    entries = list(summary.get("entries", []))
    if not any(metric in e.get("mean", {}) for e in entries):
        raise ValueError(f"metric: {metric!r} not in the summary")
    clean = next((e for e in entries if e["attack"] == "clean"), None)
    attacks = list(dict.fromkeys(e["attack"] for e in entries if e["attack"] != "clean"))
    fig = new_figure(5.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name in attacks:
        points = sorted((e for e in entries if e["attack"] == name), key=lambda e: e["eps_display"])
        points = [clean, *points] if clean is not None else points
        xs = [0.0 if e is clean else float(e["eps_display"]) for e in points]
        _band(ax, xs, [_num(e["mean"].get(metric)) for e in points], [_num(e["sd"].get(metric)) for e in points], name)
    if not attacks and clean is not None:
        ax.plot([0.0], [_num(clean["mean"].get(metric))], marker="o", label="clean")
    _style(ax, eps_label, ylabel or metric, title)
    return png_bytes(fig)


def render_certified_figure(panel: Mapping[str, Any], num_classes: int) -> bytes:
    """A grid like Fig. 1 of Laousy et al. (MICCAI 2023): one row per σ; columns: image + N(0, σ²), ground
    truth, the certified segmentation of each method (abstentions magenta). ``panel``: ``{"noisy": {σ:
    (C, H, W)}, "truth": (H, W), "certified": {(method, σ): (H, W)}}``."""
    sigmas = list(panel["noisy"])
    methods = list(dict.fromkeys(m for m, _ in panel["certified"]))
    cols = 2 + len(methods)
    fig = new_figure(2.2 * cols, 2.2 * len(sigmas))
    for r, sigma in enumerate(sigmas):
        arr = np.clip(np.asarray(panel["noisy"][sigma], dtype=np.float64), 0.0, 1.0)
        image, cmap = (arr[0], "gray") if arr.shape[0] != 3 else (arr.transpose(1, 2, 0), None)
        cells = [(image, cmap, f"noisy, σ={sigma:g}"),
                 (label_colours(np.asarray(panel["truth"]), num_classes), None, "ground truth")]
        cells += [(label_colours(np.asarray(panel["certified"][(m, sigma)]), num_classes), None, m) for m in methods]
        for c, (data, cm, title) in enumerate(cells):
            ax = fig.add_subplot(len(sigmas), cols, r * cols + c + 1)
            ax.imshow(data, cmap=cm, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(_text(title), fontsize=8)
            ax.axis("off")
    return png_bytes(fig)


def _class_series(values: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> dict[str, np.ndarray]:
    """{panel name: array over ``values``}: one series per class, or their mean (ignoring undefined
    classes) when there are more classes than :data:`_MAX_CLASS_PANELS`."""
    table = np.array([[_num(v.get(c)) for c in classes] for v in values], dtype=np.float64).reshape(
        len(values), len(classes)
    )
    if len(classes) <= _MAX_CLASS_PANELS:
        return {c: table[:, i] for i, c in enumerate(classes)}
    with np.errstate(all="ignore"):
        finite = np.isfinite(table)
        count = finite.sum(axis=1)
        mean = np.where(count > 0, np.where(finite, table, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)
    return {"mean over classes": mean}


def dice_vs_eps_png(card: Mapping[str, Any]) -> bytes:
    """Mean Dice (± sd band) against ε (in ``units.eps_unit``), one line per attack, one panel per
    foreground class (or the class mean past four classes). Every line starts at the clean Dice, ε = 0."""
    classes = list(card["bundle"]["class_names"])
    eps_unit = card["units"]["eps_unit"]
    attacks = list(dict.fromkeys(a["name"] for a in card["attacks"]))
    clean = _class_series([card["clean"]["mean"]], classes)
    panels = list(clean)
    fig = new_figure(4.2 * len(panels), 3.6)
    for p, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1)
        for name in attacks:
            rows = sorted((a for a in card["attacks"] if a["name"] == name), key=lambda a: a["eps"])
            xs = np.array([0.0] + [float(a["eps"]) for a in rows])
            means = np.concatenate([clean[panel], _class_series([a["mean"] for a in rows], classes)[panel]])
            sds = np.concatenate([[0.0], _class_series([a["sd"] for a in rows], classes)[panel]])
            _band(ax, xs, means, sds, name, alpha=0.12)
        head = card.get("headline")
        if head and head["eps"]:
            entries = sorted(head["eps"], key=lambda e: e["eps"])
            xs = np.array([0.0] + [float(e["eps"]) for e in entries])
            means = np.concatenate([clean[panel], _class_series([e["mean"] for e in entries], classes)[panel]])
            ax.plot(xs, means, color="black", linewidth=2.2, marker="s", label="worst case (per case)")
            if panel in classes:
                cis = [head["clean"]["ci95"].get(panel)] + [e["ci95"].get(panel) for e in entries]
                if all(ci is not None for ci in cis):
                    ax.fill_between(xs, [ci[0] for ci in cis], [ci[1] for ci in cis], color="black", alpha=0.12,
                                    linewidth=0)
        ax.axhline(clean[panel][0], color="0.4", linestyle=":", linewidth=1, label="clean")
        ax.set_ylim(-0.02, 1.02)
        _style(ax, f"ε ({eps_unit})", "Dice", panel)
    return png_bytes(fig)


def certified_dice_vs_sigma_png(card: Mapping[str, Any]) -> bytes:
    """Certified Dice (abstained pixels ignored) against σ, one line per foreground class (or the class
    mean), dotted at each class's clean Dice; abstain fraction on the right axis (dashed, black)."""
    classes = list(card["bundle"]["class_names"])
    rows = sorted(card["certification"], key=lambda r: r["sigma"])
    sigmas = np.array([float(r["sigma"]) for r in rows])
    cert = _class_series([r["certified_dice"] for r in rows], classes)
    clean = _class_series([card["clean"]["mean"]], classes)
    fig = new_figure(5.6, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in cert.items():
        (line,) = ax.plot(sigmas, values, marker="o", label=_text(f"certified Dice: {name}"))
        if math.isfinite(clean[name][0]):
            ax.axhline(
                clean[name][0],
                color=line.get_color(),
                linestyle=":",
                linewidth=1,
                label=_text(f"clean Dice: {name}"),
            )
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"σ ({card['units'].get('sigma_unit') or 'network-input units'})")
    ax.set_ylabel("certified Dice")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(
        sigmas,
        [float(r["abstain_fraction"]) for r in rows],
        color="black",
        linestyle="--",
        marker="s",
        label="abstain fraction",
    )
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_ylabel("abstain fraction")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="best", fontsize=7)
    ax.set_title("Randomized-smoothing certification")
    return png_bytes(fig)


def label_names(num_labels: int, class_names: Sequence[str], num_classes: int) -> list[str]:
    """Legend name of label values ``0..num_labels-1``: ``class_names`` index the labels when they name
    every class (or every foreground class, background being 0); otherwise (e.g. BraTS regions, which are
    unions of labels) the labels are named by their value."""
    names = list(class_names)
    if len(names) == num_classes:
        by_value = names
    elif len(names) == num_classes - 1:
        by_value = ["background", *names]
    else:
        by_value = []
    return [by_value[k] if k < len(by_value) else f"label {k}" for k in range(num_labels)]


def label_colours(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """(H, W) integer labels → (H, W, 3) RGB: background black, classes from a fixed palette (cycled),
    ``ABSTAIN`` (-1) magenta. Vectorised lookup, no loop over pixels."""
    palette = np.array(
        [to_rgb(_CLASS_COLOURS[k % len(_CLASS_COLOURS)]) for k in range(num_labels)] + [ABSTAIN_COLOUR]
    )
    lab = labels.astype(np.int64)
    return palette[np.where(lab == ABSTAIN, num_labels, lab)]


def examples_png(card: Mapping[str, Any], examples: Mapping[str, np.ndarray]) -> bytes:
    """The examples panel: clean image, adversarial image (both on the network input range), perturbation
    (diverging colormap, symmetric limits ±max|δ|), label, clean / adversarial / certified predictions
    (abstentions magenta) and a legend of the label colours. Arrays are (H, W) as in SCHEMA.md."""
    meta = card["examples"]
    bundle = card["bundle"]
    lo, hi = (float(v) for v in card["units"]["input_range"])
    image = np.asarray(examples["image"], dtype=np.float64)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        lo, hi = (
            float(image.min()),
            float(image.max()) if image.max() > image.min() else float(image.min()) + 1,
        )
    delta = np.asarray(examples["perturbation"], dtype=np.float64)
    lim = float(np.abs(delta).max())
    lim = lim if lim > 0 else 1.0
    maps = ("label", "pred_clean", "pred_adversarial", "pred_certified")
    num_labels = max(int(bundle["num_classes"]), 1 + max(int(np.asarray(examples[k]).max()) for k in maps))
    channels = bundle.get("channel_names")  # optional: one name per output channel, background included
    names = label_names(
        num_labels,
        channels
        if isinstance(channels, list) and len(channels) == int(bundle["num_classes"])
        else bundle["class_names"],
        int(bundle["num_classes"]),
    )
    abstain = float(np.mean(np.asarray(examples["pred_certified"]) == ABSTAIN))
    attack = _text(f"{meta['attack']}, ε={float(meta['eps']):.4g}")

    fig = new_figure(11.0, 5.8)
    panels = [
        ("clean image", image, "gray", (lo, hi)),
        (f"adversarial ({attack})", examples["adversarial"], "gray", (lo, hi)),
        ("perturbation δ = adv − clean", delta, "RdBu_r", (-lim, lim)),
        ("label", examples["label"], None, None),
        ("clean prediction", examples["pred_clean"], None, None),
        ("adversarial prediction", examples["pred_adversarial"], None, None),
        (
            f"certified (σ={float(meta['sigma']):.4g}), abstain {100 * abstain:.1f} %",
            examples["pred_certified"],
            None,
            None,
        ),
    ]
    for i, (title, data, cmap, limits) in enumerate(panels):
        ax = fig.add_subplot(2, 4, i + 1)
        if cmap is None:
            ax.imshow(label_colours(np.asarray(data), num_labels), interpolation="nearest")
        else:
            shown = ax.imshow(
                np.asarray(data, dtype=np.float64),
                cmap=cmap,
                vmin=limits[0],
                vmax=limits[1],
                interpolation="nearest",
            )
            cbar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
            cbar.ax.tick_params(labelsize=7)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    legend_ax = fig.add_subplot(2, 4, 8)
    legend_ax.axis("off")
    present = set(np.unique(np.concatenate([np.asarray(examples[k]).ravel() for k in maps])).tolist())
    handles = [
        Patch(facecolor=label_colours(np.array([k]), num_labels)[0], edgecolor="0.5", label=_text(names[k]))
        for k in range(num_labels)
        if k in present or k < int(bundle["num_classes"])
    ]
    handles.append(Patch(facecolor=ABSTAIN_COLOUR, edgecolor="0.5", label="abstain (−1)"))
    legend_ax.legend(handles=handles, loc="center", fontsize=8, title="labels", frameon=True)
    where = f"case {meta['case_id']}"
    if meta.get("slice_axis") is not None:
        where += f", slice {meta.get('slice_index')} along axis {meta['slice_axis']}"
    fig.suptitle(_text(where), fontsize=9)
    return png_bytes(fig)
