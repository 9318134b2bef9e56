"""Tiny presets: complete models built from configs with seeded random weights (no download).

- `tiny-sd`: every Stable Diffusion component at toy size (VAE, CLIP text encoder and
  tokenizer, UNet2DConditionModel), for tests of the latent-diffusion path and of exports.
- `tiny-digits`: the CPU quickstart model. It works in pixel space (no VAE): at 16x16 pixels
  a VAE would only blur the strokes of a digit and cost time, while the UNet, text encoder,
  noise schedule, loss and samplers are exactly those of Stable Diffusion.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune.diffusion.schedules import make_noise_scheduler
from sdtune.errors import ModelError
from sdtune.models.bundle import ModelBundle
from sdtune.models.tokenizer import build_tiny_tokenizer


def _text_encoder(
    hidden: int, layers: int, heads: int, max_length: int, tokenizer
) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden,
    )
    return CLIPTextModel(config)


def tiny_sd(dropout: float = 0.0) -> ModelBundle:
    """Stable Diffusion 1.x layout at toy size: 32 px images, 4x16x16 latents."""
    tokenizer = build_tiny_tokenizer(max_length=77)
    text_encoder = _text_encoder(32, 2, 4, 77, tokenizer)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        dropout=dropout,
    )
    scheduler = make_noise_scheduler(1000, "scaled_linear", "epsilon")
    return ModelBundle(unet, text_encoder, tokenizer, scheduler, vae, "custom", "preset:tiny-sd")


def tiny_digits(dropout: float = 0.0) -> ModelBundle:
    """Pixel-space, single-channel, text-conditioned model for 16x16 digits (the quickstart)."""
    tokenizer = build_tiny_tokenizer(max_length=12)
    text_encoder = _text_encoder(64, 2, 4, 12, tokenizer)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=16,
        norm_num_groups=16,
        dropout=dropout,
    )
    scheduler = make_noise_scheduler(1000, "squaredcos_cap_v2", "epsilon")
    return ModelBundle(
        unet, text_encoder, tokenizer, scheduler, None, "pixel", "preset:tiny-digits"
    )


PRESETS: dict[str, Callable[..., ModelBundle]] = {"tiny-sd": tiny_sd, "tiny-digits": tiny_digits}


def build_preset(name: str, seed: int, dropout: float = 0.0) -> ModelBundle:
    """Build preset `name` with weights drawn from `seed` (the global RNG is left untouched)."""
    if name not in PRESETS:
        known = ", ".join(f"preset:{k}" for k in PRESETS)
        raise ModelError(f"model.base: unknown preset 'preset:{name}' (known: {known})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PRESETS[name](dropout=dropout)
