"""The evaluation engine: ``(models, batches, perturbations) -> rows``, the one per-case loop of the toolkit.

The robustness sweep, the certification run, the C2F timing evaluation and the robustness card are
configurations of :func:`evaluate`: they choose the models, the perturbations and the scoring, and
read the rows. The engine owns what they share: sharding under ``torchrun``
(:func:`common.distributed.shard_batches` / :func:`~common.distributed.gather_objects`), progress
(:func:`progress_bar`), per-case caching with validated entries (:class:`CaseCache`), timing, the
NaN / Inf check of network outputs, and scoring (:mod:`common.metrics`).

A *perturbation* is one of

- :func:`clean`: the input as it is;
- :func:`attacked`: an attack at ε: any :class:`common.attacks.Attack`, or any callable
  ``(x, y) -> x_adv`` or ``(x, y) -> (x_adv, records)`` (an ensemble returning its members' records);
- :func:`smoothed`: randomized smoothing at σ (:func:`common.certify.certify`, Fischer et al., ICML 2021
  workshop "Scalable certified segmentation via randomized smoothing"; Cohen et al., ICML 2019).

Row schema (:data:`ROW_KEYS`, then the metrics), one row per case × model × perturbation:

``case_id``      :func:`common.metrics.case_id` of the image (a batch's ``case_id`` entry wins; else the
                 running index)
``model``        the model's name (``"model"`` for a single forward)
``perturbation`` ``"clean"``, the attack's name, or the smoothing perturbation's name
``kind``         ``"clean"``, ``"attack"`` or ``"smoothing"``
``eps``          L∞ budget in network-input units (0 unless an attack)
``sigma``        smoothing noise level in network-input units (0 unless smoothing)
``seconds``      wall-clock seconds per case of the perturbation and the prediction (clean: the median
                 of ``clean_repeats`` passes); ``cpu_seconds``: the same in this process's CPU time
metrics          ``dice_<c>``, ``iou_<c>``, ``dice_mean``, ``iou_mean`` (and ``hd95_*``, ``nsd_*``) of
                 :func:`common.metrics.segmentation_scores`; attacks add ``psnr``, ``ssim``, ``rmse``;
                 smoothing scores the certified map with abstained pixels ignored (sigmoid outputs: each
                 channel certified as a two-class problem) and adds
                 ``dice_strict_*`` / ``iou_strict_*`` (abstentions count as errors),
                 ``abstained_fraction`` and ``radius`` (:func:`common.certify.certified_metrics`).

Rows are ordered by model, then perturbation, then case. Empty classes follow
:data:`common.metrics.EMPTY_CLASS_RULE`.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from common.certify import ABSTAIN, certified_metrics, certify
from common.distributed import barrier, gather_objects, is_main_process, num_local_batches, shard_batches
from common.io import atomic_write_json, atomic_write_npz, check_writable
from common.metrics import case_id, overlap_scores, perturbation_scores, segmentation_scores
from common.validation import check_image, check_label_map, check_positive_int, main_output

__all__ = [
    "ROW_KEYS",
    "Perturbation",
    "Model",
    "Scoring",
    "CaseCache",
    "Result",
    "clean",
    "attacked",
    "smoothed",
    "build_attack",
    "predict_labels",
    "progress_bar",
    "settings_hash",
    "evaluate",
    "run_and_write",
]

ROW_KEYS = ("case_id", "model", "perturbation", "kind", "eps", "sigma", "seconds", "cpu_seconds")
KINDS = ("clean", "attack", "smoothing")


# ----------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Perturbation:
    """What is done to the input before the prediction; build with :func:`clean`, :func:`attacked`,
    :func:`smoothed`."""

    name: str
    kind: str = "clean"
    eps: float = 0.0
    sigma: float = 0.0
    attack: Callable | None = None
    certify: Mapping[str, Any] | None = None
    generator: Callable[[Sequence[str], torch.device], torch.Generator] | None = None


def clean(name: str = "clean") -> Perturbation:
    """The unperturbed input."""
    return Perturbation(str(name))


def attacked(name: str, eps: float, attack: Callable) -> Perturbation:
    """``attack(x, y) -> x_adv`` (or ``(x_adv, records)``) at ε (network-input units), reported as ``name``."""
    if not callable(attack):
        raise ValueError(f"attacks: {name!r} at eps={eps} is not callable")
    return Perturbation(str(name), "attack", eps=float(eps), attack=attack)


def smoothed(
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    tau: float,
    correction: str = "holm",
    batch_size: int = 16,
    generator: Callable[[Sequence[str], torch.device], torch.Generator] | None = None,
    name: str = "smoothing",
) -> Perturbation:
    """Randomized smoothing at σ with :func:`common.certify.certify`'s n0, n, α, τ and correction.

    ``generator(case_ids, device)`` gives the noise generator of one batch (default: seeded with 0).
    """
    params = dict(n0=n0, n=n, alpha=alpha, tau=tau, correction=correction, batch_size=batch_size)
    return Perturbation(str(name), "smoothing", sigma=float(sigma), certify=params, generator=generator)


@dataclass(frozen=True)
class Model:
    """A forward ``x -> logits`` (or a list, main head first), an optional denoiser ``(noisy_x, σ) -> x̂``
    used by smoothing, and an optional ``postprocess(labels) -> labels`` applied inside the timed region."""

    forward: Callable
    denoiser: Callable | None = None
    postprocess: Callable | None = None


@dataclass(frozen=True)
class Scoring:
    """How predictions are scored: the arguments of :func:`common.metrics.segmentation_scores`.

    ``output``: ``"softmax"`` (argmax over K = ``num_classes`` channels; K = 1 with 2 classes: a binary
    logit > 0) or ``"sigmoid"`` (multi-label: channel c > 0, labels given as C-channel binary masks).
    ``data_range``: the input range for PSNR / SSIM of attacks.
    """

    num_classes: int
    include_background: bool = False
    regions: Mapping[str, Sequence[int]] | None = None
    class_names: Sequence[str] | None = None
    output: str = "softmax"
    surface: bool = False
    spacing: float | Sequence[float] | None = None
    tolerance: float = 1.0
    data_range: float = 1.0

    def __post_init__(self) -> None:
        check_positive_int(self.num_classes, "num_classes")
        if self.output not in ("softmax", "sigmoid"):
            raise ValueError(f"output: expected 'softmax' or 'sigmoid', got {self.output!r}")

    def scores(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return segmentation_scores(
            pred, y, self.num_classes, self.include_background, self.regions, self.class_names,
            multilabel=self.output == "sigmoid", surface=self.surface, spacing=self.spacing,
            tolerance=self.tolerance,
        )

    def names(self) -> list[str]:
        """The reported class names, in key order (from a one-voxel probe, so every check runs early)."""
        probe = torch.zeros(1, self.num_classes if self.output == "sigmoid" else 1, 1, 1, dtype=torch.long)
        overlap = segmentation_scores(probe, probe, self.num_classes, self.include_background, self.regions,
                                      self.class_names, multilabel=self.output == "sigmoid")  # no spacing: 2-D probe
        return [k[len("dice_"):] for k in overlap if k.startswith("dice_") and k != "dice_mean"]

    def metric_names(self) -> list[str]:
        """The Dice / IoU keys of :meth:`scores`: ``dice_<class>``, ``iou_<class>``, ``dice_mean``, ``iou_mean``."""
        return [f"{m}_{n}" for m in ("dice", "iou") for n in self.names()] + ["dice_mean", "iou_mean"]


def build_attack(kind: str, forward: Callable, eps: float, **kwargs: Any) -> Callable:
    """``common.attacks.ATTACKS[kind](forward, eps, **kwargs)``: the one mapping from attack names to attack
    classes, with each class's own defaults (e.g. I-FGSM's α = ε / N)."""
    from common.attacks import ATTACKS

    if kind not in ATTACKS:
        raise ValueError(f"attack: unknown attack {kind!r}; known: {sorted(ATTACKS)}")
    return ATTACKS[kind](forward, eps, **kwargs)


# ----------------------------------------------------------------------------------------- helpers
def _plain(t: Any) -> Any:
    """A MetaTensor as a plain tensor (metadata is not wanted in attacks and metric arithmetic)."""
    return t.as_tensor() if hasattr(t, "as_tensor") and isinstance(t, torch.Tensor) else t


def _check_finite(out: torch.Tensor, ids: Sequence[str], what: str) -> None:
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"forward: NaN or Inf in the network output ({what}) for case {', '.join(ids)}")


def predict_labels(
    forward: Callable, x: torch.Tensor, num_classes: int, output: str = "softmax",
    case_ids: Sequence[str] = (), what: str = "clean input",
) -> torch.Tensor:
    """Labels of ``forward(x)`` under ``torch.no_grad()``: a label map (B, 1, *spatial) int64 for
    ``output="softmax"`` (argmax over K = ``num_classes`` channels; K = 1 with 2 classes: logit > 0), or
    binary masks (B, K, *spatial) for ``"sigmoid"`` (logit > 0 per channel). NaN / Inf logits raise,
    naming ``case_ids``."""
    with torch.no_grad():
        out = main_output(forward(x))
    matches = isinstance(out, torch.Tensor) and out.ndim == x.ndim and out.shape[0] == x.shape[0]
    if not matches or out.shape[2:] != x.shape[2:]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"forward: expected logits (B, K, *spatial) matching input {tuple(x.shape)}, got {shape}"
        )
    out = torch.as_tensor(out)
    if torch.is_floating_point(out):
        _check_finite(out, case_ids or ["?"], what)
    if output == "sigmoid":
        if out.shape[1] != num_classes:
            raise ValueError(f"forward: returned {out.shape[1]} channels for {num_classes} sigmoid outputs")
        return (out > 0).long()
    if out.shape[1] == num_classes:
        return out.argmax(dim=1, keepdim=True)
    if out.shape[1] == 1 and num_classes == 2:
        return (out > 0).long()
    raise ValueError(f"forward: returned {out.shape[1]} channels for num_classes={num_classes}")


def progress_bar(iterable: Iterable, desc: str, total: int | None, enabled: bool) -> Iterable:
    """Batches of ``iterable`` with progress on rank 0: a tqdm bar on a terminal; when stderr is not a
    terminal (a log file, CI), no per-frame bars: one line in tqdm's format when the loop ends."""
    if not (enabled and is_main_process()):
        yield from iterable
        return
    if sys.stderr.isatty():
        yield from tqdm(iterable, desc=desc, total=total, unit="batch", leave=True)
        return
    start, count = time.perf_counter(), 0
    for item in iterable:
        yield item
        count += 1
    line = tqdm.format_meter(count, total or count, time.perf_counter() - start, prefix=desc, unit="batch")
    print(line, file=sys.stderr, flush=True)


def settings_hash(settings: Any) -> str:
    """A short SHA-256 of JSON-serialised ``settings`` (the cache key of every setting that changes numbers)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _batch_case_ids(batch: Mapping[str, Any], image_key: str, size: int, start: int) -> list[str]:
    """``case_id`` from the batch, else :func:`common.metrics.case_id` of the image files, else the index."""
    ids = batch.get("case_id")
    if ids is None:
        meta = getattr(batch[image_key], "meta", None) or batch.get(f"{image_key}_meta_dict") or {}
        names = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
        if names is not None:
            names = [names] if isinstance(names, (str, Path)) else list(names)
            ids = [case_id(n) for n in names]
    if ids is None:
        return [f"case_{start + i:03d}" for i in range(size)]
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    elif isinstance(ids, (str, int)):
        ids = [ids]
    ids = [str(i) for i in ids]
    if len(ids) != size:
        raise ValueError(f"case_id: expected {size} ids for the batch, got {len(ids)}")
    return ids


# ----------------------------------------------------------------------------------------- cache
class CaseCache:
    """Per-case results on disk: ``<folder>/<case_id>.json`` (rows, fingerprint, settings hash) and
    optionally ``<case_id>.npz`` (arrays), each written atomically.

    An entry is used only when it parses, has the expected layout, the same settings hash and the same
    input fingerprint (e.g. the image and label files' hashes), and its arrays load when they are needed;
    otherwise it is recomputed with a warning naming the file (a truncated file, a foreign one, ``[]``).
    """

    def __init__(self, folder: str | Path, settings: str) -> None:
        self.folder, self.settings = Path(folder), str(settings)

    def _paths(self, cid: str) -> tuple[Path, Path]:
        return self.folder / f"{cid}.json", self.folder / f"{cid}.npz"

    def load(self, cid: str, fingerprint: Any, need_arrays: bool) -> tuple[list[dict], dict | None] | None:
        """The cached rows (and arrays) of case ``cid``, or ``None`` when it must be computed."""
        path, npz = self._paths(cid)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(entry, dict) or not isinstance(entry.get("rows"), list) or "settings" not in entry:
                raise ValueError("not a cache entry")
        except (OSError, ValueError) as err:
            warnings.warn(f"cache entry {path} is unreadable ({err}); recomputing the case", stacklevel=3)
            return None
        if entry["settings"] != self.settings or entry.get("fingerprint") != fingerprint:
            return None  # made with other settings or other files: recomputed
        arrays = None
        if need_arrays:
            try:
                with np.load(npz, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
            except Exception as err:  # a missing or truncated .npz: OSError, BadZipFile, EOFError, ValueError
                warnings.warn(f"cache entry {npz} is unreadable ({type(err).__name__}); recomputing the case",
                              stacklevel=3)
                return None
        return entry["rows"], arrays

    def save(self, cid: str, fingerprint: Any, rows: list[dict], arrays: Mapping[str, np.ndarray] | None) -> None:
        path, npz = self._paths(cid)
        if arrays is not None:
            atomic_write_npz(npz, dict(arrays))
        atomic_write_json(path, {"settings": self.settings, "fingerprint": fingerprint, "rows": rows})


# ----------------------------------------------------------------------------------------- the loop
@dataclass
class Result:
    """Rows of every case (schema above), the observers' artifacts by case id, and how many cases came
    from the cache."""

    rows: list[dict[str, Any]]
    artifacts: dict[str, Any] = field(default_factory=dict)
    reused: int = 0


def _as_models(models: Callable | Mapping[str, Any]) -> dict[str, Model]:
    if callable(models) and not isinstance(models, Mapping):
        return {"model": Model(models)}
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models: expected a forward or a non-empty mapping name -> forward / Model")
    out = {}
    for name, spec in models.items():
        if isinstance(spec, Model):
            out[str(name)] = spec
        elif isinstance(spec, Mapping) and callable(spec.get("forward")):
            out[str(name)] = Model(spec["forward"], spec.get("denoiser"), spec.get("postprocess"))
        elif callable(spec):
            out[str(name)] = Model(spec)
        else:
            raise ValueError(f"models: {name!r} needs a callable forward")
    return out


def _rows(ids, model, pert, seconds, cpu, scores) -> list[dict[str, Any]]:
    columns = {k: torch.as_tensor(v).reshape(-1).tolist() for k, v in scores.items()}
    return [{"case_id": cid, "model": model, "perturbation": pert.name, "kind": pert.kind, "eps": pert.eps,
             "sigma": pert.sigma, "seconds": seconds, "cpu_seconds": cpu, **{k: v[i] for k, v in columns.items()}}
            for i, cid in enumerate(ids)]


def _timed(fn: Callable[[], Any], x: torch.Tensor) -> tuple[Any, float, float]:
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - start) / x.shape[0], (time.process_time() - start_cpu) / x.shape[0]


def _apply_attack(pert: Perturbation, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = pert.attack(x, y)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor):
        out = out[0]  # (x_adv, records) of an ensemble
    x_adv = _plain(out)
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        got = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
        raise ValueError(f"attacks: {pert.name!r} at eps={pert.eps} returned {got}, expected {tuple(x.shape)}")
    check_image(x_adv, f"attacks: {pert.name!r} at eps={pert.eps} output")
    return x_adv.detach()


def _checked_forward(forward: Callable, ids: Sequence[str], what: str) -> Callable:
    def run(z: torch.Tensor) -> torch.Tensor:
        out = main_output(forward(z))
        _check_finite(out, ids, what)
        return out
    return run


def _evaluate_batch(models, batch_index, batch, offset, perturbations, scoring, clean_repeats, observer, keys):
    image_key, label_key = keys
    if not isinstance(batch, Mapping) or image_key not in batch or label_key not in batch:
        raise ValueError(f"data: each item must be a dict with {image_key!r} and {label_key!r}")
    x, y = _plain(batch[image_key]), _plain(batch[label_key])
    check_image(x, image_key)
    if isinstance(y, torch.Tensor) and y.ndim == x.ndim - 1:  # (B, *spatial) class maps
        y = y[:, None]
    sigmoid = scoring.output == "sigmoid"
    if not sigmoid:
        check_label_map(y, x, label_key, scoring.num_classes)
    y = y.long()
    ids = _batch_case_ids(batch, image_key, x.shape[0], offset)
    blocks: dict[tuple[str, str, float, float], list[dict]] = {}
    artifacts: dict[str, Any] = {}
    for mname, model in models.items():
        def predict(z: torch.Tensor, what: str) -> torch.Tensor:
            pred = predict_labels(model.forward, z, scoring.num_classes, scoring.output, ids, what)
            return pred if model.postprocess is None else _plain(model.postprocess(pred)).long()

        for pert in perturbations:
            if pert.kind == "clean":
                runs = [_timed(lambda: predict(x, "clean input"), x) for _ in range(clean_repeats)]
                pred = runs[0][0]
                seconds = statistics.median(r[1] for r in runs)
                cpu = statistics.median(r[2] for r in runs)
                scores = scoring.scores(pred, y)
                outcome = {"x": x, "pred": pred}
            elif pert.kind == "attack":
                def run_attack() -> tuple[torch.Tensor, torch.Tensor]:
                    x_adv = _apply_attack(pert, x, y)
                    return x_adv, predict(x_adv, f"{pert.name} at eps={pert.eps:g}")
                (x_adv, pred), seconds, cpu = _timed(run_attack, x)
                scores = {**scoring.scores(pred, y), **perturbation_scores(x_adv, x, scoring.data_range)}
                outcome = {"x": x_adv, "pred": pred}
            else:
                gen = pert.generator(ids, x.device) if pert.generator else torch.Generator(x.device).manual_seed(0)
                forward = _checked_forward(model.forward, ids, f"smoothing at sigma={pert.sigma:g}")
                if sigmoid:
                    certs, seconds, cpu = _timed(lambda: _certify_channels(forward, x, pert, model.denoiser, gen), x)
                    scores = _certified_channel_scores(certs, y, scoring)
                    pred = torch.stack([c.labels for c in certs], dim=1)
                    outcome = {"x": x, "pred": pred, "cert": certs}
                else:
                    cert, seconds, cpu = _timed(
                        lambda: certify(forward, x, pert.sigma, denoiser=model.denoiser, generator=gen,
                                        **pert.certify), x)
                    scores = _certified_scores(cert, y, scoring)
                    outcome = {"x": x, "pred": cert.labels[:, None], "cert": cert}
            blocks[(mname, pert.name, pert.eps, pert.sigma)] = _rows(ids, mname, pert, seconds, cpu, scores)
            if observer is not None:
                artifacts.update(observer(batch_index, ids, mname, pert, x, y, outcome) or {})
    return blocks, artifacts


def _certified_scores(cert, y: torch.Tensor, scoring: Scoring) -> dict[str, torch.Tensor]:
    """:func:`common.certify.certified_metrics` with the keys named by class, plus the radius."""
    if scoring.regions is not None:
        raise ValueError("regions: certified scores are per class")
    k = scoring.num_classes
    raw = certified_metrics(cert, y, k, scoring.include_background)
    first = 0 if scoring.include_background else 1
    names = dict(zip([str(c) for c in range(first, k)], scoring.names()))
    out = {}
    for key, value in raw.items():
        metric, _, cls = key.rpartition("_")
        out[f"{metric}_{names.get(cls, cls)}" if metric else key] = value.double()
    out["radius"] = torch.full((y.shape[0],), float(cert.radius), dtype=torch.float64)
    return out


def _certify_channels(forward: Callable, x: torch.Tensor, pert: Perturbation, denoiser, gen) -> list:
    """Sigmoid multi-label outputs: each channel certified as its own two-class problem (logits (0, z_c),
    class 1 where the sigmoid is > 0.5), one :func:`common.certify.certify` per channel."""
    out = []
    for c in range(int(main_output(forward(x[:1])).shape[1])):
        def binary(z: torch.Tensor, c: int = c) -> torch.Tensor:
            logit = forward(z)[:, c : c + 1]
            return torch.cat([torch.zeros_like(logit), logit], dim=1)
        out.append(certify(binary, x, pert.sigma, denoiser=denoiser, generator=gen, **pert.certify))
    return out


def _certified_channel_scores(certs: Sequence, y: torch.Tensor, scoring: Scoring) -> dict[str, torch.Tensor]:
    """Per channel: Dice / IoU with that channel's abstained pixels ignored and strict (abstentions count
    as errors), the abstained fraction over channels, the radius."""
    names, out = scoring.names(), {}
    for c, (cert, name) in enumerate(zip(certs, names)):
        abstained = (cert.labels == ABSTAIN)[:, None]
        pred, truth = (cert.labels == 1)[:, None], y[:, c : c + 1].bool()
        out.update(overlap_scores(pred, truth, [name], ignore=abstained))
        out.update({k.replace("_", "_strict_", 1): v for k, v in overlap_scores(pred, truth, [name]).items()})
    for prefix in ("dice", "iou", "dice_strict", "iou_strict"):
        out[f"{prefix}_mean"] = torch.stack([out[f"{prefix}_{n}"] for n in names], 1).mean(1)
    out["abstained_fraction"] = torch.stack([c.abstained_fraction.double() for c in certs], 1).mean(1)
    out["radius"] = torch.full((y.shape[0],), float(certs[0].radius), dtype=torch.float64)
    return out


def evaluate(
    models: Callable | Mapping[str, Any],
    batches: Iterable[Mapping[str, Any]],
    perturbations: Sequence[Perturbation],
    scoring: Scoring,
    clean_repeats: int = 1,
    progress: bool = False,
    desc: str = "evaluation",
    cache: CaseCache | None = None,
    observer: Callable | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> Result:
    """Every case of ``batches`` through every model and perturbation; rows of the module's schema.

    Args:
        models: a forward, or a mapping name -> forward / :class:`Model` / ``{"forward", "denoiser",
            "postprocess"}``.
        batches: dict batches ``{image_key: (B, C, *sp) float, label_key: (B, 1, *sp) (or (B, C, *sp) binary
            masks for sigmoid outputs), optional "case_id"}``, e.g. a DataLoader; with a cache also
            ``"fingerprint"`` (stored and compared) and ``"need_arrays"`` (the cached arrays must load).
        perturbations: :func:`clean`, :func:`attacked`, :func:`smoothed` entries; (name, ε, σ) unique.
        clean_repeats: clean predictions per case; their median time is the clean row's ``seconds``.
        progress: :func:`progress_bar` over batches (rank 0 only).
        cache: per-case :class:`CaseCache` (batches of one case; the batch's ``fingerprint`` is stored and
            compared). Cached cases skip all work, their observer arrays come from the cache.
        observer: ``observer(batch_index, case_ids, model, perturbation, x, y, outcome) -> {key: value}``, where
            ``outcome`` holds the perturbed input ``x``, the prediction ``pred`` and, for smoothing,
            ``cert``; the returned artifacts are gathered across ranks (with a cache: per case, numpy
            arrays keyed ``"<case_id>/<name>"`` are cached with the case).

    Under ``torchrun`` each rank evaluates its block of batches and every rank returns all rows in the
    same order and with the same values as one process (attacks drawing from a generator shared across
    batches excepted).
    """
    models = _as_models(models)
    keys = [(p.name, p.eps, p.sigma) for p in perturbations]
    if len(set(keys)) != len(keys) or not all(isinstance(p, Perturbation) and p.kind in KINDS for p in perturbations):
        raise ValueError("perturbations: expected Perturbation entries with unique (name, eps, sigma)")
    clean_repeats = check_positive_int(clean_repeats, "clean_repeats")
    local, reused = [], 0
    bar = progress_bar(shard_batches(batches), desc, num_local_batches(batches), progress)
    for k, offset, batch in bar:
        cached = None
        if cache is not None:
            ids = _batch_case_ids(batch, image_key, 1, offset)
            cached = cache.load(ids[0], batch.get("fingerprint"), need_arrays=bool(batch.get("need_arrays")))
        if cached is not None:
            rows, arrays = cached
            blocks = {}
            for row in rows:
                blocks.setdefault((row["model"], row["perturbation"], row["eps"], row["sigma"]), []).append(row)
            local.append((k, blocks, {f"{ids[0]}/{n}": a for n, a in (arrays or {}).items()}))
            reused += 1
            continue
        blocks, artifacts = _evaluate_batch(models, k, batch, offset, perturbations, scoring, clean_repeats,
                                            observer, (image_key, label_key))
        if cache is not None:
            prefix = f"{ids[0]}/"
            arrays = {n[len(prefix):]: a for n, a in artifacts.items() if n.startswith(prefix)}
            cache.save(ids[0], batch.get("fingerprint"), [r for b in blocks.values() for r in b], arrays or None)
        local.append((k, blocks, artifacts))
    parts = gather_objects((local, reused))
    results = sorted((r for part, _ in parts for r in part), key=lambda r: r[0])
    order = {(m, *key): i for i, (m, key) in enumerate((m, key) for m in models for key in keys)}
    rows = [row for _, blocks, _ in results for block in blocks.values() for row in block]
    if not rows:
        raise ValueError("data: no cases")
    rows.sort(key=lambda r: order[(r["model"], r["perturbation"], r["eps"], r["sigma"])])  # stable: cases keep order
    artifacts = {key: value for _, _, a in results for key, value in a.items()}
    return Result(rows, artifacts, sum(r for _, r in parts))



def run_and_write(output_dir: str | Path, compute: Callable[[], Any], write: Callable[[Any], Any]) -> Any:
    """The run of every configuration that writes a report: ``output_dir`` checked for writability and free
    space on rank 0 before any case is evaluated, ``compute()`` on every rank (sharded by :func:`evaluate`),
    ``write(result)`` on rank 0 alone, then every rank waits for the files and returns ``result``."""
    if is_main_process():
        check_writable(output_dir)
    result = compute()
    if is_main_process():
        write(result)
    barrier()
    return result
