"""Certify a test set and report it like Laousy et al. (MICCAI 2023), Tables 1-3 and Fig. 1.

:class:`CertificationRun` certifies every test case, for every σ and every *method* (a base
``forward`` plus an optional denoiser: SegCertify = noise-trained model without denoiser, "ours" =
plain model behind a diffusion denoiser), with :func:`common.certify.certify`, and writes to
``output_dir``:

- ``per_case.csv``: one row per case × σ × method: certified Dice / IoU per class with abstained pixels
  ignored (the paper's score) and the strict variant (abstentions count as errors), %⊘ abstained.
- ``clean_per_case.csv``: the same scores of each method's plain prediction (σ = 0, R = 0, Table 2's
  first row; the denoiser is not applied).
- ``summary.json``, ``summary.csv``, ``summary.md``: case means per method and σ, shaped like the
  paper's tables (σ, R, Dice / IoU per class, %⊘), plus the strict table.
- ``certified_labels.pt``: ``{"<method>/sigma=<σ>/<case>": int16 (H, W)}`` with ``ABSTAIN`` (-1).
- ``figure.png``: Fig. 1-like panel of the first case (noisy input, ground truth, certified
  segmentation of every method, abstentions magenta), one row per σ.

A configuration of the engine (:func:`common.evaluation.engine.evaluate`: models = methods, perturbations
= clean and smoothing at each σ); case ids are :func:`common.metrics.case_id`; empty classes follow
:data:`common.metrics.EMPTY_CLASS_RULE`. The output folder is checked before any case is certified and
the files are written as one report set (:func:`common.io.write_report_set`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.certify import ABSTAIN, CORRECTIONS
from common.evaluation.engine import Model, Scoring, clean, evaluate, run_and_write, smoothed
from common.io import write_report_set
from common.metrics import EMPTY_CLASS_RULE
from common.report import csv_text
from common.reporting.paper_tables import certification_tables
from common.reporting.plots import render_certified_figure
from common.validation import check_nonnegative, check_positive_int, check_probability

__all__ = [
    "check_certification_config",
    "PerSigmaDenoiser",
    "CertificationRun",
    "summarise_certification",
    "certification_tables",
]


def check_certification_config(sigmas, n0, n, alpha, tau, correction="holm") -> dict[str, Any]:
    """Validate the paper's certification hyper-parameters; ValueError naming the config key.

    σ > 0 for every σ in ``sigmas``, n0 ≥ 1, n ≥ 1, 0 < α < 1, 0.5 ≤ τ < 1 (so R = σ·Φ⁻¹(τ) ≥ 0).
    """
    if isinstance(sigmas, (int, float)) or not isinstance(sigmas, Iterable):
        raise ValueError(f"sigmas: expected a list of noise levels, got {sigmas!r}")
    sigmas = [check_nonnegative(s, "sigmas") for s in sigmas]
    if not sigmas or min(sigmas) <= 0:
        raise ValueError(f"sigmas: expected a non-empty list of values > 0, got {sigmas}")
    tau = check_nonnegative(tau, "tau")
    if not 0.5 <= tau < 1.0:
        raise ValueError(f"tau: must lie in [0.5, 1), got {tau}")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction: expected one of {CORRECTIONS}, got {correction!r}")
    return {
        "sigmas": sigmas,
        "n0": check_positive_int(n0, "n0"),
        "n": check_positive_int(n, "n"),
        "alpha": check_probability(alpha, "alpha"),
        "tau": tau,
        "correction": correction,
    }


class PerSigmaDenoiser:
    """Dispatch ``denoiser(noisy_x, sigma)`` to one denoiser per σ (the paper's UNet denoisers, one per σ).

    Args:
        denoisers: mapping σ → callable ``(noisy_x, sigma) -> x_hat``; keys may be numbers or strings
            (JSON configs), matched to the call's σ with a relative tolerance of 1e-6.
    """

    def __init__(self, denoisers: Mapping[Any, Callable]) -> None:
        if not isinstance(denoisers, Mapping) or not denoisers:
            raise ValueError("denoisers: expected a non-empty mapping sigma -> denoiser")
        self.denoisers = {check_nonnegative(k, "denoisers"): v for k, v in denoisers.items()}
        for k, v in self.denoisers.items():
            if not callable(v):
                raise ValueError(f"denoisers: the entry for sigma={k} is not callable")

    def __call__(self, noisy_x: torch.Tensor, sigma: float) -> torch.Tensor:
        for key, denoiser in self.denoisers.items():
            if math.isclose(key, sigma, rel_tol=1e-6):
                return denoiser(noisy_x, sigma)
        raise ValueError(f"sigma: no denoiser for sigma={sigma}; have {sorted(self.denoisers)}")


def _row(r: Mapping[str, Any], class_names: Sequence[str]) -> dict:
    """One CSV row of an engine row: per-class scores named by class, %⊘ as a percentage."""
    row: dict[str, Any] = {"case": r["case_id"], "method": r["model"], "sigma": r["sigma"],
                           "radius": r.get("radius", 0.0)}
    for variant in ("", "_strict"):
        for name in class_names:
            for metric in ("dice", "iou"):
                row[f"{metric}{variant}_{name}"] = float(r.get(f"{metric}{variant}_{name}", r[f"{metric}_{name}"]))
    row["abstained_pct"] = 100.0 * float(r.get("abstained_fraction", 0.0))
    return row


class CertificationRun:
    """Certify a test set for several methods and σ values and write the paper's tables and figure.

    Args:
        methods: mapping name → {"forward": callable (N, C, *sp) → logits (N, K, *sp),
            "denoiser": None | callable (noisy_x, σ) → x̂ | mapping σ → callable}.
        sigmas: noise levels σ (units of the input tensor, here images on [0, 1]); the paper: 0.25, 0.5, 1.0.
        n0, n, alpha, tau, correction: :func:`common.certify.certify` (paper: 10, 100, 0.001, 0.75, Holm).
        num_classes: K; class_names: K names (the first is background and is left out of the tables).
        output_dir: where the files listed in the module docstring go.
        batch_size: noisy copies per forward call. seed: the noise generator is reset to ``seed`` for every
            batch, σ and method, so all methods see the same noise draws.
        include_clean: also score each method's plain prediction (σ = 0 row).
        image_key, label_key: keys of the loader's dict batches.
        progress: progress over batches (stderr; rank 0 only under ``torchrun``).

    Under ``torchrun`` each rank certifies its shard of the cases and rank 0 alone writes the files, the
    same files with the same numbers as one process.
    """

    def __init__(
        self,
        methods: Mapping[str, Mapping[str, Any]],
        sigmas: Sequence[float],
        num_classes: int,
        class_names: Sequence[str],
        output_dir: str | os.PathLike,
        n0: int = 10,
        n: int = 100,
        alpha: float = 0.001,
        tau: float = 0.75,
        correction: str = "holm",
        batch_size: int = 16,
        seed: int = 0,
        include_clean: bool = True,
        image_key: str = "image",
        label_key: str = "label",
        title: str = "Certified segmentation",
        progress: bool = True,
    ) -> None:
        self.params = check_certification_config(sigmas, n0, n, alpha, tau, correction)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        if self.num_classes < 2:
            raise ValueError(f"num_classes: expected >= 2, got {num_classes}")
        if len(class_names) != self.num_classes:
            raise ValueError(f"class_names: expected {self.num_classes} names, got {list(class_names)}")
        if not isinstance(methods, Mapping) or not methods:
            raise ValueError("methods: expected a non-empty mapping name -> {'forward', 'denoiser'}")
        self.methods = {}
        for name, spec in methods.items():
            if not isinstance(spec, Mapping) or not callable(spec.get("forward")):
                raise ValueError(f"methods: '{name}' needs a callable 'forward'")
            denoiser = spec.get("denoiser")
            if isinstance(denoiser, Mapping):
                denoiser = PerSigmaDenoiser(denoiser)
            if denoiser is not None and not callable(denoiser):
                raise ValueError(f"methods: the denoiser of '{name}' is not callable")
            self.methods[str(name)] = Model(spec["forward"], denoiser)
        self.class_names = [str(c) for c in class_names]
        self.output_dir = Path(output_dir)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.seed = int(seed)
        self.include_clean = bool(include_clean)
        self.image_key, self.label_key, self.title = image_key, label_key, title
        self.progress = bool(progress)

    def _perturbations(self) -> list:
        p, seed = self.params, self.seed
        reset = lambda ids, device: torch.Generator(device=device).manual_seed(seed)  # noqa: E731
        perts = [clean()] if self.include_clean else []
        return perts + [smoothed(s, p["n0"], p["n"], p["alpha"], p["tau"], p["correction"], self.batch_size, reset,
                                 name="smoothing") for s in p["sigmas"]]

    def _keep(self, k, ids, method, pert, x, y, outcome) -> dict | None:
        """Engine observer: the certified labels of every case, and the figure's panel from the first batch."""
        if pert.kind != "smoothing":
            return None
        cert = outcome["cert"]
        out: dict[Any, Any] = {("labels", f"{method}/sigma={pert.sigma:g}/{cid}"): cert.labels[i].to(torch.int16).cpu()
                               for i, cid in enumerate(ids)}
        if k == 0:
            out.update({("panel", "image"): x[0].cpu(), ("panel", "truth"): y[0, 0].cpu(),
                        ("certified", (method, pert.sigma)): cert.labels[0].cpu()})
        return out

    def certify_loader(self, loader: Iterable) -> dict[str, Any]:
        """Certify every case of ``loader`` (dict batches); returns rows, clean rows, labels, figure data.

        Under ``torchrun`` each rank certifies its block of batches and every rank returns the results of
        all cases in loader order. The noise generator is reset to ``seed`` per batch, so the numbers equal
        a single process's.
        """
        scoring = Scoring(self.num_classes, include_background=True, class_names=self.class_names)
        result = evaluate(self.methods, loader, self._perturbations(), scoring, progress=self.progress,
                          desc=self.title, observer=self._keep, image_key=self.image_key, label_key=self.label_key)
        rows = [_row(r, self.class_names) for r in result.rows if r["kind"] == "smoothing"]
        clean_rows = [_row(r, self.class_names) for r in result.rows if r["kind"] == "clean"]
        order = {f"{r['method']}/sigma={r['sigma']:g}/{r['case']}": i for i, r in enumerate(rows)}
        kept = result.artifacts
        labels = dict(sorted(((key, v) for (kind, key), v in kept.items() if kind == "labels"),
                             key=lambda kv: order[kv[0]]))
        figure = {"image": kept[("panel", "image")], "truth": kept[("panel", "truth")], "noisy": {},
                  "certified": {key: v for (kind, key), v in kept.items() if kind == "certified"}}
        gen = torch.Generator().manual_seed(self.seed)
        for sigma in self.params["sigmas"]:
            noise = torch.randn(figure["image"].shape, generator=gen)
            figure["noisy"][sigma] = figure["image"] + sigma * noise
        return {"rows": rows, "clean_rows": clean_rows, "labels": labels, "figure": figure}

    def run(self, loader: Iterable) -> dict[str, Any]:
        """Certify ``loader`` and write every output; returns the summary dict (also ``summary.json``).

        Under ``torchrun`` rank 0 alone writes; every rank returns once the files are written.
        """
        return run_and_write(self.output_dir, lambda: self._summarise(self.certify_loader(loader)),
                             lambda out: self._write(*out))[1]

    def _summarise(self, result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        summary = summarise_certification(result["rows"] + result["clean_rows"], self.class_names[1:])
        summary.update({"params": self.params, "title": self.title, "class_names": self.class_names,
                        "num_cases": len({r["case"] for r in result["rows"]}), "abstain_label": ABSTAIN,
                        "empty_class_rule": EMPTY_CLASS_RULE})
        return result, summary

    def _write(self, result: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
        """Write the files listed in the module docstring to ``output_dir``, as one report set."""
        paper, strict = certification_tables(summary["entries"], self.class_names[1:])
        text = f"# {self.title}\n\n## Certified scores, abstentions ignored\n\n{paper}\n" \
               f"## Strict certified scores (abstentions count as errors)\n\n{strict}\n" \
               f"Empty classes: {EMPTY_CLASS_RULE}.\n"
        files: dict[str, Any] = {"per_case.csv": csv_text(result["rows"])}
        if result["clean_rows"]:
            files["clean_per_case.csv"] = csv_text(result["clean_rows"])
        files.update({
            "summary.json": json.dumps(summary, indent=2) + "\n",
            "summary.csv": csv_text(summary["entries"]),
            "summary.md": text,
            "certified_labels.pt": lambda path: torch.save(result["labels"], path),
            "figure.png": render_certified_figure(result["figure"], self.num_classes),
        })
        write_report_set(self.output_dir, files)


def summarise_certification(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """Case means (NaN-ignoring) per (method, σ).

    Returns ``{"entries": [{method, sigma, radius, n, dice_<c>, iou_<c>, ..., abstained_pct}]}``.
    """
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], float(row["sigma"])), []).append(row)
    metrics = [f"{m}{v}_{c}" for v in ("", "_strict") for c in class_names for m in ("dice", "iou")]
    order = {m: i for i, m in enumerate(dict.fromkeys(m for m, _ in groups))}
    entries = []
    for (method, sigma), group in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        entry: dict[str, Any] = {"method": method, "sigma": sigma, "radius": float(group[0]["radius"]),
                                 "n": len(group)}
        for key in metrics + ["abstained_pct"]:
            values = np.array([r[key] for r in group], dtype=np.float64)
            finite = values[~np.isnan(values)]
            entry[key] = float(finite.mean()) if finite.size else None
        entries.append(entry)
    return {"entries": entries}


