"""The model families sdtune trains, registered in one place: each module lists its families
(FAMILIES), its tiny presets (PRESETS) and how it recognises a diffusers folder of its layout
(family_of_folder). Adding a family is one module and one entry in MODULES."""

from __future__ import annotations

from pathlib import Path

from sdtune.errors import ModelError
from sdtune.models.families import sd, sd3, sdxl
from sdtune.models.families.base import Conditioning, Family

MODULES = (sd3, sd, sdxl)  # sd3 first: SD and SDXL read a folder's unet/, which SD3 lacks
FAMILIES: dict[str, Family] = {f.name: f for m in MODULES for f in m.FAMILIES}
PRESETS = {name: build for m in MODULES for name, build in m.PRESETS.items()}

__all__ = [
    "FAMILIES",
    "PRESETS",
    "Conditioning",
    "Family",
    "denoiser_folders",
    "detect_family",
    "family_named",
    "family_of_folder",
]


def denoiser_folders() -> list[str]:
    """The folders a diffusers pipeline keeps its denoiser in, one per family kind (unet,
    transformer): what makes a folder a model folder."""
    return sorted({family.denoiser for family in FAMILIES.values()}, reverse=True)


def family_named(name: str) -> Family:
    """The family a checkpoint or sdtune_model.json names."""
    if name not in FAMILIES:
        raise ModelError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of_folder(path: Path, info: dict) -> Family:
    """The family of a diffusers pipeline folder, from its layout and configs (never guessed:
    a layout no family recognises is a one-line error)."""
    for module in MODULES:
        found = module.family_of_folder(path, info)
        if found is not None:
            return found
    raise ModelError(f"model.base: {path} is a diffusers folder of a layout sdtune does not know")


def detect_family(unet_config: dict, has_second_text_encoder: bool, has_vae: bool) -> str:
    """sd1, sd2, sdxl, pixel or custom, from a UNet's config (and which components exist)."""
    if has_second_text_encoder or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return sd.sd_variant(unet_config, has_vae)
