"""Dictionary transforms that bundle configs put in their preprocessing.

MONAI has no transform that rejects label values outside the declared classes: a stray value (a mask
exported with 255 for foreground, a BraTS label 3) otherwise surfaces much later as an index error
inside a one-hot or loss, far from the file that caused it. :class:`CheckLabelsd` fails at load time and
names the file.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["CheckLabelsd"]


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
                meta = getattr(d[key], "meta", {}) or {}
                source = meta.get("filename_or_obj", "<in memory>")
                raise ValueError(
                    f"{key}: {source} holds label values {bad[:10]} outside the declared classes "
                    f"{self.allowed}"
                )
        return d
