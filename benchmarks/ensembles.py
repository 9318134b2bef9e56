"""Ensembles and soups on real data, judged by the digits judge.

Two settings, each an `sdtune train --ensemble 3` (members differ only in seed), repeated with
two seed sets (members 0-2 and 10-12; more with --seeds):

- **from scratch**: the quickstart model (preset:tiny-digits, pixel space) trained from its
  random initialisation, so the members start from different weights;
- **fine-tunes of one base**: the quickstart model pre-trained on the digits 0-8, then fully
  fine-tuned on all ten digits; the members share the base and differ in data order and noise.

For each member, the soup (the uniform average of the members' weights) and the prediction
ensemble (their mean noise prediction at every sampling step): the validation loss on one
held-out split, the judged accuracy, diversity and generative recall/precision of 500 generated
digits, as `sdtune train --ensemble` writes them in ensemble.json. One command, CPU only, about
20 minutes on 2 cores:

    python -m benchmarks.ensembles          # writes benchmarks/results/ensembles.{json,md}
    python -m benchmarks.ensembles --reuse  # continues one stopped short: trains what is missing

and rewrites the table in README.md and benchmarks/README.md (default seed sets only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.fewshot import BASE as FEWSHOT_BASE
from benchmarks.fewshot import _merge
from benchmarks.report import cpu_machine, write_results

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- ensembles:begin -->", "<!-- ensembles:end -->"
DEFAULT_SEEDS = [0, 10]  # each the first member's seed; the others are seed+1, seed+2
MEMBERS = 3
METRIC_IMAGES = 500
KEYS = ("val_loss", "judged_accuracy", "diversity", "gen_recall", "gen_precision")

SCRATCH = _merge(
    FEWSHOT_BASE,
    {
        "data": {"val_fraction": 0.1},
        "evaluate": {"metrics_images": METRIC_IMAGES, "val_batches": 4},
    },
)
SCRATCH["data"].pop("labels")


def finetune(base_model: Path) -> dict:
    """All ten digits, a full fine-tune of the 0-8 base (short: the members stay near it)."""
    return _merge(
        SCRATCH,
        {
            "model": {"base": str(base_model), "trainable": ["unet.*", "text_encoder.*"]},
            "train": {
                "max_steps": 200,
                "learning_rate": 3e-4,
                "warmup_steps": 20,
                "ema": False,
            },
        },
    )


def _ensemble(config: dict, out: Path, seed: int, say=print) -> tuple[dict, list[float]]:
    """`sdtune train --ensemble 3` of `config` at `seed`: ensemble.json's rows and the
    members' training seconds."""
    import tomli_w

    from sdtune.cli import main

    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.toml"
    path.write_text(tomli_w.dumps({**config, "seed": seed}))
    words = ["train", str(path), "--output", str(out), "--ensemble", str(MEMBERS)]
    resume = (out / "sdtune_ensemble.json").is_file()
    code = main([*words, "--resume"] if resume else words)
    if code != 0:
        raise SystemExit(f"ensembles: training {out} failed (exit {code})")
    result = json.loads((out / "ensemble.json").read_text())
    seconds = [
        json.loads((out / m / "run_summary.json").read_text())["train_seconds"]
        for m in result["members"]
    ]
    return result["results"], seconds


def _summary(runs: list[dict]) -> dict:
    """Per model kind (best member, mean member, soup, ensemble): each key's mean over the seed
    sets and its range."""
    kinds: dict[str, dict[str, list[float]]] = {}
    for rows in runs:
        members = [v for k, v in rows.items() if k.startswith("member-")]
        picks = {
            "member (mean)": {k: float(np.mean([m[k] for m in members])) for k in KEYS},
            "member (best by val loss)": min(members, key=lambda m: m["val_loss"]),
            "soup": rows["soup"],
            "ensemble": rows["ensemble"],
        }
        for kind, row in picks.items():
            for key in KEYS:
                kinds.setdefault(kind, {}).setdefault(key, []).append(float(row[key]))
    return {
        kind: {k: {"mean": float(np.mean(v)), "min": min(v), "max": max(v)} for k, v in d.items()}
        for kind, d in kinds.items()
    }


def _earlier(path: Path | None) -> dict:
    """(setting, seed) -> (rows, member seconds) of an earlier result file (--reuse)."""
    if path is None or not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    found = {}
    for name, setting in earlier.get("settings", {}).items():
        runs = setting["runs"]
        seeds = setting.get("seeds", earlier["seeds"])  # a setting may hold fewer than all
        for seed, rows, secs in zip(
            seeds, runs, setting.get("member_train_seconds") or [None] * len(runs)
        ):
            found[(name, seed)] = (rows, secs, earlier["created"][:10])
    return found


def run(work: Path, seeds: list[int], say=print, reuse: Path | None = None) -> dict:
    settings = {}
    earlier, reused = _earlier(reuse), []
    # fine-tunes need their base: the quickstart model on the digits 0-8 (as benchmarks.fewshot)
    from benchmarks.fewshot import _train

    base_dir = work / "base-0-8"
    if not (base_dir / "run_summary.json").is_file():
        say("ensembles: pre-training the base on digits 0-8 ...")
        _train(FEWSHOT_BASE, base_dir, "ensembles")
    for name, config in (
        ("from scratch", SCRATCH),
        ("fine-tunes of one base", finetune(base_dir / "model")),
    ):
        runs, seconds = [], []
        for seed in seeds:
            if (name, seed) in earlier:  # the same code and settings: its rows, not a rerun
                rows, secs, day = earlier[(name, seed)]
                reused.append(f"{name}, seeds {seed}-{seed + MEMBERS - 1} ({day})")
                say(f"ensembles: {reused[-1]}: from {reuse}")
                runs.append(rows)
                seconds.append(secs)
                continue
            say(f"ensembles: {name}, seeds {seed}..{seed + MEMBERS - 1} ...")
            rows, secs = _ensemble(config, work / name.replace(" ", "-") / f"seed-{seed}", seed)
            runs.append(rows)
            seconds.append(secs)
        settings[name] = {
            "steps": config["train"]["max_steps"],
            "seeds": list(seeds),
            "runs": runs,
            "member_train_seconds": seconds,
            "summary": _summary(runs),
        }
    return {
        "benchmark": "ensembles of 3 members (seeds s, s+1, s+2) on the digits",
        "judge": "RBF-SVM on the real scikit-learn digits (sdtune.evaluate.judge)",
        "metric_images": METRIC_IMAGES,
        "seeds": seeds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "reused": reused,
        "machine": cpu_machine(),
    }


def markdown(result: dict) -> str:
    lines = [
        "| setting | model | val loss | judged accuracy | diversity | gen. recall | gen. precision |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, setting in result["settings"].items():
        for kind, row in setting["summary"].items():
            cells = []
            for key in KEYS:
                v = row[key]
                digits = 4 if key == "val_loss" else 3
                cells.append(
                    f"{v['mean']:.{digits}f} ({v['min']:.{digits}f} to {v['max']:.{digits}f})"
                )
            lines.append(
                f"| {name} ({setting['steps']} steps) | {kind} | " + " | ".join(cells) + " |"
            )
    seeds = ", ".join(f"{s}-{s + MEMBERS - 1}" for s in result["seeds"])
    lines += [
        "",
        f"Each row: the mean over {len(result['seeds'])} ensembles of {MEMBERS} members (seeds "
        f"{seeds}), in brackets the lowest and highest. Validation loss on one held-out split "
        f"(10% of the digits); the other columns from {result['metric_images']} generated "
        "digits judged by the digits judge. `python -m benchmarks.ensembles` on "
        f"{result['machine']['cpus']} CPU cores, torch {result['machine']['torch']}, "
        f"{result['created'][:10]}"
        + (
            f"; taken from an earlier run (--reuse): {'; '.join(result['reused'])}."
            if result.get("reused")
            else "."
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "ensembles"), help="run folders")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ensembles"))
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=DEFAULT_SEEDS, help="first seed of each ensemble"
    )
    parser.add_argument("--no-readme", action="store_true", help="leave the READMEs alone")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take the ensembles the --out results already hold (same code) and train only "
        "the missing ones (a benchmark stopped short, continued)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    reuse = out.with_suffix(".json") if args.reuse else None
    result = run(Path(args.work), args.seeds, reuse=reuse)
    words = sys.argv[1:] if argv is None else argv
    readmes = (
        [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
        if not args.no_readme and args.seeds == DEFAULT_SEEDS
        else []
    )
    write_results("ensembles", out, result, markdown(result), words, readmes, (BEGIN, END))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
