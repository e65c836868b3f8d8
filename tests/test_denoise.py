"""Denoise-then-certify (common/denoise.py): σ ↔ t* mapping, DDPM inversion, training, UNet denoiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import DiffusionModelUNet, UNet
from monai.networks.schedulers import DDPMScheduler

from common.certify import ABSTAIN, certify
from common.denoise import (
    DiffusionDenoiser,
    UNetDenoiser,
    ddpm_skip_step,
    denoiser_training_loss,
    diffusion_training_loss,
    sigma_to_model_units,
    timestep_for_sigma,
    train_diffusion,
    train_unet_denoiser,
)



@pytest.fixture
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta")


def _oracle_levels() -> np.ndarray:
    """√((1 − ᾱ_t)/ᾱ_t) of the linear schedule β_t = linspace(1e-4, 0.02, 1000), in float64."""
    abar = np.cumprod(1.0 - np.linspace(1e-4, 2e-2, 1000))
    return np.sqrt((1.0 - abar) / abar)


class TrueNoiseModel:
    """Stand-in ε-model that knows the clean image x′ ∈ [−1, 1] and returns the exact noise of x_t."""

    def __init__(self, clean_model_units: torch.Tensor, scheduler: DDPMScheduler) -> None:
        self.clean, self.abar, self.calls = clean_model_units, scheduler.alphas_cumprod, []

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls.append((x_t.clone(), timesteps.clone()))
        a = self.abar[timesteps].view(-1, *([1] * (x_t.ndim - 1)))
        return (x_t - a.sqrt() * self.clean) / (1 - a).sqrt()


def _disks(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(count, 1, size, size) phantoms on [0, 1]: a bright disk (random centre, radius), dim background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.rand(count, 2, generator=g) * size * 0.5 + size * 0.25
    radius = torch.rand(count, generator=g) * size * 0.2 + size * 0.15
    dist = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    return (0.2 + 0.6 * (dist < radius[:, None, None]).float()).unsqueeze(1)


# ---- σ ↔ t* -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_model", [0.02, 0.1, 0.5, 1.0, 2.0, 10.0, 100.0])
def test_timestep_for_sigma_satisfies_the_variance_relation(scheduler, sigma_model):
    levels = _oracle_levels()
    t = timestep_for_sigma(scheduler, sigma_model)
    # Nearest level in the schedule: σ lies within half a step of level t* (paper: σ² = (1 − ᾱ_t*)/ᾱ_t*).
    lower = levels[max(t - 1, 0)]
    upper = levels[min(t + 1, 999)]
    slack = 1e-4 * levels[t]  # the scheduler's float32 ᾱ vs this float64 oracle
    assert (levels[t] + lower) / 2 - slack <= sigma_model <= (levels[t] + upper) / 2 + slack
    assert t == int(np.argmin(np.abs(levels - sigma_model))) or abs(levels[t] - sigma_model) < slack


def test_zero_one_data_doubles_sigma_and_picks_its_timestep(scheduler):
    assert sigma_to_model_units(0.25, (0.0, 1.0)) == pytest.approx(0.5)
    assert sigma_to_model_units(0.25, (-1.0, 1.0)) == pytest.approx(0.25)
    assert sigma_to_model_units(51.0, (0.0, 255.0)) == pytest.approx(0.4)
    seen = []

    def spy(x_t, timesteps):
        seen.append(int(timesteps[0]))
        return torch.zeros_like(x_t)

    x = torch.rand(2, 1, 8, 8)
    DiffusionDenoiser(spy, scheduler, data_range=(0.0, 1.0))(x, 0.25)
    DiffusionDenoiser(spy, scheduler, data_range=(-1.0, 1.0))(x, 0.5)
    assert seen[0] == seen[1] == timestep_for_sigma(scheduler, 0.5) != timestep_for_sigma(scheduler, 0.25)
    # The paper's σ ∈ {0.25, 0.5, 1.0} on [0, 1] images: √((1 − ᾱ)/ᾱ) at t* ≈ 2σ.
    for sigma in (0.25, 0.5, 1.0):
        t = DiffusionDenoiser(spy, scheduler).timestep(sigma)
        assert _oracle_levels()[t] == pytest.approx(2 * sigma, rel=0.01)


# ---- inversion ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("data_range", [(0.0, 1.0), (0.0, 255.0)])
def test_one_step_inversion_is_exact_with_the_true_noise(scheduler, data_range):
    lo, hi = data_range
    g = torch.Generator().manual_seed(0)
    x = lo + (hi - lo) * (0.1 + 0.8 * torch.rand(3, 1, 8, 8, generator=g))
    sigma = 0.5 * (hi - lo)
    noisy = x + sigma * torch.randn(x.shape, generator=g)
    model = TrueNoiseModel((x - lo) / (hi - lo) * 2 - 1, scheduler)
    x_hat = DiffusionDenoiser(model, scheduler, data_range=data_range)(noisy, sigma)
    torch.testing.assert_close(x_hat, x, atol=1e-5 * (hi - lo), rtol=0)
    (x_t, timesteps), = model.calls
    t = timestep_for_sigma(scheduler, 1.0)
    assert torch.all(timesteps == t)
    a = scheduler.alphas_cumprod[t]
    torch.testing.assert_close(x_t, a.sqrt() * ((noisy - lo) / (hi - lo) * 2 - 1))  # x_t* = √ᾱ(x + δ)


@pytest.mark.parametrize("steps, calls", [(None, None), (4, 4), (1, 1)])
def test_multistep_chain_recovers_x_with_the_true_noise(scheduler, steps, calls):
    g = torch.Generator().manual_seed(1)
    x = 0.1 + 0.8 * torch.rand(2, 1, 6, 6, generator=g)
    noisy = x + 0.05 * torch.randn(x.shape, generator=g)
    model = TrueNoiseModel(x * 2 - 1, scheduler)
    denoiser = DiffusionDenoiser(model, scheduler, multistep=True, num_inference_steps=steps,
                                 generator=torch.Generator().manual_seed(2))
    t_star = denoiser.timestep(0.05)
    torch.testing.assert_close(denoiser(noisy, 0.05), x, atol=1e-4, rtol=0)
    used = [int(ts[0]) for _, ts in model.calls]
    assert len(used) == (t_star + 1 if calls is None else calls) and used[0] == t_star
    assert used == sorted(used, reverse=True) and (calls == 1 or used[-1] == 0)


def test_skip_step_of_one_equals_monai_ddpm_step(scheduler):
    g = torch.Generator().manual_seed(3)
    x_t, eps = torch.randn(2, 1, 5, 5, generator=g), torch.randn(2, 1, 5, 5, generator=g)
    for t in (1, 40, 300):
        ours, ours_x0 = ddpm_skip_step(scheduler, eps, t, t - 1, x_t, torch.Generator().manual_seed(t))
        monai, monai_x0 = scheduler.step(eps, t, x_t, torch.Generator().manual_seed(t))
        torch.testing.assert_close(ours, monai, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_x0, monai_x0)


def test_skip_step_is_the_gaussian_posterior_q_xs_given_xt_x0(scheduler):
    g = torch.Generator().manual_seed(4)
    x0 = 0.8 * torch.rand(1, 1, 4, 4, generator=g) - 0.4
    t, s = 300, 120
    abar = scheduler.alphas_cumprod.double()
    a_t, a_s = abar[t], abar[s]
    x_t = (a_t.sqrt() * x0 + (1 - a_t).sqrt() * torch.randn(x0.shape, generator=g)).float()
    eps = ((x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()).float()  # the true noise, so x̂₀ = x0
    x_s, _ = ddpm_skip_step(scheduler, eps, t, s, x_t, torch.Generator().manual_seed(9))
    # Gaussian conditioning of (x_s, x_t) | x0 with x_t = √(ᾱ_t/ᾱ_s)·x_s + √(1 − ᾱ_t/ᾱ_s)·e.
    cov = (a_t / a_s).sqrt() * (1 - a_s)
    mean = a_s.sqrt() * x0 + cov / (1 - a_t) * (x_t.double() - a_t.sqrt() * x0)
    var = (1 - a_s) - cov**2 / (1 - a_t)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(x_s.double(), mean + var.sqrt() * z, atol=1e-5, rtol=1e-5)


# ---- networks and training --------------------------------------------------------------------------


def test_tiny_diffusion_unet_trains_and_denoises(scheduler):
    # MONAI's DiffusionModelUNet always builds attention blocks (mid block), which need einops, an optional
    # MONAI dependency: without it the network cannot be constructed, so this test fails loudly.
    import einops  # noqa: F401

    torch.manual_seed(0)
    model = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16),
                               attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)
    images = _disks(16)
    loader = [images[i:i + 8] for i in range(0, 16, 8)]

    def held_out_loss() -> float:
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)
            return float(diffusion_training_loss(model, scheduler, images, generator=g))

    before = held_out_loss()
    g = torch.Generator().manual_seed(0)
    losses = train_diffusion(model, scheduler, loader, epochs=12, lr=2e-3, generator=g)
    after = held_out_loss()
    assert len(losses) == 24 and all(np.isfinite(losses))
    assert after < 0.7 * before
    assert not model.training
    noisy = images[:2] + 0.25 * torch.randn(2, 1, 16, 16)
    x_hat = DiffusionDenoiser(model, scheduler)(noisy, 0.25)
    assert x_hat.shape == noisy.shape and bool(((x_hat >= 0) & (x_hat <= 1)).all())


def test_unet_denoiser_interface_loss_and_training():
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), strides=(2,), num_res_units=1)
    images = _disks(16, seed=1)
    g = torch.Generator().manual_seed(5)
    loss = denoiser_training_loss(net, images, 0.25, generator=g)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, torch.mean((net(images + 0.25 * noise) - images) ** 2))

    def held_out() -> float:
        with torch.no_grad():
            g = torch.Generator().manual_seed(8)
            return float(denoiser_training_loss(net, images, 0.25, generator=g))

    before = held_out()
    train_unet_denoiser(net, [images[:8], images[8:]], 0.25, epochs=15, lr=3e-3)
    assert held_out() < 0.5 * before
    denoiser = UNetDenoiser(net, sigma=0.25)
    out = denoiser(images[:3] + 0.25 * torch.randn(3, 1, 16, 16), 0.25)
    assert out.shape == (3, 1, 16, 16) and not out.requires_grad
    with pytest.raises(ValueError, match="^sigma"):
        denoiser(images[:3], 0.5)


def test_denoise_then_certify_certifies_what_plain_smoothing_cannot(scheduler):
    # Segmenter: class 1 where the input exceeds 0.5. Image: left half 0.3, right half 0.7; σ = 0.5.
    x = torch.full((1, 1, 4, 8), 0.3)
    x[..., 4:] = 0.7
    forward = lambda z: torch.cat([0.5 - z, z - 0.5], dim=1)  # noqa: E731
    plain = certify(forward, x, 0.5, n0=10, n=100, generator=torch.Generator().manual_seed(0))
    denoiser = DiffusionDenoiser(TrueNoiseModel(x * 2 - 1, scheduler), scheduler)
    smoothed = certify(forward, x, 0.5, n0=10, n=100, denoiser=denoiser,
                       generator=torch.Generator().manual_seed(0))
    assert torch.all(plain.labels == ABSTAIN)  # P(class) = Φ(0.4) ≈ 0.66 < τ everywhere
    assert torch.equal(smoothed.labels, (x[:, 0] > 0.5).long())


# ---- validation ---------------------------------------------------------------------------------------


def test_bad_sigma_and_configuration_raise(scheduler):
    denoiser = DiffusionDenoiser(lambda x, t: torch.zeros_like(x), scheduler)
    x = torch.rand(1, 1, 4, 4)
    for bad in (0.0, -0.1, float("nan"), float("inf"), 100.0):  # 100 on [0, 1] → 200 > the schedule's ≈ 152
        with pytest.raises(ValueError, match="^sigma"):
            denoiser(x, bad)
    with pytest.raises(ValueError, match="^sigma"):
        timestep_for_sigma(scheduler, 1000.0)
    with pytest.raises(ValueError, match="^sigma"):
        UNetDenoiser(lambda z: z)(x, 0.0)
    with pytest.raises(ValueError, match="^data_range"):
        DiffusionDenoiser(lambda x, t: x, scheduler, data_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="^scheduler"):
        DiffusionDenoiser(lambda x, t: x, object())
    with pytest.raises(ValueError, match="^scheduler"):
        DiffusionDenoiser(lambda x, t: x, DDPMScheduler(1000, prediction_type="sample"))
    with pytest.raises(ValueError, match="^num_inference_steps"):
        DiffusionDenoiser(lambda x, t: x, scheduler, multistep=True, num_inference_steps=0)
    with pytest.raises(ValueError, match="^noisy_x"):
        denoiser(torch.full((1, 1, 4, 4), float("nan")), 0.25)
