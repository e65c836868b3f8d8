"""Attacks against independent oracles (closed forms, the papers' update equations) and their invariants."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn as nn

from common.attacks import (
    FGSM,
    IFGSM,
    PGD,
    InvFGSM,
    KurakinIFGSM,
    constant_target,
    eps_from_pixel_scale,
    inverted_target,
    kurakin_steps,
)
from common.losses import cross_entropy, resolve_loss


def linear_model(spatial_dims: int, in_channels: int = 2, classes: int = 3, seed: int = 0) -> nn.Module:
    """A 1×1 convolution: logits_v = W x_v + b, whose CE gradient has a closed form."""
    torch.manual_seed(seed)
    conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(in_channels, classes, 1)
    return conv.double()


def ce_gradient_closed_form(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """∇_x mean-CE for logits z_v = W x_v + b: (1/V) Wᵀ (softmax(z_v) − onehot(y_v)), V = B·voxels."""
    w = model.weight.detach().numpy().reshape(model.out_channels, model.in_channels)
    b = model.bias.detach().numpy()
    xn = np.moveaxis(x.numpy(), 1, -1)  # (B, *sp, C)
    z = xn @ w.T + b
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(model.out_channels)[y.numpy()[:, 0]]
    g = (p - onehot) @ w / onehot[..., 0].size
    return np.moveaxis(g, -1, 1)


def make_batch(spatial_dims: int, batch: int = 2, channels: int = 2, size: int = 6, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels) + (size,) * spatial_dims
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch, 1) + (size,) * spatial_dims, generator=g)
    return x, y


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fgsm_equals_closed_form_on_linear_model(spatial_dims):
    model = linear_model(spatial_dims)
    x, y = make_batch(spatial_dims)
    eps = 0.03
    x_adv = FGSM(model, eps=eps, loss="ce")(x, y)
    expected = x.numpy() + eps * np.sign(ce_gradient_closed_form(model, x, y))
    np.testing.assert_allclose(x_adv.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("targeted", [False, True])
def test_ifgsm_follows_update_equation_step_by_step(targeted):
    """Liu et al., J. Digit. Imaging 2021, Eq. 2 (untargeted, +) and Eq. 3 (targeted, −), projected onto the
    ε-ball and the clip range."""
    model = linear_model(2)
    x, y = make_batch(2)
    eps, alpha, steps, clip = 0.05, 0.02, 4, (0.0, 1.0)
    x_adv = IFGSM(model, eps=eps, alpha=alpha, steps=steps, targeted=targeted, clip=clip)(x, y)
    sign = -1.0 if targeted else 1.0
    ref = x.clone()
    for _ in range(steps):
        ref = ref + sign * alpha * torch.from_numpy(np.sign(ce_gradient_closed_form(model, ref, y)))
        ref = torch.clamp(torch.min(torch.max(ref, x - eps), x + eps), *clip)
    np.testing.assert_allclose(x_adv.numpy(), ref.numpy(), atol=1e-12)


def test_pgd_random_start_then_ifgsm_steps():
    model = linear_model(2)
    x, y = make_batch(2)
    eps, alpha, steps = 0.05, 0.01, 3
    x_adv = PGD(model, eps=eps, alpha=alpha, steps=steps, generator=torch.Generator().manual_seed(7))(x, y)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    ref = x + (2 * noise - 1) * eps
    for _ in range(steps):
        ref = ref + alpha * torch.from_numpy(np.sign(ce_gradient_closed_form(model, ref, y)))
        ref = torch.min(torch.max(ref, x - eps), x + eps)
    np.testing.assert_allclose(x_adv.numpy(), ref.numpy(), atol=1e-12)
    assert not torch.equal(x_adv, IFGSM(model, eps, alpha, steps)(x, y)), "the random start must matter"


def test_invfgsm_is_one_step_down_the_loss():
    model = linear_model(3)
    x, y = make_batch(3)
    x_inv = InvFGSM(model, eps=0.02)(x, y)
    expected = x.numpy() - 0.02 * np.sign(ce_gradient_closed_form(model, x, y))
    np.testing.assert_allclose(x_inv.numpy(), expected, atol=1e-12)
    with torch.no_grad():
        clean, up, down = (cross_entropy(model(v), y) for v in (x, FGSM(model, 0.02)(x, y), x_inv))
    assert down < clean < up


def small_cnn(spatial_dims: int, channels: int = 2, classes: int = 3) -> nn.Module:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    torch.manual_seed(3)
    return nn.Sequential(conv(channels, 8, 3, padding=1), bn(8), nn.Dropout(0.2), nn.ReLU(), conv(8, classes, 3, padding=1))


def all_attacks(forward, eps=0.04):
    clip = (0.0, 1.0)
    return {
        "fgsm": FGSM(forward, eps, loss="ce", clip=clip),
        "fgsm_dice": FGSM(forward, eps, loss="dice", clip=clip),
        "ifgsm_dicece": IFGSM(forward, eps, alpha=0.01, steps=5, loss="dicece", clip=clip),
        "pgd": PGD(forward, eps, alpha=0.01, steps=5, clip=clip, generator=torch.Generator().manual_seed(0)),
        "invfgsm": InvFGSM(forward, eps, clip=clip),
        "targeted_ifgsm": IFGSM(forward, eps, 0.01, 5, targeted=True, clip=clip, target_fn=inverted_target),
        "kurakin": KurakinIFGSM(forward, eps, targeted=True, clip=clip, target_fn=inverted_target),
        "callable_loss": FGSM(forward, eps, loss=lambda logits, y: logits[:, 1].mean(), clip=clip),
    }


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("train_mode", [False, True])
def test_invariants_for_every_attack(spatial_dims, train_mode):
    model = small_cnn(spatial_dims).float()
    model.train(train_mode)
    x, y = make_batch(spatial_dims, size=8)
    x, eps = x.float(), 0.04
    # one parameter carries a pre-existing gradient, the others none: both must survive untouched
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    for name, attack in all_attacks(model, eps).items():
        x_adv = attack(x, y)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype, name
        assert not x_adv.requires_grad and x_adv.grad_fn is None, name
        assert (x_adv - x).abs().max() <= eps + 1e-6, name
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0, name
        assert model.training == train_mode, name
        for k, v in model.named_parameters():
            assert torch.equal(v, params[k]), (name, k)
        assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 0.5)), name
        assert all(p.grad is None for p in list(model.parameters())[1:]), name
        assert (x_adv - x).abs().max() > 0, f"{name} did not move the input"


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("loss", ["ce", "dice", "dicece"])
def test_targeted_attacks_lower_the_loss_to_the_target(spatial_dims, loss):
    model = small_cnn(spatial_dims).eval()
    x, y = make_batch(spatial_dims, size=8)
    x = x.float()
    target = functools.partial(constant_target, label=1)(y)
    loss_fn = resolve_loss(loss)
    for attack in (
        FGSM(model, 0.1, loss=loss, targeted=True),
        IFGSM(model, 0.1, alpha=0.02, steps=8, loss=loss, targeted=True),
        PGD(model, 0.1, alpha=0.02, steps=8, loss=loss, targeted=True, generator=torch.Generator().manual_seed(0)),
    ):
        with torch.no_grad():
            assert loss_fn(model(attack(x, target)), target) < loss_fn(model(x), target), repr(attack)


def test_untargeted_ifgsm_raises_the_loss_more_with_more_steps():
    model = small_cnn(2).eval()
    x, y = make_batch(2, size=8)
    x = x.float()
    with torch.no_grad():
        losses = [cross_entropy(model(IFGSM(model, 0.05, 0.05 / n, n)(x, y)), y) for n in (1, 10)]
        clean = cross_entropy(model(x), y)
    assert clean < losses[0] <= losses[1] + 1e-6


def test_deep_supervision_list_uses_the_main_head():
    model = linear_model(2)
    x, y = make_batch(2)
    heads = lambda v: [model(v), torch.zeros_like(model(v))]  # noqa: E731
    np.testing.assert_array_equal(FGSM(heads, 0.03)(x, y).numpy(), FGSM(model, 0.03)(x, y).numpy())


def test_per_sample_eps():
    model = linear_model(2)
    x, y = make_batch(2)
    eps = torch.tensor([0.01, 0.05])
    delta = FGSM(model, eps)(x, y) - x
    assert torch.allclose(delta[0].abs().max(), torch.tensor(0.01, dtype=x.dtype))
    assert torch.allclose(delta[1].abs().max(), torch.tensor(0.05, dtype=x.dtype))


def test_single_channel_sigmoid_output():
    torch.manual_seed(0)
    model = nn.Conv2d(1, 1, 3, padding=1)
    x = torch.rand(2, 1, 8, 8)
    y = (x > 0.5).long()
    for loss in ("ce", "dice", "dicece"):
        x_adv = IFGSM(model, 0.05, 0.01, 5, loss=loss)(x, y)
        with torch.no_grad():
            assert resolve_loss(loss)(model(x_adv), y) > resolve_loss(loss)(model(x), y), loss


@pytest.mark.parametrize(
    "build, call, argument",
    [
        (lambda m: FGSM(m, 0.1), lambda a, x, y: a(x, y[:, :, :-1]), "y"),
        (lambda m: FGSM(m, 0.1), lambda a, x, y: a(x.masked_fill(x > 0.9, float("nan")), y), "x"),
        (lambda m: FGSM(m, 0.1), lambda a, x, y: a(x.masked_fill(x > 0.9, float("inf")), y), "x"),
        (lambda m: FGSM(m, 0.1), lambda a, x, y: a(x, y.float() + 0.5), "y"),
        (lambda m: FGSM(m, 0.1), lambda a, x, y: a(x[0], y[0]), "x"),
        (lambda m: FGSM(m, -0.1), None, "eps"),
        (lambda m: FGSM(m, float("nan")), None, "eps"),
        (lambda m: IFGSM(m, 0.1, 0.01, 0), None, "steps"),
        (lambda m: IFGSM(m, 0.1, 0.01, 2.5), None, "steps"),
        (lambda m: IFGSM(m, 0.1, -0.01, 2), None, "alpha"),
        (lambda m: FGSM(m, 0.1, loss="hinge"), None, "loss"),
        (lambda m: FGSM(m, 0.1, clip=(1.0, 0.0)), None, "clip"),
        (lambda m: FGSM("not a model", 0.1), None, "forward"),
        (lambda m: FGSM(m, 0.1, target_fn=inverted_target), None, "target_fn"),
        (lambda m: FGSM(m, 0.1, targeted=True, target_fn=lambda y: y[..., :-1]), lambda a, x, y: a(x, y), "target_fn"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(build, call, argument):
    model = linear_model(2)
    x, y = make_batch(2)
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        attack = build(model)
        call(attack, x, y)


def test_kurakin_schedule_gives_the_papers_iteration_counts():
    # NLCEN (He et al., AAAI 2019): α = 1 on the 0–255 scale, iterations min(ε + 4, ⌈1.25 ε⌉)
    expected = {0.5: 1, 1: 2, 2: 3, 4: 5, 6: 8, 8: 10, 10: 13, 12: 15, 16: 20, 20: 24, 24: 28, 32: 36}
    assert {e: kurakin_steps(e) for e in expected} == expected


def test_unit_helpers():
    assert eps_from_pixel_scale(2, (0.0, 1.0)) == pytest.approx(2 / 255)
    assert eps_from_pixel_scale(2, (-1.0, 1.0)) == pytest.approx(4 / 255)
    assert eps_from_pixel_scale(2, (0.0, 255.0)) == pytest.approx(2.0)


def test_target_fn_maps_true_labels_to_targets():
    model = linear_model(2)
    x, y = make_batch(2)
    target = functools.partial(constant_target, label=1)
    with_fn = IFGSM(model, 0.05, steps=4, targeted=True, target_fn=target)(x, y)
    explicit = IFGSM(model, 0.05, steps=4, targeted=True)(x, target(y))
    torch.testing.assert_close(with_fn, explicit)


def test_default_alpha_is_eps_over_steps_and_kurakin_schedule():
    model = linear_model(2)
    x, y = make_batch(2)
    assert IFGSM(model, 0.05, steps=10).alpha == pytest.approx(0.005)
    k = KurakinIFGSM(model, eps_from_pixel_scale(8), input_range=(0.0, 1.0))
    assert k.steps == 10 and k.alpha == pytest.approx(1 / 255)
    k = KurakinIFGSM(model, eps_from_pixel_scale(0.5, (-1, 1)), input_range=(-1.0, 1.0))
    assert k.steps == 1 and k.alpha == pytest.approx(2 / 255)
    delta = k(x, y) - x
    assert delta.abs().max() <= eps_from_pixel_scale(0.5, (-1, 1)) + 1e-12


def test_inverted_and_constant_targets():
    y = torch.tensor([[[0, 1, 2, 0]]])
    assert inverted_target(y).tolist() == [[[1, 0, 0, 1]]]
    assert constant_target(y, 1).tolist() == [[[1, 1, 1, 1]]]
