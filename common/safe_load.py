"""Checkpoints handed to third-party loaders (MONAI Deploy SDK, MONAI Label) are unpickled safely.

Those loaders call ``torch.load`` without ``weights_only``; with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in
the environment torch then unpickles with code execution, so a crafted ``models/model.pt`` runs its code
(``__reduce__``). Our entry points therefore (1) load the file themselves with an explicit
``weights_only=True`` first — an explicit argument wins over that variable — and refuse it with one error
naming the file, and (2) run the third-party code under :func:`weights_only_loads`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

__all__ = ["check_weights_only", "weights_only_loads"]

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def check_weights_only(path: str | os.PathLike, name: str = "bundle") -> None:
    """``torch.load(path, weights_only=True)`` (tensors and plain containers only; no code runs). Raises
    :class:`common.errors.InputError` naming ``name`` and the file when it holds anything else or cannot
    be read."""
    import torch

    from common.errors import InputError

    try:
        torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — a refused global and a corrupt file are the same bad input
        text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split())  # torch's message has ANSI bold
        found = re.search(r"Unsupported global: GLOBAL \S+?(?=\s|$)|Unsupported operand \S+", text)
        reason = found.group(0).rstrip(".") if found else text[:200]
        raise InputError(
            f"{name}: {path} is not a weights-only checkpoint, refused to load it "
            f"(torch.load weights_only=True: {type(err).__name__}: {reason})"
        ) from None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block a ``torch.load`` that does not pass ``weights_only`` loads weights only
    (``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, and ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` removed: torch refuses
    both set); the environment is restored afterwards."""
    saved = {key: os.environ.get(key) for key in (_FORCE, _FORCE_NO)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_FORCE_NO, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
