"""ModelBundle: the components of one text-to-image diffusion model, and their (de)serialisation.

A bundle on disk is a diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/,
scheduler/, model_index.json), each component serialised on its own, plus `sdtune_model.json`
naming the family. Pixel-space models (no VAE) use the same layout without vae/ and without
model_index.json, since no diffusers pipeline class describes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

import sdtune

MODEL_FILE = "sdtune_model.json"


@dataclass
class ModelBundle:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    vae: AutoencoderKL | None
    family: str
    """sd1, sd2, custom (a latent model of another size) or pixel (no VAE)."""
    source: str
    """What model.base said, for the record."""
    extra_tokens: dict[str, int] = field(default_factory=dict)
    """Textual-inversion tokens added to the tokenizer and how many vectors each has."""

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels if self.vae else self.unet.config.in_channels)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along one side (1 for pixel-space models)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae else 1

    def components(self) -> dict[str, torch.nn.Module]:
        out: dict[str, torch.nn.Module] = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.vae is not None:
            out["vae"] = self.vae
        return out

    def to(self, device: torch.device | str) -> ModelBundle:
        for module in self.components().values():
            module.to(device)
        return self

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        if self.extra_tokens:  # a multi-vector token stands for several tokens
            from sdtune.models.embeddings import expand_prompt

            prompts = [expand_prompt(p, self.extra_tokens) for p in prompts]
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode_prompts(self, prompts: list[str], device: torch.device | str) -> torch.Tensor:
        """Text-encoder hidden states for `prompts` (the UNet's encoder_hidden_states)."""
        ids = self.tokenize(prompts).to(device)
        return self.text_encoder(ids)[0]

    def encode_images(
        self, pixel_values: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in [-1, 1] to the UNet's input space (VAE latents, scaled; or the pixels)."""
        if self.vae is None:
            return pixel_values
        dist = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        return dist.sample(generator=generator) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The UNet's space back to images in [-1, 1]."""
        if self.vae is None:
            return latents
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(scaled).sample


def save_bundle(bundle: ModelBundle, directory: Path, metadata: dict | None = None) -> None:
    """Write the bundle as a diffusers-layout folder (safetensors weights, one folder a component)."""
    directory.mkdir(parents=True, exist_ok=True)
    bundle.unet.save_pretrained(directory / "unet", safe_serialization=True)
    bundle.text_encoder.save_pretrained(directory / "text_encoder", safe_serialization=True)
    bundle.tokenizer.save_pretrained(directory / "tokenizer")
    bundle.noise_scheduler.save_pretrained(directory / "scheduler")
    if bundle.vae is not None:
        bundle.vae.save_pretrained(directory / "vae", safe_serialization=True)
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": _diffusers_version(),
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
        }
        (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info = {
        "family": bundle.family,
        "source": bundle.source,
        "sdtune_version": sdtune.__version__,
        **(metadata or {}),
    }
    (directory / MODEL_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
