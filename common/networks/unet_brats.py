"""The BraTS robustness paper's 3D-UNet and 2D-UNet (Liu et al. 2021, "Robustifying deep networks for
medical image segmentation", section "Networks" and Fig. 1), a slice-wise wrapper that scores the 2D
network on whole volumes, and the BraTS label <-> class-index mapping.

The 3D-UNet is the residual UNet of Isensee et al. 2017 ("Brain tumor segmentation and radiomics
survival prediction", BraTS 2017) that the paper describes:

* encoder, one level per resolution: an entry 3×3×3 convolution (stride 1 on the first level, stride 2
  below: the down-sampling) followed by a residual *context module* of two 3×3×3 convolutions with a
  3D (channel-wise) dropout of 0.3 between them; every convolution block is conv → instance norm →
  leaky ReLU. With 5 levels this is the paper's 15 encoder blocks.
* decoder, one level per up-sampling: nearest ×2 up-sampling and **one** 3×3×3 block, concatenation
  with the encoder level's output, then the **two** blocks of the *localisation module* (3×3×3, then
  1×1×1).
* segmentation layers: a 1×1×1 convolution to the number of classes on the top ``seg_levels`` (paper:
  3, the blue layers of Fig. 1) decoder levels, summed from the coarsest up through nearest ×2
  up-sampling (the paper's "residual links").
* the paper ends with a softmax; :meth:`UNetBraTS.forward` returns the **logits** before it (the
  project's contract: losses, distillation temperatures (Eq. 4) and post-processing apply the softmax).

The 2D-UNet is the same network with 2D convolutions (``spatial_dims=2``); :class:`SliceWise2D` runs it
over the axial slices of a volume so that it is scored, and attacked, as a 3D ``forward``.

Classes: BraTS labels {0, 1, 2, 4} (background, NCR/NET, ED, ET) are class indices {0, 1, 2, 3}
(:func:`brats_to_index`, :func:`index_to_brats`); ``out_channels=4``. Scoring in WT/TC/ET regions is
done on BraTS labels with ``common.metrics.labels_to_regions``.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from monai.networks.blocks import Convolution, UpSample
from torch import nn

from common.networks.export_guard import checks_enabled
from common.validation import check_image, check_positive_int, main_output

__all__ = [
    "BRATS_LABELS",
    "ContextBlock",
    "UNetBraTS",
    "SliceWise2D",
    "brats_to_index",
    "index_to_brats",
]

BRATS_LABELS: tuple[int, ...] = (0, 1, 2, 4)
"""BraTS label values in class-index order: background, NCR/NET (1), ED (2), ET (4) -> 0, 1, 2, 3."""

Label = TypeVar("Label", np.ndarray, torch.Tensor)


def _conv_block(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    strides: int = 1,
    dropout: float | None = None,
    negative_slope: float = 0.01,
) -> Convolution:
    """The paper's convolution block: conv → instance norm (affine) → leaky ReLU [→ channel dropout].

    Padding is MONAI's symmetric "same" padding (1 voxel each side for 3×3×3); the paper's Keras
    padding of 1 before / 2 after only shifts stride-2 sampling by half a voxel.
    """
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=strides,
        kernel_size=kernel_size,
        adn_ordering="NAD",
        norm=("instance", {"affine": True}),
        act=("leakyrelu", {"negative_slope": negative_slope}),
        dropout=dropout,
        dropout_dim=spatial_dims,
    )


@torch.jit.interface
class _Block(nn.Module):
    """A module ``Tensor -> Tensor``: lets TorchScript index a ``ModuleList`` with a loop variable."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Sequential's name)
        pass


class ContextBlock(nn.Module):
    """One encoder level: entry block (stride ``strides``) and a residual context module.

    ``y = entry(x); out = y + conv2(dropout(conv1(y)))`` with 3×3 (×3) kernels. Written here rather than
    with MONAI's ``ResidualUnit`` because that unit puts its dropout in every sub-unit, while the paper
    has a single 3D dropout between the two convolutions. Shapes: (B, in_channels, *S) →
    (B, out_channels, *S / strides).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        strides: int,
        dropout: float,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        slope = dict(negative_slope=negative_slope)
        self.entry = _conv_block(spatial_dims, in_channels, out_channels, strides=strides, **slope)
        self.context = nn.Sequential(
            _conv_block(spatial_dims, out_channels, out_channels, dropout=dropout or None, **slope),
            _conv_block(spatial_dims, out_channels, out_channels, **slope),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.entry(x)
        return y + self.context(y)


class UNetBraTS(nn.Module):
    """Isensee-style residual UNet of the BraTS robustness paper (Fig. 1), 3D or 2D.

    Args:
        spatial_dims: 3 for the paper's 3D-UNet (input 128³), 2 for its 2D-UNet (axial 128×128 slices).
        in_channels: MR modalities (paper: 4 — T1, T1Gd, T2, FLAIR).
        out_channels: classes (paper: 4 — BraTS labels 0, 1, 2, 4 as indices 0..3, see
            :func:`brats_to_index`).
        base_filters: feature maps on the first level, doubled on each level below (paper: 16).
        depth: resolution levels (paper: 5, i.e. 16..256 filters); the input's spatial size must be
            divisible by ``2 ** (depth - 1)``.
        seg_levels: decoder levels, from the top, with a 1×1 segmentation layer (paper: 3); ``None``
            gives 3, or ``depth - 1`` for shallower networks.
        dropout: rate of the channel-wise dropout inside each context module (paper: 0.3).
        negative_slope: leaky ReLU slope (Isensee et al.: 1e-2; not stated in the paper).

    ``forward(x)``: x (B, in_channels, *S) float → logits (B, out_channels, *S); the paper's softmax
    is left to the loss / post-processing.

    Example::

        net3d = UNetBraTS(spatial_dims=3)      # paper's 3D-UNet
        net2d = UNetBraTS(spatial_dims=2)      # paper's 2D-UNet, see SliceWise2D
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 4,
        base_filters: int = 16,
        depth: int = 5,
        seg_levels: int | None = None,
        dropout: float = 0.3,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: expected 2 or 3, got {spatial_dims!r}")
        in_channels = check_positive_int(in_channels, "in_channels")
        out_channels = check_positive_int(out_channels, "out_channels")
        base_filters = check_positive_int(base_filters, "base_filters")
        depth = check_positive_int(depth, "depth")
        if depth < 2:
            raise ValueError(f"depth: a UNet needs at least 2 levels, got {depth}")
        seg_levels = min(3, depth - 1) if seg_levels is None else check_positive_int(seg_levels, "seg_levels")
        if seg_levels > depth - 1:
            raise ValueError(f"seg_levels: at most depth - 1 = {depth - 1} decoder levels, got {seg_levels}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout: must lie in [0, 1), got {dropout}")
        if not float(negative_slope) >= 0.0:
            raise ValueError(f"negative_slope: must be >= 0, got {negative_slope}")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.depth, self.seg_levels = depth, seg_levels
        filters = [base_filters * 2**level for level in range(depth)]
        self.filters = tuple(filters)
        block = dict(negative_slope=negative_slope)

        # encoder[l]: level l (resolution / 2**l); level 0 has a stride-1 entry block.
        in_chs = [in_channels] + filters[:-1]
        self.encoder = nn.ModuleList(
            ContextBlock(spatial_dims, in_chs[lv], filters[lv], 2 if lv else 1, dropout, **block)
            for lv in range(depth)
        )
        # up[l]: level l+1 → l, nearest ×2 then ONE 3×3 block (paper: "after each upsampling layer").
        self.up = nn.ModuleList(
            UpSample(
                spatial_dims,
                in_channels=filters[lv + 1],
                out_channels=filters[lv + 1],
                scale_factor=2,
                mode="nontrainable",
                pre_conv=None,
                interp_mode="nearest",
                align_corners=None,
                post_conv=_conv_block(spatial_dims, filters[lv + 1], filters[lv], **block),
            )
            for lv in range(depth - 1)
        )
        # localisation[l]: after concatenation, TWO blocks, 3×3 then 1×1 ("after each concatenation").
        self.localisation = nn.ModuleList(
            nn.Sequential(
                _conv_block(spatial_dims, 2 * filters[lv], filters[lv], **block),
                _conv_block(spatial_dims, filters[lv], filters[lv], kernel_size=1, **block),
            )
            for lv in range(depth - 1)
        )
        # segmentation[l]: 1×1 convolution to the classes on decoder level l < seg_levels (blue layers).
        self.segmentation = nn.ModuleList(
            Convolution(spatial_dims, filters[lv], out_channels, kernel_size=1, conv_only=True)
            for lv in range(seg_levels)
        )
        self.seg_upsample = UpSample(
            spatial_dims, scale_factor=2, mode="nontrainable", pre_conv=None, interp_mode="nearest",
            align_corners=None,
        )

    def _check_input(self, x: torch.Tensor) -> None:
        check_image(x, "x", spatial_dims=(self.spatial_dims,))
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels, got shape {tuple(x.shape)}")
        factor = 2 ** (self.depth - 1)
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"x: spatial size {tuple(x.shape[2:])} not divisible by 2**(depth-1) = {factor}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, *S) → logits (B, out_channels, *S)."""
        if not torch.jit.is_scripting():  # Python-only checks: not compiled, traced or exported
            if checks_enabled():
                self._check_input(x)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        seg = torch.zeros(0)  # no segmentation layer yet (TorchScript needs one type: no None)
        for lv in range(self.depth - 2, -1, -1):
            if torch.jit.is_scripting():  # ModuleList[variable] compiles through the _Block interface
                up: _Block = self.up[lv]
                localisation: _Block = self.localisation[lv]
                x = localisation.forward(torch.cat([skips[lv], up.forward(x)], dim=1))
            else:  # eager: call the modules, so that their hooks run
                x = self.localisation[lv](torch.cat([skips[lv], self.up[lv](x)], dim=1))
            if lv < self.seg_levels:
                if torch.jit.is_scripting():
                    head: _Block = self.segmentation[lv]
                    s = head.forward(x)
                else:
                    s = self.segmentation[lv](x)
                seg = s if seg.numel() == 0 else self.seg_upsample(seg) + s
        return seg


class SliceWise2D(nn.Module):
    """Run a 2D segmentation network over the axial (last) axis of a volume, as one 3D ``forward``.

    The D slices of each volume are moved into the batch dimension and pushed through ``net2d`` in
    chunks of ``slice_batch_size`` slices, so the 2D model is scored on re-assembled volumes and
    attacks differentiate through it like through a 3D network (paper: "the predictions were
    combined for each input 3D volume"). x (B, C, H, W, D) → logits (B, K, H, W, D). The wrapper has
    no parameters of its own; ``train()``/``eval()`` reach ``net2d``.
    """

    def __init__(self, net2d: nn.Module, slice_batch_size: int = 64) -> None:
        super().__init__()
        if not callable(net2d):
            raise ValueError(f"net2d: expected a callable 2D network, got {type(net2d).__name__}")
        self.net2d = net2d
        self.slice_batch_size = check_positive_int(slice_batch_size, "slice_batch_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # Python-only checks: not compiled, traced or exported
            if checks_enabled():
                check_image(x, "x", spatial_dims=(3,))
        b, c, h, w, d = x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4]
        slices = x.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)
        outs: list[torch.Tensor] = []
        for chunk in slices.split(self.slice_batch_size):
            if torch.jit.is_scripting():  # a scripted net2d has one output type: the logits in eval mode
                outs.append(self.net2d(chunk))
            else:
                outs.append(main_output(self.net2d(chunk)))
        out = torch.cat(outs, dim=0)
        if not torch.jit.is_scripting():
            if checks_enabled() and (out.ndim != 4 or out.shape[0] != b * d or out.shape[2:] != (h, w)):
                raise ValueError(f"net2d: expected logits (N, K, {h}, {w}) for slices, got {tuple(out.shape)}")
        return out.reshape(b, d, out.shape[1], h, w).permute(0, 2, 3, 4, 1)


def _remap(label: Label, src: tuple[int, ...], dst: tuple[int, ...], name: str) -> Label:
    """Map values ``src[i] → dst[i]`` of an integer-valued array or tensor; other values → ValueError."""
    if isinstance(label, torch.Tensor):
        allowed = torch.isin(label, torch.tensor(src, dtype=label.dtype, device=label.device))
        out = label.clone()
    elif isinstance(label, np.ndarray):
        allowed = np.isin(label, src)
        out = label.copy()
    else:
        raise ValueError(f"{name}: expected a numpy array or torch tensor, got {type(label).__name__}")
    if not bool(allowed.all()):
        bad = label[~allowed]
        bad = np.unique(bad.detach().cpu().numpy() if isinstance(bad, torch.Tensor) else bad)
        raise ValueError(f"{name}: values {bad.tolist()[:5]} are not in {list(src)}")
    for s, t in zip(src, dst):
        if s != t:
            out[label == s] = t
    return out


def brats_to_index(label: Label) -> Label:
    """BraTS labels {0, 1, 2, 4} → class indices {0, 1, 2, 3} (same type, dtype and shape).

    Any other value (e.g. 3, NaN) raises ValueError. In a MONAI transform chain,
    ``MapLabelValued(keys="label", orig_labels=[0, 1, 2, 4], target_labels=[0, 1, 2, 3])`` does the
    same mapping without the check.
    """
    return _remap(label, BRATS_LABELS, (0, 1, 2, 3), "label")


def index_to_brats(label: Label) -> Label:
    """Class indices {0, 1, 2, 3} (e.g. ``logits.argmax(1)``) → BraTS labels {0, 1, 2, 4}; others raise."""
    return _remap(label, (0, 1, 2, 3), BRATS_LABELS, "label")
