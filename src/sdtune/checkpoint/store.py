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
        _write_manifest(tmp, step, files, meta)
    except Exception as exc:  # the partial checkpoint goes; the earlier ones and latest stay
        full = disk_full(exc, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise NoSpaceError(f"{root}: the disk filled up while writing {final.name}") from exc
        raise
    _publish(tmp, final)
    return final


def _write_manifest(tmp: Path, step: int, files: dict, meta: dict | None) -> None:
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


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete, fsynced `tmp` to `final`, then point `latest` at it (atomically)."""
    root = final.parent
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    latest_tmp = root / f"{LATEST}.tmp"
    latest_tmp.write_text(final.name + "\n")
    fsync_path(latest_tmp)
    os.replace(latest_tmp, root / LATEST)
    fsync_path(root)


def _inside(name: str) -> bool:
    """Whether a manifest's file name stays inside the checkpoint: a file, or a file in a
    folder of it (DeepSpeed writes its own folder), never a path out of it."""
    parts = name.split("/")
    return bool(name) and all(part not in ("", ".", "..") and "\\" not in part for part in parts)


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
            and _inside(name)
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


class Ranks:
    """The processes that write (and read) one sharded checkpoint together, over
    torch.distributed: each writes its own files, and the main process (rank 0) the manifest
    and `latest`, once every process has said its files are on disk."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        """`obj` from every process, in rank order, on every process (a barrier too)."""
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """The main process's `obj`, on every process."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def write_sharded_checkpoint(
    root: Path,
    step: int,
    ranks: Ranks,
    collective: Callable[[Path], None],
    own: dict[str, Callable[[Path], None]],
    meta: dict | None = None,
) -> Path:
    """Checkpoint `step` written by every process of `ranks` together, with write_checkpoint's
    promises: `collective(folder)` runs on every process (torch's distributed checkpoint
    writing each process's shard), `own` are this process's files alone. The files go into one
    temporary sibling; each process fsyncs and hashes its part of them; only when every
    process has reported does the main process write the manifest (every file's size and
    sha256), rename the folder into place and move `latest`. A process that fails or dies
    before then leaves the temporary folder, which the next start removes: `latest` never
    names a checkpoint with a half-written shard."""
    final = root / step_dirname(step)
    tmp = root / ranks.broadcast(f"{TMP_PREFIX}{step_dirname(step)}-{os.getpid()}")

    def together(phase: str, work) -> object:
        """Run `work` here; every process learns whether any failed (and all raise alike)."""
        result, error = None, None
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - every process must hear of any failure
            error = exc
        said = ranks.gather(None if error is None else (disk_full(error, tmp), repr(error)))
        failed = [(rank, f) for rank, f in enumerate(said) if f is not None]
        if not failed:
            return result
        if ranks.main and phase != "publish":
            shutil.rmtree(tmp, ignore_errors=True)
        if any(full for _, (full, _) in failed):
            raise NoSpaceError(f"{root}: the disk filled up while writing {final.name}") from error
        rank, (_, what) = failed[0]
        raise CheckpointError(
            f"{root}: process {rank} could not {phase} {final.name}: {what[:200]}"
        ) from error

    def make() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def write() -> None:
        collective(tmp)
        for file_name, writer in own.items():
            writer(tmp / file_name)

    together("create the folder of", make if ranks.main else lambda: None)
    together("write", write)
    # every file is written: the main process lists them, each process fsyncs and hashes
    # its share, and the manifest lists exactly what the main process saw
    names = ranks.broadcast(
        sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        if ranks.main
        else None
    )

    def hash_share() -> dict:
        files = {}
        for file_name in names[ranks.rank :: ranks.world]:
            path = tmp / file_name
            fsync_path(path)
            files[file_name] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
        return files

    listed = ranks.gather(together("hash", hash_share))

    def publish() -> None:
        files = {k: v for part in listed for k, v in sorted(part.items())}
        if sorted(files) != names:
            raise CheckpointError(f"{tmp}: hashed {len(files)} of {len(names)} files")
        for folder in sorted(p for p in tmp.rglob("*") if p.is_dir()):
            fsync_path(folder)  # a folder's entries (DeepSpeed's) are as durable as the files
        _write_manifest(tmp, step, files, meta)
        _publish(tmp, final)

    # no process goes on (or saves again) before `latest` has moved
    together("publish", publish if ranks.main else lambda: None)
    return final
