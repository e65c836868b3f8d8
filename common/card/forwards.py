"""Differentiable ``forward(x) -> logits`` built from a bundle's MONAI inferer and network.

The robustness card attacks the pipeline the bundle deploys, so the forward must compute what the
bundle's own ``inferer(x, network)`` computes, with autograd through it (the whole-volume input
gradient, the ``"exact"`` aggregation of :mod:`common.sliding_window`).

- :class:`WindowForward`: ``SlidingWindowInferer`` and its subclasses (``SlidingWindowInfererAdapt``).
  MONAI's ``sliding_window_inference`` with every setting of the config's inferer (``roi_size``,
  ``sw_batch_size``, ``overlap``, blend ``mode``, ``sigma_scale``, ``padding_mode``, ``cval``,
  ``buffer_steps`` / ``buffer_dim``); windows are run and stitched on the device of ``x`` (the card's
  device), whatever the config's ``sw_device`` / ``device`` say (:func:`device_note` words the
  difference for the card).
- :class:`SliceForward`: ``SliceInferer`` (a 2D network applied slice by slice to a 3D volume). MONAI's
  SliceInferer slides a (1 × roi) window along ``spatial_dim`` and squeezes that axis for the network;
  here the slice axis is moved into the batch (B·S, C, a, b) and a 2D sliding window with the same
  settings runs on it, which visits the same windows with the same blending (a window one voxel thick
  contributes a constant factor along the slice axis that the blend normalisation cancels), so the
  output equals MONAI's up to float rounding.
- :class:`NetworkForward`: ``SimpleInferer`` (the network itself) and any other inferer called as
  ``inferer(x, network)``; the card checks on the first case that the result is differentiable.

All three differentiate by autograd and are the base :class:`NetworkForward`, which refuses a network that
supplies its own input gradient (:func:`common.networks.forwards.check_autograd_forward`): none of them has
``input_gradient``, so attacks take autograd through exactly the function they compute.

A network returning a list of heads (deep supervision) contributes its first (main) head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import sliding_window_inference

from common.card.label_transforms import enum_value
from common.networks.forwards import check_autograd_forward
from common.validation import main_output

__all__ = ["NetworkForward", "WindowForward", "SliceForward", "device_note", "plain_logits"]


def plain_logits(out: Any) -> torch.Tensor:
    """The main head of a network output as a plain ``torch.Tensor`` (a ``MetaTensor`` loses its meta)."""
    out = main_output(out)
    return out.as_tensor() if hasattr(out, "as_tensor") else out


def device_note(inferer: Any, device: torch.device) -> str | None:
    """A sentence for the card when the config's inferer names ``sw_device`` / ``device`` other than the
    card's ``device`` (the card runs and stitches windows on its own device), else ``None``."""
    named = {k: getattr(inferer, k, None) for k in ("sw_device", "device")}
    differs = {
        k: str(v) for k, v in named.items() if v is not None and torch.device(v) != torch.device(device)
    }
    if not differs:
        return None
    listed = ", ".join(f"{k}={v}" for k, v in differs.items())
    return f"The config's inferer sets {listed}; the card runs and stitches the windows on {device}."


class NetworkForward:
    """``forward(x) = main head of inferer(x, network)``; with ``inferer=None``, of ``network(x)``.

    The card's forwards differentiate by autograd through the network, so a network that supplies its own
    input gradient (:class:`common.networks.forwards.InputGradientForward`) is refused
    (:func:`common.networks.forwards.check_autograd_forward`) rather than silently attacked through another
    function.
    """

    def __init__(self, network: Callable, inferer: Callable | None = None) -> None:
        self.network = check_autograd_forward(network, "network", type(self).__name__)
        self.inferer = inferer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return plain_logits(self.network(x) if self.inferer is None else self.inferer(x, self.network))


class WindowForward(NetworkForward):
    """Whole-volume forward of a ``SlidingWindowInferer`` (see the module docstring).

    Args:
        network: the network on a window batch (N, C, *roi) returning logits (N, K, *roi).
        inferer: a ``monai.inferers.SlidingWindowInferer``; its settings are read, not its devices.

    ``forward(x)``, x (B, C, *spatial) returns logits (B, K, *spatial) on ``x.device``.
    """

    def __init__(self, network: Callable, inferer: Any) -> None:
        super().__init__(network)
        self.roi_size = inferer.roi_size
        self.sw_batch_size = int(inferer.sw_batch_size)
        self.overlap = inferer.overlap
        self.mode = str(enum_value(inferer.mode))
        self.sigma_scale = inferer.sigma_scale
        self.padding_mode = str(enum_value(inferer.padding_mode))
        self.cval = float(inferer.cval)
        self.buffer_steps = getattr(inferer, "buffer_steps", None)
        self.buffer_dim = int(getattr(inferer, "buffer_dim", -1))

    def _predict(self, window: torch.Tensor) -> torch.Tensor:
        return main_output(self.network(window))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = sliding_window_inference(
            x, self.roi_size, self.sw_batch_size, self._predict, self.overlap, self.mode, self.sigma_scale,
            self.padding_mode, self.cval, x.device, x.device, False, None, None, self.buffer_steps,
            self.buffer_dim,
        )
        return plain_logits(out)


def _drop_axis(value: Any, axis: int) -> Any:
    """A per-axis setting of the 3D window without the slice axis (a scalar stays a scalar)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = list(value)
        return value[:axis] + value[axis + 1 :] if len(value) == 3 else value
    return value


class SliceForward(WindowForward):
    """Whole-volume forward of a ``SliceInferer``: the slice axis moved into the batch, then a 2D sliding
    window with the inferer's settings (see the module docstring; no buffering).

    Args:
        network: the 2D network, (N, C, a, b) -> (N, K, a, b).
        inferer: a ``monai.inferers.SliceInferer`` (``spatial_dim`` 0, 1 or 2 of ``[H, W, D]``; 2D
            ``roi_size``).

    ``forward(x)``, x (B, C, H, W, D) returns logits (B, K, H, W, D) on ``x.device``.
    """

    def __init__(self, network: Callable, inferer: Any) -> None:
        self.spatial_dim = int(inferer.spatial_dim)
        if self.spatial_dim not in (0, 1, 2):
            raise ValueError(f"spatial_dim: SliceInferer slices along 0, 1 or 2, got {self.spatial_dim}")
        roi = getattr(inferer, "orig_roi_size", inferer.roi_size)
        roi = [int(r) for r in (roi if isinstance(roi, Sequence) else [roi])]
        if len(roi) != 2:
            raise ValueError(f"roi_size: SliceInferer needs a 2D roi_size, got {roi}")
        super().__init__(network, inferer)
        self.roi_size, self.buffer_steps, self.buffer_dim = roi, None, -1
        self.overlap = _drop_axis(inferer.overlap, self.spatial_dim)
        self.sigma_scale = _drop_axis(inferer.sigma_scale, self.spatial_dim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"x: SliceInferer takes volumes (B, C, H, W, D), got shape {tuple(x.shape)}")
        axis = self.spatial_dim + 2
        moved = x.movedim(axis, 1)  # (B, S, C, a, b)
        b, s = moved.shape[:2]
        out = super().__call__(moved.reshape(b * s, *moved.shape[2:]))
        return out.reshape(b, s, *out.shape[1:]).movedim(1, axis)
