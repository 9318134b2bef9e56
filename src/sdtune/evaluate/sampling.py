"""Text-to-image sampling with classifier-free guidance, for grids, judging and `sdtune sample`.

One loop serves latent and pixel-space models alike; the samplers are diffusers' schedulers
configured from the model's own training schedule.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from sdtune.data.order import generator
from sdtune.ensemble.predict import Ensemble, as_ensemble
from sdtune.files import atomic_output
from sdtune.models.bundle import ModelBundle
from sdtune.models.families import Conditioning
from sdtune.models.modes import evaluating


@torch.no_grad()
def generate(
    bundle: ModelBundle | Ensemble,
    prompts: list[str],
    *,
    seed: int,
    steps: int = 25,
    guidance_scale: float = 3.0,
    sampler: str = "ddim",
    negative_prompt: str = "",
    guidance_rescale: float = 0.0,
    resolution: int | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    width: int | None = None,
    height: int | None = None,
) -> torch.Tensor:
    """Images in [0, 1] (N x C x H x W), one per prompt; image i's noise depends only on (seed, i).
    The size is `height` x `width`, each defaulting to `resolution` (else the model's own).
    `guidance_rescale` > 0 rescales the guided prediction (see rescale_guidance).
    An `Ensemble` samples with its members' mean prediction at every step."""
    ensemble = as_ensemble(bundle)
    bundle = ensemble.first  # the latent space, the VAE and the sampler's schedule
    arch = bundle.arch
    side = resolution or arch.default_resolution(bundle)
    size = (height or side, width or side)
    factor = bundle.downsample_factor
    channels = arch.latent_channels(bundle)
    dtype = next(bundle.denoiser.parameters()).dtype
    guided = guidance_scale != 1.0
    images = []
    with evaluating(*ensemble.modules()):
        uncond = ensemble.conditioning([negative_prompt], device) if guided else None
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            conds = ensemble.conditioning(chunk, device)
            noise = torch.stack(
                [
                    torch.randn(
                        channels,
                        size[0] // factor,
                        size[1] // factor,
                        generator=generator(seed, "sample", start + i),
                    )
                    for i in range(len(chunk))
                ]
            ).to(device=device, dtype=dtype)
            sizes = {"target_size": size}  # the micro-conditioning of families that use it
            if guided:
                conds = [Conditioning.cat([u.expand(len(chunk)), c]) for u, c in zip(uncond, conds)]
            conds = ensemble.condition(conds, sizes)
            scheduler = arch.make_sampler(bundle, sampler)
            scheduler.set_timesteps(steps, device=device)
            latents = noise * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                model_in = torch.cat([latents, latents]) if guided else latents
                model_in = scheduler.scale_model_input(model_in, t)
                out = ensemble.predict(model_in, t, conds)
                if guided:
                    out_uncond, out_cond = out.chunk(2)
                    out = out_uncond + guidance_scale * (out_cond - out_uncond)
                    if guidance_rescale > 0:
                        out = rescale_guidance(out, out_cond, guidance_rescale)
                latents = scheduler.step(out, t, latents).prev_sample
            pixels = bundle.decode_latents(latents)
            images.append(((pixels.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(images)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2024, eqs. 15-16: scale the guided prediction to the conditional one's
    standard deviation per image, and mix: phi x rescaled + (1 - phi) x guided. At high
    guidance scales (and with a zero-terminal-SNR schedule) guidance inflates the prediction's
    scale, which over-exposes; rescaling takes that back while keeping its direction."""
    dims = list(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return phi * (guided * ratio) + (1.0 - phi) * guided


def generate_as_configured(
    bundle, cfg, prompts: list[str], seed_offset: int, device, grid: bool = False
) -> torch.Tensor:
    """`generate` with the run's evaluate.* sampler settings; seed evaluate.seed + seed_offset
    (0 grids, 1 the judge, 2 the generator metrics, so each set stays fixed over a run). The
    `grid` is sampled at evaluate.sample_size where that is set."""
    width, height = (cfg.evaluate.sample_size or (None, None)) if grid else (None, None)
    return generate(
        bundle,
        prompts,
        width=width,
        height=height,
        seed=cfg.evaluate.seed + seed_offset,
        steps=cfg.evaluate.sample_steps,
        guidance_scale=cfg.evaluate.guidance_scale,
        guidance_rescale=cfg.evaluate.guidance_rescale,
        sampler=cfg.evaluate.scheduler,
        resolution=cfg.data.resolution,
        device=device,
    )


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    """Save images (N x C x H x W in [0, 1]) as one PNG grid with `nrow` images per row."""
    grid = make_grid(images, nrow=nrow, padding=1, pad_value=0.5)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
    if array.shape[2] == 1:
        array = array[:, :, 0]
    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path
