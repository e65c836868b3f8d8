"""Gradient-masking diagnostics (common.masking_diagnostics) against independent oracles: the float32
saturation thresholds derived by hand (softmax probability 1.0 ⇔ margin ≥ 24 ln 2; exp underflow to 0 ⇔
margin > 150 ln 2), the margin loss in float64, and briefly trained tiny UNets on chest phantoms — a plain
one, the same one with logits × 1e4, and a defensively distilled one (Papernot et al., IEEE S&P 2016)
trained with the project's temperature soft Dice and deployed at T = 1."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.attacks import APGD, case_dice
from common.losses import DistillationDiceLoss, SegmentationLoss, SoftDiceLoss
from common.masking_diagnostics import CHECKS, gradient_health, masking_diagnostics

SATURATE = 24 * math.log(2)  # float32: 1 + e^-m rounds to 1 once e^-m ≤ 2^-24
UNDERFLOW = 150 * math.log(2)  # float32: e^-m rounds to 0 once e^-m < 2^-150
GRID = [2 / 255, 8 / 255]


def phantoms(seeds, size=32):
    from common.data.synthetic import chest_xray_phantom

    images, labels = zip(*(chest_xray_phantom((size, size), seed=s) for s in seeds))
    x = torch.from_numpy(np.stack(images))
    y = torch.from_numpy(np.isin(np.stack(labels), (1, 2)).astype(np.int64))[:, None]  # lungs vs rest
    return x, y


def tiny_unet():
    from monai.networks.nets import UNet

    return UNet(2, 1, 2, (8, 16, 32), (2, 2), num_res_units=1)


def fit(net, x, y, objective, epochs, lr, seed):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr)
    for _ in range(epochs):
        for i in range(0, len(x), 8):
            opt.zero_grad()
            objective(net, x[i : i + 8], y[i : i + 8]).backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def data():
    return phantoms(range(16)), phantoms(range(500, 506))


@pytest.fixture(scope="module")
def plain_unet(data):
    (x, y), (xt, yt) = data
    torch.manual_seed(0)
    model = fit(tiny_unet(), x, y, lambda n, a, b: F.cross_entropy(n(a), b[:, 0]), 25, 3e-3, 0)
    with torch.no_grad():
        assert case_dice(model(xt), yt).mean() > 0.85, "the tiny UNet did not learn the lungs"
    return model


def float64_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y − max_{k≠y} z_k per pixel, in float64 (two classes)."""
    z = logits.double()
    return torch.where(y[:, 0] == 1, z[:, 1] - z[:, 0], z[:, 0] - z[:, 1])


# ------------------------------------------------------------------------------------------ oracles
def test_margin_loss_equals_float64_and_is_invariant_to_logit_scale():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (2, 1, 5, 4), generator=g)
    zn, yn = z.numpy(), y[:, 0].numpy()
    expected = []
    for b in range(2):
        terms = []
        for i in range(5):
            for j in range(4):
                c = yn[b, i, j]
                m = zn[b, c, i, j] - max(zn[b, k, i, j] for k in range(3) if k != c)
                terms.append(-m if m > 0 else 0.0)
        expected.append(np.mean(terms))
    loss = SegmentationLoss("margin")
    np.testing.assert_allclose(loss.per_image(z, y).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(loss.per_image(1e4 * z, y).numpy(), 1e4 * np.array(expected), rtol=1e-12)
    t = torch.randint(0, 2, (2, 1, 5, 4), generator=g)  # one sigmoid channel: margin (2t − 1) z
    zs = z[:, :1]
    m = (2 * t - 1) * zs
    expected_sigmoid = (-m * (m > 0)).flatten(1).mean(1).numpy()
    np.testing.assert_allclose(loss.per_image(zs, t).numpy(), expected_sigmoid, rtol=1e-12)
    w = torch.rand(2, 5, 4, generator=g, dtype=torch.float64)  # per-pixel weights (SegPGD, CosPGD) scale each term
    expected_weighted = [np.mean([w[b].numpy().ravel()[k] * v for k, v in enumerate(per_pixel)])
                         for b, per_pixel in enumerate((-torch.clamp_min(loss.margin(z, y), 0)).flatten(1).numpy())]
    np.testing.assert_allclose(loss.per_image(z, y, w).numpy(), expected_weighted, rtol=1e-12)


def test_gradient_health_counts_equal_the_float32_thresholds():
    # two classes, logits [m, 0] on a 1 × 40 strip: margins on both sides of 24 ln 2 and 150 ln 2
    margins = torch.tensor([0.5, 5.0, 15.0, 16.0, 17.5, 20.0, 60.0, 100.0, 110.0, 200.0] * 4)
    x = margins.view(1, 1, 1, 40)
    y = torch.zeros(1, 1, 1, 40, dtype=torch.long)
    forward = lambda v: torch.cat([v, torch.zeros_like(v)], 1)  # noqa: E731
    h = gradient_health(forward, x, y)
    assert h["saturated_fraction"] == pytest.approx(float((margins > SATURATE).double().mean()))  # 0.6
    underflow = float((margins > UNDERFLOW).double().mean())  # 0.2
    assert h["zero_logit_gradient_fraction"] == pytest.approx(underflow)
    assert h["median_margin"] == pytest.approx(float(margins.double().median()))
    assert h["zero_input_gradient_cases"] == 0.0  # the unsaturated pixels keep the case's gradient alive
    # every pixel beyond the underflow margin: that case's input gradient is exactly zero
    x2 = torch.cat([x, torch.full_like(x, 150.0)])
    assert gradient_health(forward, x2, torch.cat([y, y]))["zero_input_gradient_cases"] == 0.5
    # check (f) flags a case the attack cannot move even when few pixels are saturated overall
    x3 = torch.cat([torch.full((7, 1, 1, 40), 0.5), torch.full((1, 1, 1, 40), 150.0)])
    report = masking_diagnostics(forward, x3, torch.zeros_like(x3, dtype=torch.long), [1.0], clip=None,
                                 large_eps=1.0, steps=2, losses=("ce",))
    health = report["checks"]["gradient_health"]
    assert health["saturated_fraction"] == 0.125 and health["zero_input_gradient_cases"] == 0.125
    assert health["passed"] is False and "cannot move" in health["reason"]


def test_js_loss_gradient_is_finite_where_the_softmax_saturates():
    z = torch.tensor([[[[120.0]], [[0.0]]], [[[-120.0]], [[0.0]]]], requires_grad=True)
    y = torch.zeros(2, 1, 1, 1, dtype=torch.long)
    loss = SegmentationLoss("js").per_image(z, y)
    (g,) = torch.autograd.grad(loss.sum(), [z])
    assert loss.tolist() == pytest.approx([0.0, math.log(2)])  # JS of a right / a wrong certain pixel
    assert torch.equal(g, torch.zeros_like(g))  # was NaN: 0 · log 0 in the backward pass


def test_bad_arguments_are_refused_before_any_attack(plain_unet, data):
    _, (xt, yt) = data
    with pytest.raises(ValueError, match="losses"):
        masking_diagnostics(plain_unet, xt, yt, GRID, losses=("hinge",))
    with pytest.raises(ValueError, match="temperature"):
        masking_diagnostics(plain_unet, xt, yt, GRID, temperature=0)
    with pytest.raises(ValueError, match="eps_values"):
        masking_diagnostics(plain_unet, xt, yt, [])
    with pytest.raises(ValueError, match="saturation_threshold"):
        masking_diagnostics(plain_unet, xt, yt, GRID, saturation_threshold=2)


# ------------------------------------------------------------------------------------------ behaviour
def test_passes_a_plain_unet_and_flags_its_logits_times_1e4(plain_unet, data):
    _, (xt, yt) = data
    plain = masking_diagnostics(plain_unet, xt, yt, GRID, steps=10)
    assert set(plain["checks"]) == set(CHECKS)
    assert not plain["flagged"], plain["checks"]
    assert plain["checks"]["transfer_weaker"]["passed"] is None  # not saturated: no rescaled surrogate needed
    assert all(isinstance(c["reason"], str) and c["reason"] for c in plain["checks"].values())

    scaled = lambda v: 1e4 * plain_unet(v)  # noqa: E731
    masked = masking_diagnostics(scaled, xt, yt, GRID, steps=10)  # no temperature: rescaled automatically
    with torch.no_grad():
        saturated = float((float64_margin(scaled(xt), yt) > SATURATE).double().mean())
    assert saturated > 0.5
    assert masked["checks"]["gradient_health"]["passed"] is False
    assert masked["checks"]["gradient_health"]["saturated_fraction"] == pytest.approx(saturated, abs=0.01)
    assert masked["checks"]["transfer_weaker"]["passed"] is False
    assert masked["checks"]["transfer_weaker"]["failed_losses"] == ["ce"]
    assert masked["flagged"]
    # independent oracle: APGD-CE on the unscaled network (the same decisions) beats APGD-CE on × 1e4
    with torch.no_grad():
        dice = lambda x_adv: float(case_dice(plain_unet(x_adv), yt).mean())  # noqa: E731
    quick = lambda f: APGD(f, 8 / 255, steps=10, loss="ce", clip=(0, 1), metric=case_dice)  # noqa: E731
    assert dice(quick(plain_unet)(xt, yt)) < dice(quick(scaled)(xt, yt)) - 0.01
    json.dumps(plain), json.dumps(masked)  # plain JSON-able dicts


def test_rescaled_js_is_js_of_the_logits_at_median_margin_4():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) * 7
    y = torch.randint(0, 3, (2, 1, 5, 4), generator=g)
    zn, yn = z.numpy(), y[:, 0].numpy()
    expected = []
    for b in range(2):  # numpy oracle: |margin| per pixel, lower median (20 pixels: the 10th smallest), rescale
        margins = [abs(zn[b, c, i, j] - max(zn[b, k, i, j] for k in range(3) if k != c))
                   for i in range(5) for j in range(4) for c in [yn[b, i, j]]]
        factor = 4.0 / np.sort(margins)[(len(margins) - 1) // 2]
        expected.append(float(SegmentationLoss("js").per_image(z[b : b + 1] * factor, y[b : b + 1])))
    loss = SegmentationLoss("rescaled_js")
    np.testing.assert_allclose(loss.per_image(z, y).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(loss.per_image(1e6 * z, y).numpy(), expected, rtol=1e-9)
    rescaled = loss.rescaled(1e6 * z, y)
    assert float(loss.margin(rescaled, y).abs().flatten(1).median(1).values.max()) == pytest.approx(4.0)
    # sigmoid channels: margin (2t − 1) z over channels and pixels; any probability loss can be rescaled
    t = torch.randint(0, 2, (2, 3, 5, 4), generator=g)
    zs = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) * 50
    for b in range(2):
        spread = np.sort(np.abs(((2 * t[b] - 1) * zs[b]).numpy()).ravel())[(60 - 1) // 2]
        want = SegmentationLoss("dice", "sigmoid").per_image(zs[b : b + 1] * 4.0 / spread, t[b : b + 1])
        got = SegmentationLoss("rescaled_dice", "sigmoid").per_image(zs[b : b + 1], t[b : b + 1])
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)


def test_apgd_on_scale_invariant_losses_is_the_same_attack_at_any_logit_scale():
    # oracle: scaling the logits by a power of two is exact in floating point, so the margin loss, its gradient
    # and every loss comparison APGD makes scale exactly — the adversarial input must be identical
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 3, 3, padding=1)).double()
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1, keepdim=True)
    y[:, :, :4] = 2  # some pixels wrong from the start: the mask must handle both
    for loss in ("margin", "rescaled_js", "rescaled_dice"):
        attack = lambda f: APGD(f, 0.05, steps=12, loss=loss, clip=(0, 1), metric=case_dice)  # noqa: E731
        reference = attack(net)(x, y)
        assert (reference - x).abs().max() > 0, loss
        for scale in (2.0**-6, 2.0**10, 2.0**40):
            assert torch.equal(attack(lambda v, s=scale: s * net(v))(x, y), reference), (loss, scale)
    assert not torch.equal(APGD(lambda v: 2.0**10 * net(v), 0.05, steps=12, loss="js", clip=(0, 1))(x, y),
                           APGD(net, 0.05, steps=12, loss="js", clip=(0, 1))(x, y))  # JS itself is not invariant


def test_default_worst_case_is_not_fooled_by_saturated_logits(plain_unet, data):
    # behaviour on a trained tiny UNet: logits × 1e4 saturate float32's softmax (the distillation mechanism,
    # Carlini & Wagner 2016). The default ensemble must report about the same robust Dice for both — the
    # probability losses alone (soft Dice, JS: the ensemble before the rescaled members) over-report × 1e4.
    from common.attacks import DEFAULT_ENSEMBLE, worst_case_attack

    _, (xt, yt) = data
    scaled = lambda v: 1e4 * plain_unet(v)  # noqa: E731
    eps = 8 / 255
    with torch.no_grad():
        dice = lambda x_adv: float(case_dice(plain_unet(x_adv), yt).mean())  # noqa: E731
    probability_members = [(n, kw) for n, kw in DEFAULT_ENSEMBLE if not kw["loss"].startswith("rescaled_")]
    assert 0 < len(probability_members) < len(DEFAULT_ENSEMBLE)
    plain = dice(worst_case_attack(plain_unet, xt, yt, eps=eps, clip=(0, 1)))
    saturated = dice(worst_case_attack(scaled, xt, yt, eps=eps, clip=(0, 1)))
    without_margin = dice(worst_case_attack(scaled, xt, yt, eps=eps, clip=(0, 1), attacks=probability_members))
    clean = dice(xt)
    assert plain < clean - 0.1  # the attack bites on the plain network
    assert without_margin > plain + 0.05  # the old ensemble over-reports on saturated logits
    assert saturated <= plain + 0.02  # the default does not


def test_distilled_unet_is_flagged_for_saturation_and_its_gradient_still_attacks(data):
    """Defensive distillation at T = 100 as the project trains it (teacher: soft Dice on softmax(z/T);
    student: the distillation soft Dice of Liu et al., J. Digit. Imaging 2021, Eq. 7, initialised from
    the teacher — from scratch the briefly trained student collapses to the all-lung prediction), deployed
    at T = 1. Most pixels saturate (the Papernot / Carlini & Wagner mechanism: flagged by check (f)),
    yet the pixels at the lung boundary stay unsaturated, so no case's input gradient is zero and the
    white-box attack is not beaten by the one on logits / T (check (e) passes)."""
    (x, y), (xt, yt) = data
    T = 100.0
    teacher_loss = SoftDiceLoss(include_background=False, temperature=T)
    teacher = fit(tiny_unet(), x, y, lambda n, a, b: teacher_loss(n(a), b), 60, 1e-2, 0)
    student_loss = DistillationDiceLoss(T)

    def distill(net, a, b):
        with torch.no_grad():
            z = teacher(a)
        return student_loss(net(a), z)

    student = fit(copy.deepcopy(teacher).train(), x, y, distill, 60, 1e-3, 1)
    with torch.no_grad():
        logits = student(xt)
    clean = float(case_dice(logits, yt).mean())
    assert clean > 0.7, "the distilled student did not learn the lungs"
    report = masking_diagnostics(student, xt, yt, GRID, steps=10, temperature=T)
    saturated = float((float64_margin(logits, yt) > SATURATE).double().mean())
    assert saturated > 0.5
    health = report["checks"]["gradient_health"]
    assert health["passed"] is False and health["saturated_fraction"] == pytest.approx(saturated, abs=0.01)
    assert report["flagged"]
    assert health["zero_input_gradient_cases"] == 0.0
    assert report["checks"]["large_eps"]["passed"] is True
    assert report["checks"]["transfer_weaker"]["passed"] is True  # logits / T is no stronger: not masked
    assert report["attack_dice"]["ce"][-1] < clean - 0.03  # the plain gradient attack still works
