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

__all__ = ["load_weights", "save_weights", "latest_checkpoint"]


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
