"""Export a checkpoint to the formats users load: a diffusers folder, a single-file SD
checkpoint (.safetensors with the original key names, or a .ckpt), each carrying metadata."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import tomllib
import torch
from safetensors.torch import save_file

import sdtune
from sdtune.checkpoint.convert import bundle_to_single_file
from sdtune.checkpoint.state import (
    ARCH_KEY,
    CONFIG_KEY,
    PROGRESS_KEY,
    architecture_record,
    check_architecture,
    checkpoint_has_ema,
    checkpoint_weights,
    find_checkpoint,
    frozen_fingerprint,
)
from sdtune.checkpoint.store import MANIFEST, CheckpointError, verify_checkpoint
from sdtune.config import validate_config
from sdtune.errors import UserError
from sdtune.files import atomic_output
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
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run directory or step-NNNNNNN/)")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    refusals: list[str] = []

    def note(line: str) -> None:
        if line.startswith("checkpoint: refusing "):
            refusals.append(line.removeprefix("checkpoint: refusing "))
        say(line)

    found = find_checkpoint(root, note, fast) if root.is_dir() else None
    if found is not None:
        return found
    if refusals:  # the newest one's reason, and where to see all of them
        raise CheckpointError(
            f"{path}: no checkpoint verifies ({len(refusals)} refused; the newest: "
            f"{refusals[0]}); see them all with `sdtune inspect {path}`"
        )
    raise CheckpointError(
        f"{path}: no checkpoint found (expected a run directory or step-NNNNNNN/)"
    )


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
    has_ema = checkpoint_has_ema(ckpt)
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"{ckpt}: has no EMA weights (train.ema was off); use --weights raw")
    use = "ema" if (weights == "ema" or (weights == "auto" and has_ema)) else "raw"
    state = checkpoint_weights(ckpt, "ema" if use == "ema" else "model")  # sharded or not
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(state[name])
    for module in bundle.components().values():
        module.eval()
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

    fmt = check_export_target(fmt, out, overwrite)
    if fmt not in ADAPTER_FORMATS:
        if fmt != "diffusers" and bundle.extra_tokens:
            raise UserError(
                f"--format {fmt}: this model has learned tokens ({', '.join(bundle.extra_tokens)}), "
                "which SD single files cannot hold; export them with --format embedding (and "
                "the rest with --format diffusers)"
            )
        bundle.arch.check_export(bundle, fmt, meta["base_model"])
        bundle = adapters.merged_copy(bundle, lora_scale)
    if fmt in ADAPTER_FORMATS:  # single files, each written atomically
        if fmt == "lora":
            variant = adapters.variant_of(bundle)
            if variant in ("loha", "lokr"):
                raise UserError(
                    f"--format lora: diffusers' LoRA loader reads LoRA and DoRA, not "
                    f"{adapters.VARIANT_NAMES[variant]}; export --format kohya (ComfyUI, "
                    "AUTOMATIC1111) or the merged model (--format merged)"
                )
            return adapters.save_lora_diffusers(bundle, out, meta)
        if fmt == "kohya":
            return adapters.save_lora_kohya(bundle, out, meta)
        if token is None:
            raise UserError(
                "--format embedding: this checkpoint learned no textual-inversion token"
            )
        return adapters.save_embedding(bundle, out, token, meta)
    with atomic_output(out, folder=fmt == "diffusers") as tmp:
        if fmt == "diffusers":
            save_bundle(bundle, tmp, {"export": meta})
        else:
            state = bundle_to_single_file(bundle)
            metadata = {f"sdtune.{k}": str(v) for k, v in meta.items()}
            if fmt == "single-file":
                save_file(state, str(tmp), metadata=metadata)
            else:
                torch.save({"state_dict": state, "sdtune": metadata}, tmp)
    return out


def check_export_target(fmt: str, out: Path, overwrite: bool) -> str:
    """The format an export to `out` writes ('merged' resolved), if `out` may be written:
    replaced only with `overwrite`, and only when it is what such an export writes."""
    from sdtune.files import check_writable

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it")
    if fmt in ADAPTER_FORMATS and out.suffix != ".safetensors":
        raise UserError(f"--format {fmt}: --out must be a .safetensors file (got {out})")
    if fmt == "merged":
        fmt = "single-file" if out.suffix == ".safetensors" else "diffusers"
    suffix = {"single-file": ".safetensors", "ckpt": ".ckpt"}.get(fmt)
    if suffix is not None and out.suffix != suffix:
        raise UserError(f"--format {fmt}: --out must be a {suffix} file (got {out})")
    _check_replaceable(out, fmt)
    check_writable(out, folder=fmt == "diffusers")
    return fmt


def _check_replaceable(out: Path, fmt: str) -> None:
    """--overwrite replaces what an export wrote, never a user's other files or folders."""
    from sdtune.models.bundle import MODEL_FILE

    if not out.exists():
        return
    if fmt == "diffusers":
        if not out.is_dir():
            raise UserError(f"--out {out} is a file; a diffusers export is a folder")
        if not (out / MODEL_FILE).is_file():
            raise UserError(
                f"--out {out} is a folder that is not an sdtune export (no {MODEL_FILE}); "
                "sdtune replaces only folders it wrote: choose another --out"
            )
    elif out.is_dir():
        raise UserError(f"--out {out} is a folder; --format {fmt} writes one file")


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
