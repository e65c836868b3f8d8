"""Adversarial-attack-driven data augmentation (Pervin et al., arXiv:2105.12106): FGSM and inverse-FGSM copies of the training set.

The paper's pipeline (§3, Fig. 1): (1) train a U-Net on the original set; (2) attack the trained model
on every training image with FGSM, x + ε·sign(∇ₓL) (Eq. 1, loss up), and/or inverse FGSM,
x − ε·sign(∇ₓL) (Eq. 2, loss down), ε = 0.1 on normalised inputs; (3) add the examples, with their
*original* masks, to the training set; (4) retrain. Two ways to run step (2)–(3):

- **offline** (:func:`write_adversarial_dataset`): computed once from a trained model and written as
  files beside the datalist, ``<dataset_dir>/advaug_<methods>_eps<ε>/imagesTr/<method>_<name>.nii.gz``,
  plus the datalist ``<dataset_dir>/advaug_<methods>_eps<ε>.json`` whose training section is the
  original entries followed by one entry per (method, image) pointing at the ORIGINAL label file (the
  example of image ``<name>`` under method ``m`` is ``<m>_<name>``; entries keep the original keys only);
  the other sections are copied unchanged. Cheap to retrain from, but the examples go stale.
- **online** (:class:`AdversarialAugmentedDataset` + :class:`OnlineAdversarialAugmentation`): a dataset
  of constant length N·(1 + M) whose adversarial half is regenerated from the *current* model every
  ``interval`` epochs by an ignite handler. Fresh examples, at the cost of one attack pass over the
  training set per refresh.

Clipping: attacks clip to ``clip`` (the bundle uses (0, 1), the range of the windowed CT). Without
clipping, ‖x_aug − x‖∞ = ε exactly where ∇ₓL ≠ 0 and x_aug = x where ∇ₓL = 0; with clipping,
pixels pushed out of range are set to the bound (so |x_aug − x| ≤ ε there).

Units: attacks run on the network's input (after the intensity transforms). Offline examples are written
back in the source images' units (e.g. HU) through the inverse of the linear intensity window, so the
augmented datalist goes through the very same transform chain as the original one.

Also here: :func:`volumes_to_slices` (the 2D lesion-slice set the bundle trains on) and
:class:`MetricHistory` / :func:`iou_over_epochs_table` / :func:`robustness_table` (Tables 1 and 2 in shape).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.attacks import FGSM, Attack, InvFGSM
from common.data.datalist import load_datalist, write_datalist
from common.io import atomic_path
from common.report import markdown_table, write_csv
from common.validation import check_nonnegative, check_positive_int

__all__ = [
    "METHODS",
    "check_methods",
    "build_attacks",
    "adversarial_examples",
    "augmented_name",
    "unwindow",
    "write_nifti",
    "write_adversarial_dataset",
    "volumes_to_slices",
    "AdversarialAugmentedDataset",
    "OnlineAdversarialAugmentation",
    "MetricHistory",
    "iou_over_epochs_table",
    "robustness_table",
]

#: method name -> attack class (FGSM: Eq. 1, loss up; InvFGSM: Eq. 2, loss down).
METHODS: dict[str, type[Attack]] = {"fgsm": FGSM, "invfgsm": InvFGSM}


# ------------------------------------------------------------------------------------------ attacks
def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Validate a non-empty list of distinct method names from :data:`METHODS`; keep their order."""
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise ValueError(f"methods: expected a non-empty list from {sorted(METHODS)}, got {methods!r}")
    bad = [m for m in methods if m not in METHODS]
    if bad or len(set(methods)) != len(methods):
        raise ValueError(f"methods: expected distinct names from {sorted(METHODS)}, got {list(methods)}")
    return tuple(methods)


def build_attacks(
    forward: Callable, methods: Sequence[str], eps: float, loss: str | Callable = "ce",
    clip: Sequence[float] | None = (0.0, 1.0),
) -> dict[str, Attack]:
    """One attack per method, ``{name: METHODS[name](forward, eps, loss=loss, clip=clip)}``."""
    eps = check_nonnegative(eps, "eps")
    return {m: METHODS[m](forward, eps, loss=loss, clip=clip) for m in check_methods(methods)}


def adversarial_examples(
    forward: Callable, x: torch.Tensor, y: torch.Tensor, methods: Sequence[str], eps: float,
    loss: str | Callable = "ce", clip: Sequence[float] | None = (0.0, 1.0),
) -> dict[str, torch.Tensor]:
    """The augmentation copies of one batch: ``{method: x_aug}``, each (B, C, H, W) like ``x``.

    ``y`` (B, 1, H, W) are the true labels; both FGSM and InvFGSM use them (Eq. 1–2). The model's
    mode is not changed (put it in eval mode first for batch-norm networks).
    """
    return {m: a(x, y) for m, a in build_attacks(forward, methods, eps, loss, clip).items()}


def augmented_name(methods: Sequence[str], eps: float) -> str:
    """Folder / datalist stem of an offline augmentation, e.g. ``advaug_fgsm+invfgsm_eps0.1``."""
    return f"advaug_{'+'.join(check_methods(methods))}_eps{check_nonnegative(eps, 'eps'):g}"


def unwindow(x: np.ndarray, window: Sequence[float] | None) -> np.ndarray:
    """Inverse of MONAI ``ScaleIntensityRange(a_min, a_max, b_min, b_max)``: network units → source units.

    ``window = (a_min, a_max, b_min, b_max)``; ``None`` is the identity (images already in network units).
    x_src = a_min + (x − b_min)·(a_max − a_min)/(b_max − b_min), in float32.
    """
    x = np.asarray(x, dtype=np.float32)
    if window is None:
        return x
    if len(window) != 4 or window[3] == window[2] or window[1] == window[0]:
        raise ValueError(
            f"window: expected (a_min, a_max, b_min, b_max) with a_min != a_max, b_min != b_max, got {window}"
        )
    a_min, a_max, b_min, b_max = (float(v) for v in window)
    return (a_min + (x - b_min) * ((a_max - a_min) / (b_max - b_min))).astype(np.float32)


# ------------------------------------------------------------------------------------------ files
def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> Path:
    """Gzipped NIfTI-1 written atomically and deterministically (gzip mtime 0: same data → same bytes).

    Serialised in memory (``img.to_bytes()``) because nibabel picks the format from the file name and
    :func:`common.io.atomic_path` names its temporary file ``.<name>.<random>.tmp``.
    """
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    payload = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def _load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) of a NIfTI file, with a clear error for a missing or unreadable file."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image: no such file {path}")
    try:
        img = nib.load(str(path))
        return np.asanyarray(img.dataobj), img.affine
    except Exception as err:  # nibabel's ImageFileError, gzip/zlib errors on truncated files
        raise ValueError(f"image {path}: cannot be read as NIfTI ({type(err).__name__}: {err})") from err


def _relative(path: str | os.PathLike, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def _relative_entry(entry: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """A datalist entry with its image / label paths relative to ``base`` (the datalist's folder)."""
    return {k: (_relative(v, base) if k in ("image", "label") else v) for k, v in entry.items()}


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def write_adversarial_dataset(
    network: torch.nn.Module,
    datalist: str | os.PathLike,
    methods: Sequence[str],
    eps: float,
    preprocessing: Callable,
    window: Sequence[float] | None = None,
    loss: str | Callable = "ce",
    clip: Sequence[float] | None = (0.0, 1.0),
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    section: str = "training",
) -> Path:
    """Offline augmentation: attack ``network`` on every ``section`` image and write the examples + datalist.

    Args:
        network: the trained model (any ``forward(x) -> logits``); put in eval mode for the attack and
            restored to its previous mode afterwards.
        datalist: the original MSD-style datalist; the outputs go beside it (see the module docstring).
        methods: subset of ``["fgsm", "invfgsm"]``.
        eps: ε in network-input units (paper: 0.1 on inputs normalised to [0, 1]).
        preprocessing: the *intensity-only* transform chain of the bundle (dict transforms ``image``,
            ``label`` → (1, H, W) tensors); it must not change the spatial shape, since the examples are
            written on the source grid.
        window: ``(a_min, a_max, b_min, b_max)`` of the chain's ``ScaleIntensityRanged``, to write the
            examples back in source units (:func:`unwindow`); ``None`` writes network units.
        seed: seeds torch before the attack pass (FGSM itself has no randomness; same seed, same bytes).

    Returns the augmented datalist's path. Every image is written atomically first and the datalist last
    (atomically), so a failure leaves no datalist that points at missing files.
    """
    from monai.data import DataLoader, Dataset

    methods = check_methods(methods)
    eps = check_nonnegative(eps, "eps")
    batch_size = check_positive_int(batch_size, "batch_size")
    datalist = Path(datalist)
    base = datalist.parent
    entries = load_datalist(datalist, section)
    if not entries:
        raise ValueError(f"datalist {datalist}: section '{section}' is empty")
    body = json.loads(datalist.read_text(encoding="utf-8"))
    name = augmented_name(methods, eps)
    out_dir = base / name / "imagesTr"

    torch.manual_seed(int(seed))
    dataset = Dataset(entries, transform=preprocessing)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    was_training = getattr(network, "training", False)
    if hasattr(network, "eval"):
        network.eval()
    new_entries: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    start = 0
    try:
        for batch in loader:
            x = _plain(batch["image"]).to(device=device, dtype=torch.float32)
            y = _plain(batch["label"]).to(device=device).long()
            adv = adversarial_examples(network, x, y, methods, eps, loss, clip)
            for i in range(x.shape[0]):  # one file per image
                entry = entries[start + i]
                data, affine = _load_nifti(entry["image"])
                for m in methods:
                    xa = adv[m][i].cpu().numpy()
                    if xa.shape[0] != 1 or xa.shape[1:] != data.shape[: xa.ndim - 1]:
                        raise ValueError(
                            f"preprocessing: produced shape {xa.shape} for {entry['image']} of shape "
                            f"{data.shape}; it must keep the source grid and give one channel"
                        )
                    target = out_dir / f"{m}_{Path(entry['image']).name}"
                    write_nifti(target, unwindow(xa[0], window).reshape(data.shape), affine)
                    new = _relative_entry(entry, base)
                    new["image"] = _relative(target, base)  # same keys as the originals: batches collate
                    new_entries[m].append(new)
            start += x.shape[0]
    finally:
        if was_training and hasattr(network, "train"):
            network.train()

    original = [_relative_entry(e, base) for e in entries]
    sections = {k: v for k, v in body.items() if isinstance(v, list) and k != section}
    sections[section] = original + [e for m in methods for e in new_entries[m]]
    meta = {k: v for k, v in body.items() if k not in sections}
    meta["augmentation"] = {
        "methods": list(methods),
        "eps": eps,
        "clip": list(clip) if clip is not None else None,
        "loss": loss if isinstance(loss, str) else type(loss).__name__,
        "source_datalist": datalist.name,
    }
    if "numTraining" in meta and section == "training":
        meta["numTraining"] = len(sections[section])
    return write_datalist(base / f"{name}.json", sections, **meta)


# ------------------------------------------------------------------------------------------ 3D -> 2D
def volumes_to_slices(
    datalist: str | os.PathLike,
    out_dir: str | os.PathLike,
    label_value: int = 2,
    axis: int = -1,
    min_voxels: int = 1,
    sections: Sequence[str] = ("training", "validation", "test"),
    crop_size: Sequence[int] | None = None,
    seed: int = 0,
) -> Path:
    """The 2D slice set of the bundle: every slice along ``axis`` through structure ``label_value``.

    Reads each case of ``sections`` of a 3D datalist (NIfTI, one channel), keeps the slices holding at
    least ``min_voxels`` voxels of ``label_value`` and writes ``out_dir/imagesTr/<case>_s<k>.nii.gz``
    (source units and dtype, e.g. int16 HU) and ``out_dir/labelsTr/<case>_s<k>.nii.gz`` (uint8, 1 where
    the label is ``label_value``, else 0), with the in-plane part of the source affine. Slices of a case
    stay in that case's section (no slice of a test volume leaks into training). Writes
    ``out_dir/datalist.json`` atomically last and returns its path.

    ``crop_size`` (h, w) cuts each slice to a window around the structure: the window's centre is the
    structure's in-plane centroid shifted by a uniform random offset of up to a quarter of the window
    per axis (``seed``, per slice; so the structure is not always central), then moved inside the image.
    It raises the lesion's share of the pixels (small-lesion class imbalance) and the training speed.
    """
    label_value = int(label_value)
    min_voxels = check_positive_int(min_voxels, "min_voxels")
    if crop_size is not None:
        crop_size = tuple(check_positive_int(c, "crop_size") for c in crop_size)
        if len(crop_size) != 2:
            raise ValueError(f"crop_size: expected (h, w), got {crop_size}")
    rng = np.random.default_rng(int(seed))
    datalist, out_dir = Path(datalist), Path(out_dir)
    result: dict[str, list[dict[str, str]]] = {}
    for section in sections:
        result[section] = []
        for entry in load_datalist(datalist, section):
            image, affine = _load_nifti(entry["image"])
            label, _ = _load_nifti(entry["label"])
            if image.ndim != 3 or label.shape != image.shape:
                raise ValueError(
                    f"datalist {datalist}: {entry['image']} {image.shape} and its label {label.shape} "
                    "must be 3D volumes of the same shape"
                )
            ax = axis % 3
            counts = np.moveaxis(label == label_value, ax, 0).reshape(image.shape[ax], -1).sum(1)
            keep = np.flatnonzero(counts >= min_voxels)
            if keep.size == 0:
                continue
            inplane = [a for a in range(3) if a != ax]
            affine2d = np.eye(4)
            affine2d[:3, :2] = affine[:3, inplane]
            affine2d[:3, 3] = affine[:3, 3]
            stem = Path(entry["image"]).name.split(".")[0]
            images = np.take(np.asarray(image), keep, axis=ax)
            labels = (np.take(np.asarray(label), keep, axis=ax) == label_value).astype(np.uint8)
            for j, k in enumerate(keep):
                name = f"{stem}_s{k:03d}.nii.gz"
                im2, la2, aff = np.take(images, j, axis=ax), np.take(labels, j, axis=ax), affine2d
                if crop_size is not None:
                    im2, la2, aff = _crop(im2, la2, affine2d, crop_size, rng)
                write_nifti(out_dir / "imagesTr" / name, im2, aff)
                write_nifti(out_dir / "labelsTr" / name, la2, aff)
                result[section].append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    if not result.get("training"):
        raise ValueError(f"datalist {datalist}: no training slice holds label {label_value}")
    return write_datalist(
        out_dir / "datalist.json", result, name="lesion_slices",
        description=f"2D slices along axis {axis} through label {label_value} of {datalist.name}",
        labels={"0": "background", "1": "lesion"}, tensorImageSize="2D",
        numTraining=len(result["training"]),
    )


def _crop(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, size: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop (h, w) around the label's centroid with a random shift of up to size/4; the affine's origin
    moves to the crop's first pixel."""
    if any(s > n for s, n in zip(size, image.shape)):
        raise ValueError(f"crop_size: {size} is larger than the slice {image.shape}")
    centre = np.argwhere(label > 0).mean(axis=0) + rng.uniform(-0.25, 0.25, 2) * np.array(size)
    start = np.clip(np.round(centre - np.array(size) / 2.0).astype(int), 0, np.array(image.shape) - size)
    box = tuple(slice(a, a + s) for a, s in zip(start, size))
    out = affine.copy()
    out[:3, 3] = affine[:3, 3] + affine[:3, :2] @ start
    return image[box], label[box], out


# ------------------------------------------------------------------------------------------ online
class AdversarialAugmentedDataset(torch.utils.data.Dataset):
    """A dataset of constant length N·(1 + M): the N original items, then M adversarial copies of each.

    Item ``n + m·N + i`` (n = N) is item ``i`` of ``dataset`` with its ``image`` replaced by the current
    adversarial example of method ``m``; the ``label`` and every other key are the source item's (the
    augmented example keeps its source mask). Before the first :meth:`refresh` the copies equal the
    originals. ``dataset`` must give dicts with ``image`` (C, H, W) tensors of one shape (deterministic
    transforms, e.g. a ``CacheDataset``); random transforms belong after this wrapper.
    """

    def __init__(self, dataset: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> None:
        self.dataset, self.methods = dataset, check_methods(methods)
        if len(dataset) == 0:
            raise ValueError("dataset: empty")
        self.bank: torch.Tensor | None = None  # (M, N, C, H, W) once refreshed
        self.refreshes = 0

    def __len__(self) -> int:
        return len(self.dataset) * (1 + len(self.methods))

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.dataset)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        m, i = divmod(index, n)
        item = dict(self.dataset[i])
        if m > 0 and self.bank is not None:
            image = item["image"]
            adv = self.bank[m - 1, i]
            item["image"] = image.clone().copy_(adv) if isinstance(image, torch.Tensor) else adv.clone()
        return item

    def refresh(
        self, network: Callable, eps: float, loss: str | Callable = "ce",
        clip: Sequence[float] | None = (0.0, 1.0), batch_size: int = 16, device: str | torch.device = "cpu",
    ) -> None:
        """Regenerate every adversarial copy from ``network`` (eval mode during the pass, mode restored)."""
        batch_size = check_positive_int(batch_size, "batch_size")
        n = len(self.dataset)
        attacks = build_attacks(network, self.methods, eps, loss, clip)
        was_training = getattr(network, "training", False)
        if hasattr(network, "eval"):
            network.eval()
        bank = None
        try:
            for start in range(0, n, batch_size):
                items = [self.dataset[i] for i in range(start, min(start + batch_size, n))]
                x = torch.stack([_plain(torch.as_tensor(it["image"])) for it in items])
                x = x.to(device, torch.float32)
                y = torch.stack([_plain(torch.as_tensor(it["label"])) for it in items]).to(device).long()
                if bank is None:
                    bank = torch.empty((len(self.methods), n, *x.shape[1:]), dtype=x.dtype)
                elif x.shape[1:] != bank.shape[2:]:
                    raise ValueError(
                        f"dataset: images must share one shape, got {tuple(x.shape[1:])} and "
                        f"{tuple(bank.shape[2:])}"
                    )
                for j, m in enumerate(self.methods):
                    bank[j, start : start + x.shape[0]] = attacks[m](x, y).cpu()
        finally:
            if was_training and hasattr(network, "train"):
                network.train()
        self.bank = bank
        self.refreshes += 1


class OnlineAdversarialAugmentation:
    """Ignite handler: every ``interval`` completed epochs, refresh ``dataset``'s examples from ``network``.

    Attach to the trainer (``handler.attach(trainer)`` in the bundle's ``run``); the first refresh comes
    after ``interval`` epochs of training, so the examples always come from a trained model, as in the paper.
    """

    def __init__(
        self, dataset: AdversarialAugmentedDataset, network: Callable, eps: float, interval: int = 1,
        loss: str | Callable = "ce", clip: Sequence[float] | None = (0.0, 1.0), batch_size: int = 16,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(dataset, AdversarialAugmentedDataset):
            raise ValueError(
                f"dataset: expected an AdversarialAugmentedDataset, got {type(dataset).__name__}"
            )
        self.dataset, self.network = dataset, network
        self.eps = check_nonnegative(eps, "eps")
        self.interval = check_positive_int(interval, "interval")
        batch_size = check_positive_int(batch_size, "batch_size")
        self.kwargs = dict(loss=loss, clip=clip, batch_size=batch_size, device=device)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine=None) -> None:
        self.dataset.refresh(self.network, self.eps, **self.kwargs)


# ------------------------------------------------------------------------------------------ tables
class MetricHistory:
    """Ignite handler for an evaluator: append its metrics after every run to a CSV (rewritten atomically).

    Rows: ``epoch`` (the evaluator's ``state.epoch``, which MONAI's ``ValidationHandler`` sets to the
    trainer's epoch) and one column per metric in ``metric_names`` (default: all). Table 1 of the paper
    (IoU over epochs) is assembled from these files by :func:`iou_over_epochs_table`. A new training run
    starting at epoch 1 starts a new file.
    """

    def __init__(self, path: str | os.PathLike, metric_names: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.metric_names = list(metric_names) if metric_names is not None else None
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        metrics = engine.state.metrics
        names = self.metric_names if self.metric_names is not None else sorted(metrics)
        missing = [n for n in names if n not in metrics]
        if missing:
            raise ValueError(f"metric_names: {missing} not among the evaluator's metrics {sorted(metrics)}")
        epoch = int(engine.state.epoch)
        self.rows = [r for r in self.rows if r["epoch"] < epoch]
        self.rows.append({"epoch": epoch, **{n: float(metrics[n]) for n in names}})
        write_csv(self.path, self.rows)


def _read_history(path: Path, metric: str) -> dict[int, float]:
    if not path.is_file():
        raise FileNotFoundError(f"history: no such file {path}")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or metric not in rows[0]:
        raise ValueError(f"history {path}: no column '{metric}'")
    return {int(r["epoch"]): float(r[metric]) for r in rows}


def iou_over_epochs_table(
    histories: Mapping[str, str | os.PathLike], epochs: Sequence[int] | None = None,
    metric: str = "val_mean_iou", digits: int = 4,
) -> str:
    """Table 1 in shape: one row per model (``histories``: name → :class:`MetricHistory` CSV), one column
    per epoch in ``epochs`` (default every epoch recorded by all models) holding ``metric``."""
    data = {name: _read_history(Path(p), metric) for name, p in histories.items()}
    if not data:
        raise ValueError("histories: empty")
    if epochs is None:
        epochs = sorted(set.intersection(*(set(d) for d in data.values())))
    rows = [
        {"model": n, **{f"e{e}": (f"{d[e]:.{digits}f}" if e in d else "-") for e in epochs}}
        for n, d in data.items()
    ]
    headers = ["Model", *(f"epoch {e}" for e in epochs)]
    return markdown_table(rows, ["model", *(f"e{e}" for e in epochs)], headers=headers)


def robustness_table(
    summaries: Mapping[str, Mapping[str, Any]], attack: str, metric: str = "jaccard_lesion", digits: int = 4,
) -> str:
    """Table 2 in shape: one row per model (``summaries``: name → RobustnessSweep ``summary.json`` dict),
    one column per ε (ε = 0 is the clean row) holding the mean ``metric`` under ``attack``."""
    rows, eps_all = [], None
    for name, summary in summaries.items():
        values = {}
        for e in summary["entries"]:
            if e["attack"] in ("clean", attack):
                values[float(e["eps_display"])] = e["mean"].get(metric)
        if len(values) < 2:
            raise ValueError(f"summaries: {name!r} has no entries of attack {attack!r}")
        eps_all = sorted(values) if eps_all is None else eps_all
        cells = {f"{k:g}": ("-" if values.get(k) is None else f"{values[k]:.{digits}f}") for k in eps_all}
        rows.append({"model": name, **cells})
    if not rows:
        raise ValueError("summaries: empty")
    cols = [f"{k:g}" for k in eps_all]
    return markdown_table(rows, ["model", *cols], headers=[f"Model ({attack}, ε →)", *cols])
