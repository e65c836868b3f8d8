"""ResDSN: the 3D encoder–decoder with long residual sums and deep supervision (Li et al. 2019, ResDSN C2F, Fig. 3).

Layout (the figure is not in the text copy of the paper; this is the reconstruction from its caption
and Sec. 3.1.4, with the default widths ``channels = (32, 64, 128, 256)``: "Conv1a, 32, 3×3×3" and
the channels double after each max pooling)::

    resolution  encoder                         decoder
    1           Conv1a (c0)  ─────────────(+)── DeConv1a → Res/Conv1b (c0) → 1×1×1 conv → main
    1/2         Conv2a, Conv2b (c1) ──────(+)── DeConv2a → Conv2c, Conv2d (c1)      │
    1/4         Conv3a, Conv3b (c2) ──────(+)── DeConv3a → Conv3c, Conv3d (c2)      │
    1/8         Conv4a, Conv4b (c3) ────────────────┘
    aux1 = DeConv(Conv2b → K)                   (1/2 → 1)
    aux2 = DeConv(Conv3b → c1) → DeConv(c1 → K) (1/4 → 1/2 → 1)

- Every convolution is 3×3×3 conv + BatchNorm + ReLU (MONAI ``Convolution``, ``adn_ordering="NDA"``);
  stages are joined by 2×2×2 max pooling with stride 2; every deconvolution is a 4×4×4 transposed
  convolution, stride 2, padding 1 (exactly doubles the size) + BatchNorm + ReLU, except the last
  deconvolution of an auxiliary head, which outputs logits (no BN/ReLU), as the main head's 1×1×1 conv.
- Long residual connections (``(+)``) are element-wise sums of the deconvolved decoder feature and the
  encoder feature of the same resolution (Sec. 3.1.4, Table 1 "Long Res: Sum").
- The auxiliary heads up-sample with deconvolutions, as the paper does ("deconvolution layers are
  connected to upsample feature maps to be the same as input").

``residual`` selects the Table 1 / Table 5 variant:

==========  ===================  =========  ==========
residual    paper name           long res   short res
==========  ===================  =========  ==========
``long``    ResDSN               sum        no
``full``    FResDSN              sum        sum
``short``   SResDSN              no         sum
``none``    3D DSN (Table 5)     no         no
==========  ===================  =========  ==========

Short residuals wrap each two-convolution stage (Conv2a/2b … Conv4a/4b, Conv3c/3d, Conv2c/2d) in a MONAI
``ResidualUnit`` (1×1×1 projection when the channel count changes); the single-convolution stages
Conv1a and Res/Conv1b have none. ``deep_supervision=False`` drops both auxiliary heads ("Res C2F",
Table 7).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from monai.losses import DeepSupervisionLoss
from monai.networks.blocks import Convolution, ResidualUnit

from common.networks.export_guard import checks_enabled
from common.validation import check_image, check_nonnegative

__all__ = ["ResDSN", "ResDSNLoss", "RESIDUAL_MODES"]

RESIDUAL_MODES = ("long", "full", "short", "none")
_SPATIAL_DIMS = 3
_DOWNSAMPLING = 8  # three 2×2×2 poolings


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _conv(cin: int, cout: int) -> nn.Module:
    """3×3×3 convolution + BatchNorm + ReLU (size preserving)."""
    return Convolution(_SPATIAL_DIMS, cin, cout, kernel_size=3, act="RELU", norm="BATCH")


def _stage(cin: int, cout: int, short: bool) -> nn.Module:
    """Two 3×3×3 conv + BN + ReLU; with ``short`` a MONAI ``ResidualUnit`` adds the input (short residual)."""
    if short:
        return ResidualUnit(_SPATIAL_DIMS, cin, cout, kernel_size=3, subunits=2, act="RELU", norm="BATCH")
    return nn.Sequential(_conv(cin, cout), _conv(cout, cout))


def _deconv(cin: int, cout: int, logits: bool = False) -> nn.Module:
    """4×4×4 transposed conv, stride 2, padding 1: (D, H, W) → (2D, 2H, 2W); + BN + ReLU unless ``logits``."""
    return Convolution(
        _SPATIAL_DIMS,
        cin,
        cout,
        strides=2,
        kernel_size=4,
        padding=1,
        output_padding=0,
        is_transposed=True,
        act="RELU",
        norm="BATCH",
        conv_only=logits,
    )


class ResDSN(nn.Module):
    """ResDSN of Li et al. 2019, ResDSN C2F (Fig. 3, Table 1) for 3D volumes.

    Args:
        in_channels: input channels C (1 for CT).
        out_channels: classes K (2 in the paper: background, pancreas).
        channels: widths (c0, c1, c2, c3) of the four resolution steps; the paper's (32, 64, 128, 256).
        residual: ``"long"`` (ResDSN), ``"full"`` (FResDSN), ``"short"`` (SResDSN) or ``"none"`` (3D DSN).
        deep_supervision: keep the two auxiliary heads (Conv2b and Conv3b).

    Shapes: input (B, C, D, H, W) with D, H, W divisible by 8 (the paper's 64³ patches). In training mode
    with deep supervision ``forward`` returns ``[main, aux1, aux2]``, each logits (B, K, D, H, W), main
    first (aux1 from Conv2b, aux2 from Conv3b, weighted ξ1 = 0.2 and ξ2 = 0.4 by :class:`ResDSNLoss`);
    in eval mode, or without deep supervision, it returns the main logits (B, K, D, H, W) only.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (32, 64, 128, 256),
        residual: str = "long",
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not _is_positive_int(value):
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        channels = tuple(channels)
        if len(channels) != 4 or not all(_is_positive_int(c) for c in channels):
            raise ValueError(f"channels: expected four integers >= 1 (c0, c1, c2, c3), got {channels!r}")
        if residual not in RESIDUAL_MODES:
            raise ValueError(f"residual: expected one of {RESIDUAL_MODES}, got {residual!r}")
        self.in_channels, self.out_channels, self.channels = in_channels, out_channels, channels
        self.residual, self.deep_supervision = residual, bool(deep_supervision)
        self.long_residual = residual in ("long", "full")
        short = residual in ("full", "short")
        c0, c1, c2, c3 = channels

        self.pool = nn.MaxPool3d(kernel_size=2, stride=2)
        self.conv1 = _conv(in_channels, c0)  # Conv1a
        self.conv2 = _stage(c0, c1, short)  # Conv2a, Conv2b
        self.conv3 = _stage(c1, c2, short)  # Conv3a, Conv3b
        self.conv4 = _stage(c2, c3, short)  # Conv4a, Conv4b
        self.deconv3 = _deconv(c3, c2)  # DeConv3a
        self.dec3 = _stage(c2, c2, short)
        self.deconv2 = _deconv(c2, c1)  # DeConv2a
        self.dec2 = _stage(c1, c1, short)
        self.deconv1 = _deconv(c1, c0)  # DeConv1a
        self.dec1 = _conv(c0, c0)  # Res/Conv1b
        self.head = Convolution(_SPATIAL_DIMS, c0, out_channels, kernel_size=1, conv_only=True)
        # None without deep supervision: TorchScript then drops the auxiliary branch of ``forward``
        self.aux1: nn.Module | None = _deconv(c1, out_channels, logits=True) if self.deep_supervision else None
        self.aux2: nn.Module | None = (
            nn.Sequential(_deconv(c2, c1), _deconv(c1, out_channels, logits=True)) if self.deep_supervision else None
        )

    def _check_input(self, x: torch.Tensor) -> None:
        check_image(x, "x", spatial_dims=(_SPATIAL_DIMS,))
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channel(s), got shape {tuple(x.shape)}")
        if any(s % _DOWNSAMPLING for s in x.shape[2:]):
            raise ValueError(
                f"x: spatial size {tuple(x.shape[2:])} must be divisible by {_DOWNSAMPLING} "
                "(three 2x2x2 poolings)"
            )

    def _skip(self, up: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        """Long residual connection: element-wise sum of decoder and encoder features (same shape)."""
        return up + enc if self.long_residual else up

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if not torch.jit.is_scripting():  # Python-only checks: not compiled, traced or exported
            if checks_enabled():
                self._check_input(x)
        e1 = self.conv1(x)
        e2 = self.conv2(self.pool(e1))
        e3 = self.conv3(self.pool(e2))
        e4 = self.conv4(self.pool(e3))
        d3 = self.dec3(self._skip(self.deconv3(e4), e3))
        d2 = self.dec2(self._skip(self.deconv2(d3), e2))
        d1 = self.dec1(self._skip(self.deconv1(d2), e1))
        main = self.head(d1)
        if self.aux1 is not None and self.aux2 is not None:
            if self.training:
                return [main, self.aux1(e2), self.aux2(e3)]
        return main


class ResDSNLoss(nn.Module):
    """Eq. 3 of Li et al. 2019, ResDSN C2F without the weight decay term: L = L_main + ξ1 L_aux1 + ξ2 L_aux2.

    A thin wrapper around MONAI's ``DeepSupervisionLoss`` with the fixed weights (1, ξ1, ξ2); the heads
    already have the label's spatial size, so MONAI's target resizing never triggers. The λ‖Θ‖² term
    is the optimiser's ``weight_decay`` (0.0005 in the paper).

    Args:
        base_loss: ``(logits (B, K, *spatial), y) -> scalar``, e.g. ``monai.losses.DiceCELoss`` or a
            cross-entropy (the paper's loss, Eq. 1–2).
        xi: (ξ1, ξ2) for the Conv2b and Conv3b heads; the paper's (0.2, 0.4).

    ``forward(outputs, y)``: ``outputs`` is ``[main, aux1, aux2]`` (training mode) or the main logits
    tensor alone (eval mode or ``deep_supervision=False``), which is scored with weight 1.
    """

    def __init__(
        self,
        base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        xi: Sequence[float] = (0.2, 0.4),
    ) -> None:
        super().__init__()
        if not callable(base_loss):
            raise ValueError(
                f"base_loss: expected a callable (logits, y) -> scalar, got {type(base_loss).__name__}"
            )
        xi = tuple(xi)
        if len(xi) != 2:
            raise ValueError(f"xi: expected two weights (xi1, xi2), got {xi!r}")
        self.xi = tuple(check_nonnegative(v, "xi") for v in xi)
        self.weights = [1.0, *self.xi]
        self.ds_loss = DeepSupervisionLoss(base_loss, weights=self.weights)  # type: ignore[arg-type]

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, (list, tuple)):
            if not 1 <= len(outputs) <= len(self.weights):
                raise ValueError(f"outputs: expected 1 to {len(self.weights)} heads, got {len(outputs)}")
            outputs = list(outputs)
        elif not isinstance(outputs, torch.Tensor):
            raise ValueError(f"outputs: expected a tensor or a list of tensors, got {type(outputs).__name__}")
        return self.ds_loss(outputs, y)
