"""Few-shot fine-tuning benchmark on real data, judged by the digits judge.

Pre-trains the quickstart model on the digits 0-8 only, then teaches it the digit 9 from 10
real images with each method (full fine-tune, LoRA with and without output preservation,
DreamBooth with prior preservation, textual inversion) and reports, for each: the judged
accuracy on "nine" prompts, the accuracy on the other digits before and after (forgetting), the
training time and the trainable parameters. Each method runs with five seeds: the mean is
reported with the worst seed and the spread, because a user gets one seed, not the mean. One
command, CPU only, about an hour on 2 cores:

    python -m benchmarks.fewshot            # writes benchmarks/results/fewshot.{json,md}
    python -m benchmarks.fewshot --seeds 21 22 23 24 25 --judge-seed 99   # other draws

and rewrites the table in README.md and benchmarks/README.md (default seeds and judge seed
only). The target, on the worst seed: at least 0.90 on "nine" while the other digits lose at
most 1 point, for the recommended LoRA and for DreamBooth-LoRA.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.report import cpu_machine

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- fewshot:begin -->", "<!-- fewshot:end -->"
TARGET_NINE, TARGET_FORGETTING = 0.90, 1.0
TARGETED = ("lora", "dreambooth-lora")  # the recommended few-shot settings the target is for
DEFAULT_SEEDS = [1, 2, 3, 4, 5]
NINE = 9
INSTANCE_PROMPT = "a handwritten digit nine"
TOKEN = "<nine>"

BASE = {
    "seed": 0,
    "model": {"base": "preset:tiny-digits", "trainable": ["unet.*", "text_encoder.*"]},
    "data": {
        "source": "digits",
        "labels": list(range(9)),
        "resolution": 16,
        "val_fraction": 0.1,
        "caption_dropout": 0.1,
    },
    "diffusion": {"min_snr_gamma": 5.0},
    "train": {
        "max_steps": 700,
        "batch_size": 64,
        "learning_rate": 1e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 100,
        "ema": True,
        "ema_decay": 0.995,
        "log_every": 50,
    },
    "evaluate": {
        "every_steps": 0,
        "num_per_prompt": 4,
        "sample_steps": 25,
        "guidance_scale": 5.0,
        "scheduler": "dpm++",
        "val_batches": 2,
    },
}


def _finetune_common(base_model: Path) -> dict:
    return {
        "seed": 1,
        "model": {"base": str(base_model)},
        "data": {
            "source": "digits",
            "labels": [NINE],
            "limit": 10,
            "resolution": 16,
            "val_fraction": 0.0,
        },
        "diffusion": {"min_snr_gamma": 5.0},
        "train": {
            "batch_size": 10,
            "lr_schedule": "constant",
            "ema": False,
            "log_every": 50,
            "weight_decay": 0.0,
        },
        "checkpoint": {"keep_last": 1},
        "evaluate": {
            "every_steps": 0,
            "num_per_prompt": 2,
            "sample_steps": 25,
            "guidance_scale": 5.0,
            "scheduler": "dpm++",
            "val_batches": 0,
            "prompts": [INSTANCE_PROMPT, "a handwritten digit three", "a handwritten digit six"],
        },
    }


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def methods(base_model: Path) -> dict[str, dict]:
    """The fine-tuning runs, each a config on top of the shared few-shot settings."""
    common = _finetune_common(base_model)
    others = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three", "four")]
    others += [f"a handwritten digit {w}" for w in ("five", "six", "seven", "eight")]
    prior = {
        "instance_prompt": INSTANCE_PROMPT,
        "class_prompt": others,
        "num_class_images": 270,  # 30 of each other digit
        "prior_loss_weight": 1.0,
        # the base's own conditional samples: guided ones (5) are over-sharpened, and a model
        # trained on them then sampled with guidance draws artifacts that the judge misses
        "class_guidance_scale": 1.0,
        "class_sample_steps": 25,
    }
    # sdtune's recommended few-shot settings (examples/lora_fewshot_sd15.toml): rank 32 (a
    # rank-8 adapter's random initialisation decided whether a seed learned the new digit),
    # timesteps spread evenly over each batch, a cosine decay with a short warm-up, and an EMA
    # of the adapter weights
    fewshot = {
        "lora": {"rank": 32, "alpha": 32},
        "diffusion": {"timestep_sampling": "low_discrepancy"},
        "train": {
            "max_steps": 400,
            "learning_rate": 1e-3,
            "lr_schedule": "cosine",
            "warmup_steps": 20,
            "ema": True,
            "ema_decay": 0.99,
        },
    }
    preserve = {"lora": {"preserve_prompts": others, "preserve_weight": 1.0}}
    lora_r8 = _merge(
        common,
        {
            "lora": {"enabled": True, "rank": 8, "alpha": 8, "text_encoder": False},
            "train": {"max_steps": 200, "learning_rate": 1e-3},
        },
    )
    lora_plain = _merge(lora_r8, fewshot)
    dreambooth_lora = _merge(
        _merge(_merge(common, {"lora": lora_r8["lora"], "dreambooth": prior}), fewshot),
        {
            **preserve,
            "dreambooth": {"prior_loss_weight": 0.1, "class_guidance_scale": 3.0},
            # half of each batch is class images: twice lora's batch gives the nines lora's
            # ten per step (with half as many, the worst seed forgot 1.3 points, the threes);
            # at lora's lr 1e-3 it still forgot up to 1.4 points on unseen seeds (21-25)
            "train": {"batch_size": 20, "learning_rate": 7e-4},
        },
    )
    return {
        "full": _merge(
            common,
            {
                "model": {"trainable": ["unet.*"]},
                "train": {"max_steps": 150, "learning_rate": 2e-4},
            },
        ),
        # sdtune's default targets (attention and feed-forward), UNet only, keeping what the
        # base draws for the other digits' prompts (output preservation: no class images)
        "lora": _merge(lora_plain, preserve),
        "lora-plain": lora_plain,  # the same adapters and steps, trained on the ten nines alone
        "lora-r8-constant": _merge(lora_r8, preserve),  # the recommendation until 2026-12
        # the same adapters as lora, with DreamBooth's instance prompt and class images; their
        # prior loss weighs little beside output preservation, and the class images are
        # sampled at guidance 3
        "dreambooth-lora": dreambooth_lora,
        "dreambooth-full": _merge(
            common,
            {
                "model": {"trainable": ["unet.*"]},
                "dreambooth": {**prior, "num_class_images": 90},
                "train": {"max_steps": 300, "learning_rate": 1.5e-4},
            },
        ),
        "textual-inversion": _merge(
            common,
            {
                "textual_inversion": {"token": TOKEN, "init_word": "digit", "num_vectors": 4},
                "train": {"max_steps": 300, "learning_rate": 5e-2},
            },
        ),
    }


def _train(config: dict, run_dir: Path, label: str = "fewshot") -> float:
    """Train through the real CLI in this process; returns the wall time of the training."""
    import tomli_w

    from sdtune.cli import main

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.toml"
    path.write_text(tomli_w.dumps(config))
    start = time.monotonic()
    code = main(["train", str(path), "--output", str(run_dir), "--overwrite"])
    if code != 0:
        raise SystemExit(f"{label}: training {run_dir} failed (exit {code})")
    return time.monotonic() - start


def _judge(run_dir: Path, per_class: int, nine_prompt: str, seed: int) -> dict:
    """Judged accuracy per digit of the run's final (EMA when on) weights."""
    from sdtune.checkpoint.export import load_checkpoint_model, resolve_checkpoint
    from sdtune.data.sources import digit_prompt
    from sdtune.evaluate.judge import DigitsJudge
    from sdtune.evaluate.sampling import generate, save_grid

    bundle, _ = load_checkpoint_model(resolve_checkpoint(run_dir, lambda _: None))
    labels = [k for k in range(10) for _ in range(per_class)]
    prompts = [nine_prompt if k == NINE else digit_prompt(k) for k in labels]
    images = generate(
        bundle, prompts, seed=seed, steps=25, guidance_scale=5.0, sampler="dpm++", resolution=16
    )
    save_grid(images, run_dir / "fewshot_judge.png", nrow=per_class)
    result = DigitsJudge(16, seed=0).judge(images, labels)
    trainable = sum(
        p.numel() for m in bundle.components().values() for p in m.parameters() if p.requires_grad
    )
    return {
        "per_class": result.per_class,
        "nine": result.per_class[NINE],
        "others": float(np.mean(result.per_class[:NINE])),
        "trainable_parameters": trainable,
    }


def run(
    work: Path,
    per_class: int,
    only: list[str] | None,
    seeds: list[int],
    judge_seed: int = 7,
    say=print,
) -> dict:
    """Pre-train (or reuse) the base, then each method once per training seed, all judged."""
    from sdtune.config import to_toml, validate_config

    base_dir = work / "base"
    base_model = base_dir / "model"
    summary, config_file = base_dir / "run_summary.json", base_dir / "config.toml"
    same = config_file.is_file() and config_file.read_text() == to_toml(validate_config(BASE))
    if summary.is_file() and same:
        base_seconds = json.loads(summary.read_text())["train_seconds"]
        say(f"fewshot: reusing the pre-trained base in {base_dir} (same config; --fresh retrains)")
    else:
        say("fewshot: pre-training the quickstart model on digits 0-8 ...")
        base_seconds = _train(BASE, base_dir)
    before = _judge(base_dir, per_class, INSTANCE_PROMPT, seed=judge_seed)
    say(f"fewshot: base: nine {before['nine']:.2f}, others {before['others']:.3f}")
    rows = []
    for name, config in methods(base_model).items():
        if only and name not in only:
            continue
        runs = []
        for seed in seeds:  # the fine-tune's own seed: data order, noise, class images
            say(f"fewshot: {name}, seed {seed} ...")
            seconds = _train({**config, "seed": seed}, work / name / f"seed-{seed}")
            nine_prompt = INSTANCE_PROMPT
            if "textual_inversion" in config:
                nine_prompt = f"a handwritten digit {TOKEN}"
            after = _judge(work / name / f"seed-{seed}", per_class, nine_prompt, seed=judge_seed)
            runs.append(
                {
                    "seed": seed,
                    "nine_accuracy": after["nine"],
                    "others_after": after["others"],
                    "forgetting_points": 100 * (before["others"] - after["others"]),
                    "train_seconds": round(seconds, 1),
                    "per_class_after": after["per_class"],
                }
            )
            say(
                f"fewshot: {name}, seed {seed}: nine {after['nine']:.2f}, others "
                f"{before['others']:.3f} -> {after['others']:.3f}, {seconds:.0f}s"
            )

        def mean(key: str, runs: list[dict] = runs) -> float:
            return float(np.mean([r[key] for r in runs]))

        worst_nine = min(r["nine_accuracy"] for r in runs)
        worst_forgetting = max(r["forgetting_points"] for r in runs)

        row = {
            "method": name,
            "steps": config["train"]["max_steps"],
            "nine_accuracy": mean("nine_accuracy"),
            "others_before": before["others"],
            "others_after": mean("others_after"),
            "forgetting_points": mean("forgetting_points"),
            "worst_nine_accuracy": worst_nine,
            "worst_forgetting_points": worst_forgetting,
            "nine_std": float(np.std([r["nine_accuracy"] for r in runs])),
            "train_seconds": mean("train_seconds"),
            "trainable_parameters": after["trainable_parameters"],
            "runs": runs,
        }
        row["meets_target"] = (  # on every seed, not on the mean
            worst_nine >= TARGET_NINE and worst_forgetting <= TARGET_FORGETTING
        )
        row["targeted"] = name in TARGETED
        rows.append(row)
    return {
        "benchmark": "few-shot digit 9 (10 real images) on a model pre-trained on digits 0-8",
        "judge": "RBF-SVM on the real scikit-learn digits (sdtune.evaluate.judge)",
        "images_per_class": per_class,
        "judge_seed": judge_seed,
        "seeds": seeds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base": {
            "train_seconds": base_seconds,
            "per_class": before["per_class"],
            "trainable_parameters": before["trainable_parameters"],
        },
        "rows": rows,
        "machine": cpu_machine(),
    }


def merge(recorded: dict, fresh: dict) -> dict:
    """`recorded` with `fresh`'s rows in place of its rows of the same methods (new methods in
    the order of `methods()`), each re-run row noting its command and date. The draws must be
    the same (seeds, judge seed, images per digit, the base's judged accuracies): otherwise
    the rows could not be compared, and this refuses in one line."""
    for key in ("seeds", "judge_seed", "images_per_class"):
        if recorded.get(key) != fresh.get(key):
            raise SystemExit(
                f"fewshot --merge: {key} {fresh.get(key)} differs from the recorded "
                f"{recorded.get(key)}; re-run every method instead"
            )
    if recorded["base"]["per_class"] != fresh["base"]["per_class"]:
        raise SystemExit(
            "fewshot --merge: the base judges differently from the recorded one (a retrained "
            "or changed base); re-run every method instead"
        )
    out = copy.deepcopy(recorded)
    for row in fresh["rows"]:
        row = {**row, "rerun": {"command": fresh["command"], "created": fresh["created"]}}
        names = [r["method"] for r in out["rows"]]
        if row["method"] in names:
            out["rows"][names.index(row["method"])] = row
        else:
            out["rows"].append(row)
    order = list(methods(Path("base")))
    out["rows"].sort(key=lambda r: order.index(r["method"]) if r["method"] in order else 99)
    return out


def markdown(result: dict) -> str:
    base = result["base"]
    others = np.mean(base["per_class"][:NINE])

    def spread(row: dict, key: str, fmt: str) -> str:
        values = [r[key] for r in row["runs"]]
        if len(values) < 2:
            return ""
        return f" ({format(min(values), fmt)} to {format(max(values), fmt)})"

    lines = [
        "| method | steps | nine: mean (range) | nine: worst seed | forgetting: mean (range) "
        "| forgetting: worst seed | target on the worst seed | train time | trainable params |",
        "|---|---:|---:|---:|---:|---:|:-:|---:|---:|",
        f"| base (pre-trained on 0–8) | {BASE['train']['max_steps']} | "
        f"{base['per_class'][NINE]:.2f} | – | – (others {others:.3f}) | – | – | "
        f"{base['train_seconds']:.0f} s | {base['trainable_parameters']:,} |",
    ]
    for r in result["rows"]:
        worst_nine = r.get("worst_nine_accuracy", r["nine_accuracy"])
        worst_forgetting = r.get("worst_forgetting_points", r["forgetting_points"])
        verdict = "yes" if r["meets_target"] else "no"
        if not r.get("targeted", True):
            verdict = f"({verdict})"
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['nine_accuracy']:.2f}"
            f"{spread(r, 'nine_accuracy', '.2f')} | **{worst_nine:.2f}** | "
            f"{r['forgetting_points']:+.1f}{spread(r, 'forgetting_points', '+.1f')} | "
            f"**{worst_forgetting:+.1f}** | {verdict} | "
            f"{r['train_seconds']:.0f} s | {r['trainable_parameters']:,} |"
        )
    machine = result["machine"]
    seeds = ", ".join(map(str, result["seeds"]))
    reruns = [
        f"{r['method']} from `{r['rerun']['command']}` ({r['rerun']['created'][:10]})"
        for r in result["rows"]
        if "rerun" in r
    ]
    again = f" Re-run since, with the same base and draws: {'; '.join(reruns)}." if reruns else ""
    lines += [
        "",
        f"Each method fine-tuned with seeds {seeds}: the mean, in brackets the lowest and "
        f"highest run, and the worst seed on its own. Judged on {result['images_per_class']} "
        f"generated images per digit (seed {result['judge_seed']}). Target, on every seed: "
        f"nine ≥ {TARGET_NINE:.2f} and forgetting ≤ {TARGET_FORGETTING:g} point, for "
        f"{' and '.join(TARGETED)} (in brackets for the other methods, which it is not set "
        f"for). `{result['command']}` on {machine['cpus']} CPU cores, torch "
        f"{machine['torch']}, {result['created'][:10]}.{again}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "fewshot"), help="run folders")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fewshot"))
    parser.add_argument("--per-class", type=int, default=100, help="judged images per digit")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=DEFAULT_SEEDS, help="fine-tune seeds (at least 5)"
    )
    parser.add_argument("--judge-seed", type=int, default=7, help="seed of the judged images")
    parser.add_argument("--only", nargs="*", default=None, help="methods to run (default all)")
    parser.add_argument("--fresh", action="store_true", help="pre-train the base again")
    parser.add_argument("--no-readme", action="store_true", help="leave the READMEs alone")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only: replace those methods' rows in the recorded results (same base "
        "judgement, seeds, judge seed and images per digit) and keep the others",
    )
    args = parser.parse_args(argv)
    if args.fresh:
        import shutil

        shutil.rmtree(Path(args.work) / "base", ignore_errors=True)
    result = run(Path(args.work), args.per_class, args.only, args.seeds, args.judge_seed)
    words = sys.argv[1:] if argv is None else argv
    result["command"] = " ".join(["python -m benchmarks.fewshot", *words])
    out = Path(args.out)
    merged = False
    if args.only and args.merge:
        recorded = json.loads(out.with_suffix(".json").read_text())
        result = merge(recorded, result)  # raises SystemExit on a different draw
        merged = True
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"fewshot: results in {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    if len(args.seeds) < 5:
        print("fewshot: fewer than 5 seeds say little about the worst seed a user may get")
    default_draws = args.seeds == DEFAULT_SEEDS and args.judge_seed == 7
    if not args.no_readme and (merged or not args.only) and default_draws:
        from benchmarks.report import replace_between

        for readme in (ROOT / "README.md", ROOT / "benchmarks" / "README.md"):
            replace_between(readme, BEGIN, END, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
