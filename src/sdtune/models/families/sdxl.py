"""Stable Diffusion XL: one `UNet2DConditionModel` with `text_time` conditioning, two text
encoders (CLIP ViT-L and OpenCLIP ViT-bigG with its projection), a KL VAE (or none: the
pixel-space `preset:tiny-digits-xl`), DDPM.

What SDXL adds to the SD layout, and all that this module has to say:
- the conditioning is both encoders' penultimate hidden states side by side on the feature
  axis, the second encoder's pooled (projected) embedding, and six "time ids" per image: the
  image's original height and width, the top-left offset of its crop, and the size it was
  trained or sampled at (Podell et al. 2023, "micro-conditioning");
- the empty prompt (caption dropout, and guidance's negative when none is given) is zeros for
  the hidden states and the pooled embedding alike, as SDXL was trained and as diffusers'
  SDXL pipelines guide (`force_zeros_for_empty_prompt`); the time ids are kept;
- the token ids of the two tokenizers travel side by side in one row, so that batches of
  them concatenate and index like SD's;
- the VAE overflows in float16 (SDXL's most reported failure: black images, NaN losses), so
  it always runs in float32 outside any autocast, unless its config declares it fp16-safe
  (`force_upcast: false`, as the fp16-fix VAEs do);
- its file layouts: kohya's `lora_te1_`/`lora_te2_` prefixes and the `clip_l`/`clip_g`
  embedding file.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdtune.errors import ModelError, UserError
from sdtune.models.families.base import (
    Conditioning,
    keyed_embedding_file,
    read_keyed_embedding,
)
from sdtune.models.families.sd import (
    StableDiffusion,
    check_tokenizer,
    load_parts,
    most_tokens,
    text_config,
    tokenize_side_by_side,
)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
EMBEDDING_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # kohya, A1111, Comfy
TIME_IDS = "time_ids"
SINGLE_FILE_TE = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")


class StableDiffusionXL(StableDiffusion):
    denoiser = "unet"
    text_encoders = TEXT_ENCODERS
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}

    def __init__(self, name: str, label: str) -> None:
        self.name, self.label = name, label
        self.pipeline_class = "" if name == "pixel-xl" else "StableDiffusionXLPipeline"

    # ------------------------------------------------------------ components

    def architecture(self, bundle) -> dict:
        record = super().architecture(bundle)
        record["text_encoder_2"] = bundle.modules["text_encoder_2"].config.to_diff_dict()
        return record

    def describe(self, bundle) -> str:
        line = f"{super().describe(bundle)} | pooled {self.pooled_width(bundle)} + time ids"
        if bundle.vae is not None:
            line += f" | VAE {'fp16-safe' if self.vae_fp16_safe(bundle) else 'in fp32'}"
        return line

    def pooled_width(self, bundle) -> int:
        return int(bundle.modules["text_encoder_2"].config.projection_dim)

    # ------------------------------------------------------------ loading and saving

    def bundle(self, unet, encoders, tokenizers, scheduler, vae, source: str):
        from sdtune.models.bundle import ModelBundle

        check_unet(unet.config, source)
        modules = {"unet": unet, **dict(zip(TEXT_ENCODERS, encoders))}
        if vae is not None:
            modules["vae"] = vae
        return ModelBundle(
            self.name, modules, dict(zip(TEXT_ENCODERS, tokenizers)), scheduler, source
        )

    @staticmethod
    def check_layout(path: Path, key: str = "model.base") -> None:
        wanted = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
        missing = [c for c in wanted if not (path / c).is_dir()]
        if missing:
            raise ModelError(
                f"{key}: {path} has no {'/, '.join(missing)}/ folder; an SDXL pipeline "
                "folder holds unet/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, "
                "scheduler/ (and vae/)"
            )

    def load_folder(self, path: Path, source: str, info: dict, without=frozenset()):
        self.check_layout(path)

        unet, vae, encoders, tokenizers, scheduler = load_parts(
            path,
            {
                "text_encoder": (CLIPTextModel, "tokenizer"),
                "text_encoder_2": (CLIPTextModelWithProjection, "tokenizer_2"),
            },
        )
        return self.bundle(unet, encoders, tokenizers, scheduler, vae, source)

    def load_single_file(self, path: Path, config_dir: Path, source: str, without=frozenset()):
        from diffusers import StableDiffusionXLPipeline

        self.check_layout(config_dir, "model.config_source")
        try:
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path), config=str(config_dir), local_files_only=True
            )
        except Exception as exc:  # diffusers raises many types for unreadable or mismatched files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"model.base: cannot load SDXL single-file checkpoint {path}: {first}"
            ) from exc
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        encoders = (pipe.text_encoder, pipe.text_encoder_2)
        tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
        for tokenizer, folder in zip(tokenizers, ("tokenizer", "tokenizer_2")):
            check_tokenizer(tokenizer, config_dir / folder)
        return self.bundle(pipe.unet, encoders, tokenizers, scheduler, pipe.vae, source)

    tokenizer_folders = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}

    def pipeline_index(self) -> dict:
        return {
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
            "force_zeros_for_empty_prompt": True,
        }

    # ------------------------------------------------------------ conditioning

    def _tokenizers(self, bundle):
        return [bundle.tokenizers[name] for name in TEXT_ENCODERS]

    def tokenize(self, bundle, prompts: list[str]) -> torch.Tensor:
        """Both tokenizers' ids side by side: [ids of tokenizer | ids of tokenizer_2]."""
        return tokenize_side_by_side(bundle, self._tokenizers(bundle), prompts)

    def max_tokens(self, bundle) -> int:
        return min(int(t.model_max_length) for t in self._tokenizers(bundle))

    def token_counts(self, bundle, prompts: list[str]) -> list[int]:
        return most_tokens(self._tokenizers(bundle), prompts)

    def encode(self, bundle, ids, encoders=None) -> Conditioning:
        """Penultimate hidden states of both encoders, concatenated on the feature axis (as
        SDXL was trained), and the second encoder's projected pooled output."""
        split = int(bundle.tokenizers["text_encoder"].model_max_length)
        te1 = (encoders or {}).get("text_encoder", bundle.modules["text_encoder"])
        te2 = (encoders or {}).get("text_encoder_2", bundle.modules["text_encoder_2"])
        first = te1(ids[:, :split], output_hidden_states=True)
        second = te2(ids[:, split:], output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds
        # the empty prompt is no conditioning at all: zeros, as SDXL was trained with dropped
        # captions and as its pipelines guide (force_zeros_for_empty_prompt)
        # (a prompt with no tokens: its ids are BOS then EOS, read off the ids, not tokenized)
        empty = ids[:, 1] == bundle.tokenizers["text_encoder"].eos_token_id
        keep = (~empty).to(hidden.dtype)
        return Conditioning(hidden * keep[:, None, None], pooled * keep[:, None].to(pooled.dtype))

    def condition(self, bundle, text: Conditioning, batch: dict) -> Conditioning:
        """The text conditioning plus each image's time ids: (original height, width, crop
        top, left, target height, width). A batch without recorded geometry (sampling) is
        conditioned as an uncropped image of the target size, as diffusers samples."""
        target = target_size(bundle, batch)
        n = len(text)
        geometry = batch.get("geometry")
        if geometry is None:
            geometry = torch.tensor([[target[0], target[1], 0, 0]]).expand(n, 4)
        geometry = torch.as_tensor(geometry)
        sizes = torch.tensor([list(target)]).expand(n, 2)
        ids = torch.cat([geometry, sizes], dim=1).to(text.hidden.device, text.hidden.dtype)
        return text.with_extra(**{TIME_IDS: ids})

    def predict(self, bundle, noisy, timesteps, cond, denoiser=None):
        unet = denoiser if denoiser is not None else bundle.unet
        if TIME_IDS not in cond.extra or cond.pooled is None:
            raise ValueError("SDXL needs a Conditioning with pooled embeddings and time ids")
        added = {"text_embeds": cond.pooled, TIME_IDS: cond.extra[TIME_IDS]}
        return unet(
            noisy, timesteps, encoder_hidden_states=cond.hidden, added_cond_kwargs=added
        ).sample

    # ------------------------------------------------------------ images

    def vae_fp16_safe(self, bundle) -> bool:
        vae = bundle.vae
        return vae is not None and vae.config.get("force_upcast", True) is False

    def vae_precision(self, bundle, tensor: torch.Tensor):
        """No autocast around the VAE unless it is declared fp16-safe."""
        if self.vae_fp16_safe(bundle):
            return nullcontext()
        return torch.autocast(tensor.device.type, enabled=False)

    def encode_images(self, bundle, pixels, generator=None):
        vae = bundle.vae
        if vae is None:
            return pixels
        with self.vae_precision(bundle, pixels):
            dist = vae.encode(pixels.to(vae.dtype)).latent_dist
            return dist.sample(generator=generator) * vae.config.scaling_factor

    def decode_latents(self, bundle, latents):
        vae = bundle.vae
        if vae is None:
            return latents
        with self.vae_precision(bundle, latents):
            return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample

    # ------------------------------------------------------------ file layouts

    def check_export(self, bundle, fmt: str, base: str) -> None:
        if fmt in ("single-file", "ckpt") and bundle.vae is None:
            raise UserError(
                f"--format {fmt}: {base} is a pixel-space model (no VAE) and has no "
                "SDXL single-file layout; export it with --format diffusers"
            )

    def single_file_state(self, bundle) -> dict[str, torch.Tensor]:
        """The original SDXL layout that ComfyUI, AUTOMATIC1111 and diffusers' from_single_file
        read: model.diffusion_model.* (the added embedding as label_emb), first_stage_model.*,
        conditioner.embedders.0.transformer.* (CLIP) and conditioner.embedders.1.model.*
        (OpenCLIP)."""
        from sdtune.checkpoint.convert import (
            UNET_PREFIX,
            text_encoder_to_ldm,
            text_encoder_to_open_clip,
            unet_to_ldm,
            vae_to_ldm,
        )

        if bundle.vae is None:
            raise ValueError("a pixel-space model has no SDXL single-file layout")
        unet = dict(bundle.unet.state_dict())
        state = {
            UNET_PREFIX + f"label_emb.0.{ldm}.{kind}": unet.pop(f"add_embedding.linear_{i}.{kind}")
            for i, ldm in ((1, 0), (2, 2))
            for kind in ("weight", "bias")
        }
        state.update(unet_to_ldm(unet, dict(bundle.unet.config)))
        state.update(vae_to_ldm(bundle.vae.state_dict(), dict(bundle.vae.config)))
        encoders = bundle.text_encoders
        state.update(text_encoder_to_ldm(encoders["text_encoder"].state_dict(), SINGLE_FILE_TE[0]))
        state.update(
            text_encoder_to_open_clip(encoders["text_encoder_2"].state_dict(), SINGLE_FILE_TE[1])
        )
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def lora_loader(self):
        from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

        return StableDiffusionXLLoraLoaderMixin

    def kohya_metadata(self, bundle) -> dict[str, str]:
        return {
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_v2": "False",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        }

    def embedding_file(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return keyed_embedding_file(EMBEDDING_KEYS, vectors)

    def read_embedding(self, state: dict, path: Path) -> dict[str, torch.Tensor]:
        return read_keyed_embedding(EMBEDDING_KEYS, state, path, "an SDXL")


def target_size(bundle, batch: dict) -> tuple[int, int]:
    """The (height, width) in pixels the batch's images are trained or sampled at."""
    if "target_size" in batch:
        return tuple(int(s) for s in batch["target_size"])
    if batch.get("pixel_values") is not None:
        return tuple(int(s) for s in batch["pixel_values"].shape[-2:])
    if batch.get("latents") is not None:
        factor = bundle.downsample_factor
        return tuple(int(s) * factor for s in batch["latents"].shape[-2:])
    raise ValueError("SDXL conditioning needs the batch's image size")


def check_unet(config, source: str) -> None:
    """An SDXL UNet conditions on text_time; its added-embedding width must match."""
    if config.get("addition_embed_type") != "text_time":
        raise ModelError(
            f"model.base: {source}: the UNet has no text_time conditioning, so it is not SDXL"
        )


def tiny_unet(in_channels: int, cross: int, pooled: int, dropout: float, **layout):
    time_dim = 8
    return UNet2DConditionModel(
        in_channels=in_channels,
        out_channels=in_channels,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + 6 * time_dim,
        cross_attention_dim=cross,
        dropout=dropout,
        **layout,
    )


def tiny_encoders(max_length: int, widths: tuple[int, int], layers: int):
    from sdtune.models.tokenizer import build_tiny_tokenizer

    tokenizers = [build_tiny_tokenizer(max_length), build_tiny_tokenizer(max_length)]
    te1 = CLIPTextModel(text_config(widths[0], layers, 4, max_length, tokenizers[0]))
    te2 = CLIPTextModelWithProjection(text_config(widths[1], layers, 4, max_length, tokenizers[1]))
    return (te1, te2), tokenizers


def tiny_sdxl(dropout: float = 0.0):
    """Every SDXL component at toy size: 32 px images, 4x16x16 latents, two CLIP encoders
    (32 and 64 wide, the second with its projection), text_time conditioning."""
    from sdtune.diffusion.schedules import make_noise_scheduler

    encoders, tokenizers = tiny_encoders(16, (32, 64), 2)
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
        scaling_factor=0.13025,
        force_upcast=True,
    )
    unet = tiny_unet(
        4,
        32 + 64,
        64,
        dropout,
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        norm_num_groups=32,
    )
    scheduler = make_noise_scheduler(1000, "scaled_linear", "epsilon")
    return SDXL_CUSTOM.bundle(unet, encoders, tokenizers, scheduler, vae, "preset:tiny-sdxl")


def tiny_digits_xl(dropout: float = 0.0):
    """The quickstart's pixel-space digits model with SDXL's conditioning: two text encoders
    (penultimate states side by side, the second's pooled output) and the time ids."""
    from sdtune.diffusion.schedules import make_noise_scheduler

    encoders, tokenizers = tiny_encoders(12, (32, 64), 2)
    unet = tiny_unet(
        1,
        32 + 64,
        64,
        dropout,
        sample_size=16,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=16,
        norm_num_groups=16,
    )
    scheduler = make_noise_scheduler(1000, "squaredcos_cap_v2", "epsilon")
    return PIXEL_XL.bundle(unet, encoders, tokenizers, scheduler, None, "preset:tiny-digits-xl")


SDXL = StableDiffusionXL("sdxl", "Stable Diffusion XL")
SDXL_CUSTOM = StableDiffusionXL("sdxl-custom", "an SDXL layout of another size")
PIXEL_XL = StableDiffusionXL("pixel-xl", "a pixel-space model with SDXL's conditioning")
FAMILIES = (SDXL, SDXL_CUSTOM, PIXEL_XL)
PRESETS = {"tiny-sdxl": tiny_sdxl, "tiny-digits-xl": tiny_digits_xl}
BY_NAME = {f.name: f for f in FAMILIES}


def sdxl_variant(unet_config: dict, has_vae: bool) -> str:
    if not has_vae:
        return "pixel-xl"
    if unet_config.get("in_channels") == 4 and list(unet_config.get("block_out_channels", [])) == [
        320,
        640,
        1280,
    ]:
        return "sdxl"
    return "sdxl-custom"


def family_of_folder(path: Path, info: dict):
    """The variant of a diffusers folder of the SDXL layout (None: not SDXL)."""
    if not (path / "text_encoder_2").is_dir():
        return None
    config_file = path / "unet" / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model.base: {config_file} is unreadable ({exc})") from None
    if not isinstance(config, dict) or config.get("addition_embed_type") != "text_time":
        return None
    recorded = info.get("family")
    if recorded in BY_NAME:
        return BY_NAME[recorded]
    return BY_NAME[sdxl_variant(config, (path / "vae" / "config.json").is_file())]
