"""NLCE blocks against direct float64 evaluations of the paper's Eq. 1-3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import profile

from common.networks.nlce import NLCE, ContextEncoding, NonLocalBlock, encode_residuals



def _softmax(a: np.ndarray, axis: int) -> np.ndarray:
    a = a - a.max(axis=axis, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=axis, keepdims=True)


def _eq3_oracle(z: np.ndarray, d: np.ndarray, s: np.ndarray) -> np.ndarray:
    """e_k = sum_i exp(-s_k |z_i - d_k|^2) / R(e_i) (z_i - d_k), loop over k; z (B, N, C) -> (B, K, C)."""
    residuals = [z - d[k] for k in range(d.shape[0])]  # each (B, N, C)
    logits = np.stack([-s[k] * (r**2).sum(-1) for k, r in enumerate(residuals)], axis=-1)  # (B, N, K)
    weights = _softmax(logits, axis=-1)
    return np.stack([(weights[..., k, None] * r).sum(1) for k, r in enumerate(residuals)], axis=1)


def _conv1x1(conv: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """A 1x1 convolution on features (B, C, N) evaluated with numpy."""
    w = conv.weight.detach().double().numpy().reshape(conv.out_channels, conv.in_channels)
    b = conv.bias.detach().double().numpy() if conv.bias is not None else 0.0
    return np.einsum("oc,bcn->bon", w, x) + (b[None, :, None] if conv.bias is not None else 0.0)


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (2, 6, 3, 4, 5)])
def test_nonlocal_attention_equals_direct_softmax(shape):
    torch.manual_seed(0)
    spatial_dims = len(shape) - 2
    block = NonLocalBlock(spatial_dims, shape[1], inter_channels=4).double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = block.attention(x).detach().numpy().reshape(shape[0], 4, -1)  # (B, C', N)

    xn = x.numpy().reshape(shape[0], shape[1], -1)
    theta, phi, g = (_conv1x1(c, xn) for c in (block.theta, block.phi, block.g))
    f = np.exp(np.einsum("bci,bcj->bij", theta, phi))  # Eq. 1, (B, N, N)
    expected = np.einsum("bij,bcj->bci", f / f.sum(-1, keepdims=True), g)  # Eq. 2
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)


def test_nonlocal_forward_is_residual_of_projected_response():
    torch.manual_seed(1)
    block = NonLocalBlock(2, 6).double().eval()
    bn = block.w_z[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    y = block.attention(x).detach().numpy().reshape(2, 3, -1)
    wy = _conv1x1(block.w_z[0], y)
    r = lambda t: t.detach().numpy()[None, :, None]  # noqa: E731
    z_expected = (wy - r(bn.running_mean)) / np.sqrt(r(bn.running_var) + bn.eps) * r(bn.weight) + r(bn.bias)
    z_expected += x.numpy().reshape(2, 6, -1)
    got = block(x).detach().numpy().reshape(2, 6, -1)
    np.testing.assert_allclose(got, z_expected, rtol=1e-10, atol=1e-12)


def test_nonlocal_uses_fused_attention_kernel():
    """float32 attention (forward and backward) must not fall back to the N x N math kernel."""
    block = NonLocalBlock(2, 8)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    with profile() as prof:
        block(x).sum().backward()
    keys = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in keys
    assert any("flash_attention" in k for k in keys)


def test_encode_residuals_equals_eq3():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 11, 5))
    d = rng.normal(size=(4, 5))
    s = rng.uniform(0.1, 1.0, size=4)
    got = encode_residuals(torch.from_numpy(z), torch.from_numpy(d), torch.from_numpy(s)).numpy()
    np.testing.assert_allclose(got, _eq3_oracle(z, d, s), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 5, 3, 3, 4)])
def test_context_encoding_equals_direct_evaluation(shape):
    torch.manual_seed(2)
    ce = ContextEncoding(len(shape) - 2, shape[1], num_codes=6, code_channels=7).double().eval()
    with torch.no_grad():
        for bn in (ce.proj.adn.N, ce.norm):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(*shape, dtype=torch.float64)
    got = ce(x).detach().numpy()
    assert got.shape == (shape[0], 7)

    def bn_eval(bn, t, axis_shape):
        p = {k: getattr(bn, k).detach().numpy().reshape(axis_shape) for k in ("weight", "bias")}
        m, v = bn.running_mean.numpy().reshape(axis_shape), bn.running_var.numpy().reshape(axis_shape)
        return (t - m) / np.sqrt(v + bn.eps) * p["weight"] + p["bias"]

    xn = x.numpy().reshape(shape[0], shape[1], -1)
    z = np.maximum(bn_eval(ce.proj.adn.N, _conv1x1(ce.proj.conv, xn), (1, -1, 1)), 0.0)  # 1x1 conv, BN, ReLU
    e_k = _eq3_oracle(z.transpose(0, 2, 1), ce.codewords.detach().numpy(), ce.smoothing.detach().numpy())
    expected = np.maximum(bn_eval(ce.norm, e_k, (1, -1, 1)), 0.0).sum(1)  # e = sum_k ReLU(BN(e_k))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (2, 8, 3, 4, 5)])
def test_nlce_with_nl_only_is_identity_at_init(shape):
    torch.manual_seed(3)
    module = NLCE(len(shape) - 2, 8, use_ce=False)
    x = torch.randn(*shape)
    for mode in (module.train, module.eval):
        mode()
        torch.testing.assert_close(module(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (2, 8, 3, 4, 5)])
def test_full_nlce_changes_features_and_gates_channels(shape):
    torch.manual_seed(4)
    module = NLCE(len(shape) - 2, 8, num_codes=4).eval()
    x = torch.randn(*shape)
    out = module(x)
    assert out.shape == x.shape
    assert (out - x).abs().max() > 1e-3
    # NL is the identity at init, so the output is x scaled per (sample, channel) by gamma in (0, 1)
    ratio = (out / x).flatten(2)
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4, atol=1e-5)
    assert bool(((ratio > 0) & (ratio < 1)).all())
    expected_gamma = torch.sigmoid(module.gate(module.ce(x)))
    torch.testing.assert_close(ratio[..., 0], expected_gamma, rtol=1e-4, atol=1e-5)


def test_ablation_flags_remove_their_parameters():
    names = {
        flags: {n for n, _ in NLCE(2, 8, 4, use_nl=flags[0], use_ce=flags[1]).named_parameters()}
        for flags in [(True, True), (False, True), (True, False), (False, False)]
    }
    full = names[(True, True)]
    nl = {n for n in full if n.startswith("nl.")}
    ce = {n for n in full if n.startswith(("ce.", "gate."))}
    assert nl and ce and nl | ce == full
    assert names[(False, True)] == full - nl
    assert names[(True, False)] == full - ce
    assert names[(False, False)] == set()
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(NLCE(2, 8, use_nl=False, use_ce=False)(x), x, rtol=0, atol=0)


def test_without_nl_context_encoder_reads_the_input():
    torch.manual_seed(5)
    module = NLCE(2, 8, 4, use_nl=False).eval()
    x = torch.randn(2, 8, 5, 5)
    gamma = torch.sigmoid(module.gate(module.ce(x)))[..., None, None]
    torch.testing.assert_close(module(x), x * gamma)


def test_backward_reaches_parameters():
    torch.manual_seed(6)
    module = NLCE(2, 8, 4)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    module(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name in ("nl.w_z.1.weight", "ce.codewords", "ce.smoothing", "gate.weight", "ce.proj.conv.weight"):
        grad = dict(module.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="spatial_dims"):
        NLCE(1, 8)
    with pytest.raises(ValueError, match="num_codes"):
        NLCE(2, 8, num_codes=0)
    with pytest.raises(ValueError, match="in_channels"):
        NonLocalBlock(2, 0)
    module = NLCE(2, 8, 4)
    with pytest.raises(ValueError, match=r"x: expected 8 channel\(s\), got 4"):
        module(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="x: expected shape"):
        module(torch.randn(1, 8, 5, 5, 5))
    with pytest.raises(ValueError, match="x: expected a floating-point"):
        ContextEncoding(2, 8)(torch.ones(1, 8, 5, 5, dtype=torch.long))


def test_nlce_and_gradients_equal_the_materialised_reference():
    """The benchmark's reference (N x N attention, (B, N, K, C) residuals) agrees in value and x-gradient."""
    from scripts.bench_nlce import build_module, reference_forward

    module = build_module(channels=8, num_codes=4, seed=7).double()
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (module, lambda t: reference_forward(module, t)):
        out = fn(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        grads.append((out.detach(), grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_nlce_scripts_to_the_eager_output(spatial_dims):
    torch.manual_seed(0)
    block = NLCE(spatial_dims, 8, num_codes=4).eval()
    x = torch.randn(2, 8, *([6] * spatial_dims), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(block)(x), block(x), rtol=1e-5, atol=1e-5)
