"""ResUNet++ (Jha et al. 2019), a compact MONAI version: residual units, squeeze-and-excitation, an ASPP
bridge and attention gates in the decoder.

Jha, D., Smedsrud, P. H., Riegler, M. A., Johansen, D., de Lange, T., Halvorsen, P., Johansen, H. D.
ResUNet++: An Advanced Architecture for Medical Image Segmentation. IEEE International Symposium on
Multimedia (ISM) 2019, pp. 225-230. arXiv:1911.07067, doi:10.1109/ISM46123.2019.00049.

One of the three segmenters certified in Table 1 of Laousy et al., Certification of Deep Learning Models for
Medical Image Segmentation, MICCAI 2023 (arXiv:2310.03664).

Everything is a MONAI block: ``ResidualUnit`` (the residual units, strided in the encoder),
``ChannelSELayer`` (squeeze-and-excitation: Hu et al., Squeeze-and-Excitation
Networks, CVPR 2018, arXiv:1709.01507; reduction 8 as in the authors' code), ``SimpleASPP`` (the bridge
and the output ASPP, rates 1, 6, 12, 18), ``AttentionBlock`` of MONAI's ``AttentionUnet`` (the additive
attention gate of Oktay et al., Attention U-Net: Learning Where to Look for the Pancreas, MIDL 2018,
arXiv:1804.03999, which the paper's attention units follow) and ``UpSample``. Written
here is only the wiring, which MONAI has no net for. Differences from the authors' Keras code, all inside
MONAI's blocks: the residual units are conv → BN → ReLU (MONAI's ordering) instead of pre-activation;
the ASPP concatenates its four branches before a 1x1 convolution where the authors sum them (a 1x1
convolution of the concatenation can express the sum); the attention gate ends in a sigmoid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import ChannelSELayer, Convolution, ResidualUnit, SimpleASPP, UpSample
from monai.networks.layers.factories import Pool
from monai.networks.nets.attentionunet import AttentionBlock

from common.networks.export_guard import checks_enabled
from common.validation import check_image

__all__ = ["ResUNetPlusPlus", "check_strided_input"]

_ASPP_RATES = (1, 6, 12, 18)


def check_strided_input(x: torch.Tensor, spatial_dims: int, in_channels: int, stride: int, why: str) -> None:
    """Eager-mode input check of a strided segmenter: a finite float image (B, ``in_channels``, *spatial)
    with ``spatial_dims`` spatial sizes divisible by the network's total ``stride`` (``why`` says where
    it comes from)."""
    check_image(x, "x", spatial_dims=(spatial_dims,))
    if x.shape[1] != in_channels:
        raise ValueError(f"x: expected {in_channels} channel(s), got shape {tuple(x.shape)}")
    if any(s % stride for s in x.shape[2:]):
        raise ValueError(f"x: spatial size {tuple(x.shape[2:])} must be divisible by {stride} ({why})")


def _aspp(spatial_dims: int, in_channels: int, out_channels: int) -> SimpleASPP:
    """Four 3x3 atrous branches (rates 1, 6, 12, 18) of ``out_channels / 4`` each, concatenated, 1x1 conv."""
    return SimpleASPP(spatial_dims, in_channels, out_channels // len(_ASPP_RATES), kernel_sizes=(3, 3, 3, 3),
                      dilations=_ASPP_RATES, norm_type="BATCH", acti_type="RELU")


def _level(spatial_dims: int, in_channels: int, out_channels: int, stride: int, num_units: int) -> nn.Sequential:
    """``num_units`` MONAI residual units (the first strided and changing the width), BN + ReLU inside."""
    units = [ResidualUnit(spatial_dims, in_channels if i == 0 else out_channels, out_channels,
                          strides=stride if i == 0 else 1, subunits=2, act="RELU", norm="BATCH")
             for i in range(num_units)]
    return nn.Sequential(*units)


class _Decoder(nn.Module):
    """One decoder level: attention gate (the encoder skip, pooled to the decoder's resolution, gates the
    decoder features), upsampling, concatenation with the skip, residual unit(s)."""

    def __init__(self, spatial_dims: int, skip_channels: int, in_channels: int, out_channels: int,
                 stride: int, num_units: int) -> None:
        super().__init__()
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=stride, stride=stride)
        self.attention = AttentionBlock(spatial_dims, f_int=in_channels, f_g=skip_channels, f_l=in_channels)
        self.up = UpSample(spatial_dims, in_channels, in_channels, scale_factor=stride, mode="nontrainable",
                           interp_mode="nearest", align_corners=None)
        self.res = _level(spatial_dims, in_channels + skip_channels, out_channels, 1, num_units)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        gated = self.attention(self.pool(skip), x)
        return self.res(torch.cat([self.up(gated), skip], dim=1))


class ResUNetPlusPlus(nn.Module):
    """ResUNet++ (Jha et al., IEEE ISM 2019, arXiv:1911.07067) with MONAI-style arguments.

    Encoder: a residual stem at full resolution (``channels[0]``) and one strided residual level per entry
    of ``strides`` (``channels[1:]``), each followed by squeeze-and-excitation; bridge: ASPP to
    ``bridge_channels``; decoder: per level an attention gate, upsampling, concatenation with the encoder
    feature and residual unit(s), widths ``channels[L], ..., channels[1]`` as in the paper; output: ASPP to
    ``channels[0]`` and a 1x1 convolution to ``out_channels`` logits. The paper's network is
    ``channels=(16, 32, 64, 128)``, ``strides=(2, 2, 2)``, ``bridge_channels=256``, one residual unit per level.

    Args:
        spatial_dims: 2 (or 3).
        in_channels: input channels.
        out_channels: output logits (classes).
        channels: encoder widths, ``len(strides) + 1`` values, each divisible by 4 (the ASPP's 4 branches).
        strides: downsampling factor of each encoder level; the input's spatial sizes must be divisible by
            their product (:attr:`stride`).
        bridge_channels: the ASPP bridge's width (default ``2 * channels[-1]``), divisible by 4.
        num_res_units: residual units per level (the paper: 1).
        se_reduction: squeeze-and-excitation reduction ratio (the authors' code: 8), capped at the width.

    ``forward(x)`` returns logits ``(B, out_channels, *spatial)`` in train and eval mode alike, so the network
    compiles with ``torch.jit.script`` and exports to ONNX.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        bridge_channels: int | None = None,
        num_res_units: int = 1,
        se_reduction: int = 8,
    ) -> None:
        super().__init__()
        channels, strides = tuple(int(c) for c in channels), tuple(int(s) for s in strides)
        bridge = int(bridge_channels) if bridge_channels is not None else 2 * channels[-1]
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: expected 2 or 3, got {spatial_dims}")
        if len(channels) != len(strides) + 1 or not strides:
            raise ValueError(f"channels, strides: expected len(channels) == len(strides) + 1 >= 2, got "
                             f"{channels} and {strides}")
        if any(c < 4 or c % 4 for c in channels + (bridge,)):
            raise ValueError(f"channels, bridge_channels: expected multiples of 4 (ASPP), got {channels}, {bridge}")
        if any(s < 1 for s in strides) or int(num_res_units) < 1 or int(se_reduction) < 1:
            raise ValueError(f"strides, num_res_units, se_reduction: expected positive, got {strides}, "
                             f"{num_res_units}, {se_reduction}")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        stride = 1
        for s in strides:
            stride *= s
        self.stride = stride
        units = int(num_res_units)
        widths = (in_channels,) + channels
        self.encoder = nn.ModuleList()
        for i, c in enumerate(channels):
            self.encoder.append(nn.Sequential(
                _level(spatial_dims, widths[i], c, 1 if i == 0 else strides[i - 1], units),
                ChannelSELayer(spatial_dims, c, r=min(int(se_reduction), c), acti_type_1="relu"),
            ))
        self.bridge = _aspp(spatial_dims, channels[-1], bridge)
        self.decoder = nn.ModuleList()
        width = bridge
        for k in range(len(strides) - 1, -1, -1):  # skip channels[k], output channels[k + 1]
            self.decoder.append(_Decoder(spatial_dims, channels[k], width, channels[k + 1], strides[k], units))
            width = channels[k + 1]
        self.head = nn.Sequential(
            _aspp(spatial_dims, width, channels[0]),
            Convolution(spatial_dims, channels[0], out_channels, kernel_size=1, conv_only=True, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # Python-only checks: not compiled, traced or exported
            if checks_enabled():
                check_strided_input(x, self.spatial_dims, self.in_channels, self.stride, "the product of strides")
        skips: list[torch.Tensor] = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        x = self.bridge(x)
        n = len(skips)
        for i, dec in enumerate(self.decoder):
            x = dec(x, skips[n - 2 - i])
        return self.head(x)
