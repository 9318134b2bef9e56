"""`sdtune train CONFIG --ensemble N`: N members that differ only in seed, their soup, and the
ensemble's evaluation, in one resumable command.

The ensemble directory holds member-1 ... member-N (ordinary run directories: seed, seed+1,
..., each resumable from its checkpoints), soup/ (the members' uniform weight average, or for
LoRA members their mean delta on the base) and ensemble.json: validation loss and generator
metrics (judged accuracy on the digits) of every member, of the soup and of the prediction
ensemble, on one held-out split (data.split_seed fixed to the config's, so that no member has
trained on another's validation images).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import sdtune
from sdtune.errors import RunDirError, UserError

MARKER = "sdtune_ensemble.json"
RESULT = "ensemble.json"


def member_dirs(root: Path, count: int) -> list[Path]:
    return [root / f"member-{i + 1}" for i in range(count)]


def prepare_ensemble_dir(root: Path, count: int, overwrite: bool, resume: bool) -> None:
    """Create the ensemble directory, or continue (--resume) or replace (--overwrite) one; never
    a folder sdtune did not make, and --overwrite removes only what the ensemble wrote."""
    from sdtune.rundir import is_run_dir, remove_run_files

    if root.exists() and not root.is_dir():
        raise RunDirError(f"--output {root} is a file, not a directory")
    ours = (root / MARKER).is_file()
    if root.is_dir() and any(root.iterdir()) and not ours:
        what = (
            "a training run (not an ensemble)"
            if is_run_dir(root)
            else "a folder sdtune did not create"
        )
        raise RunDirError(
            f"--output {root} is {what}; choose another --output for the ensemble "
            "(sdtune never deletes files it did not write)"
        )
    if ours:
        recorded = json.loads((root / MARKER).read_text()).get("members")
        if resume and recorded != count:
            raise UserError(
                f"--resume: {root} is an ensemble of {recorded} members, not {count}; resume "
                f"it with --ensemble {recorded}"
            )
        if not resume and not overwrite:
            raise RunDirError(
                f"--output {root} already holds an ensemble; pass --resume to continue it, "
                "--overwrite to replace it, or choose another --output"
            )
        if overwrite:
            for member in sorted(root.glob("member-*")):
                if is_run_dir(member):
                    remove_run_files(member)
                if member.is_dir() and not any(member.iterdir()):
                    member.rmdir()
            from sdtune.ensemble.merge import _is_merge

            soup = root / "soup"
            if soup.exists() and not _is_merge(soup):
                raise RunDirError(
                    f"--overwrite: {soup} is not the soup sdtune wrote; move it away first "
                    "(sdtune never deletes files it did not write)"
                )
            if soup.is_dir():
                shutil.rmtree(soup)
            if (root / RESULT).exists():
                (root / RESULT).unlink()
    root.mkdir(parents=True, exist_ok=True)
    record = {"sdtune_version": sdtune.__version__, "created": time.time(), "members": count}
    (root / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def finished(run_dir: Path) -> bool:
    return (run_dir / "run_summary.json").is_file() and (run_dir / "model").is_dir()


def member_overrides(base_cfg, index: int) -> list[str]:
    """The --set lines that make member `index` (0-based): its seed, and the config's split."""
    split = base_cfg.data.split_seed if base_cfg.data.split_seed is not None else base_cfg.seed
    return [f"seed={base_cfg.seed + index}", f"data.split_seed={split}"]


def train_ensemble(args: argparse.Namespace, train_run, say=print) -> int:
    """Train the members (skipping finished ones, resuming interrupted ones), then the soup
    and the evaluation. `train_run(args, cfg, run_dir, hint)` trains one run as `sdtune train`."""
    import torch
    from accelerate import PartialState

    from sdtune.config import load_config

    count = args.ensemble
    if args.resume is not None and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    if count < 2:
        raise UserError(f"--ensemble {count}: an ensemble has at least 2 members")
    base_cfg = load_config(args.config, args.set)
    root = Path(args.output) if args.output else base_cfg.output_dir
    if args.resume not in (None, "latest"):
        raise UserError(
            "--resume PATH names one checkpoint; an ensemble resumes each member from its own "
            "newest checkpoint: pass --resume alone"
        )
    _check_base(base_cfg.model.base)
    processes = PartialState(cpu=not torch.cuda.is_available())
    if processes.is_main_process:
        prepare_ensemble_dir(root, count, args.overwrite, args.resume is not None)
    processes.wait_for_everyone()
    hint = _resume_hint(args, root)
    dirs = member_dirs(root, count)
    if _evaluated(root, dirs):
        say(f"ensemble: every member has finished and {root / RESULT} is up to date; kept")
        return 0
    for index, run_dir in enumerate(dirs):
        if finished(run_dir):
            say(f"ensemble: {run_dir.name} has finished; kept")
            continue
        cfg = load_config(args.config, [*args.set, *member_overrides(base_cfg, index)])
        member_args = argparse.Namespace(**vars(args))
        member_args.overwrite = False
        member_args.resume = "latest" if (run_dir / "sdtune_run.json").is_file() else None
        say(f"ensemble: {run_dir.name} of {count} (seed {cfg.seed})")
        code = train_run(member_args, cfg, run_dir, hint)
        if code != 0:
            return code
    if processes.is_main_process:
        cfg = load_config(args.config, [*args.set, *member_overrides(base_cfg, 0)])
        evaluate_ensemble(root, dirs, cfg, say)
    return 0


def _check_base(base: str) -> None:
    """Members of a preset with a VAE would each draw their own frozen random VAE from their
    seed: no shared latent space, so no prediction ensemble and no meaningful soup."""
    if not base.startswith("preset:"):
        return
    from sdtune.models.presets import build_preset

    if build_preset(base.removeprefix("preset:"), 0).vae is not None:
        raise UserError(
            f"--ensemble: {base} draws its frozen VAE from the seed, so members of different "
            "seeds would share no latent space; ensemble fine-tunes of one base model (a "
            "folder, file or hub id) or a pixel-space preset such as preset:tiny-digits"
        )


def _evaluated(root: Path, dirs: list[Path]) -> bool:
    """Whether ensemble.json was written after every member finished (nothing left to do)."""
    result = root / RESULT
    if not result.is_file() or not all(finished(d) for d in dirs):
        return False
    newest = max((d / "run_summary.json").stat().st_mtime for d in dirs)
    return result.stat().st_mtime >= newest


def _resume_hint(args: argparse.Namespace, root: Path) -> str:
    import shlex

    words = ["sdtune", "train", str(args.config)]
    for item in args.set or []:
        words += ["--set", item]
    words += ["--ensemble", str(args.ensemble), "--output", str(root), "--resume"]
    return shlex.join(words)


def evaluate_ensemble(root: Path, dirs: list[Path], cfg, say=print) -> dict:
    """The soup, and every member's, the soup's and the ensemble's numbers (ensemble.json)."""
    import torch

    from sdtune.data import build_datasets
    from sdtune.ensemble.members import load_member
    from sdtune.ensemble.merge import merge
    from sdtune.ensemble.predict import Ensemble, check_compatible
    from sdtune.evaluate.assess import assess
    from sdtune.evaluate.validation import validation_loss
    from sdtune.files import atomic_output

    say(f"ensemble: the soup of {len(dirs)} members")
    merge([str(d) for d in dirs], root / "soup", overwrite=True, say=say)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    members = [load_member(str(d), say).bundle.to(device) for d in dirs]
    check_compatible(members, [d.name for d in dirs])
    soup = load_member(str(root / "soup"), say).bundle.to(device)
    data = build_datasets(cfg.data, members[0].image_channels, cfg.seed, lambda *_: None)
    models = {d.name: m for d, m in zip(dirs, members)}
    models["soup"] = soup
    models["ensemble"] = Ensemble(members, [1.0 / len(members)] * len(members))
    rows: dict[str, dict] = {}
    notes: list[str] = []
    for name, model in models.items():
        row: dict[str, float] = {}
        if data.val is not None and cfg.evaluate.val_batches > 0:
            row.update(
                validation_loss(
                    model, data.val, cfg.train.batch_size, cfg.evaluate.val_batches, device
                )
            )
        values, notes = assess(model, cfg, data, device, cfg.evaluate.metrics_images)
        row.update(values)
        rows[name] = row
    keys = [
        k
        for k in ("val_loss", "judged_accuracy", "gen_recall", "gen_precision", "diversity")
        if any(k in r for r in rows.values())
    ]
    say("ensemble: " + " ".join(f"{k:>15}" for k in ["", *keys]))
    for name, row in rows.items():
        say(
            "ensemble: "
            + f"{name:>15}"
            + " ".join(f"{row.get(k, float('nan')):>15.4f}" for k in keys)
        )
    for note in notes:
        say(f"ensemble: {note}")
    result = {
        "members": [d.name for d in dirs],
        "seeds": [cfg.seed + i for i in range(len(dirs))],
        "split_seed": cfg.data.split_seed,
        "metric_images": cfg.evaluate.metrics_images,
        "results": rows,
        "notes": notes,
    }
    with atomic_output(root / RESULT) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    say(f"ensemble: results in {root / RESULT}; soup in {root / 'soup'}")
    say(
        "ensemble: sample it with: sdtune sample "
        + " ".join(f"--model {d}" for d in dirs)
        + " --prompt ... --out ensemble.png"
    )
    return result
