"""Metrics sinks: an append-only metrics.jsonl (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
    """metrics.jsonl plus TensorBoard event files under run_dir/tensorboard."""

    def __init__(
        self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.events_path = run_dir / "events.jsonl"
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint it resumes from
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, values: dict[str, float | int | str]) -> None:
        row = {"step": step, **values}
        self._fh.write(json.dumps(row, allow_nan=True) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    if math.isfinite(float(value)):
                        self._tb.add_scalar(key, value, step)

    def rewind(self, step: int, evaluated_at_step: bool) -> None:
        """Drop the rows after `step` (a rollback), keeping the file open for what follows."""
        from sdtune.train.parts import truncate_metrics

        self._fh.close()
        truncate_metrics(self.path, step, evaluated_at_step)
        self._fh = self.path.open("a", encoding="utf-8")

    def event(self, step: int, kind: str, message: str) -> None:
        """Something a person should know about (skipped step, early stop, warning): events.jsonl."""
        with self.events_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "event": kind, "message": message}) + "\n")

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


class Progress:
    """A tqdm bar (loss, lr, images/s, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, initial: int = 0, quiet: bool = False) -> None:
        self.total = total
        self.quiet = quiet  # the processes other than the main one show nothing
        self.interactive = sys.stderr.isatty() and not quiet
        self.bar = tqdm(
            total=total, initial=initial, dynamic_ncols=True, disable=not self.interactive
        )
        self.last = (time.monotonic(), initial)
        self.step_seconds: float | None = None  # smoothed seconds per step, for the ETA

    def update(
        self, step: int, loss: float, lr: float, images_per_s: float, log_line: bool
    ) -> None:
        if self.interactive:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}", refresh=False
            )
        elif log_line and not self.quiet:
            eta = self._eta(step)
            print(
                f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{images_per_s:.1f} img/s eta {eta:.0f}s",
                flush=True,
            )

    def _eta(self, step: int) -> float:
        """Seconds left at the smoothed step time (an exponential moving average over the
        intervals between log lines, as tqdm smooths its own): one slow interval, such as an
        evaluation, moves it by a third of its excess, not all of it."""
        now = time.monotonic()
        then, then_step = self.last
        self.last = (now, step)
        if step > then_step:
            seconds = (now - then) / (step - then_step)
            smoothed = self.step_seconds
            self.step_seconds = seconds if smoothed is None else 0.7 * smoothed + 0.3 * seconds
        return (self.step_seconds or 0.0) * (self.total - step)

    def write(self, text: str) -> None:
        if self.interactive:
            self.bar.write(text)
        elif not self.quiet:
            print(text, flush=True)

    def close(self) -> None:
        self.bar.close()
