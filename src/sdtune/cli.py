"""sdtune: train and fine-tune Stable Diffusion models (SD 1.x, 2.x, SDXL) and small diffusion
models, with checkpoints you can resume exactly and a report of every run.

Start with `sdtune train examples/quickstart.toml` (about two minutes on a CPU), then
`sdtune report runs/quickstart` to see what it learned. `sdtune COMMAND --help` says more."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path

from sdtune.errors import RunDirError, UserError


def cmd_train(args: argparse.Namespace) -> int:
    from sdtune.config import load_config

    if args.ensemble is not None:
        from sdtune.ensemble.runs import train_ensemble

        return train_ensemble(args, train_run)
    cfg = load_config(args.config, args.set)
    run_dir = Path(args.output) if args.output else cfg.output_dir
    return train_run(args, cfg, run_dir, _train_command(args) + f" --output {run_dir} --resume")


def train_run(args: argparse.Namespace, cfg, run_dir: Path, resume_hint: str) -> int:
    """Train one run as `sdtune train` does; `resume_hint` is the command that continues it."""
    import torch
    from accelerate import PartialState

    from sdtune.checkpoint.state import resolve_resume
    from sdtune.train.loop import TrainingInterrupted, train

    if args.resume is not None and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    from sdtune.train.shard import check_launch

    check_launch()  # a launch asking for what sdtune does not shard with: before it starts
    # under `accelerate launch` / torchrun: the main process checks and prepares the run
    # directory, the others follow once it has (alone, this is a no-op)
    processes = PartialState(cpu=not torch.cuda.is_available())
    main = processes.is_main_process
    resume_from = None
    if main:
        resume_from = _resolve_and_prepare(args, cfg, run_dir)
    processes.wait_for_everyone()
    if not main and args.resume is not None:
        resume_from = resolve_resume(run_dir, args.resume, args.fast_verify, lambda *_: None)
    try:
        result = train(cfg, run_dir, resume_from)
    except TrainingInterrupted as stop:  # not an error: the resume command, as typed here
        if main:
            print(f"sdtune: {stop.describe(resume_hint)}", file=sys.stderr)
        return stop.exit_code
    except Terminated:  # outside the loop's own handler: in set-up, or after the last step
        if main:
            print(
                f"sdtune: stopped by SIGTERM; continue with: {resume_hint} --resume latest",
                file=sys.stderr,
            )
        return 143
    if result.judged_accuracy is not None:
        print(f"training took {result.train_seconds:.1f}s")
        print(f"judged_accuracy={result.judged_accuracy:.2f}")
    return 0


def _train_command(args: argparse.Namespace) -> str:
    """`sdtune train CONFIG` with the --set overrides this run was started with."""
    import shlex

    words = ["sdtune", "train", str(args.config)]
    for item in args.set or []:
        words += ["--set", item]
    return shlex.join(words)


def _resolve_and_prepare(args: argparse.Namespace, cfg, run_dir: Path) -> Path | None:
    """The checkpoint `--resume` means (checked against the config), or a prepared new run."""
    from sdtune.checkpoint.state import CONFIG_KEY, check_resume_config, resolve_resume
    from sdtune.config import to_dict
    from sdtune.rundir import check_output, finished_results, never_trained, prepare_run_dir

    check_output(run_dir)  # never a user's own folder, whatever the flags say
    resume_from = None
    if args.resume is not None:
        resume_from = resolve_resume(run_dir, args.resume, args.fast_verify, print)
    if resume_from is not None:
        changed = check_resume_config(
            (resume_from / CONFIG_KEY).read_text(), to_dict(cfg), resume_from
        )
        if changed:
            print(f"resume: config changes allowed on resume: {', '.join(changed)}")
        if not run_dir.is_dir() or not any(run_dir.iterdir()):  # --resume PATH into a new run
            prepare_run_dir(run_dir, False)
    else:
        results = finished_results(run_dir)
        if args.resume is not None and results:  # starting again would replace them
            raise RunDirError(
                f"--resume: {run_dir} holds a finished run ({', '.join(results)}) but no "
                "checkpoint to continue from; keep it and choose another --output, or pass "
                "--overwrite instead of --resume to train it again from scratch"
            )
        again = not args.overwrite and never_trained(run_dir)
        prepare_run_dir(run_dir, args.overwrite or (args.resume is not None and not again))
        if again:
            print(f"run directory: {run_dir} held a run that stopped before its first step: "
                  "starting it again there")  # fmt: skip
    print(f"run directory: {run_dir}")
    return resume_from


def _scaled(spec: str, flag: str) -> tuple[Path, float]:
    """'file.safetensors' or 'file.safetensors:0.7' -> (path, scale)."""
    path, sep, scale = spec.rpartition(":")
    if sep and path and not scale.startswith(("/", "\\")):
        try:
            value = float(scale)
        except ValueError:
            return Path(spec), 1.0
        if not math.isfinite(value):
            raise UserError(f"{flag} {spec}: the scale {scale} is not a finite number")
        return Path(path), value
    return Path(spec), 1.0


def _token_file(spec: str) -> tuple[Path, str | None]:
    """'emb.safetensors' or 'emb.safetensors:<token>' -> (path, token)."""
    path, sep, token = spec.rpartition(":")
    if sep and path and Path(path).suffix in (".safetensors", ".pt", ".bin"):
        return Path(path), token
    return Path(spec), None


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file {path}: no such file")
        from sdtune.files import read_user_text

        prompts += [line.strip() for line in read_user_text(path).splitlines() if line.strip()]
    if not prompts:
        raise UserError("give at least one --prompt or a --prompt-file with one prompt per line")
    return prompts


def _model_specs(args: argparse.Namespace) -> list[str]:
    """The models named: the positional one and every --model, in order."""
    specs = ([args.model] if args.model else []) + list(args.models or [])
    if not specs:
        raise UserError("name a model: sdtune sample MODEL ... (or --model A --model B ...)")
    from sdtune.ensemble.members import named_twice

    twice = named_twice(specs)
    if twice:
        raise UserError(f"{twice} named twice; to weight members, use --weights")
    return specs


def _ensemble_weights(weights, count: int, flag: str):
    from sdtune.ensemble.predict import normalised

    if weights is not None and count == 1:
        raise UserError(f"{flag} weighs the members of an ensemble: name two models or more")
    return normalised(weights, count, flag)


def _ensemble(bundles: list, weights: list[float], names: list[str]):
    """One model, or the prediction ensemble of several (checked to share a latent space)."""
    if len(bundles) == 1:
        return bundles[0]
    from sdtune.ensemble.predict import Ensemble, check_compatible

    check_compatible(bundles, names)
    print(
        "ensemble: the mean prediction of "
        + ", ".join(f"{n} ({w:.3g})" for n, w in zip(names, weights))
    )
    return Ensemble(bundles, weights)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from torchvision.utils import save_image

    from sdtune.config import DiffusionConfig, ModelConfig
    from sdtune.ensemble.members import load_member, load_named
    from sdtune.evaluate.sampling import generate, save_grid
    from sdtune.files import check_writable
    from sdtune.models.embeddings import load_embedding_file
    from sdtune.models.lora import load_lora_files

    prompts = _read_prompts(args)
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the path of the grid's .png file")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the grid is a PNG image; give a path ending in .png")
    if out.is_file() and not args.overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it")
    check_writable(out)  # before minutes of sampling, not after
    names = [f"{i // args.num:03d}-{i % args.num:02d}.png" for i in range(len(prompts) * args.num)]
    if args.images_dir:
        folder = Path(args.images_dir)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--images-dir {folder} is a file; give a folder to write images to")
        taken = [n for n in [*names, "prompts.txt"] if (folder / n).exists()]
        if taken and not args.overwrite:
            raise UserError(
                f"--images-dir {folder} already holds {taken[0]}; pass --overwrite to replace "
                "such files, or choose another folder"
            )
        check_writable(folder / names[0])
    if (args.width is None) != (args.height is None):
        raise UserError("--width and --height go together: give both (or --resolution)")
    if args.resolution is not None and args.width is not None:
        raise UserError("--resolution and --width/--height exclude each other: choose one")
    specs = _model_specs(args)
    weights = _ensemble_weights(args.weights, len(specs), "--weights")
    bundles = []
    for spec in specs:
        if len(specs) == 1:  # one model: as ever (a run directory means its final model)
            source = Path(spec)
            if (source / "model").is_dir() and (source / "sdtune_run.json").is_file():
                source = source / "model"
            model_cfg = ModelConfig(base=str(source), config_source=args.config_source)
            bundle = load_named(model_cfg, DiffusionConfig(), args.seed)
        else:
            bundle = load_member(spec, print, args.config_source).bundle
        if args.lora:
            load_lora_files(bundle, [_scaled(spec, "--lora") for spec in args.lora])
        for spec in args.embedding or []:
            path, token = _token_file(spec)
            load_embedding_file(bundle, path, token or f"<{path.stem}>")
            print(f"embedding {path} loaded as token {token or f'<{path.stem}>'}")
        bundles.append(bundle)
    model = _ensemble(bundles, weights, specs)
    bundle = bundles[0]
    multiple = bundle.arch.resolution_multiple(bundle)
    for flag, value in (
        ("--resolution", args.resolution),
        ("--width", args.width),
        ("--height", args.height),
    ):
        if value is not None and value % multiple:
            raise UserError(
                f"{flag} {value}: this model needs image sides that are multiples of {multiple}"
            )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    expanded = [p for p in prompts for _ in range(args.num)]
    images = generate(
        model,
        expanded,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance,
        sampler=args.scheduler,
        negative_prompt=args.negative_prompt,
        guidance_rescale=args.guidance_rescale,
        resolution=args.resolution,
        device=device,
        width=args.width,
        height=args.height,
    )
    out = save_grid(images, Path(args.out), nrow=args.num)
    if args.images_dir:
        for name, image in zip(names, images):
            save_image(image, folder / name)
        (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
        print(f"wrote {len(images)} image(s) to {folder}")
    print(f"wrote {len(expanded)} image(s) as a grid to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sdtune.checkpoint.export import (
        check_export_target,
        export_model,
        load_checkpoint_run,
        resolve_checkpoint,
    )
    from sdtune.models.lora import has_lora

    resolved = check_export_target(args.format, Path(args.out), args.overwrite)  # before loading
    ckpt = resolve_checkpoint(Path(args.checkpoint), print, args.fast_verify)
    bundle, meta, cfg = load_checkpoint_run(ckpt, args.weights)
    what = args.format
    if args.format == "merged":  # say what was written, LoRA or not
        layout = "a single file" if resolved == "single-file" else "a diffusers folder"
        if any(has_lora(m) for m in bundle.components().values()):
            what = f"merged (the LoRA baked into the base, {layout})"
        else:
            what = f"merged (this run has no LoRA: the whole model as trained, {layout})"
    out = export_model(
        bundle,
        meta,
        args.format,
        Path(args.out),
        args.overwrite,
        lora_scale=args.lora_scale,
        token=cfg.textual_inversion.token,
    )
    print(f"exported {ckpt} ({meta['weights']} weights, step {meta['steps']}) as {what} to {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from sdtune.checkpoint.inspect import inspect_path

    return inspect_path(Path(args.path), args.fast_verify)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    import tomllib
    import torch

    from sdtune.checkpoint.export import load_checkpoint_model, resolve_checkpoint
    from sdtune.config import validate_config
    from sdtune.data import build_datasets
    from sdtune.evaluate.assess import assess

    if args.out and Path(args.out).exists():
        raise UserError(f"--out {args.out} already exists; name a new file")
    if args.out:
        from sdtune.files import check_writable

        check_writable(Path(args.out))  # before the evaluation, not after it
    ckpt = resolve_checkpoint(Path(args.checkpoint), print, args.fast_verify)
    cfg = validate_config(
        tomllib.loads((ckpt / "config.toml").read_text()), str(ckpt / "config.toml")
    )
    bundle, meta = load_checkpoint_model(ckpt, args.weights)
    others = list(args.models or [])
    weights = _ensemble_weights(args.ensemble_weights, 1 + len(others), "--ensemble-weights")
    bundles = [bundle]
    if others:
        from sdtune.ensemble.members import load_member

        bundles += [load_member(spec, print).bundle for spec in others]
    model = _ensemble(bundles, weights, [args.checkpoint, *others])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    data = build_datasets(cfg.data, bundle.image_channels, cfg.seed, print)
    values, notes = assess(model, cfg, data, device, args.num_images)
    if others and data.val is not None and cfg.evaluate.val_batches > 0:
        from sdtune.evaluate.validation import validation_loss

        values = {
            **validation_loss(
                model, data.val, cfg.train.batch_size, cfg.evaluate.val_batches, device
            ),
            **values,
        }
    if not values:  # nothing could be measured: say why, as an error
        raise UserError(f"sdtune eval {args.checkpoint}: {'; '.join(notes)}")
    for note in notes:
        print(note)
    for key, value in values.items():
        print(f"{key:<18} {value:.4f}")
    kind = "eval-ensemble" if others else "eval"  # beside it: a checkpoint stays as saved
    out = Path(args.out) if args.out else ckpt.parent / f"{kind}-{ckpt.name}.json"
    record = {"checkpoint": str(ckpt), "weights": meta["weights"], **values, "notes": notes}
    if others:
        record["ensemble"] = {"members": [str(ckpt), *others], "weights": weights}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from sdtune.ensemble.merge import merge

    merge(
        list(args.models),
        Path(args.out),
        weights=args.weights,
        soup=args.soup,
        lora_rank=args.lora_rank,
        config=Path(args.config) if args.config else None,
        overwrite=args.overwrite,
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from sdtune.config import load_config
    from sdtune.plan import make_plan, measure, render

    if args.gpu and args.memory is not None:
        raise UserError("sdtune plan: give --gpu NAME or --memory GiB, not both")
    if args.price is not None and not args.gpu and not args.measure:
        raise UserError(
            "--price: the cost is the predicted time times the price, and there is no time "
            "without --gpu NAME (or --measure, for this machine)"
        )
    cfg = load_config(args.config, args.set)
    if args.json and Path(args.json).exists():
        raise UserError(f"--json {args.json} already exists; name a new file")
    measured = None
    if args.measure:
        print(f"plan: measuring {args.measure_steps} real steps here ...")
        measured = measure(cfg, args.measure_steps)
    plan = make_plan(
        cfg,
        args.gpu,
        args.memory,
        args.price,
        measured.step_seconds if measured is not None else None,
        shards=args.fsdp or 1,
    )
    print(render(plan, cfg))
    if measured is not None:
        print(
            f"measured here ({measured.device}): {measured.step_seconds:.3g} s a step, "
            f"{measured.peak / 2**30:.3f} GiB held at the peak of a step "
            f"(predicted {plan.peak / 2**30:.3f} GiB)"
        )
    if args.json:
        from dataclasses import asdict

        record = {**asdict(plan), "fits": plan.fits}
        if measured is not None:
            record["measured"] = asdict(measured)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"plan: written to {args.json}")
    return 0 if plan.fits is not False else 3


def cmd_report(args: argparse.Namespace) -> int:
    from sdtune.files import check_writable
    from sdtune.monitor.report import write_comparison, write_report

    run_dirs = [Path(run) for run in args.run]
    for run_dir in run_dirs:
        if not (run_dir / "metrics.jsonl").is_file():
            raise RunDirError(f"{run_dir}: not a run directory (no metrics.jsonl)")
    if len(run_dirs) == 1:
        out = write_report(run_dirs[0], Path(args.out) if args.out else None)
        print(f"report written to {out}")
        return 0
    if len(set(p.resolve() for p in run_dirs)) < len(run_dirs):
        raise UserError("sdtune report: a run is named twice; name each run once")
    if not args.out:
        raise UserError(
            "sdtune report: with several runs, --out FILE names the comparison page "
            "(e.g. --out compare.html)"
        )
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the .html file to write")
    check_writable(out, folder=False)
    write_comparison(run_dirs, out)
    print(f"comparison of {len(run_dirs)} runs written to {out}")
    return 0


def cmd_config_init(args: argparse.Namespace) -> int:
    from sdtune.config import load_config
    from sdtune.files import atomic_output
    from sdtune.templates import render

    out = Path(args.out if args.out is not None else f"{args.task}.toml")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.suffix != ".toml":
        raise UserError(f"--out {out}: the config is TOML; name a .toml file")
    text = render(args.task, args.base, args.data, args.resolution, str(out))
    with atomic_output(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    load_config(str(out), [])  # what was written is a valid config (else a bug: say so)
    print(f"wrote {out}: {args.task}; edit model.base, data.path and evaluate.prompts, then:")
    print(f"  sdtune train {out}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from sdtune.config import load_config, to_toml

    cfg = load_config(args.config, args.set)
    sys.stdout.write(to_toml(cfg, with_help=True))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, like every other sdtune error (usage on --help)."""

    def error(self, message: str):
        self.exit(2, f"sdtune: error: {message}; see `{self.prog} --help`\n")


MAX_SIDE = 8192  # pixels: 8x SDXL's side; a larger image is a typo, not a wish


def _number(kind, low=None, finite=True, high=None):
    """An argparse type: an int or float, at least `low` (at most `high`), finite."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if finite and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"{text} is below the smallest allowed value, {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} is above the largest allowed value, {high}")
        return value

    return parse


def _member_options(p, weights_flag: str, model_help: str, weights_help: str) -> None:
    """--model (repeatable) and the members' weights: an ensemble of several models."""
    p.add_argument("--model", dest="models", action="append", metavar="MODEL", help=model_help)
    p.add_argument(
        weights_flag, type=_number(float, 0.0), nargs="+", default=None, help=weights_help
    )


def build_parser() -> argparse.ArgumentParser:
    import sdtune

    parser = _Parser(
        prog="sdtune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"sdtune {sdtune.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train or fine-tune a model from a config file")
    p.add_argument("config", help="TOML or YAML config file")
    p.add_argument("--output", help="run directory (default: output_dir from the config)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.max_steps=100",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="latest|PATH",
        help="continue from the newest verified checkpoint of --output (or from PATH); "
        "with no checkpoint yet, start from scratch",
    )
    p.add_argument(
        "--fast-verify", action="store_true", help="check checkpoint file sizes only, not sha256"
    )
    p.add_argument(
        "--ensemble",
        type=_number(int, 2),
        default=None,
        metavar="N",
        help="train N members that differ only in seed (seed, seed+1, ...) into --output/member-*, "
        "then their soup and the ensemble's evaluation (ensemble.json); --resume continues it",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate a grid of images from a model or run directory")
    p.add_argument(
        "model",
        nargs="?",
        help="run directory, checkpoint, model folder, single file, hub id or preset:NAME",
    )
    _member_options(
        p,
        "--weights",
        "another model (repeatable): several sample as one ensemble, their noise "
        "predictions averaged at every step",
        "the ensemble members' weights, in the order named (normalised; default equal)",
    )
    p.add_argument("--prompt", action="append", help="prompt (repeat for several)")
    p.add_argument("--prompt-file", default=None, help="text file with one prompt per line")
    p.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="LoRA file (diffusers/peft or kohya format) with an optional scale; repeatable",
    )
    p.add_argument(
        "--embedding",
        action="append",
        metavar="FILE[:TOKEN]",
        help="textual-inversion embedding (default token <file stem>); repeatable",
    )
    p.add_argument("--num", type=_number(int, 1), default=4, help="images per prompt")
    p.add_argument("--seed", type=_number(int, 0), default=0)
    p.add_argument("--steps", type=_number(int, 1), default=25, help="denoising steps")
    p.add_argument(
        "--guidance", type=_number(float, 0.0), default=3.0, help="classifier-free guidance scale"
    )
    p.add_argument(
        "--guidance-rescale",
        type=_number(float, 0.0, high=1.0),
        default=0.0,
        help="rescale the guided prediction's scale (Lin et al. 2024; 0.7 with a "
        "zero-terminal-SNR model, 0 off)",
    )
    p.add_argument("--scheduler", choices=["ddim", "euler", "dpm++"], default="ddim")
    p.add_argument("--negative-prompt", default="")
    p.add_argument(
        "--resolution",
        type=_number(int, 8, high=MAX_SIDE),
        default=None,
        help="image side in pixels (default: the model's)",
    )
    p.add_argument(
        "--width",
        type=_number(int, 8, high=MAX_SIDE),
        default=None,
        help="image width (default: --resolution)",
    )
    p.add_argument(
        "--height",
        type=_number(int, 8, high=MAX_SIDE),
        default=None,
        help="image height (default: --resolution)",
    )
    p.add_argument(
        "--config-source",
        default=None,
        help="for a single-file model: folder or cached hub id with its configs",
    )
    p.add_argument("--out", required=True, help="output PNG file (the grid: one row a prompt)")
    p.add_argument("--images-dir", default=None, help="also write each image to this folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out (and --images-dir files) if they exist",
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "export", help="export a checkpoint: full model, merged LoRA, LoRA file or embedding"
    )
    p.add_argument("checkpoint", help="run directory or checkpoints/step-NNNNNNN")
    p.add_argument(
        "--format",
        required=True,
        choices=["diffusers", "single-file", "ckpt", "merged", "lora", "kohya", "embedding"],
        help="diffusers folder | single-file/ckpt SD checkpoint | merged (LoRA baked in: folder, "
        "or single file for a .safetensors --out) | lora (diffusers/peft) | kohya (A1111/ComfyUI "
        "LoRA) | embedding (textual inversion)",
    )
    p.add_argument(
        "--out", required=True, help="output folder (diffusers) or file (.safetensors/.ckpt)"
    )
    p.add_argument(
        "--lora-scale",
        type=_number(float),
        default=1.0,
        help="strength of the LoRA baked into full models",
    )
    p.add_argument(
        "--weights",
        choices=["auto", "ema", "raw"],
        default="auto",
        help="EMA or raw weights (auto: EMA when present)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--fast-verify", action="store_true", help="check file sizes only, not sha256")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "inspect", help="show and verify what a checkpoint (or run) holds, or what an export is"
    )
    p.add_argument(
        "path",
        help="checkpoint directory, checkpoints/ folder or run directory; or an exported file "
        "(.safetensors, .ckpt: single file, LoRA, embedding) or model folder",
    )
    p.add_argument("--fast-verify", action="store_true", help="check file sizes only, not sha256")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "eval", help="generator metrics of a checkpoint (precision/recall, diversity, ...)"
    )
    p.add_argument("checkpoint", help="run directory or checkpoints/step-NNNNNNN")
    p.add_argument(
        "--num-images", type=_number(int, 10), default=100, help="images to generate (at least 10)"
    )
    p.add_argument("--weights", choices=["auto", "ema", "raw"], default="auto")
    _member_options(
        p,
        "--ensemble-weights",
        "another member (repeatable): evaluate the ensemble of the checkpoint and these, "
        "their noise predictions averaged (adds the ensemble's validation loss)",
        "the members' weights, the checkpoint first (normalised; default equal)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="the JSON file to write (default: eval-STEP.json, or eval-ensemble-STEP.json, beside it)",
    )
    p.add_argument("--fast-verify", action="store_true", help="check file sizes only, not sha256")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "merge",
        help="average models of one architecture into one (model soups), or merge LoRAs",
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="runs, checkpoints, model folders, single files or LoRA folders (RUN/model)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="the merged model: a folder (diffusers), a .safetensors single file, or with "
        "--lora-rank a LoRA folder",
    )
    p.add_argument(
        "--weights",
        type=_number(float, 0.0),
        nargs="+",
        default=None,
        help="one weight per model: full models are averaged with them (normalised); LoRAs "
        "on one base add up as base + sum w_i x delta_i (default 1/N each)",
    )
    p.add_argument(
        "--soup",
        choices=["uniform", "greedy"],
        default="uniform",
        help="greedy: best validation loss first, add a model only where the soup's "
        "validation loss improves",
    )
    p.add_argument(
        "--lora-rank",
        type=_number(int, 1),
        default=None,
        help="merge LoRAs into one LoRA of this rank (truncated SVD of the summed deltas)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="training config whose held-out images measure the validation loss (default: "
        "the members' own run config, for --soup greedy)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out (a merge it wrote)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "plan",
        help="what a config will need before it runs: parameters, FLOPs, peak memory, time, cost",
    )
    p.add_argument("config", help="TOML or YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    from sdtune.plan import GPUS

    p.add_argument(
        "--gpu",
        default=None,
        help=f"the card it will train on ({', '.join(GPUS)}): its memory and peak FLOP/s",
    )
    p.add_argument(
        "--memory", type=_number(float, 0.0001), default=None, help="the memory to fit, in GiB"
    )
    p.add_argument(
        "--price", type=_number(float, 0.0), default=None, help="the price of an hour, for the cost"
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="also time a few real steps on this machine (loads the weights)",
    )
    p.add_argument("--measure-steps", type=_number(int, 1), default=3, help=argparse.SUPPRESS)
    p.add_argument(
        "--fsdp",
        type=_number(int, 2),
        default=None,
        metavar="N",
        help="the memory of one process when FSDP shards the denoiser over N processes",
    )
    p.add_argument("--json", default=None, help="also write the plan to this JSON file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "report", help="write a self-contained HTML report of a run, or compare several runs"
    )
    p.add_argument(
        "run",
        nargs="+",
        help="run directory; several: one page comparing them (curves overlaid, sample grids "
        "at the same steps, the config keys that differ, the final numbers)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output file (default RUN/report.html; needed with several runs)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("show", help="print the resolved config with defaults and help text")
    c.add_argument("config", nargs="?", default=None, help="config file (omit for the defaults)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.set_defaults(func=cmd_config_show)
    from sdtune.templates import TASKS

    c = csub.add_parser(
        "init", help="write a commented starting config for a task (full, lora, dreambooth, ...)"
    )
    c.add_argument("task", choices=TASKS, help="what to train")
    c.add_argument(
        "--base",
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        help="model.base: a diffusers folder, cached hub id, single file or a run's model/ "
        "(default: SD 1.5's hub id)",
    )
    c.add_argument("--data", default="data/my_images", help="data.path: your image folder")
    c.add_argument(
        "--resolution",
        type=_number(int, 8),
        default=512,
        help="data.resolution: the base's own size (512 SD 1.x, 768 SD 2.x, 1024 SDXL)",
    )
    c.add_argument("--out", default=None, help="the file to write (default TASK.toml)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.set_defaults(func=cmd_config_init)
    return parser


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _has_gpu() -> bool:
    """Any accelerator torch sees (CUDA, ROCm, XPU, ...), which DeepSpeed then detects."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()


def _quiet_libraries() -> None:
    """Keep the libraries' info chatter and progress bars out of sdtune's own output."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings(
        "ignore", category=UserWarning, module="diffusers|transformers|accelerate|torch|peft"
    )
    import logging

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    # bitsandbytes (peft imports it when installed) warns at import on some CPUs about a 4-bit
    # kernel sdtune never uses
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # DeepSpeed, when installed, is imported by every transformers save_pretrained (to unwrap
    # its engine) and warns then that, finding no GPU, it runs on the CPU
    if "DS_ACCELERATOR" not in os.environ and _has_deepspeed() and not _has_gpu():
        os.environ["DS_ACCELERATOR"] = "cpu"
    # their errors too: sdtune says what failed in its own one line
    dlog.set_verbosity(dlog.CRITICAL)
    dlog.disable_progress_bar()
    tlog.set_verbosity(tlog.CRITICAL)
    tlog.disable_progress_bar()


def _error_line(message: str) -> None:
    print(
        "sdtune: error: " + " ".join(line.strip() for line in message.splitlines()), file=sys.stderr
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # sdtune never downloads behind the user's back
    if not args.debug:
        _quiet_libraries()
    previous = _raise_on_sigterm()
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return code
    except Terminated:  # an output being written atomically is removed on the way out
        print("sdtune: stopped by SIGTERM", file=sys.stderr)
        return 143
    except UserError as exc:
        if args.debug:
            raise
        _error_line(str(exc))
        return exc.exit_code
    except BrokenPipeError:  # `sdtune inspect RUN | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error as Python flushes at exit
        return 141
    except OSError as exc:  # no permission, a read-only or full disk, a vanished file
        if args.debug:
            raise
        from sdtune.files import describe_os_error

        _error_line(describe_os_error(exc))
        return 2
    except KeyboardInterrupt:
        print("sdtune: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not _UNSET:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (which saves and stops on its own): unwinds like
    Ctrl+C, so a half-written output is removed and the exit is one line."""


_UNSET = object()


def _raise_on_sigterm():
    """Make SIGTERM raise Terminated; returns the previous handler to restore (_UNSET when
    none was replaced). Left alone under a distributed launch: a rank blocked in a collective
    never returns to Python to raise it, so there the default (exit at once) is kept."""

    def handle(signum, frame):
        raise Terminated

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return _UNSET
    try:
        return signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        return _UNSET
