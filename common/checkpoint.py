"""Checkpoints are untrusted input: load them with ``weights_only=True`` and say clearly what is wrong.

The bundles save ``{"model": state_dict, ...}`` (MONAI ``CheckpointSaver`` layout, CPU tensors), which
MONAI's ``CheckpointLoader``, ``ckpt_export`` and MONAI Deploy all read. :func:`load_weights` reads that
layout or a bare state dict, for configs that are not ignite workflows (attack sweeps, certification).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

__all__ = [
    "load_weights", "save_weights", "latest_checkpoint", "prune_checkpoints", "BestMetricState", "resume_training",
    "WeightsSaver",
]


def load_weights(network: nn.Module, path: str | os.PathLike, key: str = "model", strict: bool = True) -> nn.Module:
    """Load the weights at ``path`` (``{key: state_dict}`` or a bare state dict) into ``network``; return it
    in eval mode.

    Raises ``FileNotFoundError`` naming the file, ``ValueError`` for a file that is not a (safe) PyTorch
    checkpoint or whose tensors do not fit the network (missing, unexpected or mis-shaped keys) — both
    :class:`common.errors.InputError`, so a bundle run reports them on one line.
    """
    from common.errors import InputError, MissingInputError

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"checkpoint: no such file {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated zip archives, disallowed globals
        msg = " ".join(str(err).split())[:300]
        raise InputError(f"checkpoint {path}: cannot be read as a PyTorch checkpoint ({type(err).__name__}: {msg})") from err
    state = obj.get(key, obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"checkpoint {path}: expected a state dict or a dict with key '{key}'")
    try:
        network.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        first = str(err).splitlines()[0] + " " + " ".join(str(err).split()[-40:])
        raise InputError(f"checkpoint {path}: does not fit {type(network).__name__}: {first[:600]}") from err
    return network.eval()


def save_weights(network: nn.Module, path: str | os.PathLike, **extra) -> Path:
    """Save ``{"model": CPU state dict, **extra}`` atomically (loads on machines without a GPU too)."""
    from common.io import atomic_torch_save

    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    return atomic_torch_save({"model": state, **extra}, path)


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """The newest resumable checkpoint in ``ckpt_dir`` written by MONAI's ``CheckpointSaver`` with
    ``file_prefix=prefix`` (``<prefix>_checkpoint_epoch=N.pt`` → highest N; else ``<prefix>_final.pt``),
    or ``None`` when there is none (a fresh start)."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    epochs = _epoch_checkpoints(folder, prefix)
    if epochs:
        return str(epochs[-1][1])
    final = folder / f"{prefix}_final.pt"
    return str(final) if final.is_file() else None


def _epoch_checkpoints(folder: Path, prefix: str) -> list[tuple[int, Path]]:
    """``(N, path)`` of every ``<prefix>_*epoch=N.pt`` in ``folder``, oldest first."""
    import re

    found = []
    for path in folder.glob(f"{prefix}_*epoch=*.pt"):
        match = re.search(r"epoch=(\d+)\.pt$", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint", keep: int = 1) -> list[Path]:
    """Delete all but the ``keep`` newest ``<prefix>_checkpoint_epoch=N.pt`` in ``ckpt_dir``; return the
    deleted paths.

    Why: ignite's ``Checkpoint`` (inside MONAI's ``CheckpointSaver``) only deletes the files it wrote in
    the current process, so the files of a run that was interrupted and resumed would stay forever.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep: expected an integer >= 1, got {keep!r}")
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    stale = [path for _, path in _epoch_checkpoints(folder, prefix)[:-keep]]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class BestMetricState:
    """The best key metric of a MONAI workflow (``state.best_metric``, ``state.best_metric_epoch``) as an
    object with ``state_dict`` / ``load_state_dict``, so it goes into a resumable checkpoint's ``save_dict``
    next to the model, optimizer and trainer.

    Why: MONAI's ``SupervisedEvaluator`` starts with ``best_metric = -1, best_metric_epoch = -1``; a resumed
    run that did not restore them counts its first validation as a new best, whatever its value, and every
    ``when="best"`` saver (:class:`WeightsSaver`, ``CheckpointSaver(save_key_metric=True)``) then replaces
    the better weights. ``{"validator": BestMetricState(@validate#evaluator)}`` in both the saver's
    ``save_dict`` and the resume ``load_dict`` prevents that. The values are a float and an int, so the
    checkpoint still loads with ``torch.load(..., weights_only=True)``.
    """

    def __init__(self, engine) -> None:
        if not hasattr(getattr(engine, "state", None), "best_metric"):
            raise ValueError(f"engine: expected a MONAI workflow with a key metric, got {type(engine).__name__}")
        self.engine = engine

    def state_dict(self) -> dict:
        state = self.engine.state
        best = state.best_metric
        best = float(best.item() if isinstance(best, torch.Tensor) else best)
        return {"best_metric": best, "best_metric_epoch": int(state.best_metric_epoch)}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or {"best_metric", "best_metric_epoch"} - set(state_dict):
            raise ValueError(f"state_dict: expected keys best_metric and best_metric_epoch, got {state_dict!r}")
        self.engine.state.best_metric = float(state_dict["best_metric"])
        self.engine.state.best_metric_epoch = int(state_dict["best_metric_epoch"])


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def resume_training(trainer, ckpt_dir: str | os.PathLike, load_dict: dict, prefix: str = "checkpoint",
                    keep: int | None = None) -> str | None:
    """Continue an interrupted training run from the newest ``<prefix>_checkpoint_epoch=N.pt`` in ``ckpt_dir``.

    Attaches MONAI's ``CheckpointLoader`` (``weights_only`` load, at the trainer's ``STARTED``) for
    ``load_dict`` — model, optimizer, trainer, scheduler and, with a :class:`BestMetricState`, the
    validator's best metric, so a worse first validation after the resume does not replace ``model.pt``.
    A checkpoint written before the best metric was saved lacks that entry: it is skipped with a warning.
    With ``keep`` (the saver's ``n_saved``), the trainer also deletes, after every epoch, the older
    resumable checkpoints beyond the ``keep`` newest (:func:`prune_checkpoints`; rank 0 only). Returns the
    checkpoint's path, or ``None`` (no loader attached) when ``ckpt_dir`` holds no checkpoint yet.
    """
    import warnings

    from ignite.engine import Events
    from monai.handlers import CheckpointLoader

    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep: expected an integer >= 1, got {keep!r}")

        def _prune(_engine) -> None:
            if _is_rank0():
                prune_checkpoints(ckpt_dir, prefix, keep)

        trainer.add_event_handler(Events.EPOCH_COMPLETED, _prune)
    path = latest_checkpoint(ckpt_dir, prefix)
    if path is None:
        return None
    load_dict = dict(load_dict)
    optional = [k for k, v in load_dict.items() if isinstance(v, BestMetricState)]
    if optional:
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"checkpoint {path}: cannot be read as a PyTorch checkpoint "
                             f"({type(err).__name__}: {err})") from err
        for key in optional:
            if not isinstance(stored, dict) or key not in stored:
                warnings.warn(f"checkpoint {path}: no '{key}' best metric stored (written by an older version); "
                              "the first validation after the resume counts as the best so far", stacklevel=2)
                load_dict.pop(key)
    CheckpointLoader(load_path=path, load_dict=load_dict, map_location="cpu").attach(trainer)
    return path


class WeightsSaver:
    """Ignite handler that writes ``{"model": CPU state dict}`` with :func:`save_weights`, for bundle configs.

    Why not MONAI's ``CheckpointSaver``: with a one-entry ``save_dict`` (``{"model": @network}``) ignite's
    ``Checkpoint`` saves that entry *unwrapped*, so ``model.pt`` holds a bare state dict, and the tensors
    stay on the training device. This handler always writes the ``{"model": ...}`` layout on the CPU.

    Args:
        network: the trained ``nn.Module`` (a ``DataParallel`` / ``DistributedDataParallel`` wrapper is
            unwrapped, so the keys carry no ``module.`` prefix).
        save_dir: folder of the file (created if missing).
        filename: file name inside ``save_dir``.
        when: ``"best"`` — attach to a MONAI workflow with a key metric (usually the validation
            evaluator); writes at ``EPOCH_COMPLETED`` whenever the key metric just improved (MONAI updates
            ``state.best_metric_epoch`` before handlers run), like ``CheckpointSaver(save_key_metric=True)``.
            ``"final"`` — writes once at ``COMPLETED``, like ``CheckpointSaver(save_final=True)``.

    Under ``torch.distributed`` only rank 0 writes.
    """

    WHEN = ("best", "final")

    def __init__(self, network: nn.Module, save_dir: str | os.PathLike, filename: str = "model.pt",
                 when: str = "best"):
        if not isinstance(network, nn.Module):
            raise ValueError(f"network: expected a torch.nn.Module, got {type(network).__name__}")
        if not isinstance(filename, str) or not filename or os.sep in filename:
            raise ValueError(f"filename: expected a plain file name, got {filename!r}")
        if when not in self.WHEN:
            raise ValueError(f"when: expected one of {self.WHEN}, got {when!r}")
        self.network, self.path, self.when = network, Path(save_dir) / filename, when

    def attach(self, engine) -> None:
        """Register on ``engine`` (``EPOCH_COMPLETED`` for ``"best"``, ``COMPLETED`` for ``"final"``)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED if self.when == "best" else Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        if self.when == "best":
            best_epoch = getattr(engine.state, "best_metric_epoch", None)
            if best_epoch is None:
                raise ValueError("engine: WeightsSaver(when='best') needs a MONAI workflow with a key metric")
            if best_epoch != engine.state.epoch:
                return
        if not _is_rank0():
            return
        network = self.network
        if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            network = network.module
        save_weights(network, self.path)
