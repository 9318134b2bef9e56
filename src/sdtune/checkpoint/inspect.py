"""`sdtune inspect`: what a checkpoint holds and whether it verifies; and what an exported
file or model folder is (single-file checkpoint, LoRA, embedding, diffusers folder), read
from its headers without loading its weights."""

from __future__ import annotations

import json
from pathlib import Path

import tomllib

from sdtune.checkpoint.state import CONFIG_KEY, PROGRESS_KEY, checkpoint_dirs
from sdtune.checkpoint.store import LATEST, MANIFEST, CheckpointError, verify_checkpoint
from sdtune.errors import UserError

SHOWN_METADATA = 12  # metadata entries printed (the rest counted)


def _describe(path: Path, fast: bool) -> bool:
    try:
        manifest = verify_checkpoint(path, fast=fast)
        status = "verified (sizes only)" if fast else "verified (sizes and sha256)"
        ok = True
    except CheckpointError as exc:
        manifest, status, ok = None, f"FAILED: {exc}", False
    print(f"{path}: {status}")
    if manifest is not None:
        print(
            f"  step {manifest['step']}, format {manifest['format_version']}, sdtune {manifest['sdtune_version']}"
        )
        sharded = manifest.get("sharded")
        if sharded and sharded.get("by") == "deepspeed":  # an optimizer partition per process
            n, stage = sharded.get("processes"), sharded.get("zero_stage", 2)
            print(
                f"  sharded (deepspeed ZeRO-{stage}) by {n} processes; DeepSpeed ZeRO-{stage} "
                "resumes it (on another number of processes through its universal "
                "checkpoint), and sdtune export reads it"
            )
        elif sharded:  # torch.distributed.checkpoint files: .metadata and one shard per process
            print(
                f"  sharded ({sharded.get('by')}) by {sharded.get('processes')} processes; "
                "any number of processes resumes it, and sdtune export reads it whole"
            )
        for name, info in sorted(manifest["files"].items()):
            print(f"  {name:<22} {info['size']:>14,} bytes  sha256 {info['sha256'][:16]}")
        progress = json.loads((path / PROGRESS_KEY).read_text())
        pos = progress["position"]
        print(
            f"  data position: epoch {pos['epoch']}, index {pos['index']}; skipped steps {progress['skipped_steps']}"
        )
        cfg = tomllib.loads((path / CONFIG_KEY).read_text())
        train, model = cfg.get("train", {}), cfg.get("model", {})
        print(
            f"  config: model.base {model.get('base')}, trainable {model.get('trainable')}, "
            f"max_steps {train.get('max_steps')}, batch {train.get('batch_size')}, lr {train.get('learning_rate')}"
        )
    return ok


def inspect_path(path: Path, fast: bool = False) -> int:
    """Print every checkpoint under `path` with its verification (1 if any fails, else 0), or
    what an exported file or model folder holds."""
    if path.is_file():
        return inspect_file(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    from sdtune.models.families import denoiser_folders

    if (path / "model_index.json").is_file() or any(
        (path / d / "config.json").is_file() for d in denoiser_folders()
    ):
        return inspect_model_folder(path)
    if (path / MANIFEST).is_file() or path.name.startswith("step-"):
        return 0 if _describe(path, fast) else 1
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    dirs = checkpoint_dirs(root)
    if not dirs:
        raise CheckpointError(f"{path}: no checkpoints found")
    pointer = root / LATEST
    if pointer.is_file():
        print(f"latest -> {pointer.read_text().strip()}")
    results = [_describe(d, fast) for d in dirs]
    return 0 if all(results) else 1


def _header(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """Tensor names with (dtype, shape), and the metadata, of a .safetensors file's header."""
    import struct

    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(f"{path}: not a readable .safetensors file ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    try:
        tensors = {k: (v["dtype"], list(v["shape"])) for k, v in header.items()}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"{path}: not a readable .safetensors file (a garbled header)") from None
    size, needed = path.stat().st_size, 8 + length + end
    if size < needed:
        raise UserError(
            f"{path}: truncated: {size:,} bytes, but its header describes {needed:,}; copy or "
            "download it again"
        )
    return tensors, metadata


def _ckpt_tensors(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    import torch

    try:
        data = torch.load(path, map_location="meta", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable pickle is one line
        raise UserError(f"{path}: not a readable .ckpt checkpoint ({exc})") from None
    state = data.get("state_dict", data) if isinstance(data, dict) else {}
    meta = data.get("sdtune", {}) if isinstance(data, dict) else {}
    tensors = {
        k: (str(v.dtype).removeprefix("torch."), list(v.shape))
        for k, v in state.items()
        if hasattr(v, "shape")
    }
    return tensors, {k: str(v) for k, v in meta.items()}


def _variant(names: list[str]) -> str:
    if any(".hada_" in n for n in names):
        return "LoHa"
    if any(".lokr_" in n for n in names):
        return "LoKr"
    if any("magnitude" in n or n.endswith(".dora_scale") for n in names):
        return "DoRA"
    return "LoRA"


def _kind(tensors: dict) -> str:
    names = list(tensors)
    if any(n.startswith(("lora_unet_", "lora_te")) for n in names):
        return f"kohya {_variant(names)}"
    if any(".lora_A." in n or ".lora_B." in n or ".lora.down." in n for n in names):
        return f"diffusers {_variant(names)}"
    if any(".hada_" in n or ".lokr_" in n for n in names):
        return f"peft {_variant(names)}"
    if any(n.startswith("model.diffusion_model.") for n in names):
        return "single-file checkpoint"
    if "emb_params" in names or {"clip_l", "clip_g"} <= set(names):
        return "textual-inversion embedding"
    return "unknown layout"


def _lora_summary(tensors: dict, kind: str) -> list[str]:
    """Ranks, how many modules of each component carry an adapter, and the module kinds."""
    layout, variant = kind.split(" ", 1)
    if variant in ("LoHa", "LoKr"):  # one tensor names each module; the rank is where it is
        down = ".hada_w1_b" if variant == "LoHa" else (".lokr_w1", ".lokr_w1_a")
        rank_of = ".hada_w1_b" if variant == "LoHa" else ".lokr_w2_b"
    else:
        down = ".lora_down.weight" if layout == "kohya" else ".lora_A.weight"
        if layout == "diffusers" and not any(n.endswith(down) for n in tensors):
            down = ".lora.down.weight"
        rank_of = down
    ends = down if isinstance(down, tuple) else (down,)
    modules = {
        n.removesuffix(next(e for e in ends if n.endswith(e))): shape
        for n, (_, shape) in tensors.items()
        if n.endswith(ends)
    }
    ranks = sorted({shape[0] for n, (_, shape) in tensors.items() if n.endswith(rank_of)})
    if variant == "LoKr" and len(ranks) < len(modules):
        ranks = [*ranks, "full"]  # Kronecker factors stored whole
    from sdtune.models.families import FAMILIES

    known = {t for f in FAMILIES.values() for ts in f.lora_targets.values() for t in ts}
    known = sorted(known, key=len, reverse=True)  # the longest match names the module
    # kohya prefix -> component, as the families name them (lora_te1_ before lora_te_)
    prefixes = {p: c for f in FAMILIES.values() for c, p in f.kohya_prefixes.items()}
    by_length = sorted(prefixes, key=len, reverse=True)
    per_component: dict[str, int] = {}
    suffixes: set[str] = set()
    for name in modules:
        sep = "_" if layout == "kohya" else "."
        if layout == "kohya":
            prefix = next((p for p in by_length if name.startswith(p + "_")), None)
            component = prefixes[prefix] if prefix else name.split("_", 2)[1]
        else:
            component = name.split(".", 1)[0]
        target = next((t for t in known if name.endswith(sep + t.replace(".", sep))), None)
        suffixes.add(target or name.rsplit(sep, 1)[-1])
        per_component[component] = per_component.get(component, 0) + 1
    return [
        f"  rank {', '.join(map(str, ranks)) or '?'}; adapters on "
        + ", ".join(f"{n} {c} modules" for c, n in sorted(per_component.items())),
        f"  targets (module names end in): {', '.join(sorted(suffixes))}",
    ]


def inspect_file(path: Path) -> int:
    """What an exported file is: kind, tensors, parameters, LoRA ranks and targets, metadata."""
    if path.suffix == ".safetensors":
        tensors, metadata = _header(path)
    elif path.suffix == ".ckpt":
        tensors, metadata = _ckpt_tensors(path)
    else:
        raise UserError(
            f"{path}: sdtune inspects checkpoints, run directories, model folders and "
            ".safetensors/.ckpt files"
        )
    import math

    kind = _kind(tensors)
    dtypes = sorted({dtype for dtype, _ in tensors.values()})
    params = sum(math.prod(shape) for _, shape in tensors.values())
    print(f"{path}: {kind}, {len(tensors):,} tensors, {params:,} values ({', '.join(dtypes)})")
    if kind.endswith(("LoRA", "DoRA", "LoHa", "LoKr")):
        for line in _lora_summary(tensors, kind):
            print(line)
    elif kind == "single-file checkpoint":
        parts = {}
        for name, (_, shape) in tensors.items():
            part = ".".join(name.split(".")[:2])
            parts[part] = parts.get(part, 0) + math.prod(shape)
        for part, n in sorted(parts.items()):
            print(f"  {part:<40} {n:>16,} values")
    elif kind == "textual-inversion embedding":
        for name, (_, shape) in sorted(tensors.items()):
            print(f"  {name}: {shape[0] if len(shape) > 1 else 1} vector(s) of width {shape[-1]}")
    if metadata:
        shown = sorted(metadata.items())
        for key, value in shown[:SHOWN_METADATA]:
            value = value if len(value) <= 80 else value[:77] + "..."
            print(f"  metadata {key}: {value}")
        if len(shown) > SHOWN_METADATA:
            print(f"  ... and {len(shown) - SHOWN_METADATA} more metadata entries")
    return 0


def inspect_model_folder(path: Path) -> int:
    """A diffusers (or sdtune) model folder: its family, components and their sizes."""
    import math

    from sdtune.models.bundle import MODEL_FILE

    info = {}
    if (path / MODEL_FILE).is_file():
        from sdtune.models.loading import read_model_info

        info = read_model_info(path)
    index = {}
    if (path / "model_index.json").is_file():
        try:
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path / 'model_index.json'}: unreadable ({exc})") from None
    pipeline = index.get("_class_name", "no model_index.json")
    family = info.get("family", "?")
    print(f"{path}: diffusers model folder ({pipeline}), sdtune family {family}")
    for component in sorted(p for p in path.iterdir() if p.is_dir()):
        files = sorted(component.glob("*.safetensors"))
        values = sum(math.prod(shape) for f in files for _, shape in _header(f)[0].values())
        described = f"{values:>16,} values" if files else "(no weights)"
        print(f"  {component.name:<18} {described}")
    for key in ("base_model", "export"):
        if key in info:
            print(f"  {key}: {json.dumps(info[key], default=str)[:200]}")
    return 0
