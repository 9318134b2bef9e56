"""Training throughput: sdtune's real training loop, optionally side by side with diffusers'
example script for the model's family (train_text_to_image.py, train_text_to_image_sdxl.py,
train_dreambooth_lora_sd3.py) on the same model, data and batch.

    python -m benchmarks.throughput                                # tiny-sd, 32 px, batch 64
    python -m benchmarks.throughput --peer /tmp/peer/train_text_to_image.py
    python -m benchmarks.throughput --model tiny-sdxl --peer /tmp/peer/train_text_to_image_sdxl.py
    python -m benchmarks.throughput --model sd15 --batch-size 8   # full-size SD 1.5, random weights
    python -m benchmarks.throughput --model sdxl --flops-only
    python -m benchmarks.throughput --model tiny-sd3 --peer /tmp/peer/train_dreambooth_lora_sd3.py
    python -m benchmarks.throughput --model sd35 --flops-only      # SD 3.5 Medium
    python -m benchmarks.throughput --compare train.compile=true --compare data.cache_latents=true

Each run is a fresh process (benchmarks/worker.py) timed by a hook after every optimizer step;
runs alternate (sdtune, its --compare variants, peer, sdtune, ...). Reported: images/s (batch over the median
step time), the step time's median and quartiles, peak memory (CUDA max allocated, or the
process's peak RSS on CPU), and model FLOP utilisation from a FLOP count of the step. Results
go to benchmarks/results/throughput-*.{json,md}; the table in benchmarks/README.md is rebuilt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.peer import BenchmarkError
from benchmarks.report import machine, render_markdown, update_readme, versions

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
# Dense peak TFLOP/s from NVIDIA's data sheets, by (name fragment, precision); first match wins.
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "no": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "no": 66.9}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "no": 66.9}),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.models import ARCHS

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--model", choices=sorted(ARCHS), default="tiny-sd", help="what to train (default tiny-sd)"
    )
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, help="images per step (default: the model's)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    p.add_argument(
        "--repeats", type=int, default=2, help="runs per trainer, alternated (default 2)"
    )
    p.add_argument(
        "--precision",
        choices=["no", "fp16", "bf16"],
        help="mixed precision (default: bf16 on a GPU, no on CPU)",
    )
    p.add_argument("--ema", action="store_true", help="both trainers keep an EMA of the UNet")
    p.add_argument(
        "--train-text-encoder", action="store_true", help="sdtune also trains the text encoder"
    )
    p.add_argument(
        "--log-every", type=int, default=10, help="sdtune's train.log_every (default 10)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an sdtune config override, e.g. data.cache_latents=true (recorded in the results)",
    )
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="also run sdtune with these overrides on top, alternated with the others, and "
        "report its speed relative to sdtune without them (repeatable: one variant each)",
    )
    p.add_argument("--threads", type=int, help="torch threads in each run (default: torch's)")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader worker processes, for both trainers alike (default 0)",
    )
    p.add_argument("--images", type=int, help="use only the first N digits (default: all 1,797)")
    p.add_argument(
        "--peer",
        type=Path,
        help="path of diffusers' example script for the model's family, to run side by side "
        "(train_text_to_image.py; train_text_to_image_sdxl.py for tiny-sdxl and sdxl)",
    )
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: GPU table)")
    p.add_argument("--cpu", action="store_true", help="hide GPUs from the runs")
    p.add_argument("--flops-only", action="store_true", help="print the step's FLOPs and stop")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after the timed runs, one more run per trainer under torch.profiler: where a "
        "step's time goes, written beside the results (its timings are not reported)",
    )
    p.add_argument("--work", type=Path, help="folder for data, model and runs (default: temp)")
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="where result files go (default benchmarks/results)",
    )
    p.add_argument("--no-readme", action="store_true", help="leave benchmarks/README.md alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        result = benchmark(args, "python -m benchmarks.throughput " + shlex.join(argv))
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if result is not None:
        print(render_markdown(result))
    return 0


def benchmark(args: argparse.Namespace, command: str) -> dict | None:
    """Run the benchmark `args` describe; the result (also written to args.out), or None."""
    from benchmarks.models import ARCHS, parameter_counts, step_flops
    from benchmarks.peer import PEER_PRECOMPUTES, PEER_SETTINGS, check_peer

    arch = ARCHS[args.model]
    resolution = args.resolution or arch.resolution
    batch = args.batch_size or arch.batch_size
    peer = check_peer(args.peer, arch) if args.peer is not None and not args.flops_only else None
    if peer is not None:  # sdtune does the work per step that the peer does (the SDXL caches)
        args.set = [f"data.{key}=true" for key in PEER_PRECOMPUTES.get(arch.peer, ())] + args.set
        args.set = PEER_SETTINGS.get(arch.peer, []) + args.set  # the SD3 peer trains LoRA
    flops = step_flops(arch, resolution, batch, args.train_text_encoder)
    if args.flops_only:
        counts = ", ".join(f"{k} {v / 1e6:,.1f}M" for k, v in parameter_counts(arch).items())
        parts = ", ".join(f"{k} {v / 1e9:,.1f}" for k, v in flops.items() if k != "total")
        print(f"{arch.name} at {resolution} px, batch {batch}; parameters: {counts}")
        print(f"GFLOP per step: {flops['total'] / 1e9:,.1f} ({parts})")
        print(f"GFLOP per image: {flops['total'] / batch / 1e9:,.1f}")
        return None
    if args.warmup < 1 or args.steps < 2 or args.repeats < 1 or args.workers < 0:
        raise BenchmarkError(
            "--warmup must be >= 1, --steps >= 2, --repeats >= 1 and --workers >= 0"
        )
    if peer is not None and args.train_text_encoder:
        raise BenchmarkError(
            "--peer: the peer script trains the denoiser only; leave out --train-text-encoder"
        )
    cuda = not args.cpu and _cuda_available()
    precision = args.precision or ("bf16" if cuda else "no")
    work = Path(args.work or tempfile.mkdtemp(prefix="sdtune-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    specs = _specs(args, arch, resolution, batch, precision, peer, work)
    counted = {  # the FLOPs each trainer's step really runs (a cache skips its encoder)
        name: _counted_flops(flops, spec.get("config") or spec.get("precomputes"))
        for name, spec in specs.items()
    }
    versions_now, parameters = versions(), parameter_counts(arch)  # once, not every round
    trained = next(iter(parameters))  # the denoiser: unet or transformer
    if specs["sdtune"]["config"].get("lora", {}).get("enabled"):
        trained = f"LoRA on the {trained}"
    if args.train_text_encoder:
        trained += " + text encoder"

    def record(runs: list[dict], profiles: dict[str, str], rounds: int) -> dict:
        """The result of the runs so far, written out: a benchmark stopped short (a time limit,
        a failed run) keeps every complete round of alternated runs."""
        device = runs[0]["device"]
        peak = args.peak_tflops or _peak_tflops(device, precision)
        summary = {name: _summarise(runs, name, batch, counted[name], peak) for name in specs}
        if peer is not None:
            summary["ratio"], summary["ratio_per_repeat"] = _ratio(summary, "sdtune", "peer")
        variants = {}
        for name in specs:
            if name.startswith("sdtune+"):
                ratio, per_repeat = _ratio(summary, name, "sdtune")
                variants[name] = {
                    "overrides": specs[name]["overrides"],
                    "vs_sdtune": ratio,
                    "vs_sdtune_per_repeat": per_repeat,
                    "vs_peer": _ratio(summary, name, "peer")[0] if peer is not None else None,
                }
        if variants:
            summary["variants"] = variants
        result = {
            "benchmark": "throughput",
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
            "complete": rounds == args.repeats and (bool(profiles) or not args.profile),
            "machine": machine(device, runs[0]["torch_threads"]),
            "versions": versions_now,
            "setup": {
                "model": arch.name,
                "parameters": parameters,
                "resolution": resolution,
                "batch_size": batch,
                "precision": precision,
                "trainable": trained,
                "ema": args.ema,
                "images": args.images or 1797,
                "warmup_steps": args.warmup,
                "timed_steps": args.steps,
                "repeats": rounds,
                "repeats_asked": args.repeats,
                "sdtune_log_every": args.log_every,
                "sdtune_overrides": args.set,
                "compare": args.compare,
                "threads": args.threads,
                "workers": args.workers,
                "sdtune_config": specs["sdtune"]["config"],
                "peer": peer,
                "peer_args": specs["peer"]["args"] if peer else None,
            },
            "flops_per_step": flops,
            "flops_counted": {name: counted[name] for name in specs},
            "peak_tflops": peak,
            "summary": summary,
            "runs": runs,
            "profiles": profiles,
        }
        _write(result, args)
        return result

    runs: list[dict] = []
    for repeat in range(args.repeats):  # alternated, so that drifting load hits both alike
        for trainer, spec in specs.items():
            runs.append(_run(trainer, repeat, spec, args, work, cuda))
        result = record(runs, {}, repeat + 1)
    if args.profile:  # an extra run each: the profiler's overhead stays out of the timings
        profiles = {}
        for i, (trainer, spec) in enumerate(specs.items()):
            path = work / f"profile-{i}.txt"
            short = trainer if trainer in ("sdtune", "peer") else f"variant{i}"
            try:
                _run(trainer, args.repeats, spec, args, work, cuda, profile=path)
                profiles[short] = path.read_text()
            except BenchmarkError as exc:  # the timed results still stand
                print(f"warning: {exc}", file=sys.stderr)
                profiles[short] = f"profiled run of {trainer} failed: {exc}\n"
        result = record(runs, profiles, args.repeats)
    if args.work is None:  # kept on failure, for the logs the error names
        shutil.rmtree(work, ignore_errors=True)
    return result


def _specs(args, arch, resolution: int, batch: int, precision: str, peer, work: Path) -> dict:
    """What each trainer's worker runs: the same data folder, model, batch and settings."""
    from benchmarks.peer import peer_args, sdtune_config

    data_dir, model_dir = _prepare(args, arch, resolution, work, peer is not None, write=False)
    max_steps = args.warmup + args.steps + 1  # the hook stops each run before the last step
    base = str(model_dir) if model_dir is not None else arch.base
    config = sdtune_config(
        base, data_dir, resolution, batch, max_steps, precision, args.ema,
        args.train_text_encoder, args.log_every, args.workers,
    )  # fmt: skip
    config = _with_overrides(config, args.set, work)  # a bad key fails before any work
    _prepare(args, arch, resolution, work, peer is not None, write=True)
    specs = {
        "sdtune": {"trainer": "sdtune", "register_presets": model_dir is None, "config": config}
    }
    for item in args.compare:  # sdtune with more overrides, e.g. train.compile=true
        overrides = [part.strip() for part in item.split(",") if part.strip()]
        name = "sdtune+" + ",".join(overrides)
        specs[name] = {
            **specs["sdtune"],
            "trainer": name,
            "overrides": overrides,
            "config": _with_overrides(config, overrides, work),
        }
    if peer is not None:
        from benchmarks.peer import PEER_PRECOMPUTES

        specs["peer"] = {
            "trainer": "peer",
            "script": peer["path"],
            "precomputes": {"data": dict.fromkeys(PEER_PRECOMPUTES.get(arch.peer, ()), True)},
            "args": peer_args(
                peer, model_dir, data_dir, work / "runs" / "peer", resolution, batch,
                max_steps, precision, args.ema, args.workers,
            ),
        }  # fmt: skip
    return specs


def _with_overrides(config: dict, overrides: list[str], work: Path) -> dict:
    """sdtune's config with `--set` overrides, validated here (a bad key fails before any run)."""
    import copy

    from sdtune.config import parse_override, validate_config
    from sdtune.errors import ConfigError

    config = copy.deepcopy(config)
    keys_set = {".".join(parse_override(item)[0]) for item in overrides}
    adapters = {"lora.enabled", "textual_inversion.token"} & keys_set
    if adapters and "model.trainable" not in keys_set:  # adapters train alone, as in sdtune
        config["model"].pop("trainable", None)
    for item in overrides:
        keys, value = parse_override(item)
        node = config
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    data = config["data"]
    if data.get("cache_latents") or data.get("cache_text"):
        data.setdefault("cache_dir", str(work / "cache"))  # built before the timed steps
    try:
        validate_config(config, "--set")
    except ConfigError as exc:
        raise BenchmarkError(str(exc)) from None
    return config


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _prepare(args, arch, resolution: int, work: Path, with_peer: bool, write: bool):
    """The shared data folder, and the shared model folder when the peer runs too (written
    when `write`, else only named)."""
    from benchmarks.models import resolution_multiple
    from benchmarks.peer import write_digits_folder, write_model_folder

    multiple = resolution_multiple(arch)
    if resolution % multiple:
        raise BenchmarkError(
            f"--resolution {resolution}: {arch.name} needs a multiple of {multiple}"
        )
    channels = 3 if arch.latent else 1
    data_dir = work / f"digits-{resolution}px-{channels}ch-{args.images or 'all'}"
    model_dir = work / f"model-{arch.name}" if with_peer else None
    if write:
        write_digits_folder(data_dir, resolution, channels, args.images)
        if model_dir is not None:
            write_model_folder(model_dir, arch)
    return data_dir, model_dir


def _run(
    trainer: str, repeat: int, spec: dict, args, work: Path, cuda: bool, profile: Path | None = None
) -> dict:
    """One run of one trainer in a fresh process; its timings, or a one-line error. With
    `profile`, the timed steps run under torch.profiler and the breakdown goes to that file."""
    tag = f"{repeat + 1}-{trainer}" + ("-profiled" if profile else "")
    spec = {
        **spec,
        "profile": str(profile) if profile else None,
        "warmup": args.warmup,
        "steps": args.steps,
        "run_dir": str(work / "runs" / trainer),
        "result": str(work / f"result-{tag}.json"),
    }
    spec_path, log_path = work / f"spec-{tag}.json", work / f"log-{tag}.txt"
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "hf-datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    load_start = list(os.getloadavg())
    print(f"run {tag} (load average {load_start[0]:.2f}) ...", file=sys.stderr, flush=True)
    with log_path.open("w") as log:
        code = subprocess.call(
            [sys.executable, "-m", "benchmarks.worker", str(spec_path)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if code != 0:
        lines = [line for line in log_path.read_text().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {code}"
        raise BenchmarkError(f"{trainer} run {repeat + 1} failed: {last} (log: {log_path})")
    run = json.loads(Path(spec["result"]).read_text())
    run["repeat"] = repeat + 1
    run["load_average_start"] = load_start
    return run


def _counted_flops(flops: dict, config: dict | None) -> int:
    """The FLOPs of a step as this trainer is configured: a cache (sdtune's, or the peer's
    encodings made before training) skips its encoder."""
    data = (config or {}).get("data", {})
    skipped = flops["vae_encode"] * bool(data.get("cache_latents"))
    return flops["total"] - skipped - flops["text_encoder"] * bool(data.get("cache_text"))


def _ratio(summary: dict, a: str, b: str) -> tuple[float, list[float]]:
    """images/s of `a` over `b`: of the medians, and of run k of `a` to run k of `b`."""
    pairs = zip(summary[a]["images_per_s_per_run"], summary[b]["images_per_s_per_run"])
    return summary[a]["images_per_s"] / summary[b]["images_per_s"], [x / y for x, y in pairs]


def _summarise(runs: list[dict], trainer: str, batch: int, flops: int, peak) -> dict:
    mine = [r for r in runs if r["trainer"] == trainer]
    per_run = [batch / statistics.median(r["step_s"]) for r in mine]
    steps = sorted(s for r in mine for s in r["step_s"])
    p25, _, p75 = statistics.quantiles(steps, n=4)
    median = statistics.median(steps)
    cuda = [r["peak"]["cuda_max_allocated_bytes"] for r in mine]
    achieved = flops / median / 1e12
    return {
        "images_per_s": statistics.median(per_run),
        "images_per_s_per_run": per_run,
        "images_per_s_mean": batch * len(steps) / sum(steps),
        "step_s_median": median,
        "step_s_p25": p25,
        "step_s_p75": p75,
        "step_s_min": steps[0],
        "step_s_max": steps[-1],
        "peak_rss_bytes": max(r["peak"]["rss_bytes"] for r in mine),
        "cuda_max_allocated_bytes": max(cuda) if None not in cuda else None,
        "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "load_average_1min": [r["load_average_end"][0] for r in mine],
    }


def _peak_tflops(device: str, precision: str) -> float | None:
    for fragment, table in PEAK_TFLOPS:
        if fragment in device:
            return table[precision]
    return None  # CPU or an unknown GPU: give --peak-tflops


def _write(result: dict, args) -> None:
    setup, device = result["setup"], result["machine"]["device"]
    where = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    name = f"throughput-{setup['model']}-{setup['resolution']}px-b{setup['batch_size']}-{where}"
    if setup["precision"] != "no":
        name += f"-{setup['precision']}"
    if setup["threads"]:
        name += f"-t{setup['threads']}"
    for item in setup["sdtune_overrides"]:  # e.g. data.cache_latents=true -> cache_latents-true
        name += f"-{_slug(item)}"
    if setup["peer"] is not None:
        name += "-vs-peer"
    if setup["compare"]:
        name += "-compare-" + "-".join(
            _slug(part) for c in setup["compare"] for part in c.split(",")
        )
    if len(name) > 150:  # many overrides: keep the name readable and unique
        import hashlib

        name = f"{name[:130]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(render_markdown(result) + "\n")
    for trainer, text in result["profiles"].items():
        (args.out / f"{name}.profile-{trainer}.txt").write_text(text)
    print(f"results: {args.out / name}.json and .md", file=sys.stderr)
    if not args.no_readme:
        update_readme(README, args.out)


def _slug(item: str) -> str:
    key, _, value = item.partition("=")
    return re.sub(r"[^a-z0-9]+", "-", f"{key.split('.')[-1]}-{value}".lower()).strip("-")[:40]


if __name__ == "__main__":
    sys.exit(main())
