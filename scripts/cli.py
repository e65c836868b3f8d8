"""Argument parsing shared by the fire command-line tools."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["parse_size"]


def parse_size(size: Any, ndim: int, name: str = "size") -> tuple[int, ...]:
    """A spatial size as fire hands it over — an int (repeated over ``ndim`` axes), a tuple / list, or a
    string "128,128" / "128x128" / "(128, 128)" — as a tuple of ``ndim`` ints. Raises ``ValueError``
    naming ``name`` otherwise."""
    if isinstance(size, str):
        parts = [p for p in size.replace("x", ",").replace("(", "").replace(")", "").split(",") if p.strip()]
        try:
            size = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"{name}: expected integers like '128,128', got {size!r}") from None
        size = size[0] if len(size) == 1 else size
    if isinstance(size, bool):
        raise ValueError(f"{name}: expected {ndim} integers, got {size!r}")
    if isinstance(size, int):
        size = (size,) * ndim
    if not isinstance(size, Sequence) or len(size) != ndim:
        raise ValueError(f"{name}: expected an int or {ndim} integers, got {size!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in size):
        raise ValueError(f"{name}: expected {ndim} integers, got {size!r}")
    return tuple(size)
