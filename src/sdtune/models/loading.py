"""Resolve `model.base` to a ModelBundle: preset, diffusers folder, cached hub id or single file.

The family is detected from the component configs and printed, never guessed silently.
Nothing here downloads: hub ids resolve from the local Hugging Face cache only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from sdtune.config import DiffusionConfig, ModelConfig
from sdtune.errors import ModelError
from sdtune.models.bundle import MODEL_FILE, ModelBundle, save_bundle
from sdtune.models.families import denoiser_folders, family_of_folder
from sdtune.models.families.sd import shapes_only_active
from sdtune.models.presets import build_preset

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


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


OPTIONAL = ("text_encoder_3",)
"""The model.* switches that leave a component out (`false`): their names are the components'."""


def left_out_of(model: ModelConfig) -> frozenset[str]:
    """The components `model` leaves out (model.text_encoder_3 = false)."""
    return frozenset(name for name in OPTIONAL if not getattr(model, name))


def load_folder(path: Path, source: str, without: frozenset[str] = frozenset()) -> ModelBundle:
    """Load a diffusers pipeline folder (or an sdtune model folder) through its family, with
    the optional components `without` names not loaded."""
    folders = denoiser_folders()
    if not any((path / name / "config.json").is_file() for name in folders):
        raise ModelError(
            f"model.base: {path} is not a diffusers pipeline folder (no "
            f"{' or '.join(f'{n}/config.json' for n in folders)})"
        )
    info = read_model_info(path)
    family = family_of_folder(path, info)
    family.check_left_out(without, source)
    return family.leave_out(family.load_folder(path, source, info, without), without)


def load_single_file(
    path: Path, config_source: str | None, source: str, without: frozenset[str] = frozenset()
) -> ModelBundle:
    """A single-file SD checkpoint (.safetensors/.ckpt) through diffusers' single-file loading.

    Component configs and the tokenizer come from `config_source` (a diffusers folder or a cached
    hub id), so that nothing is downloaded.
    """
    if config_source is None:  # an sdtune export names its base, which has the configs
        config_source = exported_base(path)
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
        folders = denoiser_folders()
        if not any((config_dir / name / "config.json").is_file() for name in folders):
            raise ModelError(
                f"model.config_source: {config_source} is not a diffusers pipeline folder (no "
                f"{' or '.join(f'{n}/config.json' for n in folders)})"
            )
        family = family_of_folder(config_dir, read_model_info(config_dir))
        family.check_left_out(without, source)
        if shapes_only_active():  # the architecture is its config source's: no weight read
            bundle = family.load_folder(config_dir, source, read_model_info(config_dir), without)
        else:
            bundle = family.load_single_file(path, config_dir, source, without)
        return family.leave_out(bundle, without)


def exported_base(path: Path) -> str | None:
    """The base model an sdtune export names in its metadata (None for other files)."""
    if path.suffix == ".ckpt":
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable file is reported when it is loaded
            return None
        meta = data.get("sdtune", {}) if isinstance(data, dict) else {}
        return meta.get("sdtune.base_model") or None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("sdtune.base_model") or None
    except Exception:  # an unreadable header is reported when the file is loaded
        return None


def load_model(model: ModelConfig, diffusion: DiffusionConfig, seed: int) -> ModelBundle:
    """Resolve `model.base`, apply the diffusion and dropout settings, return float32 on CPU."""
    base, without = model.base, left_out_of(model)
    if base.startswith("preset:"):
        bundle = build_preset(base.removeprefix("preset:"), seed, model.dropout)
        bundle.arch.check_left_out(without, base)
        bundle.arch.leave_out(bundle, without)
    else:
        path = Path(base).expanduser()
        if path.is_file():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                raise ModelError(
                    f"model.base: {path} is a file but not a .safetensors or .ckpt checkpoint"
                )
            bundle = load_single_file(path, model.config_source, base, without)
        elif path.is_dir() and _is_adapter_folder(path):
            return load_adapter_folder(path, diffusion, without)
        elif path.is_dir():
            bundle = load_folder(path, base, without)
        elif HUB_ID.match(base):
            bundle = load_folder(resolve_hub_id(base), base, without)
        else:
            raise ModelError(
                f"model.base: '{base}' is not a preset:NAME, an existing folder or file, "
                "or a hub id (owner/name)"
            )
    bundle.arch.apply_diffusion_settings(bundle, diffusion)
    if model.dropout > 0:
        bundle.arch.set_dropout(bundle, model.dropout)
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


def load_adapter_folder(
    path: Path, diffusion: DiffusionConfig, without: frozenset[str] = frozenset()
) -> ModelBundle:
    """A trained-adapters folder (sdtune's RUN/model after LoRA or textual inversion): its base
    model, without what it was trained without (its 'left_out') and `without`, with the LoRA
    and the embedding it names applied."""
    from sdtune.models.embeddings import load_embedding_file
    from sdtune.models.lora import load_lora_files

    info = read_model_info(path)
    if not isinstance(info.get("base"), str):
        raise ModelError(f"{path / MODEL_FILE}: names no base model ('base'); it is damaged")
    left = without | frozenset(info.get("left_out") or ())
    base = ModelConfig(
        base=info["base"],
        config_source=info.get("config_source"),
        **{name: name not in left for name in OPTIONAL},
    )
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
    return bundle.arch.describe(bundle)
