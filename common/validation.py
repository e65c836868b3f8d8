"""Argument checks shared by attacks, losses, certification and evaluation.

Every check raises ``ValueError`` whose message starts with the argument's name, so a user sees at
once which input was wrong. They run before any work is done, so nothing is computed or written from
bad input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "check_image",
    "check_label_map",
    "check_nonnegative",
    "check_positive_int",
    "check_probability",
    "check_clip",
    "main_output",
]


def check_image(x: torch.Tensor, name: str = "x", spatial_dims: Sequence[int] = (2, 3)) -> None:
    """``x`` must be a floating tensor (B, C, *spatial) with 2 or 3 spatial dims and finite values."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.ndim - 2 not in tuple(spatial_dims):
        raise ValueError(
            f"{name}: expected shape (B, C, *spatial) with {tuple(spatial_dims)} spatial dims, got {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf values")


def check_label_map(y: torch.Tensor, x: torch.Tensor, name: str = "y", num_classes: int | None = None) -> None:
    """``y`` must be an integer-valued label map (B, 1, *spatial) matching ``x``'s batch and spatial shape.

    Float tensors holding whole numbers (MONAI's ``LoadImaged`` returns float labels) are accepted.
    With ``num_classes`` the labels must lie in ``[0, num_classes)``.
    """
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(y).__name__}")
    if y.ndim != x.ndim or y.shape[1] != 1:
        raise ValueError(f"{name}: expected shape (B, 1, *spatial) for x of shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"{name}: batch and spatial shape {tuple(y.shape[:1]) + tuple(y.shape[2:])} differ from "
            f"x's {tuple(x.shape[:1]) + tuple(x.shape[2:])}"
        )
    if torch.is_floating_point(y):
        if not bool(torch.isfinite(y).all()) or not bool((y == y.round()).all()):
            raise ValueError(f"{name}: a label map must hold whole-number class indices")
    elif y.dtype == torch.bool or torch.is_complex(y):
        raise ValueError(f"{name}: unsupported label dtype {y.dtype}")
    if y.numel() and bool((y < 0).any()):
        raise ValueError(f"{name}: negative class index {int(y.min())}")
    if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
        raise ValueError(f"{name}: class index {int(y.max())} outside the declared {num_classes} classes")


def check_nonnegative(value: float, name: str) -> float:
    """A finite real number ≥ 0 (ε, α, σ ...)."""
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected a number, got {value!r}") from err
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: must be a finite number >= 0, got {value}")
    return value


def check_positive_int(value: int, name: str) -> int:
    """An integer ≥ 1 (steps, n, batch sizes ...)."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value}")
    return value


def check_probability(value: float, name: str, open_interval: bool = True) -> float:
    """A number in (0, 1) (or [0, 1] with ``open_interval=False``)."""
    value = check_nonnegative(value, name)
    if (open_interval and not 0.0 < value < 1.0) or value > 1.0:
        raise ValueError(f"{name}: must lie in {'(0, 1)' if open_interval else '[0, 1]'}, got {value}")
    return value


def check_clip(clip: Sequence[float] | None, name: str = "clip") -> tuple[float, float] | None:
    """``None`` or a pair ``(low, high)`` of finite numbers with low < high."""
    if clip is None:
        return None
    try:
        low, high = (float(v) for v in clip)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected None or a pair (low, high), got {clip!r}") from err
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"{name}: expected finite low < high, got {clip!r}")
    return low, high


def main_output(out: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The main head of a network output: the tensor itself, or the first element of a list/tuple
    (deep supervision, as MONAI's ``DynUNet`` and the ResDSN heads return)."""
    if isinstance(out, (list, tuple)):
        if not out:
            raise ValueError("forward: returned an empty list of outputs")
        out = out[0]
    if isinstance(out, dict):
        raise ValueError("forward: returned a dict; wrap the network so that it returns logits")
    return out
