"""ResDSN (Li et al., 2019 (ResDSN C2F), Fig. 3, Table 1) and its deep-supervision loss (Eq. 3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import ResidualUnit

from common.networks.resdsn import RESIDUAL_MODES, ResDSN, ResDSNLoss

SMALL = (4, 8, 8, 16)


def _net(residual: str = "long", **kwargs) -> ResDSN:
    torch.manual_seed(0)
    return ResDSN(in_channels=1, out_channels=2, channels=SMALL, residual=residual, **kwargs)


SIZES = [("long", (32, 32, 32)), ("full", (16, 8, 24)), ("short", (8, 16, 16)), ("none", (16, 16, 8))]


@pytest.mark.parametrize("residual, size", SIZES)
def test_heads_have_input_size_and_backward_reaches_every_parameter(residual, size):
    net = _net(residual).train()
    x = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(1))
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 3
    for out in outs:
        assert out.shape == (1, 2, *size)
    y = torch.randint(0, 2, (1, 1, *size), generator=torch.Generator().manual_seed(2))
    ResDSNLoss(lambda logits, t: F.cross_entropy(logits, t[:, 0]))(outs, y).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

    net.eval()
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, *size)


def test_without_deep_supervision_training_returns_main_only():
    net = _net(deep_supervision=False).train()
    out = net(torch.randn(2, 1, 16, 24, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 16, 24, 8)
    assert net.aux1 is None and net.aux2 is None and not any("aux" in k for k in net.state_dict())


def _capture(net: ResDSN, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Record Conv1a's output, DeConv1a's output and Res/Conv1b's input."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        net.conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("conv1a", o)),
        net.deconv1.register_forward_hook(lambda m, i, o: seen.__setitem__("deconv1a", o)),
        net.dec1.register_forward_pre_hook(lambda m, i: seen.__setitem__("conv1b_in", i[0])),
    ]
    net(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("residual, long_sum", [("long", 1), ("full", 1), ("short", 0), ("none", 0)])
def test_long_residual_is_the_elementwise_sum_of_decoder_and_encoder_features(residual, long_sum):
    net = _net(residual).eval()
    seen = _capture(net, torch.randn(1, 1, 16, 16, 16))
    expected = seen["deconv1a"] + seen["conv1a"] if long_sum else seen["deconv1a"]
    torch.testing.assert_close(seen["conv1b_in"], expected)


@pytest.mark.parametrize("residual, short", [("long", 0), ("full", 1), ("short", 1), ("none", 0)])
def test_short_residuals_wrap_the_two_convolution_stages(residual, short):
    net = _net(residual)
    for stage in (net.conv2, net.conv3, net.conv4, net.dec3, net.dec2):
        assert isinstance(stage, ResidualUnit) == bool(short)
    kernel = net.deconv1.conv
    assert kernel.kernel_size == (4, 4, 4) and kernel.stride == (2, 2, 2) and kernel.padding == (1, 1, 1)


def test_default_widths_are_the_papers():
    net = ResDSN()
    assert net.channels == (32, 64, 128, 256)
    assert net.conv1.conv.out_channels == 32 and net.conv4[1].conv.out_channels == 256
    assert net.head.conv.kernel_size == (1, 1, 1) and net.head.conv.out_channels == 2


def test_loss_is_main_plus_weighted_auxiliaries():
    g = torch.Generator().manual_seed(3)
    outs = [torch.randn(2, 2, 8, 8, 8, generator=g) for _ in range(3)]
    y = torch.randint(0, 2, (2, 1, 8, 8, 8), generator=g)

    def ce(logits, t):
        return F.cross_entropy(logits, t[:, 0])

    by_hand = sum(w * F.cross_entropy(o.double(), y[:, 0]) for w, o in zip((1.0, 0.2, 0.4), outs))
    got = ResDSNLoss(ce)(outs, y)
    assert abs(float(got) - float(by_hand)) < 1e-5
    assert abs(float(ResDSNLoss(ce)(outs[0], y)) - float(ce(outs[0], y))) < 1e-6
    custom = ResDSNLoss(ce, xi=(0.5, 0.0))(outs, y)
    assert abs(float(custom) - float(ce(outs[0], y) + 0.5 * ce(outs[1], y))) < 1e-5


def test_bad_inputs_raise_value_errors():
    net = _net().eval()
    with pytest.raises(ValueError, match="^x: .*divisible by 8"):
        net(torch.randn(1, 1, 16, 20, 16))
    with pytest.raises(ValueError, match="^x: expected 1 channel"):
        net(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="^x:"):
        net(torch.randn(1, 1, 16, 16))
    bad = torch.randn(1, 1, 8, 8, 8)
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^x: contains NaN"):
        net(bad)
    with pytest.raises(ValueError, match="^residual"):
        ResDSN(residual="dense")
    with pytest.raises(ValueError, match="^channels"):
        ResDSN(channels=(8, 16, 32))
    with pytest.raises(ValueError, match="^xi"):
        ResDSNLoss(F.cross_entropy, xi=(0.2,))
    with pytest.raises(ValueError, match="^outputs"):
        ResDSNLoss(F.cross_entropy)([torch.zeros(1, 2, 8, 8, 8)] * 4, torch.zeros(1, 1, 8, 8, 8).long())


@pytest.mark.parametrize("residual", RESIDUAL_MODES)
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_torchscript_gives_eager_outputs_in_both_modes(residual, deep_supervision):
    """torch.jit.script compiles every variant (the input check is skipped when scripting); eval mode gives
    the main logits, train mode with deep supervision [main, aux1, aux2], each equal to eager."""
    net = _net(residual, deep_supervision=deep_supervision)
    scripted = torch.jit.script(net)
    x = torch.randn(2, 1, 16, 16, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(scripted.eval()(x), net.eval()(x), rtol=1e-5, atol=1e-5)
        got, want = scripted.train()(x), net.train()(x)
    if deep_supervision:
        assert isinstance(got, list) and len(got) == len(want) == 3
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
