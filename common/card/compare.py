"""Two robustness cards side by side (``--compare OTHER/card.json``), e.g. an undefended model against an
adversarially trained one.

On the case ids both cards share, per class: clean Dice and the headline worst-case robust Dice at every ε
both cards have, each model's mean, the mean paired difference (this − other) and a two-sided Wilcoxon
signed-rank test (scipy, exact for small n; :func:`common.stats.paired_wilcoxon`), Holm-adjusted over the
tests of each class. With n shared cases no p can be below 2 / 2^n (stated in the result).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.card.headline import min_wilcoxon_p
from common.stats import holm_adjust, paired_wilcoxon

__all__ = ["read_other_card", "compare_cards"]


def read_other_card(path: str | os.PathLike) -> dict[str, Any]:
    """The card at ``path``; one-line errors naming the file and the missing key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compare: {path} does not exist")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"compare: {path} is not a card.json ({err})") from err
    for key in ("clean", "headline", "bundle", "data"):
        if not isinstance(card, Mapping) or key not in card:
            raise ValueError(f"compare: {path} has no key '{key}' (a card.json of schema 2 or later is needed)")
    return card


def compare_cards(card: Mapping[str, Any], other: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``{"other": {...}, "shared_cases", "classes", "rows": [{"what", "eps", "class", "this", "other",
    "difference", "p_wilcoxon", "p_adjusted"}], "min_p", "test"}`` on the shared case ids and classes."""
    ids = [c for c in card["data"]["case_ids"] if c in set(other["data"]["case_ids"])]
    if not ids:
        raise ValueError(f"compare: {source} shares no case id with this card")
    classes = [k for k in card["bundle"]["class_names"] if k in set(other["bundle"]["class_names"])]
    other_eps = {round(float(e["eps"]), 12): e for e in other["headline"]["eps"]}
    settings = [("clean Dice", None, card["clean"]["per_case"], other["clean"]["per_case"])]
    for e in card["headline"]["eps"]:
        o = other_eps.get(round(float(e["eps"]), 12))
        if o is not None:
            settings.append(("worst-case Dice", e["eps"],
                             {c: v["dice"] for c, v in e["per_case"].items()},
                             {c: v["dice"] for c, v in o["per_case"].items()}))
    rows = []
    for k in classes:
        a = np.array([[s[2][c][k] for c in ids] for s in settings], dtype=np.float64)
        b = np.array([[s[3][c][k] for c in ids] for s in settings], dtype=np.float64)
        p = paired_wilcoxon(a, b)
        adj = holm_adjust(p)
        for i, (what, eps, _, _) in enumerate(settings):
            rows.append({"what": what, "eps": eps, "class": k, "this": float(a[i].mean()), "other": float(b[i].mean()),
                         "difference": float((a[i] - b[i]).mean()), "p_wilcoxon": float(p[i]),
                         "p_adjusted": float(adj[i])})
    return {"other": {"card": source, "title": other.get("title"), "network": other["bundle"].get("network"),
                      "checkpoint_sha256": other["bundle"].get("checkpoint_sha256")},
            "shared_cases": ids, "classes": classes, "rows": rows,
            "test": "two-sided Wilcoxon signed-rank on paired cases (scipy), Holm over the tests of each class",
            "min_p": min_wilcoxon_p(len(ids)), "min_p_holm": min_wilcoxon_p(len(ids), len(settings))}
