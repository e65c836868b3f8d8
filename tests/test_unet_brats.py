"""UNetBraTS (the BraTS robustness paper's 3D-/2D-UNet), SliceWise2D and the BraTS label mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from common.networks.unet_brats import SliceWise2D, UNetBraTS, brats_to_index, index_to_brats


def _convs(module: nn.Module) -> list[nn.Module]:
    """The conv layers of the MONAI ``Convolution`` blocks inside ``module``, in order."""
    return [m.conv for m in module.modules() if isinstance(m, Convolution)]


@pytest.fixture(scope="module")
def net3d() -> UNetBraTS:
    torch.manual_seed(0)
    return UNetBraTS(spatial_dims=3, base_filters=4, depth=5)


def test_paper_configuration():
    net = UNetBraTS()
    assert net.filters == (16, 32, 64, 128, 256)
    assert (net.in_channels, net.out_channels, net.spatial_dims) == (4, 4, 3)
    # the paper's encoder: 15 convolution blocks, all 3×3×3, stride 2 where the size halves
    enc = _convs(net.encoder)
    assert len(enc) == 15 and all(c.kernel_size == (3, 3, 3) for c in enc)
    assert [blk.entry.conv.stride for blk in net.encoder] == [(1, 1, 1)] + [(2, 2, 2)] * 4
    # three 1×1×1 segmentation layers with as many kernels as labels (Fig. 1, blue)
    assert [(c.kernel_size, c.out_channels) for c in _convs(net.segmentation)] == [((1, 1, 1), 4)] * 3
    # blocks: conv → instance norm → leaky ReLU
    adn = net.encoder[0].entry.adn
    assert isinstance(adn.N, nn.InstanceNorm3d) and isinstance(adn.A, nn.LeakyReLU)


def test_decoder_blocks_per_level(net3d):
    """One block after each up-sampling, two (3×3×3 then 1×1×1) after each concatenation."""
    assert len(net3d.up) == len(net3d.localisation) == net3d.depth - 1
    for lv, (up, loc) in enumerate(zip(net3d.up, net3d.localisation)):
        ups = [m for m in up.modules() if isinstance(m, nn.Upsample)]
        assert len(ups) == 1 and ups[0].mode == "nearest"
        up_convs = _convs(up)
        assert len(up_convs) == 1 and up_convs[0].kernel_size == (3, 3, 3)
        assert up_convs[0].in_channels == net3d.filters[lv + 1]
        assert up_convs[0].out_channels == net3d.filters[lv]
        loc_convs = _convs(loc)
        assert [c.kernel_size for c in loc_convs] == [(3, 3, 3), (1, 1, 1)]
        assert loc_convs[0].in_channels == 2 * net3d.filters[lv]  # concatenation of skip and up-sampled


def test_output_is_sum_of_upsampled_segmentation_layers(net3d):
    """Oracle: logits = up(up(seg2(d2)) + seg1(d1)) + seg0(d0) from the decoder outputs d_l."""
    net3d.eval()
    dec = {}
    hooks = [
        loc.register_forward_hook(lambda m, i, o, lv=lv: dec.__setitem__(lv, o))
        for lv, loc in enumerate(net3d.localisation)
    ]
    x = torch.randn(1, 4, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net3d(x)
        seg = [net3d.segmentation[lv](dec[lv]) for lv in range(3)]
        up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
        expect = up(up(seg[2]) + seg[1]) + seg[0]
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, expect)


def test_forward_backward_3d(net3d):
    net3d.train()
    x = torch.randn(1, 4, 32, 32, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = net3d(x)
    assert out.shape == (1, 4, 32, 32, 32)
    net3d.zero_grad()
    F.cross_entropy(out, torch.randint(0, 4, (1, 32, 32, 32))).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net3d.parameters())


def test_forward_2d_shape_and_layers():
    torch.manual_seed(0)
    net = UNetBraTS(spatial_dims=2, base_filters=4)
    assert all(c.kernel_size in ((3, 3), (1, 1)) for c in _convs(net))
    assert sum(isinstance(m, nn.Dropout2d) for m in net.modules()) == 5
    out = net(torch.randn(3, 4, 64, 64))
    assert out.shape == (3, 4, 64, 64)
    out.sum().backward()


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    net = UNetBraTS(3, base_filters=4, depth=3)
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout3d)]
    assert len(drops) == net.depth and all(d.p == 0.3 for d in drops)
    # each dropout sits between the two convolutions of a context module
    assert all(isinstance(blk.context[0].adn.D, nn.Dropout3d) for blk in net.encoder)
    x = torch.randn(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        net.eval()
        a, b = net(x), net(x)
        net.train()
        torch.manual_seed(10)
        c = net(x)
        torch.manual_seed(11)
        d = net(x)
    torch.testing.assert_close(a, b)
    assert (c - d).abs().max() > 1e-3
    # without dropout the train-mode forward is deterministic too: the randomness is the dropout
    torch.manual_seed(0)
    plain = UNetBraTS(3, base_filters=4, depth=3, dropout=0.0).train()
    assert not any(isinstance(m, nn.Dropout3d) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), plain(x))


def test_input_validation(net3d):
    with pytest.raises(ValueError, match="x: expected 4 channels"):
        net3d(torch.randn(1, 3, 32, 32, 32))
    with pytest.raises(ValueError, match=r"x: spatial size .* divisible by 2\*\*\(depth-1\) = 16"):
        net3d(torch.randn(1, 4, 32, 24, 32))
    with pytest.raises(ValueError, match="x:"):
        net3d(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="x: contains NaN"):
        net3d(torch.full((1, 4, 32, 32, 32), float("nan")))
    with pytest.raises(ValueError, match="spatial_dims"):
        UNetBraTS(spatial_dims=1)
    with pytest.raises(ValueError, match="seg_levels"):
        UNetBraTS(depth=3, seg_levels=3)
    assert UNetBraTS(depth=3, base_filters=2).seg_levels == 2
    with pytest.raises(ValueError, match="dropout"):
        UNetBraTS(dropout=1.0)


def test_slicewise_matches_slice_loop_and_is_batched():
    torch.manual_seed(0)
    net2d = UNetBraTS(spatial_dims=2, base_filters=4, depth=3).eval()
    sw = SliceWise2D(net2d, slice_batch_size=3)
    calls = []
    net2d.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = torch.randn(2, 4, 16, 16, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
    out = sw(x)
    assert out.shape == (2, 4, 16, 16, 5)
    assert calls == [3, 3, 3, 1]  # 10 slices in chunks of 3, not one call per slice
    with torch.no_grad():
        per_slice = [[net2d(x[b : b + 1, ..., k])[0] for k in range(5)] for b in range(2)]
        oracle = torch.stack([torch.stack(row, dim=-1) for row in per_slice])
    torch.testing.assert_close(out.detach(), oracle, rtol=1e-5, atol=1e-5)
    # differentiable as a 3D forward: the gradient of slice k depends only on slice k
    out[..., 2].sum().backward()
    assert x.grad[..., 2].abs().sum() > 0 and x.grad[..., [0, 1, 3, 4]].abs().sum() == 0
    with pytest.raises(ValueError, match="x:"):
        sw(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="slice_batch_size"):
        SliceWise2D(net2d, slice_batch_size=0)


def test_label_mapping_round_trip_and_rejects_others():
    brats = np.array([[0, 1], [2, 4]], dtype=np.uint8)
    idx = brats_to_index(brats)
    assert idx.dtype == np.uint8 and idx.tolist() == [[0, 1], [2, 3]]
    assert brats.tolist() == [[0, 1], [2, 4]]  # input untouched
    np.testing.assert_array_equal(index_to_brats(idx), brats)
    t = torch.tensor([4.0, 0.0, 2.0, 1.0, 4.0])  # MONAI loads labels as float
    ti = brats_to_index(t)
    assert ti.dtype == torch.float32 and ti.tolist() == [3.0, 0.0, 2.0, 1.0, 3.0]
    assert torch.equal(index_to_brats(ti), t)
    with pytest.raises(ValueError, match=r"label: values \[3\]"):
        brats_to_index(np.array([0, 3, 4]))
    with pytest.raises(ValueError, match=r"label: values \[4\]"):
        index_to_brats(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="label"):
        brats_to_index(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="label"):
        brats_to_index([0, 1])


@pytest.mark.parametrize("spatial_dims, shape", [(3, (1, 4, 16, 16, 16)), (2, (2, 4, 16, 16))])
def test_torchscript_gives_the_eager_logits(spatial_dims, shape):
    """torch.jit.script compiles the network (decoder ModuleLists indexed through an interface, input check
    skipped when scripting); its logits equal eager ones (eval mode: no dropout)."""
    torch.manual_seed(0)
    net = UNetBraTS(spatial_dims, base_filters=4, depth=3).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net)(x), net(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x: spatial size"):
        net(torch.zeros(*shape[:2], *([6] * spatial_dims)))  # eager mode keeps its check


def test_slicewise_wrapper_scripts_to_the_eager_volume():
    torch.manual_seed(0)
    wrapper = SliceWise2D(UNetBraTS(2, base_filters=4, depth=3), slice_batch_size=3).eval()
    x = torch.randn(1, 4, 16, 16, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(wrapper)(x), wrapper(x), rtol=1e-5, atol=1e-5)
