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

With `"profile": PATH` in the spec, `torch.profiler` records the timed steps (after warm-up) and
PATH gets a breakdown of where a step's time goes: device kernels by kind (matmul, convolution,
attention, normalisation, optimizer, elementwise...), the device's busy fraction (the rest is
the host not keeping up), and the top kernels and host operators. A profiled run's timings
are not reported (the profiler adds overhead); the harness makes it an extra run.
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

    def __init__(self, total_steps: int, profile_after: int | None = None) -> None:
        self.total = total_steps
        self.profile_after = profile_after
        self.profiler = None
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
        if self.profiler is not None and len(self.marks) < self.total:  # the run ended short
            self.profiler.stop()

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
        if self.profile_after is not None and len(self.marks) == self.profile_after:
            self.profiler = start_profiler(self.cuda)
        if len(self.marks) == self.total:
            if self.cuda:
                torch.cuda.synchronize()
            if self.profiler is not None:
                self.profiler.stop()
            self.peak = peak_memory(self.cuda)
            self.load_average = list(os.getloadavg())
            raise Finished

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def start_profiler(cuda: bool):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiler = profile(activities=activities)
    profiler.start()
    return profiler


# Device kernels by kind, first match wins (names as cuDNN, cuBLAS, CUTLASS, Triton and
# PyTorch's own kernels spell them on Hopper and Ampere).
KERNEL_KINDS = [
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa")),
    ("optimizer / foreach", ("adam", "multi_tensor_apply", "_foreach", "sgd", "rmsprop")),
    ("layout transpose", ("nchwtonhwc", "nhwctonchw")),
    ("convolution", ("convolution", "conv2d", "fprop", "dgrad", "wgrad", "winograd", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "gemv", "matmul", "mm_")),
    ("reduction", ("reduce_kernel", "reduce_")),
    ("normalisation", ("norm", "welford", "moments")),
    ("copy / dtype conversion", ("copy", "memcpy", "memset", "fill")),
]


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    if lowered.startswith("triton"):
        return "fused (triton)"
    return "elementwise / other"


def profile_report(profiler, steps: int, step_s: list[float], trainer: str) -> str:
    """Where the profiled steps' time went, as plain text (the harness copies it to results)."""
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    wall = sum(step_s)
    lines = [f"profile of {trainer}: {steps} steps, {wall / steps * 1e3:.1f} ms per step (wall)"]
    # device kernels; a user annotation's device span ("Optimizer.step#AdamW.step") covers
    # kernels counted already, so it is left out
    kernels = [
        e
        for e in events
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    if kernels:
        busy = sum(e.self_device_time_total for e in kernels) / 1e6  # us -> s
        lines.append(
            f"device busy {busy / steps * 1e3:.1f} ms per step in kernels = {busy / wall:.0%} of "
            "the profiled wall time (the profiler slows the host: compare the kernels' time with "
            "the timed runs' step time; a step longer than its kernels waits on the host)"
        )
        kinds: dict[str, float] = {}
        for e in kernels:
            kind = kernel_kind(e.key)
            kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1e6
        lines += ["", f"{'kernel kind':<26}{'ms/step':>10}{'share':>8}"]
        for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
            lines.append(f"{kind:<26}{seconds / steps * 1e3:>10.2f}{seconds / busy:>8.1%}")
        lines += ["", f"{'top kernels':<90}{'ms/step':>10}{'calls/step':>12}"]
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:30]:
            lines.append(
                f"{e.key[:88]:<90}{e.self_device_time_total / 1e3 / steps:>10.2f}"
                f"{e.count / steps:>12.1f}"
            )
    host = [e for e in events if e.device_type == DeviceType.CPU]
    lines += ["", f"{'top host operators (self time)':<60}{'ms/step':>10}{'calls/step':>12}"]
    for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:25]:
        lines.append(
            f"{e.key[:58]:<60}{e.self_cpu_time_total / 1e3 / steps:>10.2f}{e.count / steps:>12.1f}"
        )
    return "\n".join(lines) + "\n"


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
    profile_path = spec.get("profile")
    with StepClock(total, spec["warmup"] if profile_path else None) as clock:
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
    if clock.profiler is not None:
        report = profile_report(
            clock.profiler, spec["steps"], intervals[warmup - 1 :], spec["trainer"]
        )
        Path(profile_path).write_text(report)
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
