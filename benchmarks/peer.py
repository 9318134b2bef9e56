"""What both trainers share, and the peer's side of it.

The peer is diffusers' example script for the model's family: `examples/text_to_image/
train_text_to_image.py` for SD 1.x/2.x, `train_text_to_image_sdxl.py` for SDXL,
`examples/dreambooth/train_dreambooth_lora_sd3.py` for SD 3.x (LoRA only: diffusers has no
SD3 full fine-tune script; the harness then trains sdtune's LoRA on the same modules at the
same rank), given by path (the user takes it from the diffusers repository, at the tag of the
installed diffusers; it is never kept in this repository). Both trainers read the same image folder (the digits written
as PNGs with a metadata.jsonl) and the same diffusers pipeline folder (the model saved once
by sdtune's `save_bundle`), with the same optimizer settings, batch and resolution.

The SDXL script encodes every image and caption once before its first step (`datasets.map`)
and trains on those latents and embeddings; sdtune does the same work per step with
`data.cache_latents` and `data.cache_text`, which the harness then sets (`PEER_PRECOMPUTES`).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

from sdtune.errors import UserError

PEER_NEEDS = ("datasets", "torchvision", "tensorboard", "packaging")
# The settings both trainers run with: the peer's defaults, spelled out for sdtune too.
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-2
MAX_GRAD_NORM = 1.0
# What a peer script computes once before training instead of at every step: sdtune's matching
# overrides, so that both trainers do the same work per step.
PEER_PRECOMPUTES = {  # data.* keys set to true
    "examples/text_to_image/train_text_to_image_sdxl.py": ("cache_latents", "cache_text"),
}
SD3_PEER = "examples/dreambooth/train_dreambooth_lora_sd3.py"
# What each peer's text must hold (and must not): tells one example from another.
PEER_MARKS = {
    "examples/text_to_image/train_text_to_image.py": (
        ("--train_data_dir", "def main"),
        ("StableDiffusionXLPipeline", "StableDiffusion3Pipeline"),
    ),
    "examples/text_to_image/train_text_to_image_sdxl.py": (
        ("--train_data_dir", "def main", "StableDiffusionXLPipeline"),
        ("StableDiffusion3Pipeline",),
    ),
    SD3_PEER: (
        ("--instance_data_dir", "--dataset_name", "def main", "StableDiffusion3Pipeline"),
        (),
    ),
}
# The SD3 peer's LoRA (its defaults: rank 4, alpha = rank, the attention projections of both
# streams), which sdtune's side is given too.
SD3_LORA_RANK = 4
SD3_LORA_TARGETS = [
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
]  # fmt: skip
PEER_SETTINGS = {  # sdtune overrides that make its run the peer's kind of run
    SD3_PEER: [
        "lora.enabled=true",
        f"lora.rank={SD3_LORA_RANK}",
        f"lora.alpha={SD3_LORA_RANK}",
        "lora.unet_targets=[" + ",".join(f'"{t}"' for t in SD3_LORA_TARGETS) + "]",
    ],
}


class BenchmarkError(UserError):
    """The benchmark cannot run as asked; the message says what to do."""


def check_peer(script: Path, arch) -> dict:
    """The peer script's facts (path, sha256, minimum diffusers), or a one-line error naming
    what is missing. `arch` says which diffusers example it must be."""
    import hashlib

    import diffusers
    from packaging.version import Version

    if arch.peer is None:
        raise BenchmarkError(
            f"--peer: diffusers' text-to-image scripts train latent (VAE) models; {arch.name} "
            "has no VAE, so it has no peer"
        )
    if not script.is_file():
        raise BenchmarkError(
            f"--peer {script}: no such file; take {arch.peer} from the diffusers repository "
            f"at the tag of your diffusers (v{diffusers.__version__})"
        )
    text = script.read_text(encoding="utf-8")
    needed, absent = PEER_MARKS[arch.peer]
    if not all(mark in text for mark in needed) or any(mark in text for mark in absent):
        raise BenchmarkError(
            f"--peer {script}: this is not diffusers' {arch.peer}, the peer for --model {arch.name}"
        )
    missing = [name for name in PEER_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise BenchmarkError(
            f"--peer: the peer script needs {', '.join(missing)}, not installed here "
            f"(pip install {' '.join(missing)}; see examples/text_to_image/requirements.txt)"
        )
    found = re.search(r'check_min_version\("([^"]+)"\)', text)
    needs = found.group(1) if found else None
    if needs is not None and Version(diffusers.__version__) < Version(needs):
        raise BenchmarkError(
            f"--peer {script} needs diffusers>={needs} but {diffusers.__version__} is installed; "
            f"take the script from the diffusers tag v{diffusers.__version__}"
        )
    return {
        "path": str(script),
        "example": arch.peer,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "min_diffusers": needs,
        "has_interpolation_flag": "--image_interpolation_mode" in text,
    }


def write_digits_folder(folder: Path, resolution: int, channels: int, limit: int | None) -> Path:
    """sdtune's bundled digits as PNGs already at `resolution` (bicubic, as sdtune resizes), with a
    metadata.jsonl (file_name, text): the folder both trainers read. Reused when complete."""
    from PIL import Image

    from sdtune.data.sources import digits_records

    if (folder / "metadata.jsonl").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = []
    for i, record in enumerate(digits_records()[:limit]):
        image = record.open().resize((resolution, resolution), Image.Resampling.BICUBIC)
        name = f"{i:04d}.png"
        image.convert("RGB" if channels == 3 else "L").save(tmp / name)
        rows.append(json.dumps({"file_name": name, "text": record.caption}))
    (tmp / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    tmp.rename(folder)
    return folder


def write_model_folder(folder: Path, arch) -> Path:
    """The model as a diffusers pipeline folder (seed 0), written once and reused: the peer
    loads it with from_pretrained(subfolder=...), sdtune as model.base."""
    from benchmarks.models import build_bundle
    from sdtune.models.bundle import MODEL_FILE, save_bundle

    if (folder / MODEL_FILE).is_file():  # save_bundle writes this file last
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_bundle(build_bundle(arch, seed=0), tmp)
    tmp.rename(folder)
    return folder


def _shared_args(model_dir, out_dir, resolution, batch, max_steps, precision, workers):
    """The flags every diffusers example script takes alike: model, shape, optimizer, run."""
    return [
        "--pretrained_model_name_or_path", str(model_dir),
        "--resolution", str(resolution),
        "--center_crop",
        "--train_batch_size", str(batch),
        "--max_train_steps", str(max_steps),
        "--learning_rate", str(LEARNING_RATE),
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--adam_weight_decay", str(WEIGHT_DECAY),
        "--max_grad_norm", str(MAX_GRAD_NORM),
        "--mixed_precision", precision,
        "--seed", "0",
        "--output_dir", str(out_dir),
        "--checkpointing_steps", str(10**9),
        "--dataloader_num_workers", str(workers),
        "--report_to", "tensorboard",
    ]  # fmt: skip


def peer_args(
    peer: dict,
    model_dir: Path,
    data_dir: Path,
    out_dir: Path,
    resolution: int,
    batch: int,
    max_steps: int,
    precision: str,
    ema: bool,
    workers: int = 0,
) -> list[str]:
    """The peer's command line for the benchmark's model, data and settings."""
    args = _shared_args(model_dir, out_dir, resolution, batch, max_steps, precision, workers)
    if peer["example"] == SD3_PEER:
        if ema:
            raise BenchmarkError(
                f"--ema: diffusers' {SD3_PEER} keeps no EMA; leave out --ema to compare with it"
            )
        return args + sd3_peer_args(data_dir)
    args += ["--train_data_dir", str(data_dir)]
    if peer["has_interpolation_flag"]:  # sdtune resizes with bicubic
        args += ["--image_interpolation_mode", "bicubic"]
    if ema:
        args.append("--use_ema")
    return args


def sd3_peer_args(data_dir: Path) -> list[str]:
    """train_dreambooth_lora_sd3.py's own flags: the captioned digits folder read as a dataset
    (each image its own caption, encoded by all three encoders at every step, as sdtune does
    without data.cache_text), LoRA of rank 4 on its default modules, the flow matching
    objective sdtune trains (logit-normal levels, target eps - x_0: no EDM preconditioning)."""
    return [
        "--dataset_name", str(data_dir),
        "--image_column", "image",
        "--caption_column", "text",
        "--instance_prompt", "a digit",  # required; each image's own caption is used
        "--max_sequence_length", "77",
        "--rank", str(SD3_LORA_RANK),
        "--optimizer", "AdamW",
        "--weighting_scheme", "logit_normal",
        "--precondition_outputs", "0",
    ]  # fmt: skip


def sdtune_config(
    base: str,
    data_dir: Path,
    resolution: int,
    batch: int,
    max_steps: int,
    precision: str,
    ema: bool,
    train_text: bool,
    log_every: int,
    workers: int = 0,
) -> dict:
    """sdtune's config for the same run: no validation, samples, checkpoints or judge on the way."""
    return {
        "seed": 0,
        "model": {
            "base": base,
            "trainable": ["unet.*"] + (["text_encoder.*"] if train_text else []),
        },
        "data": {
            "source": "folder",
            "path": str(data_dir),
            "resolution": resolution,
            "center_crop": True,
            "val_fraction": 0.0,
            "num_workers": workers,
        },
        "train": {
            "max_steps": max_steps,
            "batch_size": batch,
            "learning_rate": LEARNING_RATE,
            "lr_schedule": "constant",
            "weight_decay": WEIGHT_DECAY,
            "max_grad_norm": MAX_GRAD_NORM,
            "mixed_precision": precision,
            "ema": ema,
            "log_every": log_every,
        },
        "checkpoint": {"every_steps": 0},
        "evaluate": {"every_steps": 0, "val_batches": 0, "before_training": False},
    }
