"""The models the throughput benchmark trains, and the FLOP count of one training step.

- sdtune's tiny presets (`tiny-sd`, `tiny-digits`, `tiny-sdxl`), as `model.base = "preset:NAME"`
  says, and `tiny-sd3` (sdtune's `preset:tiny-sd3` with 77-token text encoders, the length
  diffusers' SD3 script tokenizes to);
- full-size Stable Diffusion architectures built from their published component configs
  (written out below, so nothing is downloaded) with seeded random weights: `sd15` (UNet
  859.5M parameters, VAE 83.7M, CLIP ViT-L/14 text encoder 123.1M), `sdxl` (UNet 2.57B,
  CLIP ViT-L and OpenCLIP bigG text encoders) and `sd35` (SD 3.5 Medium: the MMDiT-X
  transformer, CLIP-L and CLIP-G with projections, T5-XXL, the 16-channel VAE). Random weights
  cost the same FLOPs and memory as trained ones.

The full-size models are handed to sdtune's real loader by adding them to the preset table in
the benchmark's own process (`register_presets`). Each model with a VAE names the diffusers
example script that trains its family: the peer of a side-by-side run.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from sdtune.diffusion.schedules import make_noise_scheduler
from sdtune.models.bundle import ModelBundle
from sdtune.models.families import PRESETS
from sdtune.models.families.sd import SD1
from sdtune.models.families.sd3 import SD3, tiny_encoders, tiny_sd3, tiny_t5_tokenizer
from sdtune.models.families.sdxl import SDXL
from sdtune.models.presets import build_preset
from sdtune.models.tokenizer import build_tiny_tokenizer

# stable-diffusion-v1-5/stable-diffusion-v1-5: unet/config.json, vae/config.json
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SD_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# openai/clip-vit-large-patch14, text model (SD 1.x text_encoder; SDXL text_encoder)
CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json, text_encoder_2 (OpenCLIP bigG)
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
CLIP_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


# stabilityai/stable-diffusion-3.5-medium: transformer/config.json, vae/config.json,
# text_encoder_2 (CLIP-G: bigG's text tower with its projection), text_encoder_3 (T5 v1.1 XXL)
SD35_TRANSFORMER = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
SD3_VAE = {
    **SD_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
T5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.0,
}
SD3_TOKENS = 77  # what diffusers' SD3 script tokenizes CLIP to (and T5, by its default)


@dataclass(frozen=True)
class Arch:
    """A model the benchmark knows: its sdtune `model.base`, default shape and what can run."""

    name: str
    base: str | None
    """model.base for sdtune (None: sdtune cannot train it yet, FLOPs only)."""
    resolution: int
    batch_size: int
    latent: bool
    """True when the model has a VAE (only such models fit diffusers' text-to-image scripts)."""
    peer: str | None = None
    """The diffusers example script that trains this model's family (None: no peer)."""


PEER_SD = "examples/text_to_image/train_text_to_image.py"
PEER_SDXL = "examples/text_to_image/train_text_to_image_sdxl.py"
PEER_SD3 = "examples/dreambooth/train_dreambooth_lora_sd3.py"
ARCHS = {
    "tiny-sd": Arch("tiny-sd", "preset:tiny-sd", 32, 64, True, PEER_SD),
    "tiny-digits": Arch("tiny-digits", "preset:tiny-digits", 16, 64, False),
    "tiny-sdxl": Arch("tiny-sdxl", "preset:tiny-sdxl", 32, 64, True, PEER_SDXL),
    "sd15": Arch("sd15", "preset:bench-sd15", 512, 8, True, PEER_SD),
    "sdxl": Arch("sdxl", "preset:bench-sdxl", 1024, 4, True, PEER_SDXL),
    "tiny-sd3": Arch("tiny-sd3", "preset:bench-tiny-sd3", 32, 64, True, PEER_SD3),
    "sd35": Arch("sd35", "preset:bench-sd35", 1024, 4, True, PEER_SD3),
}


def _clip_config(fields: dict, tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        **fields,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sd15(dropout: float = 0.0) -> ModelBundle:
    """Stable Diffusion 1.5 at full size with random weights (sdtune's byte-level tokenizer
    stands in for CLIP's, which would need a download; the encoder's cost is the same)."""
    tokenizer = build_tiny_tokenizer(max_length=77)
    text_encoder = CLIPTextModel(_clip_config(CLIP_L, tokenizer))
    vae = AutoencoderKL(**SD_VAE)
    unet = UNet2DConditionModel(**SD15_UNET, dropout=dropout)
    scheduler = make_noise_scheduler(1000, "scaled_linear", "epsilon")
    return SD1.bundle(unet, text_encoder, tokenizer, scheduler, vae, "preset:bench-sd15")


# stabilityai/stable-diffusion-xl-base-1.0: vae/config.json differs from SD's in these
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}


def sdxl(dropout: float = 0.0) -> ModelBundle:
    """SDXL base 1.0 at full size with random weights: the 2.57B UNet, CLIP ViT-L and OpenCLIP
    bigG (with its projection), SDXL's VAE (sdtune's byte-level tokenizer for both, as in sd15)."""
    tokenizers = [build_tiny_tokenizer(max_length=77), build_tiny_tokenizer(max_length=77)]
    encoders = [
        CLIPTextModel(_clip_config(CLIP_L, tokenizers[0])),
        CLIPTextModelWithProjection(_clip_config(CLIP_BIGG, tokenizers[1])),
    ]
    vae = AutoencoderKL(**SDXL_VAE)
    unet = UNet2DConditionModel(**SDXL_UNET, dropout=dropout)
    scheduler = make_noise_scheduler(1000, "scaled_linear", "epsilon")
    return SDXL.bundle(unet, encoders, tokenizers, scheduler, vae, "preset:bench-sdxl")


def bench_tiny_sd3(dropout: float = 0.0) -> ModelBundle:
    """sdtune's tiny-sd3 with 77-token text encoders: diffusers' SD3 script pads every CLIP
    prompt to 77 tokens, whatever the tokenizer says."""
    tiny = tiny_sd3(dropout)
    encoders, tokenizers = tiny_encoders(SD3_TOKENS, (32, 64), 64, 2)
    return tiny.arch.bundle(
        tiny.denoiser, encoders, tokenizers, tiny.noise_scheduler, tiny.vae, "preset:bench-tiny-sd3"
    )


def _t5_config(fields: dict, tokenizer) -> T5Config:
    return T5Config(**fields, pad_token_id=tokenizer.pad_token_id, eos_token_id=1)


def sd35(dropout: float = 0.0) -> ModelBundle:
    """SD 3.5 Medium at full size with random weights: the 2.24B MMDiT-X (dual attention in
    its first 13 layers, QK-norm), CLIP-L and CLIP-G with projections, T5-XXL's encoder, the
    16-channel VAE (sdtune's local tokenizers stand in for CLIP's and T5's: their cost is the
    same at the same lengths)."""
    clip_tokenizers = [build_tiny_tokenizer(SD3_TOKENS), build_tiny_tokenizer(SD3_TOKENS)]
    t5_tokenizer = tiny_t5_tokenizer(SD3_TOKENS)
    encoders = [
        CLIPTextModelWithProjection(_clip_config(CLIP_L, clip_tokenizers[0])),
        CLIPTextModelWithProjection(_clip_config(CLIP_BIGG, clip_tokenizers[1])),
        T5EncoderModel(_t5_config(T5_XXL, t5_tokenizer)),
    ]
    transformer = SD3Transformer2DModel(**SD35_TRANSFORMER)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    vae = AutoencoderKL(**SD3_VAE)
    tokenizers = [*clip_tokenizers, t5_tokenizer]
    bundle = SD3.bundle(transformer, encoders, tokenizers, scheduler, vae, "preset:bench-sd35")
    SD3.set_dropout(bundle, dropout)  # model.dropout
    return bundle


def register_presets() -> None:
    """Let `model.base = "preset:bench-sd15"`, `"preset:bench-sdxl"`, `"preset:bench-sd35"`
    and `"preset:bench-tiny-sd3"` name the benchmark's models (this process only)."""
    PRESETS.setdefault("bench-sd15", sd15)
    PRESETS.setdefault("bench-sdxl", sdxl)
    PRESETS.setdefault("bench-sd35", sd35)
    PRESETS.setdefault("bench-tiny-sd3", bench_tiny_sd3)


def build_bundle(arch: Arch, seed: int = 0) -> ModelBundle:
    """The model with real (random, seeded) weights, as sdtune builds it for `arch.base`."""
    if arch.base is None:
        raise ValueError(f"{arch.name} has no sdtune bundle")
    register_presets()
    return build_preset(arch.base.removeprefix("preset:"), seed)


def _is_transformer(arch: Arch) -> bool:
    return arch.peer == PEER_SD3


def _meta_components(arch: Arch) -> tuple[torch.nn.Module, list, AutoencoderKL | None]:
    """The architecture on the meta device (shapes only, no memory, no initialisation): the
    denoiser (UNet or SD3 transformer), the text encoders in order, the VAE."""
    if arch.name == "sd35":
        with torch.device("meta"):
            bundle = sd35()
        return bundle.denoiser, list(bundle.text_encoders.values()), bundle.vae
    if arch.name == "sd15":
        unet_cfg, text_cfgs, vae_cfg = SD15_UNET, [CLIPTextConfig(**CLIP_L)], SD_VAE
    elif arch.name == "sdxl":
        unet_cfg, vae_cfg = SDXL_UNET, SDXL_VAE
        text_cfgs = [CLIPTextConfig(**CLIP_L), CLIPTextConfig(**CLIP_BIGG)]
    else:  # a tiny preset is cheap to build for real; it is what counts
        bundle = build_bundle(arch)
        for module in bundle.components().values():
            module.to("meta")
        return bundle.denoiser, list(bundle.text_encoders.values()), bundle.vae
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        encoders = [CLIPTextModel(text_cfgs[0])]
        if len(text_cfgs) > 1:
            encoders.append(CLIPTextModelWithProjection(text_cfgs[1]))
        vae = AutoencoderKL.from_config(vae_cfg) if vae_cfg is not None else None
    return unet, encoders, vae


def resolution_multiple(arch: Arch) -> int:
    """Image sides must be a multiple of this: the VAE's downsampling times the UNet's (or the
    transformer's patch size)."""
    denoiser, _, vae = _meta_components(arch)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    if _is_transformer(arch):
        return vae_factor * int(denoiser.config.patch_size)
    return vae_factor * 2 ** (len(denoiser.config.block_out_channels) - 1)


def parameter_counts(arch: Arch) -> dict[str, int]:
    denoiser, encoders, vae = _meta_components(arch)
    name = "transformer" if _is_transformer(arch) else "unet"
    counts = {name: sum(p.numel() for p in denoiser.parameters())}
    for i, encoder in enumerate(encoders):
        counts["text_encoder" + (f"_{i + 1}" if i else "")] = sum(
            p.numel() for p in encoder.parameters()
        )
    if vae is not None:
        counts["vae"] = sum(p.numel() for p in vae.parameters())
    return counts


def step_flops(arch: Arch, resolution: int, batch: int, train_text: bool) -> dict[str, int]:
    """FLOPs of one training step at this shape, counted by torch's FlopCounterMode on the meta
    device (matmuls, convolutions and attention; elementwise work is not counted): the VAE
    encode, the text encoder(s), the UNet forward and the whole backward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    if _is_transformer(arch):
        return _transformer_step_flops(arch, resolution, batch, train_text)
    unet, encoders, vae = _meta_components(arch)
    for module in [*encoders, *([vae] if vae is not None else [])]:
        module.requires_grad_(train_text and module is not vae)
    channels = vae.config.in_channels if vae is not None else unet.config.in_channels
    pixels = torch.zeros(batch, channels, resolution, resolution, device="meta")
    length = encoders[0].config.max_position_embeddings
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    flops: dict[str, int] = {}
    with FlopCounterMode(display=False) as counter:

        def mark(name: str) -> None:
            flops[name] = counter.get_total_flops() - sum(flops.values())

        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() if vae is not None else pixels
        mark("vae_encode")
        with nullcontext() if train_text else torch.no_grad():
            outputs = [e(ids, output_hidden_states=True) for e in encoders]
        if len(encoders) == 1:
            hidden, extra = outputs[0].last_hidden_state, {}
        else:  # SDXL: penultimate states of both encoders, pooled bigG embedding, size/crop ids
            hidden = torch.cat([o.hidden_states[-2] for o in outputs], dim=-1)
            time_ids = torch.zeros(batch, 6, device="meta")
            extra = {
                "added_cond_kwargs": {"text_embeds": outputs[1].text_embeds, "time_ids": time_ids}
            }
        mark("text_encoder")
        pred = unet(latents, timesteps, encoder_hidden_states=hidden, **extra).sample
        mark("unet_forward")
        pred.float().pow(2).mean().backward()
        mark("backward")
    flops["total"] = sum(flops.values())
    return flops


def _transformer_step_flops(arch: Arch, resolution: int, batch: int, train_text: bool) -> dict:
    """step_flops for the SD3 layout: the VAE encode, CLIP-L and CLIP-G (penultimate states,
    pooled outputs) and T5 at 77 tokens each, the transformer's forward and the backward
    (`train_text` trains the CLIP encoders, never T5)."""
    from torch.utils.flop_counter import FlopCounterMode

    transformer, encoders, vae = _meta_components(arch)
    for i, module in enumerate([vae, *encoders]):
        module.requires_grad_(train_text and 1 <= i <= 2)
    with torch.device("meta"):
        pixels = torch.zeros(batch, 3, resolution, resolution)
        ids = torch.zeros(batch, SD3_TOKENS, dtype=torch.long)
        timesteps = torch.zeros(batch)
    flops: dict[str, int] = {}
    with FlopCounterMode(display=False) as counter:

        def mark(name: str) -> None:
            flops[name] = counter.get_total_flops() - sum(flops.values())

        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample()
        mark("vae_encode")
        with nullcontext() if train_text else torch.no_grad():
            clip = [e(ids, output_hidden_states=True) for e in encoders[:2]]
        with torch.no_grad():
            t5 = encoders[2](ids)[0]
        hidden = torch.cat([o.hidden_states[-2] for o in clip], dim=-1)
        hidden = torch.nn.functional.pad(hidden, (0, t5.shape[-1] - hidden.shape[-1]))
        hidden = torch.cat([hidden, t5], dim=-2)
        pooled = torch.cat([o.text_embeds for o in clip], dim=-1)
        mark("text_encoder")
        pred = transformer(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
        ).sample
        mark("transformer_forward")
        pred.float().pow(2).mean().backward()
        mark("backward")
    flops["total"] = sum(flops.values())
    return flops
