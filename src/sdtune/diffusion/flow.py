"""Flow matching (rectified flow; Lipman et al. 2023, Liu et al. 2023), as Stable Diffusion 3
trains it (Esser et al. 2024): the straight path x_s = (1 - s) x_0 + s eps between the data and
the noise, and the denoiser learns its velocity eps - x_0. The same interface as `DDPM`
(draw / at / weights / validation_timesteps / timestep_range), so the step, validation and a
curriculum take it unchanged.

- **Noise levels.** A fraction u in (0, 1) is drawn ('uniform'; 'logit_normal': the sigmoid of
  a normal of `logit_mean`, `logit_std`, SD3's default 0, 1; 'mode': SD3's eq. 21 with
  `mode_scale`), then shifted toward the noise: s = a u / (1 + (a - 1) u), a = `shift` (SD3
  uses 3.0 at 1024 px). With `shift_resolution` set, a scales with the image side in pixels
  as SD3's eq. 23 does: a = shift x sqrt(pixels / shift_resolution²) (more pixels, more noise
  needed to destroy the same structure). The denoiser reads the timestep 1000 s, as diffusers'
  FlowMatchEulerDiscreteScheduler gives it.
- **Loss weights** per example: 'none'; 'sigma_sqrt' 1 / s² (SD3's; s floored at 1/1000, the
  lowest level of diffusers' discrete schedule); 'cosmap' 2 / (pi (1 - 2s + 2s²)) (Esser et
  al., the cosine map).
- **Validation** at fixed levels: one s in each of equal strata of (0, 1), unshifted, so the
  numbers compare across shifts and are repeatable bit for bit.

Every draw comes from the generator passed in, in a fixed order (the noise, then the levels).
"""

from __future__ import annotations

import math

import torch

from sdtune.diffusion.objective import Noised, Objective
from sdtune.diffusion.targets import offset_noise

TIMESTEP_SCALE = 1000.0  # the denoiser reads 1000 s (diffusers' flow-matching schedulers)
SAMPLINGS = ("uniform", "logit_normal", "mode")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
EPS = 1e-5  # s stays in [EPS, 1 - EPS]
WEIGHT_FLOOR = 1e-3  # 1 / s² is taken at s >= this: one example never outweighs a batch


class FlowMatching(Objective):
    def __init__(
        self,
        sampling: str = "logit_normal",
        weighting: str = "none",
        shift: float = 1.0,
        shift_resolution: int | None = None,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        noise_offset: float = 0.0,
        device: torch.device | str = "cpu",
        pixels_per_latent: int = 1,
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"flow matching: sampling {sampling!r}; choose one of {SAMPLINGS}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"flow matching: weighting {weighting!r}; choose one of {WEIGHTINGS}")
        if shift <= 0:
            raise ValueError(f"flow matching: shift must be positive (got {shift})")
        self.sampling, self.weighting = sampling, weighting
        self.shift, self.shift_resolution = float(shift), shift_resolution
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.noise_offset = noise_offset
        self.device = device
        self.pixels_per_latent = pixels_per_latent  # the VAE's downsampling (1: pixel space)
        self.prediction_type = "flow"  # the velocity eps - x_0
        self.timestep_range = (0.0, 1.0)
        """The fractions [low, high) of the noise levels training draws from (a curriculum
        stage narrows it; validation keeps every level)."""

    # ------------------------------------------------------------------ levels

    def shift_for(self, latents: torch.Tensor) -> float:
        """The shift a batch of `latents` gets: `shift`, scaled by the image's side in pixels
        (the latents' times the VAE's downsampling) over `shift_resolution` when that is set."""
        if self.shift_resolution is None:
            return self.shift
        side = math.sqrt(latents.shape[-2] * latents.shape[-1]) * self.pixels_per_latent
        return self.shift * side / self.shift_resolution

    def draw_fractions(self, n: int, gen: torch.Generator, device) -> torch.Tensor:
        """n fractions u in (0, 1) from the configured density (float64, from `gen`)."""
        if self.sampling == "logit_normal":
            z = torch.randn(n, generator=gen, device=device, dtype=torch.float64)
            return torch.sigmoid(self.logit_mean + self.logit_std * z)
        u = torch.rand(n, generator=gen, device=device, dtype=torch.float64)
        if self.sampling == "mode":  # SD3 eq. 21: more mass in the middle for scale > 0
            return 1.0 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1.0 + u)
        return u

    @staticmethod
    def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
        """s = a u / (1 + (a - 1) u): the identity at a = 1, toward the noise for a > 1."""
        return shift * u / (1.0 + (shift - 1.0) * u)

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.double() / TIMESTEP_SCALE

    # ------------------------------------------------------------------ the interface

    def draw(self, latents: torch.Tensor, gen: torch.Generator) -> Noised:
        """Noise, offset, levels, input perturbation (in this order, from `gen`), then the
        noised batch."""
        noise = torch.randn(latents.shape, generator=gen, device=latents.device)
        noise = offset_noise(noise, self.noise_offset, gen)
        u = self.draw_fractions(latents.shape[0], gen, latents.device)
        s = self.shifted(u, self.shift_for(latents))
        low, high = self.timestep_range
        s = (low + (high - low) * s).clamp(EPS, 1.0 - EPS)
        timesteps = (s * TIMESTEP_SCALE).float()
        noisy, target = self.at(latents, noise, timesteps, self.input_noise(noise, gen))
        return Noised(noisy, timesteps, target, self.weights(timesteps))

    def at(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, input_noise=None
    ):
        """(noisy input, target) for given noise and timesteps: x_s = (1 - s) x_0 + s eps and
        the velocity eps - x_0; the input made with `input_noise` where given (input
        perturbation), the target with `noise`."""
        shape = (-1,) + (1,) * (latents.ndim - 1)
        s = self.sigmas(timesteps).to(latents.device, torch.float32).view(shape)
        made = noise if input_noise is None else input_noise
        noisy = ((1.0 - s) * latents.float() + s * made.float()).to(latents.dtype)
        return noisy, (noise.float() - latents.float()).to(latents.dtype)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.weighting == "none":
            return None
        s = self.sigmas(timesteps).float()
        if self.weighting == "sigma_sqrt":  # floored at diffusers' lowest level, 1/1000
            return s.clamp(min=WEIGHT_FLOOR).pow(-2.0)
        return 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s**2))  # cosmap

    def validation_timesteps(self, offsets: torch.Tensor) -> torch.Tensor:
        """One level in each of len(offsets) equal strata of (0, 1), at the given fractions of
        the way through each, low to high (unshifted)."""
        s = (torch.arange(len(offsets), dtype=torch.float64) + offsets.double()) / len(offsets)
        return (s.clamp(EPS, 1.0 - EPS) * TIMESTEP_SCALE).float()
