"""Training targets and loss weights; pure functions on tensors."""

from __future__ import annotations

import torch


def velocity(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, sec. 4)."""
    ac = alphas_cumprod.to(device=x0.device, dtype=torch.float32)[timesteps]
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return (
        ac.sqrt().view(shape).to(x0.dtype) * noise - (1.0 - ac).sqrt().view(shape).to(x0.dtype) * x0
    )


def training_target(
    prediction_type: str,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """The tensor the model is trained to predict for `prediction_type` ('epsilon' or 'v_prediction')."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, timesteps, alphas_cumprod)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, eq. 9).

    For an epsilon target the weight is min(SNR, gamma) / SNR; for a v target the MSE already
    carries a factor SNR + 1, so the weight is min(SNR, gamma) / (SNR + 1).
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr.clamp(min=1e-8)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def offset_noise(
    noise: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Add a per-sample, per-channel constant to the noise (Guttenberg 2023, "offset noise")."""
    if strength == 0.0:
        return noise
    offset = torch.randn(
        noise.shape[:2] + (1,) * (noise.ndim - 2),
        generator=generator,
        device=noise.device,
        dtype=noise.dtype,
    )
    return noise + strength * offset


LOSSES = ("mse", "huber", "pseudo_huber")


def elementwise_error(
    model_output: torch.Tensor, target: torch.Tensor, kind: str = "mse", delta: float = 0.1
) -> torch.Tensor:
    """The per-element error, in float32: 'mse' r²; 'huber' 2 x Huber(r; delta), r² inside
    |r| < delta and 2 delta |r| - delta² outside; 'pseudo_huber' 2 delta (sqrt(r² + delta²) -
    delta), its smooth form (Charbonnier 1994; for diffusion, Khrapov & Lu 2024). Both are r²
    for small residuals and grow linearly for large ones, so a few outlying images or
    corrupted captions pull the weights less than under the square."""
    residual = model_output.float() - target.float()
    if kind == "mse":
        return residual.pow(2)
    if kind == "huber":
        return 2.0 * torch.nn.functional.huber_loss(
            residual, torch.zeros_like(residual), reduction="none", delta=delta
        )
    if kind == "pseudo_huber":
        return 2.0 * delta * (torch.sqrt(residual.pow(2) + delta * delta) - delta)
    raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")


def diffusion_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    pixel_weights: torch.Tensor | None = None,
    kind: str = "mse",
    delta: float = 0.1,
) -> torch.Tensor:
    """The error per sample (`kind`: see elementwise_error; mean squared by default),
    optionally weighted, averaged over the batch. With `pixel_weights` (B x 1 x h x w, a loss
    mask at the latents' resolution), each sample's error is its mask-weighted mean: a
    masked-out background teaches nothing, and a small subject weighs as much as a large one."""
    error = elementwise_error(model_output, target, kind, delta)
    if pixel_weights is not None:
        w = pixel_weights.float().expand_as(error)
        per_sample = (error * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-8)
    else:
        per_sample = error.flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
