"""NLCEN (non-local context encoding network), its loss, and NLCE inserted into MONAI's UNet.

He et al., "Non-Local Context Encoder: Robust Biomedical Image Segmentation against Adversarial
Attacks", AAAI 2019: sections "Non-Local Context Encoding Network" (architecture, Eq. 5) and
"Generalization" (one NLCE between the last down-sampling and the first up-sampling of a UNet).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch
import torch.nn.functional as F
from monai.networks.blocks.activation_checkpointing import ActivationCheckpointWrapper
from monai.networks.layers.factories import Conv
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import UNet
from monai.networks.nets.resnet import ResNetBottleneck, resnet18, resnet50
from torch import nn

from common.networks.nlce import NLCE
from common.networks.export_guard import checks_enabled
from common.validation import check_image, check_nonnegative

__all__ = ["NLCEN", "NLCENLoss", "add_nlce_to_unet", "UNetWithNLCE"]

_BACKBONES = {"resnet18": resnet18, "resnet50": resnet50}
TOTAL_STRIDE = 32  # conv1 (2) x max-pool (2) x layer2..layer4 (2 each)


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class NLCEN(nn.Module):
    """Non-local context encoding network (2D), He et al. 2019, Fig. 3.

    Global phase: a MONAI ResNet-18/50 whose conv2..conv5 stages (MONAI ``layer1``..``layer4``,
    strides 4, 8, 16, 32) are each followed by an :class:`~common.networks.nlce.NLCE`, giving
    E2..E5. A feature pyramid follows FPN (Lin et al. 2017): P5 = L5(E5), P_i = L_i(E_i) +
    up(P_{i+1}) with 1x1 lateral convolutions L_i to ``fpn_channels`` and nearest up-sampling. Each
    P_i gives a prediction through its own 3x3 convolution and bilinear up-sampling to the input
    size (supervised). MONAI's ``FeaturePyramidNetwork`` is not used because it adds a 3x3
    convolution on every P_i, which the paper does not have (its 3x3 convolution is the head).

    Refinement phase: 0, 1, 2, 3 (``refine_bottlenecks``) MONAI ``ResNetBottleneck`` blocks on P2,
    P3, P4, P5, bilinear up-sampling to P2's size, concatenation, and a 3x3 convolution to the
    refined logits, up-sampled bilinearly to the input size.

    ``forward(x)`` with x (B, in_channels, H, W), H and W multiples of 32, returns

    - training mode: ``[refined, pred_P2, pred_P3, pred_P4, pred_P5]``, each (B, out_channels, H, W)
      (the main output first, for :class:`NLCENLoss` and :func:`common.validation.main_output`);
    - eval mode: the refined logits (B, out_channels, H, W) only (the paper's test-time output).

    Args:
        in_channels: image channels (1 for chest X-ray, 3 for dermoscopy).
        out_channels: classes (logits).
        backbone: ``"resnet18"`` (JSRT in the paper) or ``"resnet50"`` (ISBI 2016).
        use_nlce: attach NLCE modules; False is the paper's ablation "w/o NLCE".
        use_nl: NLCE with its non-local block; False is "w/o NL".
        use_ce: NLCE with its context encoder and channel gate; False is "w/o CE".
        num_codes: codewords K per context encoder.
        fpn_channels: channels of P2..P5; a multiple of 4 (the bottleneck's expansion).
        refine_bottlenecks: number of bottleneck blocks on P2, P3, P4, P5.
        widen_factor: width multiplier of the ResNet (1.0 is the standard ResNet).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        backbone: str = "resnet18",
        use_nlce: bool = True,
        use_nl: bool = True,
        use_ce: bool = True,
        num_codes: int = 32,
        fpn_channels: int = 256,
        refine_bottlenecks: Sequence[int] = (0, 1, 2, 3),
        widen_factor: float = 1.0,
    ) -> None:
        super().__init__()
        sizes = {"in_channels": in_channels, "out_channels": out_channels, "num_codes": num_codes}
        for name, value in sizes.items():
            if not _is_int(value, 1):
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if backbone not in _BACKBONES:
            raise ValueError(f"backbone: expected one of {sorted(_BACKBONES)}, got {backbone!r}")
        if not _is_int(fpn_channels, 4) or fpn_channels % 4:
            raise ValueError(f"fpn_channels: expected a positive multiple of 4, got {fpn_channels!r}")
        refine_bottlenecks = tuple(refine_bottlenecks)
        if len(refine_bottlenecks) != 4 or not all(_is_int(n, 0) for n in refine_bottlenecks):
            raise ValueError(f"refine_bottlenecks: expected 4 integers >= 0, got {refine_bottlenecks!r}")
        if not _is_number(widen_factor) or widen_factor < 1 / 64:
            raise ValueError(f"widen_factor: expected a number >= 1/64, got {widen_factor!r}")
        self.in_channels, self.out_channels = in_channels, out_channels

        self.backbone = _BACKBONES[backbone](
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            widen_factor=widen_factor,
            feed_forward=False,
        )
        expansion = 4 if backbone == "resnet50" else 1
        stage_channels = [int(c * widen_factor) * expansion for c in (64, 128, 256, 512)]
        self.stage_channels = stage_channels

        with_nlce = use_nlce and (use_nl or use_ce)
        self.nlce = (
            nn.ModuleList(NLCE(2, c, num_codes, use_nl=use_nl, use_ce=use_ce) for c in stage_channels)
            if with_nlce
            else None
        )
        conv, fpn = Conv[Conv.CONV, 2], fpn_channels
        self.lateral = nn.ModuleList(conv(c, fpn, kernel_size=1) for c in stage_channels)
        self.heads = nn.ModuleList(conv(fpn, out_channels, kernel_size=3, padding=1) for _ in range(4))
        self.refine = nn.ModuleList(
            nn.Sequential(*(ResNetBottleneck(fpn, fpn // 4, spatial_dims=2) for _ in range(n)))
            for n in refine_bottlenecks
        )
        self.fuse = conv(4 * fpn, out_channels, kernel_size=3, padding=1)

    def _check_input(self, x: torch.Tensor) -> None:
        check_image(x, "x", spatial_dims=(2,))
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channel(s), got {x.shape[1]}")
        if any(s < TOTAL_STRIDE or s % TOTAL_STRIDE for s in x.shape[2:]):
            raise ValueError(
                f"x: spatial size {tuple(x.shape[2:])} must be a multiple of the total stride {TOTAL_STRIDE} "
                f"(minimum {TOTAL_STRIDE} x {TOTAL_STRIDE})"
            )

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """E2..E5 (after NLCE), strides 4, 8, 16, 32."""
        net = self.backbone
        h = net.maxpool(net.act(net.bn1(net.conv1(x))))
        e2 = net.layer1(h)
        e3 = net.layer2(e2)
        e4 = net.layer3(e3)
        features = [e2, e3, e4, net.layer4(e4)]
        if self.nlce is not None:
            features = [nlce(features[i]) for i, nlce in enumerate(self.nlce)]
        return features

    def _pyramid(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """P2..P5 (``fpn_channels`` each) by the FPN top-down pathway."""
        lateral = [conv(features[i]) for i, conv in enumerate(self.lateral)]
        p = lateral[3]
        pyramid = [p]
        for i in range(2, -1, -1):
            p = lateral[i] + F.interpolate(p, size=lateral[i].shape[2:], mode="nearest")
            pyramid.insert(0, p)
        return pyramid

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, list[torch.Tensor]]:  # noqa: UP007 (TorchScript)
        """Refined logits (eval) or [refined, P2..P5 predictions] (training), each (B, out, H, W)."""
        if not torch.jit.is_scripting():  # Python-only checks: not compiled, traced or exported
            if checks_enabled():
                self._check_input(x)
        size = x.shape[2:]
        pyramid = self._pyramid(self._encode(x))
        p2_size = pyramid[0].shape[2:]
        refined: list[torch.Tensor] = []
        for i, block in enumerate(self.refine):
            r = block(pyramid[i])
            refined.append(F.interpolate(r, size=p2_size, mode="bilinear", align_corners=False) if i > 0 else r)
        out = F.interpolate(self.fuse(torch.cat(refined, 1)), size=size, mode="bilinear", align_corners=False)
        if not self.training:
            return out
        outputs = [out]
        for i, head in enumerate(self.heads):
            outputs.append(F.interpolate(head(pyramid[i]), size=size, mode="bilinear", align_corners=False))
        return outputs


class NLCENLoss(nn.Module):
    """NLCEN's deep-supervision loss, Eq. 5: L = (1/4) sum_{i=2..5} L_g^i + lambda L_r.

    Takes NLCEN's training-mode output ``[refined, pred_P2, ..., pred_P5]`` and the target; the
    coarse losses are averaged (1/m for m coarse predictions, 1/4 in the paper).

    Args:
        base_loss: a per-prediction loss ``base_loss(logits, target) -> scalar``, e.g. MONAI's
            ``DiceCELoss(to_onehot_y=True, softmax=True)`` or ``DiceCELoss(lambda_dice=0)`` for the
            paper's cross-entropy (Eq. 4).
        lam: lambda, weight of the refined loss (0.25 in the paper).
    """

    def __init__(self, base_loss: Callable[..., torch.Tensor], lam: float = 0.25) -> None:
        super().__init__()
        if not callable(base_loss):
            raise ValueError(f"base_loss: expected a callable loss, got {type(base_loss).__name__}")
        self.base_loss = base_loss
        self.lam = check_nonnegative(lam, "lam")

    def forward(self, outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor) or not isinstance(outputs, (list, tuple)) or len(outputs) < 2:
            raise ValueError(
                "outputs: expected the training-mode list [refined, pred_P2, ..., pred_P5]; "
                "put the network in train() mode"
            )
        refined, *coarse = outputs
        global_loss = torch.stack([self.base_loss(p, target) for p in coarse]).mean()
        return global_loss + self.lam * self.base_loss(refined, target)


def _is_connection_block(module: nn.Module) -> bool:
    """MONAI UNet's ``Sequential(down, SkipConnection(sub), up)`` (see ``UNet._get_connection_block``)."""
    return isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[1], SkipConnection)


def add_nlce_to_unet(
    unet: UNet,
    num_codes: int = 32,
    use_nl: bool = True,
    use_ce: bool = True,
    inter_channels: int | None = None,
    code_channels: int | None = None,
) -> UNet:
    """Insert one NLCE between the last down-sampling and the first up-sampling stage of a MONAI UNet.

    MONAI's UNet nests ``Sequential(down, SkipConnection(subblock), up)`` blocks; the innermost
    subblock is the bottom layer (after the last down-sampling, output ``unet.channels[-1]``
    channels), whose output is concatenated with the skip and fed to the first up-sampling layer.
    The bottom layer is replaced, in place, by ``Sequential(bottom, NLCE(channels[-1]))``
    (``CheckpointUNet``'s checkpoint wrappers are looked through). The paper's "Generalization"
    section.

    Returns the same ``unet`` object (modified). The NLCE arguments are those of
    :class:`~common.networks.nlce.NLCE`.
    """
    if not isinstance(unet, UNet):
        raise ValueError(f"unet: expected a monai.networks.nets.UNet, got {type(unet).__name__}")
    if any(isinstance(m, NLCE) for m in unet.modules()):
        raise ValueError("unet: already contains an NLCE module")
    block = unet.model
    if not _is_connection_block(block):
        raise ValueError("unet: unexpected structure, expected Sequential(down, SkipConnection, up) blocks")
    while True:
        holder, attr = block[1], "submodule"
        sub = holder.submodule
        if isinstance(sub, ActivationCheckpointWrapper):
            holder, attr, sub = sub, "module", sub.module
        if not _is_connection_block(sub):
            break
        block = sub
    nlce = NLCE(unet.dimensions, unet.channels[-1], num_codes, use_nl, use_ce, inter_channels, code_channels)
    setattr(holder, attr, nn.Sequential(sub, nlce))
    return unet


class UNetWithNLCE(UNet):
    """MONAI ``UNet`` with one NLCE at its bottom (see :func:`add_nlce_to_unet`), for bundle configs::

        {"_target_": "common.networks.nlcen.UNetWithNLCE", "spatial_dims": 2, "in_channels": 1,
         "out_channels": 2, "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_codes": 32}

    Args:
        *args, **kwargs: MONAI ``UNet`` arguments.
        num_codes, use_nl, use_ce, inter_channels, code_channels: NLCE arguments.

    Shapes: as the UNet, (B, in_channels, *spatial) -> (B, out_channels, *spatial).
    """

    def __init__(
        self,
        *args,
        num_codes: int = 32,
        use_nl: bool = True,
        use_ce: bool = True,
        inter_channels: int | None = None,
        code_channels: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        add_nlce_to_unet(self, num_codes, use_nl, use_ce, inter_channels, code_channels)
