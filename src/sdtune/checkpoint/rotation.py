"""Which checkpoints to keep: the last N, every K-th, and the best by a validation metric.
Runs only after a successful save, so the newest good checkpoint is never deleted first."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from sdtune.checkpoint.state import checkpoint_dirs
from sdtune.checkpoint.store import LATEST, TMP_PREFIX


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def best_step(evaluations: list[dict], metric: str, mode: str, steps: set[int]) -> int | None:
    """The checkpointed step whose evaluation of `metric` is best (ties: the earliest)."""
    best: tuple[float, int] | None = None
    for row in evaluations:
        value = row.get(metric)
        if row.get("step") not in steps or value is None or not math.isfinite(value):
            continue
        key = (value if mode == "min" else -value, row["step"])
        if best is None or key < best:
            best = key
    return None if best is None else best[1]


def rotate(
    root: Path,
    keep_last: int | None,
    keep_every: int,
    keep_best: str | None,
    mode: str,
    evaluations: list[dict],
) -> list[Path]:
    """Delete the checkpoints no rule keeps; returns what was deleted."""
    dirs = checkpoint_dirs(root)
    if keep_last is None or not dirs:
        return []
    steps = {step_of(d): d for d in dirs}
    keep = {step_of(d) for d in dirs[-keep_last:]}
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    if keep_best:
        best = best_step(evaluations, keep_best, mode, set(steps))
        if best is not None:
            keep.add(best)
    pointer = root / LATEST
    if pointer.is_file():
        keep.add(step_of(root / pointer.read_text().strip()))
    removed = []
    for step, path in sorted(steps.items()):
        if step in keep:
            continue
        doomed = root / f"{TMP_PREFIX}delete-{path.name}-{os.getpid()}"
        os.rename(path, doomed)  # gone from view at once; a crash leaves only a temporary
        shutil.rmtree(doomed)
        removed.append(path)
    return removed
