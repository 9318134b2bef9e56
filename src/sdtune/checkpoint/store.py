"""Atomic, verified checkpoint directories.

Written by hand because no library in the field writes checkpoints atomically: a checkpoint is
written into a temporary sibling, every file and the directory are fsynced, the directory is
renamed into place, and only then is `latest` replaced (atomically). `manifest.json` records the
size and sha256 of every file, so a truncated or corrupted checkpoint is detected on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import sdtune
from sdtune.errors import UserError
from sdtune.files import NoSpaceError, disk_full, fsync_path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or corrupt."""


def step_dirname(step: int) -> str:
    return f"step-{step:07d}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint(
    root: Path, step: int, writers: dict[str, Callable[[Path], None]], meta: dict | None = None
) -> Path:
    """Write files (name -> function writing that path) as checkpoint `step` under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dirname(step)
    tmp = root / f"{TMP_PREFIX}{step_dirname(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files = {}
        for name, write in writers.items():
            path = tmp / name
            write(path)
            fsync_path(path)
            files[name] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "sdtune_version": sdtune.__version__,
            "step": step,
            "files": files,
            **(meta or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        fsync_path(tmp / MANIFEST)
        fsync_path(tmp)
    except Exception as exc:  # the partial checkpoint goes; the earlier ones and latest stay
        full = disk_full(exc, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise NoSpaceError(f"{root}: the disk filled up while writing {final.name}") from exc
        raise
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    latest_tmp = root / f"{LATEST}.tmp"
    latest_tmp.write_text(final.name + "\n")
    fsync_path(latest_tmp)
    os.replace(latest_tmp, root / LATEST)
    fsync_path(root)
    return final


def verify_checkpoint(path: Path, fast: bool = False) -> dict:
    """Check every file against the manifest (size, and sha256 unless `fast`); return the manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete or not a checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        well_formed = isinstance(files, dict) and all(
            isinstance(info, dict)
            and isinstance(info.get("size"), int)
            and isinstance(info.get("sha256"), str)
            and Path(name).name == name
            for name, info in files.items()
        )
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    if not well_formed or not files:
        raise CheckpointError(f"{manifest_path}: malformed manifest (no valid file list)")
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        if file.stat().st_size != info["size"]:
            raise CheckpointError(
                f"{file}: size {file.stat().st_size} != {info['size']} in {MANIFEST} (truncated?)"
            )
        if not fast and sha256_of(file) != info["sha256"]:
            raise CheckpointError(f"{file}: sha256 does not match {MANIFEST} (corrupted)")
    return manifest
