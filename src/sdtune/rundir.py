"""The run directory: refuses to clobber earlier training output unless asked to."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import sdtune
from sdtune.errors import RunDirError

MARKER = "sdtune_run.json"
OUTPUTS = (MARKER, "metrics.jsonl", "checkpoints", "model", "config.toml")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> Path:
    """Create `run_dir`; if it already holds training output, delete it only with `overwrite`."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--output {run_dir} is a file, not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        ours = any((run_dir / name).exists() for name in OUTPUTS)
        if not ours:
            raise RunDirError(
                f"--output {run_dir} is a non-empty directory that is not an sdtune run; "
                "choose another --output"
            )
        if not overwrite:
            raise RunDirError(
                f"--output {run_dir} already holds a training run; pass --overwrite to replace it "
                "or choose another --output"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text(
        json.dumps({"sdtune_version": sdtune.__version__, "created": time.time()}, indent=2) + "\n"
    )
    return run_dir
