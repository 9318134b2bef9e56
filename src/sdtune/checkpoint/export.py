"""Export a checkpoint to the formats users load: a diffusers folder, a single-file SD
checkpoint (.safetensors with the original key names, or a .ckpt), each carrying metadata."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import tomllib
import torch
from safetensors.torch import load_file, save_file

import sdtune
from sdtune.checkpoint.convert import bundle_to_single_file
from sdtune.checkpoint.state import (
    ARCH_KEY,
    CONFIG_KEY,
    EMA_KEY,
    MODEL_KEY,
    PROGRESS_KEY,
    architecture_record,
    check_architecture,
    find_checkpoint,
    frozen_fingerprint,
)
from sdtune.checkpoint.store import MANIFEST, CheckpointError, verify_checkpoint
from sdtune.config import validate_config
from sdtune.errors import UserError
from sdtune.models import load_model, save_bundle
from sdtune.models.adapt import prepare_model
from sdtune.models.bundle import ModelBundle

FORMATS = ("diffusers", "single-file", "ckpt", "merged", "lora", "kohya", "embedding")
ADAPTER_FORMATS = ("lora", "kohya", "embedding")


def resolve_checkpoint(path: Path, say, fast: bool = False) -> Path:
    """A verified checkpoint directory from a run directory, a checkpoints/ folder or a step dir."""
    if (path / MANIFEST).is_file():
        verify_checkpoint(path, fast=fast)
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = find_checkpoint(root, say, fast) if root.is_dir() else None
    if found is None:
        raise CheckpointError(
            f"{path}: no verified checkpoint found (expected a run directory or step-NNNNNNN/)"
        )
    return found


def load_checkpoint_model(ckpt: Path, weights: str = "auto") -> tuple[ModelBundle, dict]:
    """Rebuild the model a checkpoint belongs to and load its trained (EMA or raw) weights."""
    bundle, meta, _ = load_checkpoint_run(ckpt, weights)
    return bundle, meta


def load_checkpoint_run(ckpt: Path, weights: str = "auto"):
    """(bundle, export metadata, the checkpoint's config) for a verified checkpoint."""
    cfg = validate_config(tomllib.loads((ckpt / CONFIG_KEY).read_text()), str(ckpt / CONFIG_KEY))
    bundle = load_model(cfg.model, cfg.diffusion, cfg.seed)
    prepare_model(bundle, cfg)
    named = {f"{c}.{n}": p for c, m in bundle.components().items() for n, p in m.named_parameters()}
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    frozen = frozen_fingerprint({n: p for n, p in named.items() if not p.requires_grad})
    check_architecture(
        json.loads((ckpt / ARCH_KEY).read_text()),
        architecture_record(bundle, trainable, frozen, cfg.model.base),
        ckpt,
    )
    has_ema = (ckpt / EMA_KEY).is_file()
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"{ckpt}: has no EMA weights (train.ema was off); use --weights raw")
    use = "ema" if (weights == "ema" or (weights == "auto" and has_ema)) else "raw"
    state = load_file(str(ckpt / (EMA_KEY if use == "ema" else MODEL_KEY)))
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(state[name])
    bundle.unet.eval()
    bundle.text_encoder.eval()
    progress = json.loads((ckpt / PROGRESS_KEY).read_text())
    meta = {
        "sdtune_version": sdtune.__version__,
        "base_model": cfg.model.base,
        "steps": str(progress["step"]),
        "weights": use,
        "config_sha256": hashlib.sha256((ckpt / CONFIG_KEY).read_bytes()).hexdigest(),
        "family": bundle.family,
    }
    return bundle, meta, cfg


def export_model(
    bundle: ModelBundle,
    meta: dict,
    fmt: str,
    out: Path,
    overwrite: bool = False,
    lora_scale: float = 1.0,
    token: str | None = None,
) -> Path:
    """Write `bundle` as `fmt` to `out` (through a temporary sibling, then renamed).

    Full-model formats bake a LoRA in (times lora_scale) and fold new tokens into the table;
    'merged' is a diffusers folder, or a single file when `out` ends in .safetensors."""
    from sdtune.checkpoint import adapters

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it")
    if fmt in ADAPTER_FORMATS and out.suffix != ".safetensors":
        raise UserError(f"--format {fmt}: --out must be a .safetensors file (got {out})")
    if fmt == "merged":
        fmt = "single-file" if out.suffix == ".safetensors" else "diffusers"
    if fmt not in ADAPTER_FORMATS:
        if fmt != "diffusers" and bundle.extra_tokens:
            raise UserError(
                f"--format {fmt}: this model has learned tokens ({', '.join(bundle.extra_tokens)}), "
                "which SD single files cannot hold; export them with --format embedding (and "
                "the rest with --format diffusers)"
            )
        _check_single_file(bundle, fmt, meta)
        bundle = adapters.merged_copy(bundle, lora_scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ADAPTER_FORMATS:  # single files, each written atomically
        if out.exists():
            out.unlink()
        if fmt == "lora":
            return adapters.save_lora_diffusers(bundle, out, meta)
        if fmt == "kohya":
            return adapters.save_lora_kohya(bundle, out, meta)
        if token is None:
            raise UserError(
                "--format embedding: this checkpoint learned no textual-inversion token"
            )
        return adapters.save_embedding(bundle, out, token, meta)
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if fmt == "diffusers":
        save_bundle(bundle, tmp, {"export": meta})
    else:
        state = bundle_to_single_file(bundle)
        metadata = {f"sdtune.{k}": str(v) for k, v in meta.items()}
        if fmt == "single-file":
            save_file(state, str(tmp), metadata=metadata)
        else:
            torch.save({"state_dict": state, "sdtune": metadata}, tmp)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)
    return out


def _check_single_file(bundle: ModelBundle, fmt: str, meta: dict) -> None:
    if fmt != "diffusers" and bundle.vae is None:
        raise UserError(
            f"--format {fmt}: {meta['base_model']} is a pixel-space model (no VAE) and has no "
            "Stable Diffusion single-file layout; export it with --format diffusers"
        )
    if fmt != "diffusers" and bundle.family == "sd2":
        raise UserError(
            f"--format {fmt}: SD 2.x single files keep the text encoder in OpenCLIP layout, which "
            "sdtune does not write yet; export with --format diffusers"
        )


def single_file_metadata(path: Path) -> dict[str, str]:
    """The sdtune.* metadata of an exported .safetensors file ({} for other files)."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # unreadable headers are reported by the loader itself
        return {}
