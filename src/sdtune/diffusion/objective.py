"""The training objective behind one interface: draw the noise and timesteps of a batch, noise
the latents, give the target and the per-example loss weights; and the fixed noise levels
validation uses. DDPM (epsilon or v, min-SNR weighting, offset noise) is the implementation
today; flow matching plugs in beside it.

Every draw comes from the generator passed in, in a fixed order, so that a step's draws are a
function of (seed, step, micro-batch, process) and a resumed run makes the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdtune.diffusion.schedules import (
    add_noise,
    low_discrepancy_timesteps,
    sample_timesteps,
    snr,
)
from sdtune.diffusion.targets import min_snr_weights, offset_noise, training_target


@dataclass
class Noised:
    """A batch made ready for the denoiser: its input, the timesteps, the target, and the
    objective's per-example loss weights (None: all ones)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None


class DDPM:
    """Denoising diffusion (Ho et al. 2020) on a discrete schedule of T steps: x_t =
        sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t uniform (independently, or spread evenly over
    each batch: diffusion.timestep_sampling); the target is eps or v (Salimans & Ho
        2022); min-SNR-gamma weights (Hang et al. 2023); offset noise (Guttenberg 2023)."""

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        min_snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        device: torch.device | str = "cpu",
        timestep_sampling: str = "uniform",
    ) -> None:
        self.alphas_cumprod = alphas_cumprod.to(device)
        self.num_train_timesteps = int(alphas_cumprod.shape[0])
        self.prediction_type = prediction_type
        self.min_snr_gamma = min_snr_gamma
        self.noise_offset = noise_offset
        self.sample_timesteps = {
            "uniform": sample_timesteps,
            "low_discrepancy": low_discrepancy_timesteps,
        }[timestep_sampling]
        self.timestep_range = (0.0, 1.0)
        """The fractions [low, high) of the schedule training draws from (a curriculum stage
        narrows it; validation keeps every level)."""

    def draw(self, latents: torch.Tensor, gen: torch.Generator) -> Noised:
        """Noise, offset, timesteps (in this order, from `gen`), then the noised batch."""
        noise = torch.randn(latents.shape, generator=gen, device=latents.device)
        noise = offset_noise(noise, self.noise_offset, gen)
        low, high = self.timestep_range
        if (low, high) == (0.0, 1.0):
            timesteps = self.sample_timesteps(
                latents.shape[0], self.num_train_timesteps, gen, latents.device
            )
        else:  # the same draws, over the stage's part of the schedule
            T = self.num_train_timesteps
            first = min(int(low * T), T - 1)
            end = max(first + 1, min(T, math.ceil(high * T)))
            timesteps = first + self.sample_timesteps(
                latents.shape[0], end - first, gen, latents.device
            )
        noisy, target = self.at(latents, noise, timesteps)
        return Noised(noisy, timesteps, target, self.weights(timesteps))

    def at(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """(noisy input, target) for given noise and timesteps (validation fixes both)."""
        ac = self.alphas_cumprod
        noisy = add_noise(latents, noise, timesteps, ac)
        return noisy, training_target(self.prediction_type, latents, noise, timesteps, ac)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.min_snr_gamma is None:
            return None
        values = snr(self.alphas_cumprod, timesteps)
        return min_snr_weights(values, self.min_snr_gamma, self.prediction_type)

    def validation_timesteps(self, offsets: torch.Tensor) -> torch.Tensor:
        """Validation's fixed noise levels, low to high (see strata_timesteps)."""
        return strata_timesteps(offsets, self.num_train_timesteps)


def strata_timesteps(offsets: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """One timestep in each of len(offsets) equal strata of [0, T), at the given fractions of
    the way through each."""
    width = num_train_timesteps / len(offsets)
    t = (torch.arange(len(offsets)) + offsets) * width
    return t.long().clamp_(0, num_train_timesteps - 1)
