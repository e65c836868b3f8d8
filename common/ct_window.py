"""PGD adversarial training of the ResDSN coarse model with the paper's budget, exactly, per case.

Li et al., 2019 (ResDSN C2F), Sec. 4.2: attacks and PGD training use ε = 0.03 Λ, α = 0.01 Λ (Λ = 340 HU,
the window [−100, 240] HU), on CT that is clipped to the window and z-normalised per case. The bundle feeds
window-scaled CT x_w = (clip(HU) + 100) / 340 ∈ [0, 1] and trains on patches of the per-case z-normalised
volume z = (x_w − μ_case) / σ_case. A patch no longer carries its case's (μ, σ), so:

- :class:`ZNormWithStatsd` z-normalises the whole case exactly as MONAI ``NormalizeIntensityd`` (population
  σ, σ = 0 → 1) and stores μ_case and σ_case (window units) under ``<key>_window_mean`` / ``_window_std``;
  MONAI's patch samplers copy such non-image keys into every patch, and the data loader batches them to
  (B,) tensors.
- :class:`WindowPGD` is the attack of ``common.handlers.AdversarialTrainingIteration``: per batch
  (``for_batch``, called by the iteration with the batch) it maps each z-patch back to window units with its
  own case's (μ, σ), runs PGD there with ε = 0.03 and α = 0.01 (= 10.2 HU and 3.4 HU for every case) and
  ``clip = (0, 1)`` (the HU window) at every step, and returns the adversarial patch in z units.

MONAI's ``NormalizeIntensityd`` does not return its statistics and its patch samplers cannot re-derive
them, hence these two pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, NormalizeIntensity

from common.attacks import PGD
from common.validation import check_nonnegative, check_positive_int

__all__ = ["ZNormWithStatsd", "WindowPGD"]


class ZNormWithStatsd(MapTransform):
    """``NormalizeIntensityd`` over the whole case plus its statistics: ``<key>_window_mean`` and
    ``<key>_window_std`` (0-d float64 tensors, the units of the input: window units for the bundle)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalise = NormalizeIntensity()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key]).float()
            mean = x.mean()
            std = torch.std(x, unbiased=False)  # as NormalizeIntensity
            d[key] = self.normalise(d[key])
            d[f"{key}_window_mean"] = mean.double()
            d[f"{key}_window_std"] = torch.where(std == 0, torch.ones_like(std), std).double()
        return d


class WindowPGD:
    """PGD in window units with each case's exact statistics (module docstring).

    Args:
        network: the trained network (on z-normalised patches); may return deep-supervision heads.
        eps, alpha: budget and step in window units (paper: 0.03 and 0.01 of the window Λ).
        steps: PGD iterations (paper: N = 5 for the attacks, "the same" for training).
        loss: attack loss name or callable (``common.attacks``).
        clip: valid window-scaled range (0, 1) = [−100, 240] HU.
        key: the image key whose ``<key>_window_mean`` / ``_window_std`` the batch carries.

    ``for_batch(batchdata, device)`` returns ``attack(z, y) -> z_adv``; calling the object itself is an
    error (without the batch there are no case statistics).
    """

    def __init__(
        self,
        network: Callable,
        eps: float = 0.03,
        alpha: float = 0.01,
        steps: int = 5,
        loss: str | Callable = "ce",
        clip: Sequence[float] = (0.0, 1.0),
        key: str = "image",
        generator: torch.Generator | None = None,
    ) -> None:
        if not callable(network):
            raise ValueError(f"network: expected a callable, got {type(network).__name__}")
        self.network = network
        self.eps = check_nonnegative(eps, "eps")
        self.alpha = check_nonnegative(alpha, "alpha")
        self.steps = check_positive_int(steps, "steps")
        self.loss = loss
        self.clip = tuple(float(c) for c in clip)
        self.key = key
        self.generator = generator

    def _stats(self, batchdata: Mapping, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        names = (f"{self.key}_window_mean", f"{self.key}_window_std")
        missing = [n for n in names if n not in batchdata]
        if missing:
            raise ValueError(
                f"batchdata: no {missing} — z-normalise with common.ct_window.ZNormWithStatsd so that every "
                "patch carries its case's statistics"
            )
        mean, std = (torch.as_tensor(batchdata[n], dtype=torch.float32, device=device).reshape(-1) for n in names)
        if not bool((std > 0).all()):
            raise ValueError(f"batchdata: {names[1]} must be > 0, got {std.tolist()}")
        return mean, std

    def for_batch(self, batchdata: Mapping, device: torch.device | str = "cpu") -> Callable:
        mean, std = self._stats(batchdata, torch.device(device))

        def view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            if t.numel() != x.shape[0]:
                raise ValueError(f"batchdata: {t.numel()} case statistics for a batch of {x.shape[0]}")
            return t.view(-1, *([1] * (x.ndim - 1)))

        def forward(x_w: torch.Tensor):
            return self.network((x_w - view(mean, x_w)) / view(std, x_w))

        pgd = PGD(forward, eps=self.eps, alpha=self.alpha, steps=self.steps, loss=self.loss, clip=self.clip,
                  generator=self.generator, clip_input=True)

        def attack(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            m, s = view(mean, z), view(std, z)
            return (pgd(z * s + m, y) - m) / s

        return attack

    def __call__(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise ValueError("WindowPGD: needs the batch's case statistics; use for_batch(batchdata) (the "
                         "adversarial-training iteration does)")
