"""DeepLabV2 (Chen et al. 2018), a compact MONAI version: a residual backbone whose last stages trade their
stride for dilation, and the ASPP head that sums four dilated 3x3 classifiers (rates 6, 12, 18, 24),
upsampled bilinearly to the input size. No CRF, no pretrained weights.

Chen, L.-C., Papandreou, G., Kokkinos, I., Murphy, K., Yuille, A. L. DeepLab: Semantic Image Segmentation
with Deep Convolutional Nets, Atrous Convolution, and Fully Connected CRFs. IEEE Transactions on Pattern
Analysis and Machine Intelligence 40(4):834-848, 2018. arXiv:1606.00915, doi:10.1109/TPAMI.2017.2699184.

One of the three segmenters certified in Table 1 of Laousy et al., Certification of Deep Learning Models for
Medical Image Segmentation, MICCAI 2023 (arXiv:2310.03664).

Built from MONAI blocks: ``Convolution`` (the 7x7 stem and the ASPP branches, which take ``dilation``) and
``ResidualUnit`` (the backbone's residual blocks, with ``strides`` and ``dilation``). Written here: the
backbone wiring and the head. MONAI's ``ResNet`` has neither dilated stages nor a segmentation output,
and its ``SimpleASPP`` concatenates normalised branches and mixes them with a 1x1 convolution (DeepLabV3+),
while DeepLabV2's ASPP-L *sums* four plain 3x3 classifiers; that sum is the few lines of
:class:`_ASPPSum`. The backbone is ResNet-like (the paper's is an ImageNet ResNet-101, 3-4-23-3
bottleneck blocks): basic residual units (conv → BN → ReLU twice, MONAI's ordering) and
``num_res_units`` per stage, trained from scratch here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers.factories import Pool

from common.networks.export_guard import checks_enabled
from common.networks.resunetpp import check_strided_input

__all__ = ["DeepLabV2", "deeplab_dilations"]


def deeplab_dilations(strides: Sequence[int]) -> tuple[int, ...]:
    """Dilation of each backbone stage: every stage after the first with stride 1 (a stride removed from
    the ResNet) doubles the dilation, as in DeepLab: strides (1, 2, 1, 1) → dilations (1, 1, 2, 4)."""
    d, out = 1, []
    for i, s in enumerate(strides):
        if i > 0 and int(s) == 1:
            d *= 2
        out.append(d)
    return tuple(out)


class _ASPPSum(nn.Module):
    """DeepLabV2's ASPP-L: parallel 3x3 convolutions to the class logits at the given rates, summed."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, dilation=int(r), conv_only=True,
                        bias=True)
            for r in rates
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(1, dtype=x.dtype, device=x.device)
        for branch in self.branches:
            out = out + branch(x)
        return out


class DeepLabV2(nn.Module):
    """DeepLabV2 (Chen et al., TPAMI 2018, arXiv:1606.00915) with MONAI-style arguments.

    Stem: 7x7 convolution of stride 2 (BN, ReLU) and 3x3 max pooling of stride 2, width ``channels[0]``;
    backbone: one stage per entry of ``strides`` (width ``channels[i + 1]``, ``num_res_units`` residual units,
    the first with the stage's stride, all with the stage's dilation); head: the sum of four 3x3
    convolutions to ``out_channels`` at ``atrous_rates`` (6, 12, 18, 24: ASPP-L), then bilinear upsampling
    to the input size. The defaults, strides (1, 2, 1, 1) with dilations (1, 1, 2, 4), give DeepLabV2's
    output stride 8.

    Args:
        spatial_dims: 2 (or 3; trilinear upsampling).
        in_channels: input channels.
        out_channels: output logits (classes).
        channels: stem width and one width per stage (``len(strides) + 1`` values).
        strides: stride of each stage; the input's spatial sizes must be divisible by ``4 * prod(strides)``
            (:attr:`stride`).
        dilations: dilation of each stage; default :func:`deeplab_dilations` of ``strides``. A strided stage
            cannot be dilated.
        num_res_units: residual units per stage (an int, or one per stage).
        atrous_rates: the ASPP rates (the paper's ASPP-L: 6, 12, 18, 24).

    ``forward(x)`` returns logits ``(B, out_channels, *spatial)`` at the input's size in train and eval mode,
    so the network compiles with ``torch.jit.script`` and exports to ONNX.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (32, 32, 64, 128, 256),
        strides: Sequence[int] = (1, 2, 1, 1),
        dilations: Sequence[int] | None = None,
        num_res_units: int | Sequence[int] = 2,
        atrous_rates: Sequence[int] = (6, 12, 18, 24),
    ) -> None:
        super().__init__()
        channels, strides = tuple(int(c) for c in channels), tuple(int(s) for s in strides)
        dilations = deeplab_dilations(strides) if dilations is None else tuple(int(d) for d in dilations)
        units = (tuple(int(u) for u in num_res_units) if isinstance(num_res_units, Sequence)
                 else (int(num_res_units),) * len(strides))
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: expected 2 or 3, got {spatial_dims}")
        if len(channels) != len(strides) + 1 or not strides:
            raise ValueError(f"channels, strides: expected len(channels) == len(strides) + 1 >= 2, got "
                             f"{channels} and {strides}")
        if len(dilations) != len(strides) or len(units) != len(strides):
            raise ValueError(f"dilations, num_res_units: expected {len(strides)} values (one per stage), got "
                             f"{dilations} and {units}")
        if min(channels + strides + dilations + units) < 1 or not atrous_rates or min(atrous_rates) < 1:
            raise ValueError("channels, strides, dilations, num_res_units, atrous_rates: expected positive values")
        if any(s > 1 and d > 1 for s, d in zip(strides, dilations)):
            raise ValueError(f"strides, dilations: a strided stage cannot be dilated, got {strides}, {dilations}")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.interp_mode = "bilinear" if spatial_dims == 2 else "trilinear"
        stride = 4
        for s in strides:
            stride *= s
        self.stride = stride
        self.stem = nn.Sequential(
            Convolution(spatial_dims, in_channels, channels[0], strides=2, kernel_size=7, act="RELU",
                        norm="BATCH", bias=False),
            Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2, padding=1),
        )
        stages = []
        for i, (s, d, n) in enumerate(zip(strides, dilations, units)):
            stages += [ResidualUnit(spatial_dims, channels[i] if j == 0 else channels[i + 1], channels[i + 1],
                                    strides=s if j == 0 else 1, subunits=2, act="RELU", norm="BATCH",
                                    dilation=d, bias=False)
                       for j in range(n)]
        self.backbone = nn.Sequential(*stages)
        self.head = _ASPPSum(spatial_dims, channels[-1], out_channels, atrous_rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # Python-only checks: not compiled, traced or exported
            if checks_enabled():
                check_strided_input(x, self.spatial_dims, self.in_channels, self.stride,
                                    "4 for the stem times the product of strides")
        logits = self.head(self.backbone(self.stem(x)))
        return F.interpolate(logits, size=x.shape[2:], mode=self.interp_mode, align_corners=False)
