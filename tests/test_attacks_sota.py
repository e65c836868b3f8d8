"""APGD, SegPGD, CosPGD, the SEA losses, sigmoid multi-label attacks, the worst-case ensemble and the
gradient-masking diagnostics, against independent oracles (the papers' update rules re-implemented per
image, direct float64 formulas, brute-force minima) and on a briefly trained tiny UNet."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.attacks import (
    APGD,
    ATTACKS,
    FGSM,
    IFGSM,
    PGD,
    CosPGD,
    SegPGD,
    WorstCase,
    apgd_checkpoints,
    case_dice,
    worst_case_attack,
)
from common.losses import LOSS_NAMES, SegmentationLoss, pack_bits, resolve_loss, unpack_bits
from common.sliding_window import SlidingWindowForward


def tanh_cnn(spatial_dims: int = 2, channels: int = 1, classes: int = 3, seed: int = 0) -> nn.Module:
    """A small non-linear CNN (float64) whose loss landscape makes APGD oscillate."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    torch.manual_seed(seed)
    return nn.Sequential(conv(channels, 6, 3, padding=1), nn.Tanh(), conv(6, classes, 3, padding=1)).double().eval()


def batch(spatial_dims=2, b=3, channels=1, size=8, classes=3, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((b, channels) + (size,) * spatial_dims, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (b, 1) + (size,) * spatial_dims, generator=g)
    return x, y


# ------------------------------------------------------------------------------------------ APGD
def test_apgd_checkpoints_are_the_papers():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (Croce & Hein 2020, §3.2), w_j = ceil(p_j N) < N
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(25) == [6, 11, 15, 18, 20, 22, 24]


def apgd_oracle(model, x, y, eps, n, checkpoints, clip=(0.0, 1.0)):
    """Algorithm 1 of Croce & Hein (ICML 2020) for ONE image, scalar bookkeeping in Python floats."""

    def f_grad(v):
        v = v.detach().requires_grad_(True)
        loss = F.cross_entropy(model(v), y[:, 0])
        (g,) = torch.autograd.grad(loss, [v])
        return float(loss.detach()), g

    def proj(v):
        return torch.clamp(torch.min(torch.max(v, x - eps), x + eps), *clip)

    eta, x_k = 2 * eps, x.clone()
    f_k, g_k = f_grad(x_k)
    fs, f_max, x_max, g_max = [f_k], f_k, x_k, g_k
    f_max_at, x_prev, last, reduced_last, etas = [f_max], x_k, 0, False, []
    for k in range(n):
        if k in checkpoints:
            rises = sum(fs[i + 1] > fs[i] for i in range(last, k))
            cond1 = rises < 0.75 * (k - last)
            cond2 = (not reduced_last) and f_max_at[last] == f_max
            reduced_last = cond1 or cond2
            if reduced_last:
                eta, x_k, g_k = eta / 2, x_max, g_max
                fs[-1] = f_max
            last = k
        etas.append(eta)
        z = proj(x_k + eta * g_k.sign())
        a = 1.0 if k == 0 else 0.75
        x_prev, x_k = x_k, proj(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev))
        f_k, g_k = f_grad(x_k)
        fs.append(f_k)
        if f_k > f_max:
            f_max, x_max, g_max = f_k, x_k, g_k
        f_max_at.append(f_max)
    return etas, x_max, fs


def test_apgd_step_size_schedule_follows_the_paper_per_image():
    model = tanh_cnn()
    x, y = batch()
    eps, n = torch.tensor([0.3, 0.1, 0.02]), 25
    attack = APGD(model, eps, steps=n, loss="ce", clip=(0.0, 1.0))
    x_adv = attack(x, y)
    halvings = torch.stack(attack.history["restarts"])
    assert bool(halvings.any()) and not bool(halvings.all()), "the toy case must exercise both branches"
    for b in range(x.shape[0]):
        etas, x_max, fs = apgd_oracle(model, x[b : b + 1], y[b : b + 1], float(eps[b]), n, apgd_checkpoints(n))
        np.testing.assert_allclose(attack.history["eta"][:, b].numpy(), etas, rtol=1e-6)
        np.testing.assert_allclose(attack.history["loss"][:, b].numpy(), fs, rtol=1e-9)
        np.testing.assert_allclose(x_adv[b : b + 1].numpy(), x_max.numpy(), atol=1e-7)


# -------------------------------------------------------------------------------- SegPGD / CosPGD
def test_segpgd_weights_and_step_equal_the_formula():
    model = tanh_cnn()
    x, y = batch()
    steps, alpha, eps = 4, 0.01, 0.05
    attack = SegPGD(model, eps, steps=steps, alpha=alpha, clip=(0.0, 1.0))
    x_adv = attack(x, y)
    assert attack.history["lambda"] == [t / (2 * steps) for t in range(steps)]
    # replay with the formula written out: L_t = 1/N [(1-λ) Σ_correct CE + λ Σ_wrong CE]
    v = x.clone()
    for t in range(steps):
        lam = t / (2 * steps)
        v_ = v.detach().requires_grad_(True)
        logits = model(v_)
        ce = F.cross_entropy(logits, y[:, 0], reduction="none")
        correct = (logits.argmax(1) == y[:, 0]).detach().numpy()
        w = torch.from_numpy(np.where(correct, 1 - lam, lam))
        (g,) = torch.autograd.grad((w * ce).sum() / ce[0].numel(), [v_])
        v = torch.clamp(torch.min(torch.max(v + alpha * g.sign(), x - eps), x + eps), 0, 1)
    np.testing.assert_allclose(x_adv.numpy(), v.numpy(), atol=1e-12)


def test_cospgd_weights_equal_the_cosine_per_pixel():
    model = tanh_cnn()
    x, y = batch()
    logits = model(x).detach()
    attack = CosPGD(model, 0.05, steps=1)
    w = attack.pixel_weight(logits, y).numpy()
    p = torch.softmax(logits, 1).numpy()
    onehot = np.eye(3)[y[:, 0].numpy()].transpose(0, 3, 1, 2)
    cos = (p * onehot).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(onehot, axis=1))
    np.testing.assert_allclose(w, cos, rtol=1e-12)
    targeted = CosPGD(model, 0.05, steps=1, targeted=True)
    np.testing.assert_allclose(targeted.pixel_weight(logits, y).numpy(), 1 - cos, rtol=1e-12)
    # sigmoid: per channel, the binary distribution (1 - p, p) against (1 - y, y)
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mask = (torch.rand(2, 3, 4, 4) > 0.5).long()
    sig = CosPGD(lambda v: v, 0.05, steps=1, output="sigmoid")
    q = 1 / (1 + np.exp(-z.numpy()))
    t = mask.numpy()
    expected = (q * t + (1 - q) * (1 - t)) / np.sqrt(q**2 + (1 - q) ** 2)
    np.testing.assert_allclose(sig.pixel_weight(z, mask).numpy(), expected, rtol=1e-12)
    # one CosPGD step equals a signed step of the cosine-weighted CE (cosine detached)
    x1 = CosPGD(model, 0.05, steps=1, alpha=0.01)(x, y)
    v = x.clone().requires_grad_(True)
    ce = F.cross_entropy(model(v), y[:, 0], reduction="none")
    (g,) = torch.autograd.grad((torch.from_numpy(cos) * ce).mean(), [v])
    np.testing.assert_allclose(x1.numpy(), (x + 0.01 * g.sign()).numpy(), atol=1e-12)


# ---------------------------------------------------------------------------------- SEA losses
def _softmax_terms(z, y):
    z = z.numpy().astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = y[:, 0].numpy()
    p_true = np.take_along_axis(p, labels[:, None], 1)[:, 0]
    correct = p.argmax(1) == labels
    return p, labels, p_true, correct


def test_sea_losses_equal_direct_float64_evaluation_softmax():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 5, 6, generator=g)
    y = torch.randint(0, 4, (3, 1, 5, 6), generator=g)
    y[2] = 0  # one image holding a single class
    p, labels, p_true, correct = _softmax_terms(z, y)
    ce = -np.log(p_true)
    n = labels[0].size
    masked = (ce * correct).reshape(3, -1).sum(1) / n
    balanced = []
    for b in range(3):
        per_class = [(ce[b] * correct[b])[labels[b] == c].mean() for c in range(4) if (labels[b] == c).any()]
        balanced.append(np.mean(per_class))
    js = []
    for b in range(3):
        q = np.eye(4)[labels[b]].transpose(2, 0, 1)
        m = 0.5 * (p[b] + q)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl_pm = np.where(p[b] > 0, p[b] * np.log(p[b] / m), 0).sum(0)
            kl_qm = np.where(q > 0, q * np.log(q / m), 0).sum(0)
        js.append((0.5 * kl_pm + 0.5 * kl_qm).mean())
    for name, expected in (("masked_ce", masked), ("balanced_masked_ce", balanced), ("js", js), ("ce", ce.reshape(3, -1).mean(1))):
        got = SegmentationLoss(name).per_image(z.double(), y).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-10, err_msg=name)


def test_sea_losses_equal_direct_float64_evaluation_sigmoid():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    t = (torch.rand(2, 3, 4, 4, 4, generator=g) > 0.6).long()
    t[1, 2] = 0  # a channel with one class only
    q = 1 / (1 + np.exp(-z.numpy()))
    tn = t.numpy()
    p_true = np.where(tn == 1, q, 1 - q)
    ce = -np.log(p_true)
    correct = (q > 0.5) == (tn == 1)
    expected = {
        "ce": ce.reshape(2, -1).mean(1),
        "masked_ce": (ce * correct).reshape(2, -1).mean(1),
        "js": (0.5 * ((1 - p_true) * np.log(2) + p_true * np.log(2 * p_true / (1 + p_true))) - 0.5 * np.log((1 + p_true) / 2)).reshape(2, -1).mean(1),
        "dice": 1 - ((2 * (q * tn).reshape(2, 3, -1).sum(2) + 1e-5) / (q.reshape(2, 3, -1).sum(2) + tn.reshape(2, 3, -1).sum(2) + 1e-5)).mean(1),
    }
    bal = np.zeros(2)
    for b in range(2):
        per_channel = []
        for c in range(3):
            m = ce[b, c] * correct[b, c]
            per_channel.append(np.mean([m[tn[b, c] == v].mean() for v in (0, 1) if (tn[b, c] == v).any()]))
        bal[b] = np.mean(per_channel)
    expected["balanced_masked_ce"] = bal
    for name, value in expected.items():
        loss = SegmentationLoss(name, output="sigmoid")
        np.testing.assert_allclose(loss.per_image(z, t).numpy(), value, rtol=1e-10, err_msg=name)
        # packed bits (how a multi-label target travels through sliding windows) give the same value
        np.testing.assert_allclose(loss.per_image(z, pack_bits(t)).numpy(), value, rtol=1e-10, err_msg=name)
    assert torch.equal(unpack_bits(pack_bits(t), 3), t)


def test_every_loss_has_a_per_image_form_consistent_with_its_batch_mean():
    z = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 1, 6, 6))
    for name in LOSS_NAMES:
        loss = resolve_loss(name)
        assert torch.allclose(loss(z, y), loss.per_image(z, y).mean()), name


# --------------------------------------------------------------------------- invariants of the new attacks
def small_bn_cnn(spatial_dims=2, classes=3):
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    torch.manual_seed(3)
    return nn.Sequential(conv(2, 8, 3, padding=1), bn(8), nn.Dropout(0.2), nn.ReLU(), conv(8, classes, 3, padding=1))


def new_attacks(forward, eps):
    clip = (0.0, 1.0)
    out = {}
    for loss in ("ce", "dice", "masked_ce", "balanced_masked_ce", "js"):
        out[f"apgd_{loss}"] = APGD(forward, eps, steps=6, loss=loss, clip=clip)
    out["apgd_random_start"] = APGD(forward, eps, steps=4, clip=clip, random_start=True, generator=torch.Generator().manual_seed(0))
    out["segpgd"] = SegPGD(forward, eps, steps=4, clip=clip)
    out["cospgd_js"] = CosPGD(forward, eps, steps=4, loss="js", clip=clip)
    out["cospgd_targeted"] = CosPGD(forward, eps, steps=4, clip=clip, targeted=True)
    out["worst_case"] = WorstCase(forward, eps, clip=clip, attacks=[("SegPGD", {"steps": 2}), ("APGD", {"steps": 3, "loss": "js"})])
    return out


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("train_mode", [False, True])
def test_invariants_for_every_new_attack(spatial_dims, train_mode):
    model = small_bn_cnn(spatial_dims)
    model.train(train_mode)
    x, y = batch(spatial_dims, b=2, channels=2, size=6, dtype=torch.float32)
    eps = torch.tensor([0.04, 0.02])
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    heads = lambda v: [model(v), torch.zeros(1)]  # noqa: E731 - deep supervision: main head first
    for name, attack in new_attacks(heads, eps).items():
        x_adv = attack(x, y)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype, name
        assert not x_adv.requires_grad and x_adv.grad_fn is None, name
        delta = (x_adv - x).abs().flatten(1).max(1).values
        assert bool((delta <= eps + 1e-6).all()), name
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0, name
        assert model.training == train_mode, name
        for k, v in model.named_parameters():
            assert torch.equal(v, params[k]), (name, k)
        assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 0.5)), name
        assert all(p.grad is None for p in list(model.parameters())[1:]), name
        if "masked" not in name:  # a random network may classify no pixel right: nothing for a masked loss to push
            assert bool(delta.max() > 0), f"{name} did not move the input"


# ------------------------------------------------------------------- sigmoid multi-label, sliding windows
def test_sigmoid_multilabel_3d_through_sliding_windows():
    torch.manual_seed(0)
    net = nn.Conv3d(2, 3, 1).double().eval()  # pointwise: every window sees exactly the voxels it covers
    x = torch.rand(2, 2, 8, 8, 8, dtype=torch.float64)
    mask = (torch.rand(2, 3, 8, 8, 8) > 0.5).long()
    whole = FGSM(net, 0.03, loss="ce", output="sigmoid")(x, mask)
    # oracle: x + ε sign ∇ of the per-channel binary CE evaluated directly
    v = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(net(v), mask.double()), [v])
    np.testing.assert_allclose(whole.numpy(), (x + 0.03 * g.sign()).numpy(), atol=1e-12)
    for aggregation in ("exact", "window_mean"):
        sw = SlidingWindowForward(net, roi_size=4, overlap=0.0, sw_batch_size=3, aggregation=aggregation)
        got = FGSM(sw, 0.03, loss="ce", output="sigmoid")(x, mask)
        np.testing.assert_allclose(got.numpy(), whole.numpy(), atol=1e-12, err_msg=aggregation)
        for loss in ("ce", "js", "dice"):
            for attack in (APGD(sw, 0.05, steps=3, loss=loss, output="sigmoid"), SegPGD(sw, 0.05, steps=2, loss=loss, output="sigmoid"),
                           CosPGD(sw, 0.05, steps=2, loss=loss, output="sigmoid")):
                x_adv = attack(x, mask)
                assert (x_adv - x).abs().max() <= 0.05 + 1e-12
                with torch.no_grad():
                    before = SegmentationLoss(loss, "sigmoid")(net(x), mask)
                    after = SegmentationLoss(loss, "sigmoid")(net(x_adv), mask)
                assert after > before, (aggregation, loss, type(attack).__name__)
        # a masked loss stops pulling on flipped voxels: judge it by the per-channel Dice it returns
        dice = lambda logits, t: case_dice(logits, t, output="sigmoid")  # noqa: E731
        x_adv = APGD(sw, 0.1, steps=4, loss="masked_ce", output="sigmoid", metric=dice)(x, mask)
        with torch.no_grad():
            assert dice(net(x_adv), mask).mean() < dice(net(x), mask).mean() - 0.05, aggregation


# -------------------------------------------------------------------------------- issue #16: x and y
def test_x_outside_clip_is_refused_or_clipped_when_asked():
    model = tanh_cnn()
    x, y = batch()
    z = x * 4 - 2  # z-scored-like input in [-2, 2]
    with pytest.raises(ValueError, match=r"^x: .*outside clip=\(0, 1\).*clip_input=True"):
        FGSM(model, 0.01, clip=(0, 1))(z, y)
    x_adv = FGSM(model, 0.01, clip=(0, 1), clip_input=True)(z, y)
    assert (x_adv - z.clamp(0, 1)).abs().max() <= 0.01 + 1e-12 and x_adv.min() >= 0 and x_adv.max() <= 1
    with pytest.raises(ValueError, match=r"^x: "):
        APGD(model, 0.01, steps=2, clip=(0, 1))(z, y)


@pytest.mark.parametrize(
    "classes, output, make_y",
    [
        (2, "auto", lambda y: torch.full_like(y, 7)),
        (1, "auto", lambda y: torch.full_like(y, 3)),
        (3, "sigmoid", lambda y: torch.zeros(y.shape[0], 2, *y.shape[2:], dtype=torch.long)),
        (3, "sigmoid", lambda y: torch.full((y.shape[0], 3, *y.shape[2:]), 2, dtype=torch.long)),
    ],
)
def test_labels_outside_the_networks_classes_are_refused(classes, output, make_y):
    model = tanh_cnn(classes=classes)
    x, y = batch()
    for attack in (FGSM(model, 0.01, output=output), APGD(model, 0.01, steps=2, output=output), WorstCase(model, 0.01, output=output)):
        with pytest.raises(ValueError, match=r"^y: "):
            attack(x, make_y(y))


# ------------------------------------------------------------------------------------------- WorstCase
def test_worst_case_keeps_per_case_the_minimum_over_its_members():
    model = tanh_cnn(classes=3)
    x, y = batch(b=4)
    members = [("FGSM", {}), ("PGD", {"steps": 3, "alpha": 0.02}), ("SegPGD", {"steps": 3}), ("APGD", {"steps": 4, "loss": "js"})]
    attack = WorstCase(model, 0.1, clip=(0, 1), attacks=members, stop_dice=None, seed=3)
    x_adv, records = attack.run(x, y)
    dice = records["dice"].numpy()
    assert dice.shape == (4, 4) and not np.isnan(dice).any()
    # oracle: rebuild every member alone and take the per-case minimum by brute force
    singles = []
    for k, (name, kw) in enumerate(members):
        extra = {"generator": torch.Generator().manual_seed(3 + k)} if name == "PGD" else {}
        if name in ("SegPGD", "APGD"):
            extra["metric"] = case_dice
        x_k = ATTACKS[name](model, eps=0.1, clip=(0, 1), **kw, **extra)(x, y)
        with torch.no_grad():
            singles.append(case_dice(model(x_k), y).numpy())
    np.testing.assert_allclose(dice, np.stack(singles, 1), atol=1e-12)
    with torch.no_grad():
        final = case_dice(model(x_adv), y).numpy()
    np.testing.assert_allclose(final, dice.min(1), atol=1e-12)
    np.testing.assert_array_equal(records["chosen"].numpy(), dice.argmin(1))
    # deterministic given the seed
    again = WorstCase(model, 0.1, clip=(0, 1), attacks=members, stop_dice=None, seed=3)(x, y)
    assert torch.equal(again, x_adv)


def test_case_dice_hand_computed():
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 1, 0, :2] = 1  # predicted 1 1 0 0
    y = torch.tensor([[[[1, 0, 2, 0]]]])
    # class 1: 2·1/(2+1) = 2/3; class 2: 0/(0+1) = 0; mean 1/3; region {1, 2}: 2·1/(2+2) = 1/2
    assert case_dice(logits, y).item() == pytest.approx(1 / 3)
    assert case_dice(logits, y, classes=2).item() == 0.0
    assert case_dice(logits, y, classes=[1, 2]).item() == pytest.approx(0.5)
    # several regions: their mean — {1, 2} 1/2 and {2} 0 → 1/4 (BraTS WT / TC / ET are given this way)
    assert case_dice(logits, y, classes=[[1, 2], [2]]).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="^classes"):
        case_dice(logits[:, :1], y.clamp(max=1), classes=[[0]])


def test_case_dice_over_regions_equals_the_reported_region_metric():
    # the worst case must choose by what a study reports: mean region Dice of common.metrics
    from common.metrics import segmentation_scores

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, 6, 6, generator=g)
    y = torch.randint(0, 4, (3, 1, 6, 6, 6), generator=g)
    regions = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    scores = segmentation_scores(logits.argmax(1, keepdim=True), y, 4, regions=regions)
    expected = torch.stack([scores[f"dice_{k}"] for k in regions], 1).mean(1)
    np.testing.assert_allclose(case_dice(logits, y, classes=list(regions.values())).numpy(), expected.numpy(), rtol=1e-12)


def test_worst_case_bad_members_are_refused_before_running():
    model = tanh_cnn()
    with pytest.raises(ValueError, match="^attacks"):
        WorstCase(model, 0.1, attacks=[("NoSuchAttack", {})])
    with pytest.raises(ValueError, match="^attacks"):
        WorstCase(model, 0.1, attacks=[("APGD", {"eps": 0.2})])
    with pytest.raises(ValueError, match="^attacks"):
        WorstCase(model, 0.1, attacks=[("APGD", {"stepz": 3})])


# --------------------------------------------------------------- behaviour on a briefly trained tiny UNet
def phantoms(seeds, size=32):
    from common.data.synthetic import chest_xray_phantom

    images, labels = zip(*(chest_xray_phantom((size, size), seed=s) for s in seeds))
    x = torch.from_numpy(np.stack(images))
    y = torch.from_numpy(np.isin(np.stack(labels), (1, 2)).astype(np.int64))[:, None]  # lungs vs rest
    return x, y


@pytest.fixture(scope="module")
def trained_unet():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    x, y = phantoms(range(16))
    model = UNet(2, 1, 2, (8, 16, 32), (2, 2), num_res_units=1)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(25):
        for i in range(0, 16, 8):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 8]), y[i : i + 8, 0]).backward()
            opt.step()
    model.eval()
    xt, yt = phantoms(range(500, 506))
    with torch.no_grad():
        assert case_dice(model(xt), yt).mean() > 0.85, "the tiny UNet did not learn the lungs"
    return model, xt, yt


def test_default_worst_case_is_at_least_as_strong_as_the_best_ifgsm(trained_unet):
    model, x, y = trained_unet
    eps = 8 / 255
    with torch.no_grad():
        wc = case_dice(model(worst_case_attack(model, x, y, eps=eps, clip=(0, 1))), y).mean()
        best_ifgsm = min(
            case_dice(model(IFGSM(model, eps, eps / 10, 10, loss=loss, clip=(0, 1))(x, y)), y).mean() for loss in ("ce", "dice")
        )
        clean = case_dice(model(x), y).mean()
    assert wc <= best_ifgsm < clean


def test_bundle_configs_select_the_worst_case_by_name():
    from monai.bundle import ConfigParser

    config = {
        "imports": ["$import common", "$import common.attacks", "$import torch"],
        "model": "$torch.nn.Conv2d(1, 2, 1)",
        "attack": {
            "attack_names": None,
            "worst_case": {"_target_": "common.attacks.WorstCase", "_mode_": "callable", "forward": "@model", "clip": [0, 1]},
            "attacks": {"fgsm": {"_target_": "common.attacks.FGSM", "_mode_": "callable", "forward": "@model", "clip": [0, 1]}},
            "selected": "$common.attacks.select_attacks(@attack#attacks, @attack#attack_names, worst_case=@attack#worst_case)",
        },
    }
    for names, expected in ((None, ["fgsm"]), (["worst_case", "fgsm"], ["worst_case", "fgsm"])):
        parser = ConfigParser(config)
        parser["attack"]["attack_names"] = names
        parser.get_parsed_content("imports")
        selected = parser.get_parsed_content("attack#selected")
        assert list(selected) == expected
    assert isinstance(selected["worst_case"](eps=0.1), WorstCase)
    with pytest.raises(ValueError, match="^attack_names: unknown"):
        from common.attacks import select_attacks

        select_attacks({"fgsm": None}, ["apgd"])


@pytest.mark.parametrize("aggregation", ["exact", "window_mean"])
def test_new_attacks_through_per_case_normalisation_and_windows(aggregation):
    """The ResDSN pipeline shape: window-scaled CT → per-case z-normalisation → sliding windows."""
    from common.networks.normalise import PerCaseZNorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 2, 1)).eval()
    forward = PerCaseZNorm(SlidingWindowForward(net, roi_size=6, overlap=0.5, sw_batch_size=4, aggregation=aggregation))
    x = torch.rand(1, 1, 10, 10, 10)
    y = (torch.rand(1, 1, 10, 10, 10) > 0.7).long()
    for attack in (APGD(forward, 0.05, steps=3, loss="js", clip=(0, 1)), SegPGD(forward, 0.05, steps=2, clip=(0, 1)),
                   WorstCase(forward, 0.05, clip=(0, 1), attacks=[("CosPGD", {"steps": 2}), ("APGD", {"steps": 2})])):
        x_adv = attack(x, y)
        assert (x_adv - x).abs().max() <= 0.05 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        with torch.no_grad():
            assert case_dice(forward(x_adv), y) <= case_dice(forward(x), y), type(attack).__name__


def test_output_read_from_the_bundles_postprocessing():
    from monai.transforms import Activationsd, AsDiscreted, Compose

    from common.attacks import output_from_postprocessing

    sigmoid = Compose([Activationsd(keys="pred", sigmoid=True), AsDiscreted(keys="pred", threshold=0.5)])
    assert output_from_postprocessing(sigmoid) == "sigmoid"
    assert output_from_postprocessing([Activationsd(keys="pred", softmax=True)]) == "softmax"
    config = {"_target_": "Compose", "transforms": [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}]}
    assert output_from_postprocessing(config) == "sigmoid"
    assert output_from_postprocessing([AsDiscreted(keys="pred", argmax=True)]) == "auto"
