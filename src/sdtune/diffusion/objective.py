"""The training objective behind one interface: draw the noise and timesteps of a batch, noise
the latents, give the target and the per-example loss weights; and the fixed noise levels
validation uses; and the training loss (mean squared, Huber or pseudo-Huber). DDPM (epsilon
or v, min-SNR weighting, offset noise, biased or logit-normal timesteps, input perturbation)
is here; flow matching (flow.py) plugs in beside it.

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
from sdtune.diffusion.targets import (
    diffusion_loss,
    min_snr_weights,
    offset_noise,
    training_target,
)

TIMESTEP_BIASES = ("none", "earlier", "later", "range")


@dataclass
class Noised:
    """A batch made ready for the denoiser: its input, the timesteps, the target, and the
    objective's per-example loss weights (None: all ones)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None


class Objective:
    """What every objective shares: the training loss's form (diffusion.loss, huber_delta) and
    input perturbation (Ning et al. 2023: the input is noised with eps + gamma xi, xi a second
    draw, while the target keeps eps, which narrows the gap between training, where the input
    is always a true noising, and sampling, where it carries the model's own errors)."""

    loss_kind = "mse"
    huber_delta = 0.1
    input_perturbation = 0.0

    def configure(self, diffusion) -> Objective:
        """Take diffusion.loss, diffusion.huber_delta and diffusion.input_perturbation."""
        self.loss_kind = diffusion.loss
        self.huber_delta = float(diffusion.huber_delta)
        self.input_perturbation = float(diffusion.input_perturbation)
        return self

    def loss(self, pred, target, weights=None, pixel_weights=None) -> torch.Tensor:
        """The batch's training loss under diffusion.loss (validation stays plain MSE)."""
        return diffusion_loss(
            pred, target, weights, pixel_weights, self.loss_kind, self.huber_delta
        )

    def input_noise(self, noise: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The noise the input is made with: None (`noise` itself), or noise + gamma xi with
        input perturbation (xi drawn last from `gen`, so runs without it draw as before)."""
        if self.input_perturbation == 0.0:
            return None
        extra = torch.randn(noise.shape, generator=gen, device=noise.device, dtype=noise.dtype)
        return noise + self.input_perturbation * extra


class DDPM(Objective):
    """Denoising diffusion (Ho et al. 2020) on a discrete schedule of T steps: x_t =
        sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; the target is eps or v (Salimans & Ho 2022);
    min-SNR-gamma weights (Hang et al. 2023); offset noise (Guttenberg 2023).

    Timesteps are uniform (independently, or spread evenly over each batch:
    diffusion.timestep_sampling = 'low_discrepancy'), or drawn from a density over [0, T):
    'logit_normal' (t / T the sigmoid of a normal, Esser et al. 2024's choice, tried on DDPM
    by OneTrainer and SimpleTuner), and/or a bias that makes the earlier (less noisy), later
    (noisier) or a chosen range of timesteps `multiplier` times as likely as the rest (the
    timestep bias of diffusers' SDXL script). A density draws by the inverse of its
    cumulative distribution, from uniform (or low-discrepancy) fractions."""

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        min_snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        device: torch.device | str = "cpu",
        timestep_sampling: str = "uniform",
        density: torch.Tensor | None = None,
    ) -> None:
        self.alphas_cumprod = alphas_cumprod.to(device)
        self.num_train_timesteps = int(alphas_cumprod.shape[0])
        self.prediction_type = prediction_type
        self.min_snr_gamma = min_snr_gamma
        self.noise_offset = noise_offset
        if timestep_sampling == "logit_normal" and density is None:
            raise ValueError("logit-normal timesteps need their density (timestep_density)")
        self.sample_timesteps = (
            low_discrepancy_timesteps
            if timestep_sampling == "low_discrepancy"
            else sample_timesteps
        )
        self.low_discrepancy = timestep_sampling == "low_discrepancy"
        if density is not None and density.shape != (self.num_train_timesteps,):
            raise ValueError(f"a timestep density needs {self.num_train_timesteps} values")
        self.density = None if density is None else density.double().cpu()
        """Relative probabilities of the T timesteps (None: uniform)."""
        self.timestep_range = (0.0, 1.0)
        """The fractions [low, high) of the schedule training draws from (a curriculum stage
        narrows it; validation keeps every level)."""

    def draw(self, latents: torch.Tensor, gen: torch.Generator) -> Noised:
        """Noise, offset, timesteps, input perturbation (in this order, from `gen`), then the
        noised batch."""
        noise = torch.randn(latents.shape, generator=gen, device=latents.device)
        noise = offset_noise(noise, self.noise_offset, gen)
        timesteps = self.draw_timesteps(latents.shape[0], gen, latents.device)
        noisy, target = self.at(latents, noise, timesteps, self.input_noise(noise, gen))
        return Noised(noisy, timesteps, target, self.weights(timesteps))

    def draw_timesteps(self, n: int, gen: torch.Generator, device) -> torch.Tensor:
        """n timesteps from the configured sampling, within timestep_range."""
        if self.density is not None:
            return self._from_density(n, gen, device)
        low, high = self.timestep_range
        if (low, high) == (0.0, 1.0):
            return self.sample_timesteps(n, self.num_train_timesteps, gen, device)
        first, end = self._range_indices()  # the same draws, over the stage's part
        return first + self.sample_timesteps(n, end - first, gen, device)

    def _range_indices(self) -> tuple[int, int]:
        low, high = self.timestep_range
        T = self.num_train_timesteps
        first = min(int(low * T), T - 1)
        return first, max(first + 1, min(T, math.ceil(high * T)))

    def _from_density(self, n: int, gen: torch.Generator, device) -> torch.Tensor:
        """Inverse-CDF draws from `density` restricted to timestep_range: uniform fractions,
        or with low_discrepancy one offset spread evenly over the batch (then shuffled)."""
        first, end = self._range_indices()
        p = torch.zeros_like(self.density)
        p[first:end] = self.density[first:end]
        cdf = torch.cumsum(p, 0)
        cdf = cdf / cdf[-1]
        if self.low_discrepancy:
            u0 = torch.rand((), generator=gen, device=device, dtype=torch.float64)
            order = torch.randperm(n, generator=gen, device=device)
            u = (u0 + order.to(torch.float64) / n) % 1.0
        else:
            u = torch.rand(n, generator=gen, device=device, dtype=torch.float64)
        t = torch.searchsorted(cdf.to(device), u, right=True)
        return t.clamp_(first, end - 1).long()

    def at(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, input_noise=None
    ):
        """(noisy input, target) for given noise and timesteps (validation fixes both); the
        input made with `input_noise` where given (input perturbation), the target with `noise`."""
        ac = self.alphas_cumprod
        noisy = add_noise(latents, noise if input_noise is None else input_noise, timesteps, ac)
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


def timestep_density(
    num_train_timesteps: int,
    sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    bias: str = "none",
    portion: float = 0.25,
    multiplier: float = 2.0,
    bias_range: tuple[float, float] | None = None,
) -> torch.Tensor | None:
    """Relative probabilities of the T timesteps for diffusion.timestep_sampling =
    'logit_normal' and/or a diffusion.timestep_bias; None when both are uniform (the draws
    then stay torch.randint's, as before these options existed).

    - logit_normal: the density of sigmoid(N(logit_mean, logit_std²)) at each step's centre,
      (t + 1/2) / T.
    - bias 'earlier' / 'later': the first / last `portion` of the schedule is `multiplier`
      times as likely; 'range': the fractions bias_range = [low, high) are."""
    if bias not in TIMESTEP_BIASES:
        raise ValueError(f"unknown timestep bias {bias!r}; choose one of {TIMESTEP_BIASES}")
    T = num_train_timesteps
    if sampling != "logit_normal" and bias == "none":
        return None
    centres = (torch.arange(T, dtype=torch.float64) + 0.5) / T
    density = torch.ones(T, dtype=torch.float64)
    if sampling == "logit_normal":
        logit = torch.log(centres / (1.0 - centres))
        density = torch.exp(-0.5 * ((logit - logit_mean) / logit_std) ** 2) / (
            centres * (1.0 - centres)
        )
    if bias != "none":
        if bias == "earlier":
            favoured = centres < portion
        elif bias == "later":
            favoured = centres >= 1.0 - portion
        else:
            if bias_range is None:
                raise ValueError("timestep bias 'range' needs a range [low, high)")
            low, high = bias_range
            favoured = (centres >= low) & (centres < high)
        density = torch.where(favoured, density * multiplier, density)
    return density / density.sum()
