"""Dictionary transforms that bundle configs put in their preprocessing: load-time checks naming the file.

MONAI has no transform that rejects bad input where it is read, so a fault otherwise surfaces far from
the file that caused it:

- :class:`LoadImaged` — MONAI's ``LoadImaged`` (drop-in, same arguments) whose failure on a missing,
  empty, truncated or non-image file raises one :class:`common.errors.InputError` naming the file,
  instead of a reader's ``EOFError`` ending in "Failed to instantiate CacheDataset".
- :class:`CheckImageLabeld` — the label's spatial shape and affine must match its image's (a 32×32 mask
  for a 64×64 image would otherwise be resized to the network size and scored misaligned), and the
  image must hold no NaN / Inf (otherwise training fails at some later iteration); names both files.
- :class:`CheckLabelsd` — a label value outside the declared classes (a mask exported with 255 for
  foreground, a BraTS label 3) would surface as an index error inside a one-hot or loss.

All raise :class:`common.errors.InputError` (a ``ValueError``).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import LoadImage, MapTransform
from monai.transforms import LoadImaged as _MonaiLoadImaged

from common.errors import InputError, MissingInputError

__all__ = ["LoadImaged", "CheckImageLabeld", "CheckLabelsd"]


def _source(value) -> str:
    """The file(s) a loaded item came from (MONAI metadata), or ``<in memory>``."""
    meta = getattr(value, "meta", None) or {}
    source = meta.get("filename_or_obj", "<in memory>")
    if isinstance(source, (list, tuple)):
        return ", ".join(str(s) for s in source)
    return str(source)


def _check_file(path) -> None:
    """Raise naming ``path`` if it is missing or empty (before any reader sees it)."""
    if isinstance(path, (str, os.PathLike)):
        if not os.path.exists(path):
            raise MissingInputError(f"{os.fspath(path)}: no such file")
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise InputError(f"{os.fspath(path)}: the file is empty (0 bytes), not an image")


class _NamingLoadImage(LoadImage):
    """MONAI's ``LoadImage`` whose failures name the file (see :class:`LoadImaged`)."""

    def __call__(self, filename, reader=None):
        files = list(filename) if isinstance(filename, (list, tuple)) else [filename]
        for path in files:
            _check_file(path)
        try:
            return super().__call__(filename, reader)
        except InputError:
            raise
        except Exception as err:
            names = ", ".join(os.fspath(f) if isinstance(f, (str, os.PathLike)) else "<in memory>" for f in files)
            msg = " ".join(str(err).split())[:300]
            raise InputError(f"{names}: cannot be read as an image ({type(err).__name__}: {msg})") from err


class LoadImaged(_MonaiLoadImaged):
    """``monai.transforms.LoadImaged`` (same arguments and output) whose failure on a missing, empty,
    truncated or non-image file raises :class:`common.errors.InputError` naming the file.

    Why a subclass: MONAI's readers raise ``EOFError`` / ``ImageFileError`` without the path, and a
    ``CacheDataset`` re-raises them as "Failed to instantiate CacheDataset".
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._loader.__class__ = _NamingLoadImage  # same state; only ``__call__`` differs


class CheckImageLabeld(MapTransform):
    """Load-time checks of an image and its label(s): finite image values; each label's spatial shape and
    affine equal to the image's. Put it right after :class:`LoadImaged`, before any resampling.

    The spatial shape is the one the reader saw (``meta["spatial_shape"]``, independent of the channel
    layout); the affines (voxel to world, mm) must agree within ``atol``. Raises
    :class:`common.errors.InputError` naming the image file (NaN / Inf, with the count) or both files.

    Args:
        keys: the image key first, then the label keys, e.g. ``["image", "label"]``. A missing label key
            (inference) skips the pair checks (``allow_missing_keys`` defaults to True).
        atol: largest accepted absolute difference between the two affines' entries (mm).
        check_affine: False for data whose files carry no geometry to trust.
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), atol: float = 1e-3, check_affine: bool = True,
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not atol >= 0:
            raise ValueError(f"atol: expected a number >= 0, got {atol!r}")
        self.atol, self.check_affine = float(atol), bool(check_affine)

    @staticmethod
    def _spatial_shape(value) -> tuple[int, ...]:
        meta = getattr(value, "meta", None) or {}
        shape = meta.get("spatial_shape")
        if shape is not None:
            return tuple(int(s) for s in torch.as_tensor(shape).flatten().tolist())
        return tuple(torch.as_tensor(value).shape[1:])

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = [k for k in self.key_iterator(d)]
        if not keys or keys[0] != self.keys[0]:
            if not self.allow_missing_keys:
                raise KeyError(f"CheckImageLabeld: no '{self.keys[0]}' in the data")
            return d
        image_key, image = keys[0], d[keys[0]]
        values = torch.as_tensor(image)
        if values.is_floating_point() or values.is_complex():
            bad = int((~torch.isfinite(values)).sum())
            if bad:
                raise InputError(f"{image_key} file {_source(image)}: holds {bad} NaN/Inf values")
        shape = self._spatial_shape(image)
        for key in keys[1:]:
            label = d[key]
            other = self._spatial_shape(label)
            if other != shape:
                raise InputError(
                    f"{key} file {_source(label)} has spatial shape {other} but {image_key} file "
                    f"{_source(image)} has {shape}"
                )
            a, b = getattr(image, "affine", None), getattr(label, "affine", None)
            if self.check_affine and a is not None and b is not None:
                a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
                diff = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
                if not diff <= self.atol:
                    raise InputError(
                        f"{key} file {_source(label)} and {image_key} file {_source(image)} have different "
                        f"affines (voxel to world; largest difference {diff:.4g} > atol {self.atol:g})"
                    )
        return d


class CheckLabelsd(MapTransform):
    """Raise ``ValueError`` if a label map holds a value outside the declared ones — ``[0, num_classes)``,
    or exactly ``values`` when given (raw labels that are not contiguous, such as BraTS {0, 1, 2, 4}) — or a
    non-integer, NaN or Inf value; the message names the file (from MONAI's metadata) and the offending
    values.

    Args:
        keys: label keys to check.
        num_classes: number of declared classes (background included); ignored when ``values`` is given.
        values: the declared label values (integers), e.g. ``[0, 1, 2, 4]`` for raw BraTS labels.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int | None = None,
        values: Sequence[int] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if values is not None:
            if (isinstance(values, (str, bytes)) or not len(values)
                    or any(isinstance(v, bool) or not isinstance(v, int) for v in values)):
                raise ValueError(f"values: expected a non-empty list of integers, got {values!r}")
            self.allowed = sorted(set(values))
        elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected an integer >= 1, got {num_classes!r}")
        else:
            self.allowed = list(range(num_classes))
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key])
            values = torch.unique(label)
            allowed = torch.as_tensor(self.allowed, dtype=values.dtype if values.is_floating_point() else torch.float64)
            bad: Sequence[float] = [
                float(v) for v in values
                if not torch.isfinite(v) or v != torch.round(v) or not bool((allowed == v).any())
            ]
            if bad:
                source = _source(d[key])
                raise InputError(
                    f"{key}: {source} holds label values {bad[:10]} outside the declared classes "
                    f"{self.allowed}"
                )
        return d
