"""Curriculum against none at the same compute, on the digits, judged by the digits judge.

The quickstart model (preset:tiny-digits, from scratch, 700 steps of 64) trained three ways,
each with two seeds (more with --seeds):

- **none**: the quickstart as it is (16 px throughout);
- **8 px first**: the first 350 steps at 8 px, the digits' own resolution (a quarter of the
  pixels a step), then 16 px;
- **noisy half first**: the first 200 steps on the noisier half of the schedule only.

Every 50 steps the judge reads 100 generated digits (10 per digit): the first step whose
judged accuracy reaches 0.90, and the training time to it (from the logged throughput, the
evaluations excluded); at the end, the judged accuracy of 200 digits and the validation loss.
One command, CPU only, about 15 minutes on 2 cores:

    python -m benchmarks.curriculum          # writes benchmarks/results/curriculum.{json,md}

and rewrites the table in README.md (default seeds only).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.fewshot import BASE as FEWSHOT_BASE
from benchmarks.fewshot import _merge, _train
from benchmarks.report import cpu_machine, write_results

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- curriculum:begin -->", "<!-- curriculum:end -->"
DEFAULT_SEEDS = [1, 2]
TARGET = 0.90
EVERY = 50

QUICKSTART = _merge(  # the quickstart (fewshot's base config) on all ten digits
    FEWSHOT_BASE,
    {
        "train": {"weight_decay": 0.01, "log_every": 10},
        "checkpoint": {"every_steps": 0},
        "evaluate": {
            "every_steps": EVERY,
            "metrics_every": EVERY,
            "metrics_images": 100,
            "num_per_prompt": 1,
            "judge": True,
        },
    },
)
QUICKSTART["data"].pop("labels")
VARIANTS = {
    "none": [],
    "8 px first": [{"until_step": 350, "resolution": 8}],
    "noisy half first": [{"until_step": 200, "timesteps": [0.5, 1.0]}],
}


def _config(variant: str, seed: int) -> dict:
    config = copy.deepcopy(QUICKSTART)
    config["seed"] = seed
    if VARIANTS[variant]:
        config["curriculum"] = {"stages": VARIANTS[variant]}
    return config


def _reading(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    batch = QUICKSTART["train"]["batch_size"] * QUICKSTART["train"]["log_every"]
    seconds, elapsed = {}, 0.0
    for row in rows:
        if "images_per_s" in row and row["images_per_s"] > 0:
            elapsed += batch / row["images_per_s"]
            seconds[row["step"]] = elapsed
    judged = [(r["step"], r["judged_accuracy"]) for r in rows if "judged_accuracy" in r]
    reached = next((s for s, a in judged if a >= TARGET), None)
    to_time = None
    if reached is not None:
        to_time = next(v for s, v in sorted(seconds.items()) if s >= reached)
    final = json.loads((run_dir / "judge.json").read_text())["judged_accuracy"]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    return {
        "steps_to_target": reached,
        "seconds_to_target": to_time,
        "final_accuracy": final,
        "final_val_loss": summary["final_val_loss"],
        "train_seconds": seconds[max(seconds)] if seconds else None,
        "judged_every_50": judged,
    }


def run(work: Path, seeds: list[int], say=print) -> dict:
    rows = []
    for variant in VARIANTS:
        runs = []
        for seed in seeds:
            say(f"curriculum: {variant}, seed {seed} ...")
            out = work / variant.replace(" ", "-") / f"seed-{seed}"
            _train(_config(variant, seed), out, "curriculum")
            runs.append({"seed": seed, **_reading(out)})
            say(
                f"curriculum: {variant}, seed {seed}: {runs[-1]['steps_to_target']} steps to {TARGET}"
            )
        rows.append({"variant": variant, "stages": VARIANTS[variant], "runs": runs})
    return {
        "benchmark": f"curriculum against none: steps to judged accuracy {TARGET} on the digits",
        "seeds": seeds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
        "machine": cpu_machine(),
    }


def _cell(values: list, digits: int = 0) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "never"
    text = f"{np.mean(known):.{digits}f} ({min(known):.{digits}f} to {max(known):.{digits}f})"
    missing = len(values) - len(known)
    return text + (f", {missing} never" if missing else "")


def markdown(result: dict) -> str:
    lines = [
        f"| curriculum | steps to {TARGET:.2f} | training seconds to {TARGET:.2f} | final judged accuracy | final val loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        runs = row["runs"]
        lines.append(
            f"| {row['variant']} | {_cell([r['steps_to_target'] for r in runs])} | "
            f"{_cell([r['seconds_to_target'] for r in runs], 1)} | "
            f"{_cell([r['final_accuracy'] for r in runs], 3)} | "
            f"{_cell([r['final_val_loss'] for r in runs], 4)} |"
        )
    seeds = ", ".join(map(str, result["seeds"]))
    lines += [
        "",
        f"The quickstart model from scratch, 700 steps of 64 digits, seeds {seeds}: the mean, "
        "in brackets the lowest and highest run. Judged every 50 steps on 100 generated digits "
        "(the first step at or above the target; its time from the logged throughput, "
        "evaluations excluded), at the end on 200. `python -m benchmarks.curriculum` on "
        f"{result['machine']['cpus']} CPU cores, torch {result['machine']['torch']}, "
        f"{result['created'][:10]}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "curriculum"), help="run folders")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "curriculum"))
    parser.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS)
    parser.add_argument("--no-readme", action="store_true", help="leave the README alone")
    args = parser.parse_args(argv)
    result = run(Path(args.work), args.seeds)
    words = sys.argv[1:] if argv is None else argv
    readmes = [ROOT / "README.md"] if not args.no_readme and args.seeds == DEFAULT_SEEDS else []
    write_results(
        "curriculum", Path(args.out), result, markdown(result), words, readmes, (BEGIN, END)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
