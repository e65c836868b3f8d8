"""Non-local context encoder (NLCE): non-local block, context encoding and channel gating.

He et al., "Non-Local Context Encoder: Robust Biomedical Image Segmentation against Adversarial
Attacks", AAAI 2019. The non-local block follows Wang et al., "Non-local Neural Networks" (CVPR
2018, embedded Gaussian); the context encoding follows Zhang et al., "Context Encoding for Semantic
Segmentation" (EncNet, CVPR 2018).

All blocks take feature maps (B, C, *spatial) with ``spatial_dims`` 2 or 3 spatial dimensions, and
are written so that memory grows linearly with the number of positions N = prod(spatial):

- the non-local attention uses ``torch.nn.functional.scaled_dot_product_attention`` (no N x N matrix);
- the context encoding uses matrix products (O(N K) memory for K codewords, not O(N K C)).

MONAI has no non-local or context-encoding block, hence these modules; they use MONAI's
``Conv``/``Norm`` factories and ``Convolution`` block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Norm
from torch import nn

from common.networks.export_guard import checks_enabled

__all__ = ["NonLocalBlock", "ContextEncoding", "NLCE", "encode_residuals"]


def _check_features(x: torch.Tensor, spatial_dims: int, channels: int, name: str = "x") -> None:
    """``x`` must be a floating tensor (B, channels, *spatial) with ``spatial_dims`` spatial dims."""
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        raise ValueError(f"{name}: expected a floating-point torch.Tensor")
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name}: expected shape (B, C, *spatial) with {spatial_dims} spatial dims, got {tuple(x.shape)}"
        )
    if x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channel(s), got {x.shape[1]}")


def _check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims: expected 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


def _tokens(f: torch.Tensor) -> torch.Tensor:
    """(B, C', *spatial) -> (B, 1, N, C'), contiguous: PyTorch's fused CPU attention kernel needs 4-D
    inputs with unit stride in C'; other layouts silently fall back to the math kernel that
    materialises the N x N matrix."""
    return f.flatten(2).transpose(1, 2).contiguous().unsqueeze(1)


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block, NLCE Eq. 1-2 with the residual z_i = W_z y_i + x_i.

    y_i = sum_j softmax_j(theta(x_i)^T phi(x_j)) g(x_j), with theta, phi, g 1x1 convolutions to
    ``inter_channels`` C'. The softmax over j is the normalisation C(x) of Eq. 2. W_z is a 1x1
    convolution back to C channels followed by batch norm whose scale and shift start at zero
    (Wang et al. 2018), so the block is exactly the identity at initialisation.

    Args:
        spatial_dims: 2 or 3.
        in_channels: C, channels of the input and output.
        inter_channels: C' of the embeddings; default ``max(1, in_channels // 2)`` (Wang et al.).

    Shapes: (B, C, *spatial) -> (B, C, *spatial).
    """

    def __init__(self, spatial_dims: int, in_channels: int, inter_channels: int | None = None) -> None:
        super().__init__()
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        self.in_channels = _positive(in_channels, "in_channels")
        if inter_channels is None:
            inter_channels = max(1, in_channels // 2)
        self.inter_channels = inter = _positive(inter_channels, "inter_channels")
        conv = Conv[Conv.CONV, spatial_dims]
        self.theta = conv(in_channels, inter, kernel_size=1)
        self.phi = conv(in_channels, inter, kernel_size=1)
        self.g = conv(in_channels, inter, kernel_size=1)
        self.w_z = nn.Sequential(
            conv(inter, in_channels, kernel_size=1), Norm[Norm.BATCH, spatial_dims](in_channels)
        )
        nn.init.zeros_(self.w_z[1].weight)
        nn.init.zeros_(self.w_z[1].bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The non-local response y of Eq. 2, shape (B, C', *spatial), via SDPA with ``scale=1``."""
        if not torch.jit.is_scripting():  # Python-only checks: not compiled, traced or exported
            if checks_enabled():
                _check_features(x, self.spatial_dims, self.in_channels)
        q, k, v = _tokens(self.theta(x)), _tokens(self.phi(x)), _tokens(self.g(x))
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # embedded Gaussian: no 1/sqrt(C')
        return y.squeeze(1).transpose(1, 2).unflatten(2, x.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """z = W_z y + x, shape (B, C, *spatial)."""
        return self.w_z(self.attention(x)) + x


def encode_residuals(z: torch.Tensor, codewords: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """Aggregated soft-assignment residuals e_k of NLCE Eq. 3 (EncNet's encoding layer).

    e_k = sum_i a_ik (z_i - d_k) with a_ik = softmax_k(-s_k ||z_i - d_k||^2). Computed as
    ||z_i - d_k||^2 = ||z_i||^2 - 2 z_i.d_k + ||d_k||^2 and e_k = (A^T Z)_k - (sum_i a_ik) d_k, so
    the largest intermediate is (B, N, K), never (B, N, K, C).

    Args:
        z: features (B, N, C).
        codewords: codebook D, (K, C).
        smoothing: smoothing factors s, (K,).

    Returns:
        e, (B, K, C).
    """
    sq_dist = (
        z.pow(2).sum(-1, keepdim=True) - 2.0 * torch.matmul(z, codewords.t()) + codewords.pow(2).sum(-1)
    )  # (B, N, K)
    assign = torch.softmax(-smoothing * sq_dist, dim=-1)  # a_ik, (B, N, K)
    return torch.matmul(assign.transpose(1, 2), z) - assign.sum(1).unsqueeze(-1) * codewords


class ContextEncoding(nn.Module):
    """Context encoder of NLCE: global context e from a learned codebook (Eq. 3).

    The features are first mapped to the codeword dimension C'' by a 1x1 convolution (the paper);
    batch norm and ReLU follow it as in EncNet's encoding head. With K learned codewords d_k and
    smoothing factors s_k, the residuals e_k (see :func:`encode_residuals`) go through batch norm
    (over codewords, as EncNet's ``BatchNorm1d(K)``) and ReLU, and are summed over k:
    e = sum_k ReLU(BN(e_k)).

    Args:
        spatial_dims: 2 or 3.
        in_channels: C of the input.
        num_codes: K, number of codewords (32 as in EncNet).
        code_channels: C'' of the codewords; default ``in_channels``.

    Shapes: (B, C, *spatial) -> (B, C'').
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, num_codes: int = 32, code_channels: int | None = None
    ) -> None:
        super().__init__()
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        self.in_channels = _positive(in_channels, "in_channels")
        self.num_codes = _positive(num_codes, "num_codes")
        code_channels = in_channels if code_channels is None else code_channels
        self.code_channels = _positive(code_channels, "code_channels")
        self.proj = Convolution(
            spatial_dims, in_channels, self.code_channels, kernel_size=1, act="relu", norm="batch", bias=False
        )
        std = 1.0 / math.sqrt(self.num_codes * self.code_channels)
        self.codewords = nn.Parameter(torch.empty(self.num_codes, self.code_channels).uniform_(-std, std))
        self.smoothing = nn.Parameter(torch.empty(self.num_codes).uniform_(0.0, 1.0))
        self.norm = Norm[Norm.BATCH, 1](self.num_codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global context e, shape (B, C'')."""
        if not torch.jit.is_scripting():  # Python-only checks: not compiled, traced or exported
            if checks_enabled():
                _check_features(x, self.spatial_dims, self.in_channels)
        z = self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C'')
        e_k = encode_residuals(z, self.codewords, self.smoothing)  # (B, K, C'')
        return F.relu(self.norm(e_k)).sum(1)


class NLCE(nn.Module):
    """Non-local context encoder: F_z = NonLocal(x), e = ContextEncoding(F_z), out = F_z * gamma.

    gamma = sigmoid(W_gamma e) is a channel-wise scale (W_gamma a linear layer C'' -> C), broadcast
    over space. The flags give the paper's ablations:

    - ``use_nl=False`` (w/o NL): no non-local block, F_z = x; the context encoder works on x.
    - ``use_ce=False`` (w/o CE): no context encoder and no gate; the output is F_z.
    - both False (w/o NLCE): the module has no parameters and is the identity.

    With the non-local block only, the module is the identity at initialisation (W_z starts at 0).

    Args:
        spatial_dims: 2 or 3.
        in_channels: C.
        num_codes: K codewords of the context encoder.
        use_nl: include the non-local block.
        use_ce: include the context encoder and channel gate.
        inter_channels: C' of the non-local embeddings (default C // 2).
        code_channels: C'' of the codewords (default C).

    Shapes: (B, C, *spatial) -> (B, C, *spatial).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_codes: int = 32,
        use_nl: bool = True,
        use_ce: bool = True,
        inter_channels: int | None = None,
        code_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        self.in_channels = _positive(in_channels, "in_channels")
        self.nl = NonLocalBlock(spatial_dims, in_channels, inter_channels) if use_nl else None
        self.ce = ContextEncoding(spatial_dims, in_channels, num_codes, code_channels) if use_ce else None
        self.gate = nn.Linear(self.ce.code_channels, in_channels) if self.ce is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F_z ⊗ gamma, shape (B, C, *spatial)."""
        if not torch.jit.is_scripting():  # Python-only checks: not compiled, traced or exported
            if checks_enabled():
                _check_features(x, self.spatial_dims, self.in_channels)
        fz = self.nl(x) if self.nl is not None else x
        if self.ce is None:
            return fz
        gamma = torch.sigmoid(self.gate(self.ce(fz)))  # (B, C)
        return fz * gamma.reshape(list(gamma.shape) + [1] * self.spatial_dims)
