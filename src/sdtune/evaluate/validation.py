"""Deterministic validation loss: fixed noise and fixed stratified timesteps per held-out image,
seeded independently of training, so two evaluations of the same weights agree exactly."""

from __future__ import annotations

import torch

from sdtune.data.dataset import ImageTextDataset, collate
from sdtune.data.order import generator
from sdtune.diffusion.schedules import add_noise, stratified_timesteps
from sdtune.diffusion.targets import diffusion_loss, training_target
from sdtune.models.bundle import ModelBundle

VAL_SEED = 20240607  # independent of the training seed: the same images and noise every time


@torch.no_grad()
def validation_loss(
    bundle: ModelBundle,
    dataset: ImageTextDataset,
    batch_size: int,
    max_batches: int,
    device: torch.device | str,
) -> float:
    """Mean diffusion loss over the first `max_batches` batches of the held-out set."""
    count = min(len(dataset), batch_size * max_batches)
    if count == 0:
        return float("nan")
    num_t = int(bundle.noise_scheduler.config.num_train_timesteps)
    ac = bundle.noise_scheduler.alphas_cumprod
    strata = stratified_timesteps(count, num_t)
    unet_mode, te_mode = bundle.unet.training, bundle.text_encoder.training
    bundle.unet.eval()
    bundle.text_encoder.eval()
    total = 0.0
    try:
        for start in range(0, count, batch_size):
            idx = list(range(start, min(start + batch_size, count)))
            batch = collate([dataset[i] for i in idx])
            pixels = batch["pixel_values"].to(device)
            latents = bundle.encode_images(pixels, generator(VAL_SEED, "vae", start, device=device))
            noise = torch.stack(
                [
                    torch.randn(latents.shape[1:], generator=generator(VAL_SEED, "noise", i))
                    for i in idx
                ]
            ).to(device)
            timesteps = strata[idx].to(device)
            noisy = add_noise(latents, noise, timesteps, ac)
            target = training_target(bundle.prediction_type, latents, noise, timesteps, ac)
            hidden = bundle.encode_prompts(batch["captions"], device)
            pred = bundle.unet(noisy, timesteps, encoder_hidden_states=hidden).sample
            total += float(diffusion_loss(pred, target)) * len(idx)
    finally:
        bundle.unet.train(unet_mode)
        bundle.text_encoder.train(te_mode)
    return total / count
