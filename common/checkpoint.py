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

__all__ = ["load_weights", "save_weights", "latest_checkpoint", "WeightsSaver"]


def load_weights(network: nn.Module, path: str | os.PathLike, key: str = "model", strict: bool = True) -> nn.Module:
    """Load the weights at ``path`` (``{key: state_dict}`` or a bare state dict) into ``network``; return it
    in eval mode.

    Raises ``FileNotFoundError`` naming the file, ``ValueError`` for a file that is not a (safe) PyTorch
    checkpoint or whose tensors do not fit the network (missing, unexpected or mis-shaped keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated zip archives, disallowed globals
        raise ValueError(f"checkpoint {path}: cannot be read as a PyTorch checkpoint ({type(err).__name__}: {err})") from err
    state = obj.get(key, obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path}: expected a state dict or a dict with key '{key}'")
    try:
        network.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        first = str(err).splitlines()[0] + " " + " ".join(str(err).split()[-40:])
        raise ValueError(f"checkpoint {path}: does not fit {type(network).__name__}: {first[:600]}") from err
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
    import re

    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    epochs = []
    for path in folder.glob(f"{prefix}_*epoch=*.pt"):
        match = re.search(r"epoch=(\d+)", path.name)
        if match:
            epochs.append((int(match.group(1)), path))
    if epochs:
        return str(max(epochs)[1])
    final = folder / f"{prefix}_final.pt"
    return str(final) if final.is_file() else None


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
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        network = self.network
        if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            network = network.module
        save_weights(network, self.path)
