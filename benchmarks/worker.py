"""One timed training run in a fresh process: sdtune's own loop, or the peer script.

    python -m benchmarks.worker SPEC.json      (written and started by benchmarks.throughput)

Both trainers are timed the same way, from outside their code: a global optimizer post-step
hook (`torch.optim.optimizer.register_optimizer_step_post_hook`) marks the end of every
`optimizer.step()`. The interval between two marks is one whole training iteration as the
trainer runs it: data loading, VAE encode, text encoder, UNet forward and backward, clipping,
the optimizer, and whatever the trainer does between steps (EMA, logging, progress bar). On a
GPU a mark is a CUDA event recorded on the stream after the step's kernels (no synchronisation,
so a trainer that keeps the GPU fed is not stalled by the clock; a host stall shows as a longer
interval), and the intervals are read once at the end; on a CPU it is a timestamp. After
warm-up + timed steps the hook records the peak memory and stops the run by raising
`Finished`, so the end-of-run saves are not waited for.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch


class Finished(Exception):
    """Raised from the step hook once every step has been timed: ends the trainer early."""


class StepClock:
    """A mark after each optimizer step: CUDA events on a GPU, timestamps on a CPU."""

    def __init__(self, total_steps: int) -> None:
        self.total = total_steps
        self.cuda = torch.cuda.is_available()
        self.marks: list = []
        self.first_host_time: float | None = None
        self.peak: dict[str, int | None] = {}
        self.load_average: list[float] = []

    def __enter__(self) -> StepClock:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.handle = register_optimizer_step_post_hook(self._after_step)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self.first_host_time is None:
            if self.cuda:  # once: the set-up time counts to the end of the first step
                torch.cuda.synchronize()
            self.first_host_time = time.perf_counter()
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        if len(self.marks) == self.total:
            if self.cuda:
                torch.cuda.synchronize()
            self.peak = peak_memory(self.cuda)
            self.load_average = list(os.getloadavg())
            raise Finished

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def peak_memory(cuda: bool) -> dict[str, int | None]:
    """Peak resident set size of this process, and CUDA's max allocated bytes when on a GPU."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "rss_bytes": rss,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }


def run_sdtune(spec: dict) -> None:
    """sdtune's real training loop, in this process, on the config the harness wrote."""
    from sdtune.config import validate_config
    from sdtune.rundir import prepare_run_dir
    from sdtune.train.loop import train

    if spec["register_presets"]:
        from benchmarks.models import register_presets

        register_presets()
    cfg = validate_config(spec["config"], "benchmark config")
    run_dir = prepare_run_dir(Path(spec["run_dir"]), overwrite=True)
    train(cfg, run_dir, say=lambda text: print(text, flush=True))


def run_peer(spec: dict) -> None:
    """The peer script as `python SCRIPT ARGS` would run it, in this process (so the hook sees it)."""
    import runpy

    sys.argv = [spec["script"], *spec["args"]]
    runpy.run_path(spec["script"], run_name="__main__")


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    total = spec["warmup"] + spec["steps"]
    start = time.perf_counter()
    with StepClock(total) as clock:
        try:
            (run_peer if spec["trainer"] == "peer" else run_sdtune)(spec)
        except Finished:
            pass
    if len(clock.marks) < total:
        print(
            f"benchmark: {spec['trainer']} stopped after {len(clock.marks)} of {total} steps",
            file=sys.stderr,
        )
        return 1
    intervals, warmup = clock.intervals(), spec["warmup"]
    result = {
        "trainer": spec["trainer"],
        "setup_and_first_step_s": clock.first_host_time - start,
        "warmup_step_s": intervals[: warmup - 1],
        "step_s": intervals[warmup - 1 :],
        "peak": clock.peak,
        "load_average_end": clock.load_average,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if clock.cuda else "cpu",
        "timed_by": "cuda events" if clock.cuda else "perf_counter",
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
