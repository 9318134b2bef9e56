"""ModelBundle: the components of one text-to-image diffusion model, and their family.

The bundle holds modules by component name (the prefix of every parameter name: `unet.`,
`text_encoder.`, `vae.`, ...), the tokenizer of each text encoder, the training schedule and
where the model came from. What the components mean and how they are called is the family's
(`bundle.arch`, models/families): the bundle itself knows no architecture.

On disk a bundle is a diffusers pipeline folder (one folder per component) plus
`sdtune_model.json` naming the family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MODEL_FILE = "sdtune_model.json"


@dataclass
class ModelBundle:
    family: str
    """The family's name (models/families): sd1, sd2, custom, pixel, ..."""
    modules: dict[str, torch.nn.Module]
    """Component name -> module, in the family's order."""
    tokenizers: dict[str, Any]
    """Text-encoder component name -> its tokenizer."""
    noise_scheduler: Any
    """The training schedule (a diffusers scheduler whose config the samplers start from)."""
    source: str
    """What model.base said, for the record."""
    extra_tokens: dict[str, int] = field(default_factory=dict)
    """Textual-inversion tokens added to the tokenizers and how many vectors each has."""
    left_out: dict[str, int] = field(default_factory=dict)
    """Optional components not loaded (model.text_encoder_3 = false), with their parameter
    counts (0: unknown)."""

    @property
    def arch(self):
        """The family's implementation: every architecture-specific operation goes through it."""
        from sdtune.models.families import family_named

        return family_named(self.family)

    # what the family's components are
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.modules[self.arch.denoiser]

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {
            name: self.modules[name] for name in self.arch.text_encoders if name in self.modules
        }

    @property
    def vae(self):
        return self.modules.get("vae")

    # the components of the SD layout by their diffusers names (families and tests use them)
    @property
    def unet(self) -> torch.nn.Module:
        return self.modules["unet"]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.modules["text_encoder"]

    @property
    def tokenizer(self):
        return self.tokenizers["text_encoder"]

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    @property
    def image_channels(self) -> int:
        return self.arch.image_channels(self)

    @property
    def downsample_factor(self) -> int:
        return self.arch.downsample_factor(self)

    def components(self) -> dict[str, torch.nn.Module]:
        return dict(self.modules)

    def to(self, device: torch.device | str) -> ModelBundle:
        for module in self.modules.values():
            module.to(device)
        return self

    # the family's operations, for the callers that hold a bundle
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.arch.tokenize(self, prompts)

    def encode_prompts(self, prompts: list[str], device: torch.device | str) -> torch.Tensor:
        """The text encoders' hidden states of `prompts` (the rest of the conditioning, where a
        family has more: `arch.conditioning`)."""
        return self.arch.conditioning(self, prompts, device).hidden

    def encode_images(
        self, pixel_values: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.arch.encode_images(self, pixel_values, generator)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.arch.decode_latents(self, latents)


def save_bundle(bundle: ModelBundle, directory: Path, metadata: dict | None = None) -> None:
    """Write the bundle as a diffusers-layout folder (safetensors weights, one folder a component)."""
    bundle.arch.save(bundle, directory, metadata or {})
