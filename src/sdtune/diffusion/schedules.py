"""Noise schedules: the forward process q(x_t | x_0) and its signal-to-noise ratio.

The beta schedules themselves come from diffusers' DDPMScheduler (linear and scaled_linear
from Ho et al. 2020 / Rombach et al. 2022, squaredcos_cap_v2 from Nichol & Dhariwal 2021);
the functions here are pure maps of tensors on top of its `alphas_cumprod`.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def make_noise_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
    prediction_type: str = "epsilon",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    **options,
) -> DDPMScheduler:
    """A DDPM training scheduler with Stable Diffusion's defaults (`options`: more of
    DDPMScheduler's settings, e.g. rescale_betas_zero_snr)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
        **options,
    )


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021, eq. 1)."""
    ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1.0 - ac)


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4)."""
    ac = alphas_cumprod.to(device=x0.device, dtype=torch.float32)[timesteps]
    shape = (-1,) + (1,) * (x0.ndim - 1)
    sqrt_ac = ac.sqrt().view(shape).to(x0.dtype)
    sqrt_one_minus = (1.0 - ac).sqrt().view(shape).to(x0.dtype)
    return sqrt_ac * x0 + sqrt_one_minus * noise


def sample_timesteps(
    batch: int, num_train_timesteps: int, generator: torch.Generator, device: torch.device | str
) -> torch.Tensor:
    """Uniform timesteps t ~ U{0, ..., T-1}, drawn from `generator` (so a resume redraws the same)."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device)


def low_discrepancy_timesteps(
    batch: int, num_train_timesteps: int, generator: torch.Generator, device: torch.device | str
) -> torch.Tensor:
    """A batch's timesteps evenly spread over [0, T) from one uniform offset, in a random order:
    t_i = floor(((u + i / B) mod 1) T), the low-discrepancy sampler of Kingma et al. 2021 (VDM).
    Each t is still uniform, but every batch covers low, mid and high noise alike, so the
    gradient of a small batch varies less from step to step. Drawn from `generator`."""
    u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
    order = torch.randperm(batch, generator=generator, device=device)
    fractions = (u + order.to(torch.float64) / batch) % 1.0
    return (fractions * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def stratified_timesteps(count: int, num_train_timesteps: int) -> torch.Tensor:
    """`count` timesteps at the centres of equal strata of [0, T): a fixed, deterministic cover."""
    edges = (torch.arange(count, dtype=torch.float64) + 0.5) * num_train_timesteps / count
    return edges.long().clamp_(0, num_train_timesteps - 1)
