"""The run directory: recognised by the marker sdtune writes, never clobbered unless asked, and
even then only what sdtune wrote there is removed (a user's own files in it stay)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import sdtune
from sdtune.errors import RunDirError
from sdtune.files import TMP_GLOB

MARKER = "sdtune_run.json"
# every name sdtune writes at the top of a run directory (and its .tmp- temporaries):
# --overwrite removes these and nothing else
WRITTEN = (
    MARKER,
    "config.toml",
    "trainable.txt",
    "data_report.json",
    "metrics.jsonl",
    "events.jsonl",
    "tensorboard",
    "samples",
    "checkpoints",
    "model",
    "run_summary.json",
    "report.html",
    "judge_samples.png",
    "judge.json",
)
CLASS_IMAGES = "class_images"  # DreamBooth's generated class-NNNNN.png/.txt; a user's own stay
RESULTS = ("model", "run_summary.json")  # what only a finished run leaves


def is_run_dir(path: Path) -> bool:
    return (path / MARKER).is_file()


def finished_results(run_dir: Path) -> list[str]:
    """The results of a finished run in `run_dir` (its final model, its summary), if any."""
    return [name for name in RESULTS if (run_dir / name).exists()]


def never_trained(run_dir: Path) -> bool:
    """A run directory whose run stopped before its first step (a bad file found while loading,
    Ctrl+C during set-up): no checkpoint, no result, no logged step. Running the same command
    again continues in it instead of asking for --overwrite (what it made, such as DreamBooth's
    class images, is kept and reused)."""
    if not is_run_dir(run_dir) or finished_results(run_dir):
        return False
    if any((run_dir / "checkpoints").glob("step-*")):
        return False
    metrics = run_dir / "metrics.jsonl"
    return not (metrics.is_file() and '"loss"' in metrics.read_text(errors="replace"))


def check_output(run_dir: Path) -> None:
    """`run_dir` is usable as a run directory: absent, empty, or marked as one by sdtune."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--output {run_dir} is a file, not a directory")
    if run_dir.is_dir() and not is_run_dir(run_dir) and any(run_dir.iterdir()):
        raise RunDirError(
            f"--output {run_dir} is a non-empty folder that sdtune did not create (no {MARKER}); "
            "choose another --output (sdtune never deletes files it did not write)"
        )


def prepare_run_dir(run_dir: Path, overwrite: bool) -> Path:
    """Create `run_dir`; if it already holds a run, replace it only with `overwrite`, removing
    just the files sdtune wrote."""
    check_output(run_dir)
    if is_run_dir(run_dir) and not overwrite and never_trained(run_dir):
        pass  # stopped before its first step: start it again here, keeping what it made
    elif is_run_dir(run_dir):
        if not overwrite:
            raise RunDirError(
                f"--output {run_dir} already holds a training run; pass --overwrite to replace it "
                "or choose another --output"
            )
        remove_run_files(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text(
        json.dumps({"sdtune_version": sdtune.__version__, "created": time.time()}, indent=2) + "\n"
    )
    return run_dir


def remove_run_files(run_dir: Path) -> None:
    """Delete what sdtune wrote in `run_dir` (the marker last, so a crash midway leaves a run
    directory that is still recognised), and nothing else."""
    temporaries = [p.name for p in run_dir.glob(TMP_GLOB)]  # of an interrupted write
    for name in [*WRITTEN[1:], *temporaries, MARKER]:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    classes = run_dir / CLASS_IMAGES
    if classes.is_dir():
        for path in classes.iterdir():
            if path.is_file() and (path.name.startswith("class-") or path.match(TMP_GLOB)):
                path.unlink()
        if not any(classes.iterdir()):
            classes.rmdir()
