"""`sdtune inspect`: what a checkpoint holds and whether it verifies."""

from __future__ import annotations

import json
from pathlib import Path

import tomllib

from sdtune.checkpoint.state import CONFIG_KEY, PROGRESS_KEY, checkpoint_dirs
from sdtune.checkpoint.store import LATEST, MANIFEST, CheckpointError, verify_checkpoint


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
    """Print every checkpoint under `path` with its verification; 1 if any fails, else 0."""
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
