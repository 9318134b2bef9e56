"""Deterministic validation loss: every held-out image is noised at one fixed timestep in each
third of the schedule (low, mid and high noise), with fixed noise, all seeded independently of
training; so two evaluations of the same weights agree exactly, and the per-bucket losses show
where the model fails (averages hide it)."""

from __future__ import annotations

import torch

from sdtune.config import DiffusionConfig
from sdtune.data.dataset import ImageTextDataset, collate
from sdtune.data.order import generator
from sdtune.diffusion.objective import strata_timesteps
from sdtune.ensemble.predict import Ensemble, as_ensemble
from sdtune.evaluate.names import BUCKETS  # noise level: t in each third of [0, T)
from sdtune.models.bundle import ModelBundle
from sdtune.models.modes import evaluating

VAL_SEED = 20240607  # independent of the training seed: the same images and noise every time


def bucket_offsets(index: int) -> torch.Tensor:
    """Image `index`'s fixed position inside each noise-level bucket (fractions in [0, 1))."""
    return torch.rand(len(BUCKETS), generator=generator(VAL_SEED, "t", index))


def bucket_timesteps(index: int, num_train_timesteps: int) -> torch.Tensor:
    """Image `index`'s fixed DDPM timestep in each bucket, on a schedule of T steps."""
    return strata_timesteps(bucket_offsets(index), num_train_timesteps)


def _batches(dataset: ImageTextDataset, count: int, batch_size: int):
    """(start, indices) of the first `count` held-out images in batches of one size each:
    in index order, grouped by aspect-ratio bucket where there are several (a bucket's last
    batch may be smaller); `start` numbers the batch's first image in that order."""
    order = list(range(len(dataset)))
    if dataset.bucket_ids is not None:
        order.sort(key=lambda i: dataset.bucket_ids[i])
    order = order[:count]
    start = 0
    while start < len(order):
        idx = order[start : start + batch_size]
        if dataset.bucket_ids is not None:
            first = dataset.bucket_ids[idx[0]]
            idx = [i for i in idx if dataset.bucket_ids[i] == first]
        yield start, idx
        start += len(idx)


@torch.no_grad()
def validation_loss(
    bundle: ModelBundle | Ensemble,
    dataset: ImageTextDataset,
    batch_size: int,
    max_batches: int,
    device: torch.device | str,
    objective=None,
) -> dict[str, float]:
    """{'val_loss', 'val_loss_low', 'val_loss_mid', 'val_loss_high'} (plain MSE, unweighted) over
    the first `max_batches` batches of the held-out set, under the family's objective. An
    `Ensemble` is measured on its members' mean prediction."""
    count = min(len(dataset), batch_size * max_batches)
    if count == 0:
        return {}
    ensemble = as_ensemble(bundle)
    bundle = ensemble.first  # the latent space and the schedule
    arch = bundle.arch
    if objective is None:
        objective = arch.objective(bundle, DiffusionConfig(), device)
    sums = torch.zeros(len(BUCKETS), dtype=torch.float64)
    with evaluating(*ensemble.modules()):
        for start, idx in _batches(dataset, count, batch_size):
            batch = collate([dataset[i] for i in idx])
            pixels = batch["pixel_values"].to(device)
            latents = bundle.encode_images(pixels, generator(VAL_SEED, "vae", start, device=device))
            conds = ensemble.condition(ensemble.conditioning(batch["captions"], device), batch)
            for b in range(len(BUCKETS)):
                noise = torch.stack(
                    [
                        torch.randn(latents.shape[1:], generator=generator(VAL_SEED, "noise", i, b))
                        for i in idx
                    ]
                ).to(device)
                timesteps = torch.stack(
                    [objective.validation_timesteps(bucket_offsets(i))[b] for i in idx]
                ).to(device)
                noisy, target = objective.at(latents, noise, timesteps)
                pred = ensemble.predict(noisy, timesteps, conds)
                per_image = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
                sums[b] += per_image.double().sum().cpu()
    per_bucket = sums / count
    out = {"val_loss": float(per_bucket.mean())}
    out.update({f"val_loss_{name}": float(v) for name, v in zip(BUCKETS, per_bucket)})
    return out
