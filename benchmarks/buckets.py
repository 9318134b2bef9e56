"""Wide digits: what aspect-ratio buckets buy on real, non-square data, judged.

Each training image is two real UCI digits side by side (2:1, 16x8 px upscaled by the
pipeline), captioned "the digits three and seven". The quickstart's pixel-space model is
trained from scratch on them twice: with centre-cropped squares (data.buckets = false: every
crop cuts the outer halves of both digits off) and with buckets (each image whole, at the
2:1-ish bucket of the same area). Both then sample every pair at the bucket's wide size, and
each half of every image is read by the digits judge (sdtune.evaluate.judge). Reported per
variant and seed: the pair accuracy (both digits right), each half's accuracy, and the
training images/s (the throughput cost of buckets against square batches of the same area).
One command, CPU only:

    python -m benchmarks.buckets                  # writes benchmarks/results/buckets.{json,md}
    python -m benchmarks.buckets --seeds 1 --steps 600      # a quick look

and rewrites the table in README.md and benchmarks/README.md (default settings only).
Target: bucketed pair accuracy >= 0.80 on every seed, far above the square crops'.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import cpu_machine

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- buckets:begin -->", "<!-- buckets:end -->"
TARGET_PAIR = 0.80
DEFAULT_SEEDS = [1, 2, 3]
DEFAULT_STEPS = 1500
RESOLUTION = 22  # the area: 22x22 squares, or 30x16 buckets for the 2:1 pairs
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PAIRS = 3000


def pair_prompt(a: int, b: int) -> str:
    return f"the digits {WORDS[a]} and {WORDS[b]}"


def write_pairs(folder: Path, count: int = PAIRS, seed: int = 0) -> Path:
    """`count` 16x8 images of two real digits side by side, with a metadata.jsonl."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if (folder / "metadata.jsonl").is_file():
        return folder
    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        left, right = rng.integers(0, len(pixels), 2)
        image = np.concatenate([pixels[left], pixels[right]], axis=1)
        name = f"pair-{i:05d}.png"
        Image.fromarray(image, "L").save(folder / name)
        text = pair_prompt(int(digits.target[left]), int(digits.target[right]))
        rows.append(json.dumps({"file_name": name, "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def config(data: Path, seed: int, steps: int, buckets: bool) -> dict:
    return {
        "seed": seed,
        "model": {"base": "preset:tiny-digits", "trainable": ["unet.*", "text_encoder.*"]},
        "data": {
            "path": str(data),
            "resolution": RESOLUTION,
            "buckets": buckets,
            "max_aspect": 2.5,
            "val_fraction": 0.05,
            "caption_dropout": 0.1,
        },
        "diffusion": {"min_snr_gamma": 5.0},
        "train": {
            "max_steps": steps,
            "batch_size": 64,
            "learning_rate": 1e-3,
            "lr_schedule": "cosine",
            "warmup_steps": 100,
            "ema": True,
            "ema_decay": 0.995,
            "log_every": 50,
        },
        "checkpoint": {"keep_last": 1},
        "evaluate": {
            "every_steps": 0,
            "val_batches": 1,
            "sample_steps": 25,
            "guidance_scale": 5.0,
            "scheduler": "dpm++",
            "num_per_prompt": 1,
            "prompts": [pair_prompt(3, 7), pair_prompt(1, 8), pair_prompt(0, 5)],
            "sample_size": list(WIDE),
        },
    }


WIDE = (30, 16)  # the bucket of the 2:1 pairs at RESOLUTION (sides multiples of 2)


def _train(cfg: dict, run_dir: Path, say=print) -> float:
    """Train through the real CLI in this process (or reuse a finished run of the same config
    in `run_dir`: --work keeps them); returns the training's wall time."""
    from benchmarks.fewshot import _train as train_once
    from sdtune.config import to_toml, validate_config

    summary, saved = run_dir / "run_summary.json", run_dir / "config.toml"
    if summary.is_file() and saved.is_file():
        if saved.read_text() == to_toml(validate_config(cfg)):
            say(f"buckets: reusing the finished run in {run_dir} (same config)")
            return float(json.loads(summary.read_text())["train_seconds"])
    return train_once(cfg, run_dir, "buckets")


def _images_per_s(run_dir: Path) -> float:
    """The median logged training throughput after the first logged window (warm-up)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]
    return float(np.median(rates)) if rates else float("nan")


def judge_pairs(run_dir: Path, per_pair: int, seed: int) -> dict:
    """Sample every ordered pair `per_pair` times at the wide size; judge each half."""
    from sdtune.checkpoint.export import load_checkpoint_model, resolve_checkpoint
    from sdtune.evaluate.judge import DigitsJudge
    from sdtune.evaluate.sampling import generate, save_grid

    bundle, _ = load_checkpoint_model(resolve_checkpoint(run_dir, lambda _: None))
    pairs = [(a, b) for a in range(10) for b in range(10) for _ in range(per_pair)]
    prompts = [pair_prompt(a, b) for a, b in pairs]
    images = generate(
        bundle,
        prompts,
        seed=seed,
        steps=25,
        guidance_scale=5.0,
        sampler="dpm++",
        width=WIDE[0],
        height=WIDE[1],
    )
    save_grid(images[: 10 * per_pair * 10 : per_pair], run_dir / "pairs_judge.png", nrow=10)
    half = WIDE[0] // 2
    judge = DigitsJudge(16, seed=0)
    left = judge.predict(images[..., :half])
    right = judge.predict(images[..., half : 2 * half])
    want_left = np.array([a for a, _ in pairs])
    want_right = np.array([b for _, b in pairs])
    return {
        "pair_accuracy": float(((left == want_left) & (right == want_right)).mean()),
        "left_accuracy": float((left == want_left).mean()),
        "right_accuracy": float((right == want_right).mean()),
    }


def run(
    work: Path,
    seeds: list[int],
    steps: int,
    per_pair: int,
    judge_seed: int,
    say=print,
    pairs: int = PAIRS,
):
    data = write_pairs(work / "data", pairs)
    rows = []
    for variant, buckets in (("square crops", False), ("buckets", True)):
        runs = []
        for seed in seeds:
            run_dir = work / ("buckets" if buckets else "square") / f"seed-{seed}"
            say(f"buckets: {variant}, seed {seed} ...")
            seconds = _train(config(data, seed, steps, buckets), run_dir, say)
            judged = judge_pairs(run_dir, per_pair, judge_seed)
            runs.append(
                {
                    "seed": seed,
                    **judged,
                    "images_per_s": _images_per_s(run_dir),
                    "train_seconds": round(seconds, 1),
                }
            )
            say(
                f"buckets: {variant}, seed {seed}: pair {judged['pair_accuracy']:.3f} (left "
                f"{judged['left_accuracy']:.3f}, right {judged['right_accuracy']:.3f}), "
                f"{runs[-1]['images_per_s']:.0f} images/s"
            )
        rows.append(
            {
                "variant": variant,
                "pair_accuracy": float(np.mean([r["pair_accuracy"] for r in runs])),
                "worst_pair_accuracy": min(r["pair_accuracy"] for r in runs),
                "left_accuracy": float(np.mean([r["left_accuracy"] for r in runs])),
                "right_accuracy": float(np.mean([r["right_accuracy"] for r in runs])),
                "images_per_s": float(np.mean([r["images_per_s"] for r in runs])),
                "runs": runs,
            }
        )
    square, bucketed = rows
    return {
        "benchmark": "wide digits: two real UCI digits side by side (2:1), judged per half",
        "resolution": RESOLUTION,
        "wide_size": list(WIDE),
        "steps": steps,
        "seeds": seeds,
        "per_pair": per_pair,
        "judge_seed": judge_seed,
        "rows": rows,
        "throughput_ratio": bucketed["images_per_s"] / square["images_per_s"],
        "meets_target": bucketed["worst_pair_accuracy"] >= TARGET_PAIR,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": cpu_machine(),
    }


def table(result: dict) -> str:
    lines = [
        "| training | pair accuracy (mean) | worst seed | left digit | right digit | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['variant']} | {row['pair_accuracy']:.2f} | **{row['worst_pair_accuracy']:.2f}** "
            f"| {row['left_accuracy']:.2f} | {row['right_accuracy']:.2f} | {row['images_per_s']:.0f} |"
        )
    seeds = ", ".join(map(str, result["seeds"]))
    lines.append("")
    lines.append(
        f"Trained from scratch ({result['steps']} steps, batch 64) with seeds {seeds}, both at "
        f"an area of {result['resolution']}x{result['resolution']} px, then every ordered pair "
        f"sampled {result['per_pair']} times at {result['wide_size'][0]}x{result['wide_size'][1]} "
        "and each half read by the digits judge (pair: both right; chance 0.01). Buckets' "
        f"throughput against square batches of the same area: {result['throughput_ratio']:.2f}x. "
        f"Target: bucketed worst seed >= {TARGET_PAIR:.2f}: "
        f"{'met' if result['meets_target'] else 'not met'}. `python -m benchmarks.buckets` on "
        f"{result['machine']['cpus']} CPU cores, torch {result['machine']['torch']}, "
        f"{result['created'][:10]}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.buckets", description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdtune-buckets"))
    parser.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--per-pair", type=int, default=3, help="images per ordered pair")
    parser.add_argument("--judge-seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    result = run(args.work, args.seeds, args.steps, args.per_pair, args.judge_seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "buckets.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    (args.out / "buckets.md").write_text(text + "\n")
    print(text)
    default = args.seeds == DEFAULT_SEEDS and args.steps == DEFAULT_STEPS and args.per_pair == 3
    if default:
        from benchmarks.report import replace_between

        for readme in (ROOT / "README.md", ROOT / "benchmarks" / "README.md"):
            replace_between(readme, BEGIN, END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
