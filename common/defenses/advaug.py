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
back in the source images' units (e.g. HU) through the inverse of the linear intensity window
(:func:`common.data.slices.unwindow`), so the augmented datalist goes through the very same transform
chain as the original one.

The bundle's 2D slice set comes from :func:`common.data.slices.volumes_to_slices`, its IoU-per-epoch
history from :class:`common.handlers.MetricHistory`, and Tables 1 and 2 in shape from
:mod:`common.reporting.advaug_tables`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from common.attacks import FGSM, Attack, InvFGSM
from common.data.datalist import load_datalist, write_datalist
from common.data.slices import read_nifti, unwindow
from common.io import atomic_write_nifti
from common.validation import check_nonnegative, check_positive_int

__all__ = [
    "METHODS",
    "check_methods",
    "build_attacks",
    "adversarial_examples",
    "augmented_name",
    "write_adversarial_dataset",
    "AdversarialAugmentedDataset",
    "OnlineAdversarialAugmentation",
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


# ------------------------------------------------------------------------------------------ files
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
            examples back in source units (:func:`common.data.slices.unwindow`); ``None`` writes network units.
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
                data, affine = read_nifti(entry["image"])
                for m in methods:
                    xa = adv[m][i].cpu().numpy()
                    if xa.shape[0] != 1 or xa.shape[1:] != data.shape[: xa.ndim - 1]:
                        raise ValueError(
                            f"preprocessing: produced shape {xa.shape} for {entry['image']} of shape "
                            f"{data.shape}; it must keep the source grid and give one channel"
                        )
                    target = out_dir / f"{m}_{Path(entry['image']).name}"
                    atomic_write_nifti(target, unwindow(xa[0], window).reshape(data.shape), affine)
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
