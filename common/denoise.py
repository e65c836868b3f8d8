"""Denoisers for denoise-then-certify (Laousy et al., MICCAI 2023, Sec. 4; Carlini et al., ICLR 2023).

Randomized smoothing feeds x + δ, δ ~ N(0, σ²I), to the segmenter. A DDPM trained on images mapped
to [−1, 1] sees x_t = √ᾱ_t·x + √(1 − ᾱ_t)·ε. Scaling x + δ by √ᾱ_t gives exactly that form when
σ² = (1 − ᾱ_t)/ᾱ_t, so the DDPM denoises the smoothing noise from timestep t*:

    x_t* = √ᾱ_t*·(x + δ),   x̂₀ = (x_t* − √(1 − ᾱ_t*)·ε̂(x_t*, t*)) / √ᾱ_t*   (one step: the paper's default)

or by running the reverse chain t*, t* − 1, …, 0 (multi-step, the paper's supplementary option).
σ is given in the units of the data; on [0, 1] data the map to [−1, 1] doubles it.

Every denoiser here is a callable ``denoiser(noisy_x, sigma) -> x_hat`` with x_hat in the data's units,
the interface :func:`common.certify.certify` expects. No pretrained hub weights exist offline, so the
module also holds the DDPM ε-prediction training loss and a small training loop on the bundle's own
images, and the paper's comparison: a UNet trained per σ to map x + δ to x.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer

from common.validation import check_clip, check_image, check_nonnegative, check_positive_int, main_output

__all__ = [
    "sigma_to_model_units",
    "timestep_for_sigma",
    "ddpm_skip_step",
    "DiffusionDenoiser",
    "diffusion_training_loss",
    "train_diffusion",
    "UNetDenoiser",
    "denoiser_training_loss",
    "train_unet_denoiser",
]


def sigma_to_model_units(sigma: float, data_range: Sequence[float] = (0.0, 1.0)) -> float:
    """σ in data units → σ on the DDPM's [−1, 1] scale: σ_model = σ·2/(hi − lo) (doubles on [0, 1] data)."""
    sigma = _check_sigma(sigma)
    lo, hi = check_clip(data_range, "data_range")
    return sigma * 2.0 / (hi - lo)


def timestep_for_sigma(scheduler, sigma_model: float, name: str = "sigma") -> int:
    """t* whose noise level √((1 − ᾱ_t)/ᾱ_t) is nearest to ``sigma_model`` (Sec. 4: σ² = (1 − ᾱ_t*)/ᾱ_t*).

    Args:
        scheduler: a MONAI scheduler (e.g. ``DDPMScheduler``) with ``alphas_cumprod`` (T,).
        sigma_model: σ > 0 on the model's [−1, 1] scale (see :func:`sigma_to_model_units`).
        name: argument name used in error messages.

    Raises:
        ValueError naming ``name`` if σ exceeds the schedule's largest level, reached at t = T − 1.
    """
    sigma_model = _check_sigma(sigma_model, name)
    levels = _noise_levels(scheduler)
    if sigma_model > float(levels[-1]):
        raise ValueError(
            f"{name}: noise level {sigma_model:.4g} on the model's [-1, 1] scale exceeds the schedule's "
            f"largest, {float(levels[-1]):.4g} at t = {levels.numel() - 1}"
        )
    return int(torch.argmin((levels - sigma_model).abs()))


def ddpm_skip_step(
    scheduler, eps: torch.Tensor, t: int, s: int, x_t: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral DDPM step from timestep t to an earlier s < t (Ho et al. 2020, Eq. 6-7, 15).

    x̂₀ = clamp((x_t − √(1 − ᾱ_t)·ε̂)/√ᾱ_t, −1, 1); with ᾱ_{t|s} = ᾱ_t/ᾱ_s and β_{t|s} = 1 − ᾱ_{t|s}:
    x_s ~ N(√ᾱ_s β_{t|s}/(1 − ᾱ_t)·x̂₀ + √ᾱ_{t|s}(1 − ᾱ_s)/(1 − ᾱ_t)·x_t, (1 − ᾱ_s)/(1 − ᾱ_t)·β_{t|s}).
    For s = t − 1 this is MONAI's ``DDPMScheduler.step`` (fixed-small variance, clipped x̂₀); it is written
    out because that method always steps to t − 1 and so cannot skip timesteps.

    Returns:
        (x_s, x̂₀), both shaped like ``x_t``.
    """
    if not 0 <= s < t:
        raise ValueError(f"s: expected 0 <= s < t = {t}, got {s}")
    abar = scheduler.alphas_cumprod.double()
    a_t, a_s = float(abar[t]), float(abar[s])
    x0 = _predict_x0(eps, x_t, a_t)
    # β_{t|s} is small (β_1 ≈ 1e-4): take it from the betas in float64, not from a ratio of float32 ᾱ.
    betas = getattr(scheduler, "betas", None)
    if isinstance(betas, torch.Tensor) and betas.shape == abar.shape:
        b_ts = float(-torch.expm1(torch.log1p(-betas[s + 1 : t + 1].double()).sum()))
    else:
        b_ts = 1 - a_t / a_s
    a_ts = 1 - b_ts
    mean = math.sqrt(a_s) * b_ts / (1 - a_t) * x0 + math.sqrt(a_ts) * (1 - a_s) / (1 - a_t) * x_t
    var = max((1 - a_s) / (1 - a_t) * b_ts, 1e-20)
    noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
    return mean + math.sqrt(var) * noise, x0


class DiffusionDenoiser:
    """Denoise x + δ with a DDPM ε-prediction model started at t* (Carlini et al. 2023; Laousy et al. 2023).

    Args:
        model: ε-prediction network called as ``model(x_t, timesteps)`` with x_t (N, C, *spatial) on
            [−1, 1] and timesteps (N,) int64, e.g. MONAI ``DiffusionModelUNet``. Put it in eval mode.
        scheduler: MONAI ``DDPMScheduler`` (the paper: linear β schedule, 1000 steps) with
            ``prediction_type="epsilon"``.
        data_range: (lo, hi) of the images the segmenter sees; mapped linearly to [−1, 1].
        multistep: False for the one-step x̂₀ (the paper's default), True for the reverse chain t* … 0.
        num_inference_steps: with ``multistep``, the number of model calls, evenly spaced from t* to 0;
            None runs every timestep t*, t* − 1, …, 0 as the paper describes.
        generator: torch.Generator for the multi-step chain's ancestral noise.

    Calling ``denoiser(noisy_x, sigma)`` returns x̂ of the same shape, clamped to ``data_range``.
    Inference only (runs under ``torch.no_grad``).
    """

    def __init__(
        self,
        model,
        scheduler,
        data_range: Sequence[float] = (0.0, 1.0),
        multistep: bool = False,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not callable(model):
            raise ValueError(f"model: expected a callable network, got {type(model).__name__}")
        _noise_levels(scheduler)
        if getattr(scheduler, "prediction_type", "epsilon") != "epsilon":
            raise ValueError(
                f"scheduler: expected prediction_type 'epsilon', got {scheduler.prediction_type!r}"
            )
        self.model = model
        self.scheduler = scheduler
        self.data_range = check_clip(data_range, "data_range")
        self.multistep = bool(multistep)
        if num_inference_steps is not None:
            num_inference_steps = check_positive_int(num_inference_steps, "num_inference_steps")
        self.num_inference_steps = num_inference_steps
        self.generator = generator

    def timestep(self, sigma: float) -> int:
        """t* for a noise level σ given in data units."""
        return timestep_for_sigma(self.scheduler, sigma_to_model_units(sigma, self.data_range), name="sigma")

    def timesteps(self, sigma: float) -> list[int]:
        """The model's timesteps for σ: [t*] one-step, or a decreasing chain from t* to 0 multi-step."""
        t_star = self.timestep(sigma)
        if not self.multistep or t_star == 0:
            return [t_star]
        steps = t_star + 1 if self.num_inference_steps is None else min(self.num_inference_steps, t_star + 1)
        if steps == 1:
            return [t_star]
        chain = torch.linspace(t_star, 0, steps).round().long().unique_consecutive()
        return [int(t) for t in chain]

    @torch.no_grad()
    def __call__(self, noisy_x: torch.Tensor, sigma: float) -> torch.Tensor:
        """noisy_x: (N, C, *spatial) = x + δ in data units; returns x̂ (N, C, *spatial) in data units."""
        check_image(noisy_x, "noisy_x")
        chain = self.timesteps(sigma)
        lo, hi = self.data_range
        x = (noisy_x - lo) * (2.0 / (hi - lo)) - 1.0
        abar = self.scheduler.alphas_cumprod.double()
        x_t = math.sqrt(float(abar[chain[0]])) * x
        for i, t in enumerate(chain):
            timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            eps = main_output(self.model(x_t, timesteps))
            if not isinstance(eps, torch.Tensor) or eps.shape != x_t.shape:
                shape = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
                raise ValueError(f"model: expected an epsilon prediction of shape {tuple(x_t.shape)}, "
                                 f"got {shape}")
            if i + 1 < len(chain):
                x_t, _ = ddpm_skip_step(self.scheduler, eps, t, chain[i + 1], x_t, self.generator)
            else:
                x0 = _predict_x0(eps, x_t, float(abar[t]))
        return (x0 + 1.0) * ((hi - lo) / 2.0) + lo


def diffusion_training_loss(
    model,
    scheduler,
    x0: torch.Tensor,
    data_range: Sequence[float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDPM ε-prediction loss (Ho et al. 2020, Eq. 14): E_{t, ε} ‖ε − ε_θ(√ᾱ_t·x₀ + √(1 − ᾱ_t)·ε, t)‖².

    Args:
        model: ε-prediction network, e.g. MONAI ``DiffusionModelUNet``.
        scheduler: MONAI scheduler; noising by MONAI's ``DiffusionInferer`` (``scheduler.add_noise``).
        x0: (B, C, *spatial) clean images in ``data_range`` (mapped to [−1, 1] here).
        generator: torch.Generator for t ~ U{0, …, T − 1} and ε ~ N(0, I).

    Returns:
        scalar mean-squared error (differentiable).
    """
    check_image(x0, "x0")
    lo, hi = check_clip(data_range, "data_range")
    x = (x0 - lo) * (2.0 / (hi - lo)) - 1.0
    num_steps = int(_noise_levels(scheduler).numel())
    timesteps = torch.randint(0, num_steps, (x.shape[0],), generator=generator, device=x.device)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    inferer = DiffusionInferer(scheduler)
    prediction = inferer(inputs=x, diffusion_model=model, noise=noise, timesteps=timesteps)
    return F.mse_loss(prediction.float(), noise.float())


def train_diffusion(
    model,
    scheduler,
    loader: Iterable,
    epochs: int,
    lr: float = 1e-4,
    data_range: Sequence[float] = (0.0, 1.0),
    image_key: str = "image",
    generator: torch.Generator | None = None,
) -> list[float]:
    """Train an ε-prediction model with Adam on the images of ``loader`` (tensors, or dicts with
    ``image_key``, or tuples whose first item is the image). Returns the loss of every iteration."""
    return _fit(
        lambda x: diffusion_training_loss(model, scheduler, x, data_range, generator),
        model, loader, epochs, lr, image_key,
    )


class UNetDenoiser:
    """The paper's comparison denoiser: a network trained for one σ to map x + δ to x (Salman et al. 2020).

    Args:
        network: image-to-image network (N, C, *spatial) → (N, C, *spatial), e.g. a small MONAI ``UNet``
            with ``in_channels == out_channels``; trained with :func:`denoiser_training_loss`.
        sigma: the σ (data units) it was trained for; calls with another σ raise. None skips the check.

    Calling ``denoiser(noisy_x, sigma)`` returns the network's output. Inference only (``torch.no_grad``).
    """

    def __init__(self, network, sigma: float | None = None) -> None:
        if not callable(network):
            raise ValueError(f"network: expected a callable network, got {type(network).__name__}")
        self.network = network
        self.sigma = None if sigma is None else _check_sigma(sigma)

    @torch.no_grad()
    def __call__(self, noisy_x: torch.Tensor, sigma: float) -> torch.Tensor:
        check_image(noisy_x, "noisy_x")
        sigma = _check_sigma(sigma)
        if self.sigma is not None and not math.isclose(sigma, self.sigma, rel_tol=1e-6):
            raise ValueError(f"sigma: this denoiser was trained for sigma={self.sigma}, called with {sigma}")
        out = main_output(self.network(noisy_x))
        if out.shape != noisy_x.shape:
            raise ValueError(
                f"network: output shape {tuple(out.shape)} differs from input {tuple(noisy_x.shape)}"
            )
        return out


def denoiser_training_loss(
    network, x: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """MSE ‖h(x + δ) − x‖², δ ~ N(0, σ²I), for a per-σ denoiser h (σ in the units of ``x``). Scalar."""
    check_image(x, "x")
    sigma = _check_sigma(sigma)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return F.mse_loss(main_output(network(x + sigma * noise)), x)


def train_unet_denoiser(
    network,
    loader: Iterable,
    sigma: float,
    epochs: int,
    lr: float = 1e-3,
    image_key: str = "image",
    generator: torch.Generator | None = None,
) -> list[float]:
    """Train a per-σ denoiser with Adam on the images of ``loader``; returns the loss of every iteration."""
    sigma = _check_sigma(sigma)
    return _fit(
        lambda x: denoiser_training_loss(network, x, sigma, generator), network, loader, epochs, lr, image_key
    )


def _fit(loss_fn, network, loader, epochs, lr, image_key) -> list[float]:
    """Adam loop shared by the two trainers; puts ``network`` in train mode and leaves it in eval mode."""
    epochs = check_positive_int(epochs, "epochs")
    lr = check_nonnegative(lr, "lr")
    if lr <= 0:
        raise ValueError(f"lr: must be > 0, got {lr}")
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    losses: list[float] = []
    network.train()
    for _ in range(epochs):
        for batch in loader:
            if isinstance(batch, dict):
                x = batch[image_key]
            else:
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(x)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    network.eval()
    return losses


def _predict_x0(eps: torch.Tensor, x_t: torch.Tensor, abar_t: float) -> torch.Tensor:
    """One-step x̂₀ = (x_t − √(1 − ᾱ_t)·ε̂)/√ᾱ_t, clamped to [−1, 1] (Ho et al. 2020, Eq. 15)."""
    return ((x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)).clamp(-1.0, 1.0)


def _noise_levels(scheduler) -> torch.Tensor:
    """√((1 − ᾱ_t)/ᾱ_t) for t = 0 … T − 1 in float64 (increasing for any valid schedule)."""
    abar = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(abar, torch.Tensor) or abar.ndim != 1 or abar.numel() < 1:
        raise ValueError("scheduler: expected a MONAI scheduler with a 1-D alphas_cumprod tensor")
    abar = abar.detach().double().cpu()
    return ((1.0 - abar) / abar).sqrt()


def _check_sigma(sigma: float, name: str = "sigma") -> float:
    sigma = check_nonnegative(sigma, name)
    if sigma <= 0:
        raise ValueError(f"{name}: must be > 0, got {sigma}")
    return sigma
