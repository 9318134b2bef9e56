"""Resolve `model.base` to a ModelBundle: preset, diffusers folder, cached hub id or single file.

The family is detected from the component configs and printed, never guessed silently.
Nothing here downloads: hub ids resolve from the local Hugging Face cache only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from transformers import CLIPTextModel, CLIPTokenizer

from sdtune.config import DiffusionConfig, ModelConfig
from sdtune.diffusion.schedules import make_noise_scheduler
from sdtune.errors import ModelError
from sdtune.models.bundle import MODEL_FILE, ModelBundle, save_bundle
from sdtune.models.presets import build_preset

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def detect_family(unet_config: dict, has_second_text_encoder: bool, has_vae: bool) -> str:
    """sd1, sd2, sdxl, pixel or custom, from the UNet's config (and which components exist)."""
    if has_second_text_encoder or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if not has_vae:
        return "pixel"
    cross = unet_config.get("cross_attention_dim")
    if unet_config.get("in_channels") == 4 and unet_config.get("block_out_channels") == [
        320,
        640,
        1280,
        1280,
    ]:
        if cross == 768:
            return "sd1"
        if cross == 1024:
            return "sd2"
    return "custom"


def resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot folder of a cached hub repository (never downloads)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        raise ModelError(
            f"model.base: hub id '{repo_id}' is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); sdtune never downloads: fetch it first "
            f"(e.g. `hf download {repo_id}`) or point model.base at a local folder"
        ) from exc


def load_folder(path: Path, source: str) -> ModelBundle:
    """Load a diffusers pipeline folder (SD1/SD2 layout) or a pixel-space sdtune model folder."""
    if not (path / "unet" / "config.json").is_file():
        raise ModelError(
            f"model.base: {path} is not a diffusers pipeline folder (no unet/config.json)"
        )
    missing = [c for c in ("text_encoder", "tokenizer", "scheduler") if not (path / c).is_dir()]
    if missing:
        raise ModelError(
            f"model.base: {path} has no {'/, '.join(missing)}/ folder; a Stable Diffusion "
            "pipeline folder holds unet/, text_encoder/, tokenizer/, scheduler/ (and vae/)"
        )
    if (path / "text_encoder_2").is_dir():
        raise ModelError(
            f"model.base: {path} is an SDXL pipeline (it has text_encoder_2); "
            "sdtune train supports SD 1.x/2.x layouts so far"
        )
    info = read_model_info(path)
    has_vae = (path / "vae" / "config.json").is_file()

    def component(name: str, load):
        try:
            return load()
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"model.base: cannot load {path / name}: {first}") from exc

    unet = component("unet", lambda: UNet2DConditionModel.from_pretrained(path, subfolder="unet"))
    vae = (
        component("vae", lambda: AutoencoderKL.from_pretrained(path, subfolder="vae"))
        if has_vae
        else None
    )
    text_encoder = component(
        "text_encoder", lambda: CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    )
    tokenizer = component(
        "tokenizer", lambda: CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    )
    if not 0 < tokenizer.model_max_length <= 4096:  # an empty tokenizer/ gives 10**30
        raise ModelError(
            f"model.base: {path / 'tokenizer'} gives no usable maximum length "
            f"({tokenizer.model_max_length}); is its tokenizer_config.json missing?"
        )
    scheduler = component(
        "scheduler", lambda: DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    )
    family = detect_family(dict(unet.config), False, has_vae)
    if info.get("family") in ("pixel", "custom", "sd1", "sd2"):
        family = info["family"]
    return ModelBundle(unet, text_encoder, tokenizer, scheduler, vae, family, source)


def load_single_file(path: Path, config_source: str | None, source: str) -> ModelBundle:
    """A single-file SD checkpoint (.safetensors/.ckpt) through diffusers' single-file loading.

    Component configs and the tokenizer come from `config_source` (a diffusers folder or a cached
    hub id), so that nothing is downloaded.
    """
    from diffusers import StableDiffusionPipeline

    if config_source is None:  # an sdtune export names its base, which has the configs
        config_source = _exported_base(path)
    if config_source is None:
        raise ModelError(
            f"model.base: single-file checkpoint {path} needs its component configs: set "
            "model.config_source to a diffusers folder or cached hub id of the same architecture "
            "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)"
        )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sdtune-preset-") as scratch:
        config_dir = Path(config_source).expanduser()
        if config_source.startswith("preset:"):  # its configs, written for diffusers to read
            config_dir = Path(scratch)
            save_bundle(build_preset(config_source.removeprefix("preset:"), 0), config_dir)
        elif not config_dir.is_dir():
            if HUB_ID.match(config_source):
                config_dir = resolve_hub_id(config_source)
            else:
                raise ModelError(f"model.config_source: {config_source} is not a folder or hub id")
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path),
                config=str(config_dir),
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
            )
        except Exception as exc:  # diffusers raises many types for unreadable or mismatched files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"model.base: cannot load single-file checkpoint {path}: {first}"
            ) from exc
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    family = detect_family(dict(pipe.unet.config), False, True)
    return ModelBundle(
        pipe.unet, pipe.text_encoder, pipe.tokenizer, scheduler, pipe.vae, family, source
    )


def _exported_base(path: Path) -> str | None:
    """The base model an sdtune export names in its metadata (None for other files)."""
    if path.suffix == ".ckpt":
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable file is reported when it is loaded
            return None
        meta = data.get("sdtune", {}) if isinstance(data, dict) else {}
        return meta.get("sdtune.base_model")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("sdtune.base_model")
    except Exception:  # an unreadable header is reported when the file is loaded
        return None


def _apply_diffusion_overrides(bundle: ModelBundle, diffusion: DiffusionConfig) -> None:
    config = dict(bundle.noise_scheduler.config)
    if diffusion.noise_schedule is not None:
        bundle.noise_scheduler = make_noise_scheduler(
            diffusion.num_train_timesteps,
            diffusion.noise_schedule,
            diffusion.prediction_type or config.get("prediction_type", "epsilon"),
            config.get("beta_start", 0.00085),
            config.get("beta_end", 0.012),
        )
    elif diffusion.prediction_type is not None:
        bundle.noise_scheduler = DDPMScheduler.from_config(
            config, prediction_type=diffusion.prediction_type
        )


def set_unet_dropout(unet: UNet2DConditionModel, p: float) -> None:
    """Set the dropout probability of every residual block of the UNet (and record it)."""
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            module.dropout.p = p
    unet.register_to_config(dropout=p)


def load_model(model: ModelConfig, diffusion: DiffusionConfig, seed: int) -> ModelBundle:
    """Resolve `model.base`, apply the diffusion and dropout settings, return float32 on CPU."""
    base = model.base
    if base.startswith("preset:"):
        bundle = build_preset(base.removeprefix("preset:"), seed, model.dropout)
    else:
        path = Path(base).expanduser()
        if path.is_file():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                raise ModelError(
                    f"model.base: {path} is a file but not a .safetensors or .ckpt checkpoint"
                )
            bundle = load_single_file(path, model.config_source, base)
        elif path.is_dir() and _is_adapter_folder(path):
            return load_adapter_folder(path, diffusion)
        elif path.is_dir():
            bundle = load_folder(path, base)
        elif HUB_ID.match(base):
            bundle = load_folder(resolve_hub_id(base), base)
        else:
            raise ModelError(
                f"model.base: '{base}' is not a preset:NAME, an existing folder or file, "
                "or a hub id (owner/name)"
            )
    if bundle.family == "sdxl":
        raise ModelError(f"model.base: {base} is SDXL; sdtune train supports SD 1.x/2.x so far")
    _apply_diffusion_overrides(bundle, diffusion)
    if model.dropout > 0:
        set_unet_dropout(bundle.unet, model.dropout)
    for module in bundle.components().values():
        if next(module.parameters()).dtype != torch.float32:
            module.to(torch.float32)
    return bundle


def read_model_info(path: Path) -> dict:
    """A model folder's sdtune_model.json ({} when it has none), or a one-line error."""
    info = path / MODEL_FILE
    if not info.is_file():
        return {}
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"{info}: unreadable ({exc}); restore it from the run or export that wrote it"
        ) from None
    if not isinstance(data, dict):
        raise ModelError(
            f"{info}: not a JSON object; restore it from the run or export that wrote it"
        )
    return data


def _is_adapter_folder(path: Path) -> bool:
    return read_model_info(path).get("kind") == "adapters"


def load_adapter_folder(path: Path, diffusion: DiffusionConfig) -> ModelBundle:
    """A trained-adapters folder (sdtune's RUN/model after LoRA or textual inversion): its base
    model with the LoRA and the embedding it names applied."""
    from sdtune.models.embeddings import load_embedding_file
    from sdtune.models.lora import load_lora_files

    info = read_model_info(path)
    if not isinstance(info.get("base"), str):
        raise ModelError(f"{path / MODEL_FILE}: names no base model ('base'); it is damaged")
    base = ModelConfig(base=info["base"], config_source=info.get("config_source"))
    try:
        bundle = load_model(base, diffusion, int(info.get("seed", 0)))
    except ModelError as exc:
        raise ModelError(f"{path}: its base model cannot be loaded: {exc}") from None
    try:
        lora, embedding = info.get("lora"), info.get("embedding")
        lora_file = path / lora if lora else None
        embedding_file = (path / embedding["file"], embedding["token"]) if embedding else None
    except (TypeError, KeyError):
        raise ModelError(
            f"{path / MODEL_FILE}: its 'lora'/'embedding' entries are damaged"
        ) from None
    if lora_file is not None:
        load_lora_files(bundle, [(lora_file, 1.0)])
    if embedding_file is not None:
        load_embedding_file(bundle, *embedding_file)
    bundle.source = str(path)
    return bundle


def describe(bundle: ModelBundle) -> str:
    """One line naming what was loaded."""
    unet = bundle.unet.config
    space = "pixel space" if bundle.vae is None else f"latents /{bundle.downsample_factor}"
    return (
        f"model: {bundle.source} | family {bundle.family} | {space} | "
        f"prediction {bundle.prediction_type} | "
        f"schedule {bundle.noise_scheduler.config.beta_schedule} | "
        f"cross-attention dim {unet.cross_attention_dim}"
    )
