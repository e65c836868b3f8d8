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
  segmentation of every method, abstentions in white), one row per σ.

All files are written atomically (:mod:`common.io`, :func:`common.report.write_bytes`).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.metrics import compute_dice, compute_iou
from tqdm.auto import tqdm

from common.certify import ABSTAIN, CORRECTIONS, certified_metrics, certify
from common.distributed import barrier, gather_objects, is_main_process, num_local_batches, shard_batches
from common.io import atomic_torch_save, atomic_write_json
from common.report import markdown_table, write_bytes, write_csv
from common.validation import check_nonnegative, check_positive_int, check_probability, main_output

__all__ = [
    "check_certification_config",
    "PerSigmaDenoiser",
    "CertificationRun",
    "summarise_certification",
    "certification_tables",
    "render_certified_figure",
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


def _plain_scores(labels: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Dice / IoU per class of a label map (B, *sp) against y (B, *sp); MONAI metrics, NaN if empty."""
    pred = torch.nn.functional.one_hot(labels.long(), num_classes).movedim(-1, 1).float()
    truth = torch.nn.functional.one_hot(y.long(), num_classes).movedim(-1, 1).float()
    dice = compute_dice(pred, truth, True, True, num_classes)
    iou = compute_iou(pred, truth, True, True)
    out = {}
    for c in range(num_classes):
        out[f"dice_{c}"], out[f"iou_{c}"] = dice[:, c], iou[:, c]
        out[f"dice_strict_{c}"], out[f"iou_strict_{c}"] = dice[:, c], iou[:, c]
    out["abstained_fraction"] = torch.zeros(labels.shape[0], dtype=torch.float64)
    return out


def _case_name(batch: Mapping, key: str, index: int) -> str:
    """Case id from the image's file name (MetaTensor meta), else ``case_<index>``."""
    meta = getattr(batch.get(key), "meta", None) or batch.get(f"{key}_meta_dict") or {}
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    if not name:
        return f"case_{index:03d}"
    base = os.path.basename(str(name))
    for ext in (".nii.gz", ".nii", ".png", ".jpg"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def _row(case: str, method: str, sigma: float, radius: float, scores, class_names, i: int) -> dict:
    """One CSV row: per-class scores named by class, %⊘ as a percentage."""
    row: dict[str, Any] = {"case": case, "method": method, "sigma": sigma, "radius": radius}
    for variant in ("", "_strict"):
        for c, name in enumerate(class_names):
            row[f"dice{variant}_{name}"] = float(scores[f"dice{variant}_{c}"][i])
            row[f"iou{variant}_{name}"] = float(scores[f"iou{variant}_{c}"][i])
    row["abstained_pct"] = 100.0 * float(scores["abstained_fraction"][i])
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
            case, σ and method, so all methods see the same noise draws.
        include_clean: also score each method's plain prediction (σ = 0 row).
        image_key, label_key: keys of the loader's dict batches.
        progress: a tqdm bar over batches (stderr; rank 0 only under ``torchrun``).

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
            self.methods[str(name)] = (spec["forward"], denoiser)
        self.class_names = [str(c) for c in class_names]
        self.output_dir = Path(output_dir)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.seed = int(seed)
        self.include_clean = bool(include_clean)
        self.image_key, self.label_key, self.title = image_key, label_key, title
        self.progress = bool(progress)

    def _certify_batch(self, batch: Mapping, offset: int, keep_panel: bool) -> dict[str, Any]:
        """Rows, clean rows and certified labels of one batch (``offset``: cases before it); its figure
        panel (image, truth, certified maps; noise added later) when ``keep_panel``."""
        p = self.params
        rows, clean_rows, labels = [], [], {}
        x, y = batch[self.image_key], batch[self.label_key]
        x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
        y = y.as_tensor() if hasattr(y, "as_tensor") else torch.as_tensor(y)
        y = y[:, 0] if y.ndim == x.ndim else y
        x, y = x.float(), y.long().to(x.device)
        names = [_case_name(batch, self.image_key, offset)] if x.shape[0] == 1 else [
            f"case_{offset + i:03d}" for i in range(x.shape[0])
        ]
        panel = {"image": x[0].cpu(), "truth": y[0].cpu(), "noisy": {}, "certified": {}}
        for method, (forward, denoiser) in self.methods.items():
            if self.include_clean:
                with torch.no_grad():
                    pred = main_output(forward(x)).argmax(1)
                scores = _plain_scores(pred, y, self.num_classes)
                clean_rows += [_row(nm, method, 0.0, 0.0, scores, self.class_names, i)
                               for i, nm in enumerate(names)]
            for sigma in p["sigmas"]:
                generator = torch.Generator(device=x.device).manual_seed(self.seed)
                cert = certify(forward, x, sigma, p["n0"], p["n"], p["alpha"], p["tau"], p["correction"],
                               self.batch_size, denoiser, generator)
                scores = certified_metrics(cert, y, self.num_classes)
                rows += [_row(nm, method, sigma, cert.radius, scores, self.class_names, i)
                         for i, nm in enumerate(names)]
                for i, nm in enumerate(names):
                    labels[f"{method}/sigma={sigma:g}/{nm}"] = cert.labels[i].to(torch.int16).cpu()
                panel["certified"][(method, sigma)] = cert.labels[0].cpu()
        return {"rows": rows, "clean_rows": clean_rows, "labels": labels,
                "panel": panel if keep_panel else None}

    def certify_loader(self, loader: Iterable) -> dict[str, Any]:
        """Certify every case of ``loader`` (dict batches); returns rows, clean rows, labels, figure data.

        Under ``torchrun`` (an initialised process group) each rank certifies its block of batches
        (:func:`common.distributed.shard_batches`) and every rank returns the results of all cases in
        loader order. The noise generator is reset to ``seed`` per batch, so the numbers equal a single
        process's.
        """
        local = []
        bar = tqdm(
            shard_batches(loader), desc=self.title, total=num_local_batches(loader), unit="batch", leave=True,
            disable=not (self.progress and is_main_process()),
        )
        for k, offset, batch in bar:
            local.append((k, self._certify_batch(batch, offset, keep_panel=k == 0)))
        ordered = sorted((r for part in gather_objects(local) for r in part), key=lambda r: r[0])
        results = [r for _, r in ordered]
        rows = [row for r in results for row in r["rows"]]
        if not rows:
            raise ValueError("loader: yielded no test cases")
        clean_rows = [row for r in results for row in r["clean_rows"]]
        labels = {key: value for r in results for key, value in r["labels"].items()}
        figure = results[0]["panel"]
        gen = torch.Generator().manual_seed(self.seed)
        for sigma in self.params["sigmas"]:
            noise = torch.randn(figure["image"].shape, generator=gen)
            figure["noisy"][sigma] = figure["image"] + sigma * noise
        return {"rows": rows, "clean_rows": clean_rows, "labels": labels, "figure": figure}

    def run(self, loader: Iterable) -> dict[str, Any]:
        """Certify ``loader`` and write every output; returns the summary dict (also ``summary.json``).

        Under ``torchrun`` rank 0 alone writes; every rank returns once the files are written.
        """
        result = self.certify_loader(loader)
        summary = summarise_certification(result["rows"] + result["clean_rows"], self.class_names[1:])
        summary.update({"params": self.params, "title": self.title, "class_names": self.class_names,
                        "num_cases": len({r["case"] for r in result["rows"]}), "abstain_label": ABSTAIN})
        if is_main_process():
            self._write(result, summary)
        barrier()
        return summary

    def _write(self, result: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
        """Write the files listed in the module docstring to ``output_dir``."""
        out = self.output_dir
        write_csv(out / "per_case.csv", result["rows"])
        if result["clean_rows"]:
            write_csv(out / "clean_per_case.csv", result["clean_rows"])
        atomic_write_json(out / "summary.json", summary)
        write_csv(out / "summary.csv", summary["entries"])
        paper, strict = certification_tables(summary["entries"], self.class_names[1:])
        text = f"# {self.title}\n\n## Certified scores, abstentions ignored\n\n{paper}\n" \
               f"## Strict certified scores (abstentions count as errors)\n\n{strict}"
        write_bytes(out / "summary.md", text.encode())
        atomic_torch_save(result["labels"], out / "certified_labels.pt")
        write_bytes(out / "figure.png", render_certified_figure(result["figure"], self.num_classes))


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


def certification_tables(entries: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> tuple[str, str]:
    """Markdown tables shaped like the paper's Tables 1-3: method, σ, R, Dice / IoU per class, %⊘.

    Returns (certified table with abstentions ignored, strict table).
    """
    tables = []
    for variant in ("", "_strict"):
        columns = ["method", "sigma", "radius"]
        headers = ["Method", "σ", "R"]
        for c in class_names:
            columns += [f"dice{variant}_{c}", f"iou{variant}_{c}"]
            headers += [f"{c} Dice", f"{c} IoU"]
        columns.append("abstained_pct")
        headers.append("%⊘")
        rows = [{**e, "sigma": f"{e['sigma']:.2f}", "radius": f"{e['radius']:.2f}"} for e in entries]
        tables.append(markdown_table(rows, columns, ".2f", headers))
    return tables[0], tables[1]


_PALETTE = np.array(
    [[0.0, 0.0, 0.0], [0.12, 0.47, 0.71], [1.0, 0.5, 0.05], [0.17, 0.63, 0.17], [0.84, 0.15, 0.16],
     [0.58, 0.4, 0.74], [0.55, 0.34, 0.29], [0.89, 0.47, 0.76], [0.5, 0.5, 0.5], [0.74, 0.74, 0.13]]
)


def _colour(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """(H, W) labels → (H, W, 3) RGB; background black, classes from a fixed palette, ABSTAIN white."""
    lab = labels.numpy().astype(np.int64)
    palette = np.vstack([_PALETTE[np.arange(num_classes) % len(_PALETTE)], [[1.0, 1.0, 1.0]]])
    return palette[np.where(lab == ABSTAIN, num_classes, lab)]


def _display(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """(C, H, W) image → displayable array clipped to [0, 1]: gray (H, W) or RGB (H, W, 3)."""
    arr = image.clamp(0.0, 1.0).numpy()
    return (arr[0], "gray") if arr.shape[0] != 3 else (arr.transpose(1, 2, 0), None)


def render_certified_figure(panel: Mapping[str, Any], num_classes: int, dpi: int = 100) -> bytes:
    """PNG bytes of a Fig. 1-like grid: one row per σ; columns: image + N(0, σ²), ground truth, and the
    certified segmentation of each method (abstentions white)."""
    sigmas = list(panel["noisy"])
    methods = list(dict.fromkeys(m for m, _ in panel["certified"]))
    cols = 2 + len(methods)
    fig = Figure(figsize=(2.2 * cols, 2.2 * len(sigmas)), dpi=dpi)
    FigureCanvasAgg(fig)
    for r, sigma in enumerate(sigmas):
        image, cmap = _display(panel["noisy"][sigma])
        truth = _colour(panel["truth"], num_classes)
        cells = [(image, cmap, f"noisy, σ={sigma:g}"), (truth, None, "ground truth")]
        cells += [(_colour(panel["certified"][(m, sigma)], num_classes), None, m) for m in methods]
        for c, (data, cm, title) in enumerate(cells):
            ax = fig.add_subplot(len(sigmas), cols, r * cols + c + 1)
            ax.imshow(data, cmap=cm, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
