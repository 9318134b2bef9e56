"""Deterministic validation loss: every held-out image is noised at one fixed timestep in each
third of the schedule (low, mid and high noise), with fixed noise, all seeded independently of
training; so two evaluations of the same weights agree exactly, and the per-bucket losses show
where the model fails (averages hide it)."""

from __future__ import annotations

import torch

from sdtune.data.dataset import ImageTextDataset, collate
from sdtune.data.order import generator
from sdtune.diffusion.schedules import add_noise
from sdtune.diffusion.targets import training_target
from sdtune.evaluate.names import BUCKETS  # noise level: t in each third of [0, T)
from sdtune.models.bundle import ModelBundle

VAL_SEED = 20240607  # independent of the training seed: the same images and noise every time


def bucket_timesteps(index: int, num_train_timesteps: int) -> torch.Tensor:
    """Image `index`'s fixed timestep in each bucket: a seeded position inside each third."""
    offsets = torch.rand(len(BUCKETS), generator=generator(VAL_SEED, "t", index))
    width = num_train_timesteps / len(BUCKETS)
    t = (torch.arange(len(BUCKETS)) + offsets) * width
    return t.long().clamp_(0, num_train_timesteps - 1)


@torch.no_grad()
def validation_loss(
    bundle: ModelBundle,
    dataset: ImageTextDataset,
    batch_size: int,
    max_batches: int,
    device: torch.device | str,
) -> dict[str, float]:
    """{'val_loss', 'val_loss_low', 'val_loss_mid', 'val_loss_high'} (plain MSE, unweighted) over
    the first `max_batches` batches of the held-out set."""
    count = min(len(dataset), batch_size * max_batches)
    if count == 0:
        return {}
    num_t = int(bundle.noise_scheduler.config.num_train_timesteps)
    ac = bundle.noise_scheduler.alphas_cumprod
    modes = bundle.unet.training, bundle.text_encoder.training
    bundle.unet.eval()
    bundle.text_encoder.eval()
    sums = torch.zeros(len(BUCKETS), dtype=torch.float64)
    try:
        for start in range(0, count, batch_size):
            idx = list(range(start, min(start + batch_size, count)))
            batch = collate([dataset[i] for i in idx])
            pixels = batch["pixel_values"].to(device)
            latents = bundle.encode_images(pixels, generator(VAL_SEED, "vae", start, device=device))
            hidden = bundle.encode_prompts(batch["captions"], device)
            for b in range(len(BUCKETS)):
                noise = torch.stack(
                    [
                        torch.randn(latents.shape[1:], generator=generator(VAL_SEED, "noise", i, b))
                        for i in idx
                    ]
                ).to(device)
                timesteps = torch.stack([bucket_timesteps(i, num_t)[b] for i in idx]).to(device)
                noisy = add_noise(latents, noise, timesteps, ac)
                target = training_target(bundle.prediction_type, latents, noise, timesteps, ac)
                pred = bundle.unet(noisy, timesteps, encoder_hidden_states=hidden).sample
                per_image = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
                sums[b] += per_image.double().sum().cpu()
    finally:
        bundle.unet.train(modes[0])
        bundle.text_encoder.train(modes[1])
    per_bucket = sums / count
    out = {"val_loss": float(per_bucket.mean())}
    out.update({f"val_loss_{name}": float(v) for name, v in zip(BUCKETS, per_bucket)})
    return out
