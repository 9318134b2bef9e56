"""The throughput benchmark's records: machine and versions, a Markdown page per result, and
the table in benchmarks/README.md rebuilt from every result file."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- throughput:begin -->", "<!-- throughput:end -->"


def machine(device: str, threads: int) -> dict:
    """Where the benchmark ran: the device the runs used, the CPU, threads and memory."""
    cpu = platform.processor()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", info.read_text(), re.M)
        cpu = names[0] if names else cpu
    memory = None
    if Path("/proc/meminfo").is_file():
        found = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        memory = int(found.group(1)) * 1024 if found else None
    return {
        "device": device,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "memory_bytes": memory,
        "platform": platform.platform(),
    }


def cpu_machine() -> dict:
    """Where a CPU benchmark ran, as the CPU benchmarks record it in their results."""
    import sys

    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def write_results(
    name: str, out: Path, result: dict, table: str, words: list[str], readmes: list[Path], markers
) -> None:
    """A CPU benchmark's results: out.json (with the command that made it), out.md (its
    table, printed too) and the table between `markers` in each of `readmes`."""
    import json

    result["command"] = " ".join([f"python -m benchmarks.{name}", *words])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"{name}: results in {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    for readme in readmes:
        replace_between(readme, *markers, table)


def versions() -> dict:
    """The versions of Python, sdtune and the libraries both trainers use, and the git commit."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("sdtune", "torch", "diffusers", "transformers", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["git_commit"] = _git("rev-parse", "HEAD")
    status = _git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    out["git_dirty"] = None if status is None else bool(status)
    return out


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def _mfu(summary: dict) -> str:
    achieved = summary["achieved_tflops"]
    if summary["mfu"] is None:
        return f"n/a ({achieved * 1e3:,.1f} GFLOP/s)"
    return f"{summary['mfu']:.1%} ({achieved:,.1f} TFLOP/s)"


def _spread(pairs: list[float]) -> str:
    return f" ({min(pairs):.2f}–{max(pairs):.2f})" if len(pairs) > 1 else ""


def _step(x: dict) -> str:
    return (
        f"{x['step_s_median'] * 1e3:.0f} ms "
        f"[{x['step_s_p25'] * 1e3:.0f}–{x['step_s_p75'] * 1e3:.0f}]"
    )


def _memory(x: dict) -> str:
    if x["cuda_max_allocated_bytes"]:
        return f"{_mib(x['cuda_max_allocated_bytes'])} CUDA"
    return f"{_mib(x['peak_rss_bytes'])} RSS"


def _rows(result: dict) -> list[list[str]]:
    """The results table's lines of one result: sdtune (and the peer), then each variant."""
    s, setup = result["summary"], result["setup"]
    peer = s.get("peer")
    device = result["machine"]["device"]
    threads = result["machine"]["torch_threads"]
    where = f"CPU, {threads} thread{'s' * (threads > 1)}" if device == "cpu" else device
    shape = f"{setup['model']} {setup['resolution']} px ×{setup['batch_size']} {setup['precision']}"
    shape += "".join(f" {o}" for o in setup.get("sdtune_overrides", []))
    everyone = [s[name] for name in s if isinstance(s[name], dict) and "images_per_s" in s[name]]
    load = statistics.mean(x for one in everyone for x in one["load_average_1min"])

    def line(name: str, label: str, vs_peer: str, vs_sdtune: str) -> list[str]:
        mine = s[name]
        return [
            where,
            label,
            f"{mine['images_per_s']:.1f}",
            _step(mine),
            _memory(mine),
            _mfu(mine),
            f"{peer['images_per_s']:.1f}" if peer else "–",
            _step(peer) if peer else "–",
            _memory(peer) if peer else "–",
            vs_peer,
            vs_sdtune,
            f"{load:.1f}",
            result["created"][:10],
        ]

    ratio = f"**{s['ratio']:.2f}×**{_spread(s['ratio_per_repeat'])}" if peer else "–"
    rows = [line("sdtune", shape, ratio, "–")]
    for name, v in s.get("variants", {}).items():
        vs_peer = f"**{v['vs_peer']:.2f}×**" if v["vs_peer"] is not None else "–"
        vs_sdtune = f"{v['vs_sdtune']:.2f}×{_spread(v['vs_sdtune_per_repeat'])}"
        rows.append(line(name, f"{shape} + {', '.join(v['overrides'])}", vs_peer, vs_sdtune))
    return rows


HEADER = [
    "device",
    "model, shape, precision",
    "sdtune img/s",
    "sdtune step (median [IQR])",
    "sdtune peak mem",
    "sdtune MFU (achieved)",
    "peer img/s",
    "peer step",
    "peer peak mem",
    "vs peer",
    "vs sdtune",
    "load avg",
    "date",
]


def _table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def render_markdown(result: dict) -> str:
    setup, machine, versions = result["setup"], result["machine"], result["versions"]
    flops = result["flops_per_step"]
    parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in flops.items() if k != "total")
    peer = setup["peer"]
    lines = [
        f"# Throughput: {setup['model']} at {setup['resolution']} px, batch {setup['batch_size']}",
        "",
        _table(_rows(result)),
        "",
        f"- command: `{result['command']}` ({result['created']})",
        f"- machine: {machine['device']}; CPU {machine['cpu']} ({machine['cpu_count']} cores, "
        f"torch threads {machine['torch_threads']}); {_mib(machine['memory_bytes'])}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- trained: {setup['trainable']}, EMA {'on' if setup['ema'] else 'off'}, "
        f"{setup['images']} digit images, {setup.get('workers', 0)} DataLoader workers; "
        f"{setup['warmup_steps']} warm-up + "
        f"{setup['timed_steps']} timed steps per run, {setup['repeats']} run(s) per trainer, "
        "alternated, each in a fresh process",
        f"- FLOPs per step: {flops['total'] / 1e9:.2f} GFLOP ({parts}; sdtune's step as "
        f"configured: {result['flops_counted']['sdtune'] / 1e9:.2f}); "
        f"peak {result['peak_tflops'] or 'n/a'} TFLOP/s",
        "- img/s = batch / median step time of a run, median over runs; a step is the time "
        "between the ends of two optimizer steps (CUDA events on a GPU, timestamps on a CPU); "
        "load avg = 1-minute load average",
    ]
    if result.get("complete") is False:
        lines.append(
            f"- stopped short: {setup['repeats']} of {setup.get('repeats_asked')} round(s) of runs "
            "done"
            + (" (profiled runs missing)" if setup["repeats"] == setup.get("repeats_asked") else "")
        )
    if setup.get("compare"):
        lines.append(
            "- variants: sdtune with " + "; ".join(setup["compare"]) + " on top, alternated with "
            "the others; vs sdtune = its img/s / sdtune's (in brackets: run k against run k)"
        )
    if setup["sdtune_overrides"] or setup["threads"]:
        lines.append(
            f"- sdtune overrides: {', '.join(setup['sdtune_overrides']) or 'none'}; "
            f"torch threads: {setup['threads'] or 'default'}"
        )
    if peer is not None:
        lines.append(
            f"- peer: {peer['path']} (sha256 {peer['sha256'][:12]}, needs diffusers>="
            f"{peer['min_diffusers']}), timed by the same hook; vs peer = sdtune img/s / peer img/s "
            "(in brackets: the lowest and highest ratio of run k of sdtune to run k of the peer)"
        )
    if result.get("profiles"):
        lines.append(
            "- profiled (one more run each, not timed): "
            + ", ".join(f"`.profile-{name}.txt`" for name in result["profiles"])
            + " beside this file"
        )
    return "\n".join(lines)


def update_readme(readme: Path, results: Path) -> None:
    """Rebuild the table between the markers in `readme` from every throughput result."""
    found = [json.loads(p.read_text()) for p in sorted(results.glob("throughput-*.json"))]
    ordered = sorted(found, key=lambda r: (r["machine"]["device"], r["created"]))
    rows = [row for r in ordered for row in _rows(r)]
    replace_between(readme, BEGIN, END, _table(rows))


def replace_between(path: Path, begin: str, end: str, text: str) -> None:
    """Put `text` between the marker lines `begin` and `end` of `path` (said, if they are missing)."""
    if not path.is_file() or begin not in path.read_text():
        print(f"note: {path} has no {begin} marker; not updated", file=sys.stderr)
        return
    head, rest = path.read_text().split(begin, 1)
    tail = rest.split(end, 1)[1] if end in rest else ""
    path.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
