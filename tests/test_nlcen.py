"""NLCEN (ResNet + NLCE + FPN + refinement), its Eq. 5 loss, and NLCE inserted into MONAI's UNet."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet
from monai.networks.nets.unet import CheckpointUNet

from common.networks.nlce import NLCE
from common.networks.nlcen import NLCEN, NLCENLoss, UNetWithNLCE, add_nlce_to_unet

TINY = {"fpn_channels": 8, "num_codes": 4, "widen_factor": 0.25}



@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_resnet18_nlcen_train_and_eval_outputs(size):
    torch.manual_seed(0)
    net = NLCEN(in_channels=1, out_channels=3, backbone="resnet18", **TINY)
    x = torch.randn(2, 1, *size)
    outputs = net(x)
    assert isinstance(outputs, list) and len(outputs) == 5
    assert all(o.shape == (2, 3, *size) for o in outputs)
    target = torch.randint(0, 3, (2, size[0], size[1]))
    sum(F.cross_entropy(o, target) for o in outputs).backward()
    params = dict(net.named_parameters())
    for name in ("backbone.conv1.weight", "fuse.weight", "heads.0.weight", "heads.3.weight",
                 "refine.3.2.conv3.weight", "nlce.0.gate.weight", "nlce.3.ce.codewords"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name

    net.eval()
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, *size)
    assert bool(torch.isfinite(out).all())


def test_full_width_resnet18_and_resnet50_eval_forward():
    torch.manual_seed(1)
    lung = NLCEN(in_channels=1, backbone="resnet18", fpn_channels=16, num_codes=4).eval()
    assert lung.stage_channels == [64, 128, 256, 512]
    skin = NLCEN(in_channels=3, backbone="resnet50", fpn_channels=16, num_codes=4).eval()
    assert skin.stage_channels == [256, 512, 1024, 2048]
    with torch.no_grad():
        assert lung(torch.randn(1, 1, 32, 64)).shape == (1, 2, 32, 64)
        assert skin(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_refinement_bottleneck_counts():
    net = NLCEN(**TINY)
    assert [len(block) for block in net.refine] == [0, 1, 2, 3]
    assert net.nlce is not None and len(net.nlce) == 4


def test_ablation_flags_remove_exactly_their_parameters():
    def names(**flags):
        return {n: p.shape for n, p in NLCEN(**TINY, **flags).named_parameters()}

    full = names()
    nl = {n for n in full if n.startswith("nlce.") and ".nl." in n}
    ce = {n for n in full if n.startswith("nlce.") and (".ce." in n or ".gate." in n)}
    nlce = {n for n in full if n.startswith("nlce.")}
    assert nl and ce and nl | ce == nlce
    for flags, removed in (({"use_nl": False}, nl), ({"use_ce": False}, ce), ({"use_nlce": False}, nlce)):
        ablated = names(**flags)
        assert set(ablated) == set(full) - removed, flags
        assert all(ablated[n] == full[n] for n in ablated)
    assert set(names(use_nl=False, use_ce=False)) == set(full) - nlce


def test_nlcen_loss_is_eq5():
    """Constant two-class logits (a, 0) with target 0 have cross-entropy log(1 + exp(-a)) at every pixel."""
    a = [0.3, -1.0, 2.0, 0.5, -0.7]  # refined, P2, P3, P4, P5
    outputs = [torch.stack([torch.full((2, 8, 8), v), torch.zeros(2, 8, 8)], dim=1) for v in a]
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    ce = [math.log1p(math.exp(-v)) for v in a]
    loss = NLCENLoss(F.cross_entropy)(outputs, target)
    assert loss.item() == pytest.approx(0.25 * sum(ce[1:]) + 0.25 * ce[0], rel=1e-6)
    loss_lam = NLCENLoss(F.cross_entropy, lam=1.5)(outputs, target)
    assert loss_lam.item() == pytest.approx(0.25 * sum(ce[1:]) + 1.5 * ce[0], rel=1e-6)


def test_nlcen_loss_with_monai_loss_trains_the_network():
    from monai.losses import DiceCELoss

    torch.manual_seed(2)
    net = NLCEN(**TINY)
    loss_fn = NLCENLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    x, y = torch.randn(2, 1, 64, 64), torch.randint(0, 2, (2, 1, 64, 64))
    loss = loss_fn(net(x), y)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    with pytest.raises(ValueError, match="outputs: expected the training-mode list"):
        loss_fn(torch.zeros(2, 2, 64, 64), y)
    with pytest.raises(ValueError, match="lam"):
        NLCENLoss(F.cross_entropy, lam=-1)


def test_eval_mode_works_under_sliding_window_inference():
    torch.manual_seed(3)
    net = NLCEN(**TINY).eval()
    inferer = SlidingWindowInferer(roi_size=(64, 64), sw_batch_size=2, overlap=0.25)
    with torch.no_grad():
        out = inferer(torch.randn(1, 1, 96, 128), net)
    assert out.shape == (1, 2, 96, 128)


def test_bad_inputs_and_arguments():
    net = NLCEN(**TINY).eval()
    with pytest.raises(ValueError, match=r"x: expected 1 channel\(s\), got 3"):
        net(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"x: spatial size \(48, 64\).*32.*minimum 32"):
        net(torch.randn(1, 1, 48, 64))
    with pytest.raises(ValueError, match="x: spatial size .*minimum 32"):
        net(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="x: expected shape"):
        net(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="x: contains NaN"):
        net(torch.full((1, 1, 32, 32), float("nan")))
    with pytest.raises(ValueError, match="backbone"):
        NLCEN(backbone="resnet34")
    with pytest.raises(ValueError, match="fpn_channels"):
        NLCEN(fpn_channels=10)
    with pytest.raises(ValueError, match="refine_bottlenecks"):
        NLCEN(refine_bottlenecks=(0, 1, 2))


def _unet(spatial_dims=2, cls=UNet):
    return cls(spatial_dims, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_with_nl_only_equals_plain_unet_at_init(spatial_dims):
    torch.manual_seed(4)
    plain = _unet(spatial_dims)
    with_nl = add_nlce_to_unet(copy.deepcopy(plain), num_codes=4, use_ce=False)
    nlces = [m for m in with_nl.modules() if isinstance(m, NLCE)]
    assert len(nlces) == 1 and nlces[0].in_channels == 16
    x = torch.randn(2, 1, *([16] * spatial_dims))
    for mode in ("train", "eval"):
        getattr(plain, mode)()
        getattr(with_nl, mode)()
        out = with_nl(x)
        assert out.shape == (2, 2, *([16] * spatial_dims))
        torch.testing.assert_close(out, plain(x), rtol=0, atol=0)


def test_unet_with_full_nlce_differs_and_sits_at_the_bottom():
    torch.manual_seed(5)
    plain = _unet()
    full = add_nlce_to_unet(copy.deepcopy(plain), num_codes=4)
    bottom = full.model[1].submodule[1].submodule  # Sequential(bottom layer, NLCE)
    assert isinstance(bottom[1], NLCE)
    x = torch.randn(2, 1, 16, 16)
    assert (full.eval()(x) - plain.eval()(x)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="already contains an NLCE"):
        add_nlce_to_unet(full)
    with pytest.raises(ValueError, match="unet: expected a monai.networks.nets.UNet"):
        add_nlce_to_unet(torch.nn.Conv2d(1, 1, 1))


def test_unet_with_nlce_class_matches_the_helper_and_checkpoint_unet():
    torch.manual_seed(6)
    built = UNetWithNLCE(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                         num_res_units=1, num_codes=4)
    helper = add_nlce_to_unet(_unet(), num_codes=4)
    assert set(built.state_dict()) == set(helper.state_dict())
    helper.load_state_dict(built.state_dict())
    x = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(built.eval()(x), helper.eval()(x))
    ckpt = add_nlce_to_unet(_unet(cls=CheckpointUNet), num_codes=4)
    assert sum(isinstance(m, NLCE) for m in ckpt.modules()) == 1
    assert ckpt(torch.randn(2, 1, 16, 16, requires_grad=True)).shape == (2, 2, 16, 16)


@pytest.mark.parametrize("flags", [{}, {"use_nl": False}, {"use_ce": False}, {"use_nlce": False}])
def test_torchscript_gives_eager_outputs_in_both_modes(flags):
    """torch.jit.script compiles NLCEN (its input check is skipped when scripting): eval mode returns the
    refined logits tensor, train mode the list [refined, P2..P5] that NLCENLoss takes, each equal to eager."""
    torch.manual_seed(0)
    net = NLCEN(**TINY, **flags)
    scripted = torch.jit.script(net)
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = scripted.eval()(x)
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, net.eval()(x), rtol=1e-5, atol=1e-5)
        outs = scripted.train()(x)
        expected = net.train()(x)
    assert isinstance(outs, list) and len(outs) == len(expected) == 5
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    loss = NLCENLoss(F.cross_entropy)
    y = torch.randint(0, 2, (2, 64, 64), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loss(outs, y), loss(expected, y))
    with pytest.raises(ValueError, match="x: expected 1 channel"):
        net.eval()(torch.zeros(1, 3, 64, 64))  # eager mode keeps its check


def test_unet_with_nlce_scripts_to_the_eager_output():
    torch.manual_seed(0)
    net = UNetWithNLCE(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_codes=4)
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net).eval()(x), net.eval()(x), rtol=1e-5, atol=1e-5)
