"""Setting up a run: the accelerator, the model as the config trains it, the data (and its
cache), the live training objects, the step's context, and the state to start from."""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdtune.checkpoint.state import (
    TrainingProgress,
    architecture_record,
    clean_temporaries,
    frozen_fingerprint,
    load_deepspeed_state,
    load_sharded_state,
    load_training_state,
    sharded_info,
)
from sdtune.checkpoint.store import CheckpointError
from sdtune.config import RunConfig, in_steps, to_dict, to_toml
from sdtune.data import build_datasets
from sdtune.data.dataset import apply_buckets, write_report
from sdtune.data.order import derive_seed
from sdtune.errors import ConfigError, DataError
from sdtune.models import describe, load_model
from sdtune.models.adapt import prepare_model
from sdtune.monitor.logging import MetricsLog, Progress
from sdtune.train.dreambooth import with_dreambooth
from sdtune.train.ema import EMA
from sdtune.train.guard import StepGuard
from sdtune.train.optim import build_lr_scheduler, build_optimizer, param_groups, skips_on_device
from sdtune.train.parts import grid_prompts, truncate_metrics
from sdtune.train.preserve import BasePrior, OutputPreservation
from sdtune.train.shard import (
    Gathered,
    Zero3Parts,
    autocast,
    check_launch,
    check_sharded,
    deepspeed_engine,
    is_deepspeed,
    is_sharded,
    route_deepspeed,
    route_fsdp,
    same_start,
    zero_stage,
)
from sdtune.train.speed import check_speed_options, prepare_denoiser, set_tf32, training_forward
from sdtune.train.step import BatchSource, StepContext, TrainingObjects


@dataclass
class Run:
    """Everything a run holds while it trains: built by `setup`, read and updated by the step,
    `watch` and `finish`."""

    cfg: RunConfig
    run_dir: Path
    say: Any
    accelerator: Any
    track: Any
    bundle: Any
    data: Any
    objects: TrainingObjects
    ctx: StepContext
    state: TrainingProgress
    log: MetricsLog | None
    progress: Progress
    prompts: list[str]
    config_toml: str
    last_saved: int = -1
    last_save_time: float = field(default_factory=time.monotonic)
    window_images: int = 0
    window_start: float = field(default_factory=time.monotonic)
    last_loss: float = float("nan")
    curriculum: Any = None
    gathered: Gathered | None = None
    """Weights sharded (FSDP, DeepSpeed ZeRO-3): the whole model on the main process, for
    evaluation and the final model."""

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sharded(self) -> bool:
        return self.gathered is not None

    @property
    def deepspeed(self) -> bool:
        return self.ctx.engine is not None

    @property
    def zero_stage(self) -> int | None:
        return zero_stage(self.accelerator)

    @property
    def saves_together(self) -> bool:
        """Whether every process writes its part of a checkpoint (FSDP, DeepSpeed), not the
        main process alone."""
        return self.sharded or self.deepspeed

    @property
    def ranks(self):
        from sdtune.checkpoint.store import Ranks

        return Ranks(self.accelerator.process_index, self.accelerator.num_processes)

    def gather(self) -> None:
        """Sharded: the whole trained weights into `gathered` (every process calls it)."""
        if self.gathered is not None:
            self.gathered.refresh()

    @contextmanager
    def readable(self):
        """(bundle, EMA) as evaluation and the final model read them, on the main process: the
        trained ones, or when sharded the gathered copy (after `gather`) on the device."""
        if self.gathered is None:
            yield self.bundle, self.objects.ema
            return
        with self.gathered.on(self.device) as bundle:
            yield bundle, self.gathered.copy_ema

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def restore(self, path: Path) -> TrainingProgress:
        """The training objects as checkpoint `path` holds them; returns its progress."""
        rank, saved = self.accelerator.process_index, sharded_info(path)
        if self.deepspeed or (saved or {}).get("by") == "deepspeed":
            return self._restore_deepspeed(path, saved)
        if saved is not None:  # any number of processes, sharded or not, reads it
            return load_sharded_state(path, self.objects, self.bundle.denoiser, rank, self.sharded)
        if self.sharded:
            raise CheckpointError(
                f"{path}: saved by an unsharded run; resume it without FSDP (the sharded run "
                "reads only sharded checkpoints)"
            )
        return load_training_state(path, self.objects, rank)

    def _restore_deepspeed(self, path: Path, saved: dict | None) -> TrainingProgress:
        """A DeepSpeed checkpoint resumes under DeepSpeed with the ZeRO stage that wrote it:
        on as many processes as wrote it, each reading its own optimizer partition, or on
        another number through DeepSpeed's universal checkpoint; DeepSpeed resumes only from
        its own."""
        world = self.accelerator.num_processes
        if saved is None or saved.get("by") != "deepspeed":
            raise CheckpointError(
                f"{path}: not saved by a DeepSpeed run; resume it as it was trained (DeepSpeed "
                "reads only its own checkpoints)"
            )
        processes = saved.get("processes")
        if not self.deepspeed:
            raise CheckpointError(
                f"{path}: saved by DeepSpeed on {processes} processes, each with its part of "
                "the optimizer state; resume it with the same DeepSpeed launch (e.g. "
                f"--num_processes {processes})"
            )
        stage = saved.get("zero_stage", 2)  # the first DeepSpeed checkpoints: ZeRO-2 only
        if stage != self.zero_stage:
            raise CheckpointError(
                f"{path}: saved by DeepSpeed ZeRO stage {stage}, which partitions the state "
                f"otherwise than stage {self.zero_stage}; resume it with zero_stage: {stage}"
            )
        if processes == world:
            return load_deepspeed_state(path, self.objects, self.ctx.engine, self.ranks, self.parts)
        return self._restore_universal(path, processes)

    def _restore_universal(self, path: Path, processes: int) -> TrainingProgress:
        """Checkpoint `path`, saved by DeepSpeed on `processes` processes, on this run's
        number: the main process converts it to DeepSpeed's universal checkpoint (a
        temporary sibling, removed after), which every process then reads its part of."""
        from sdtune.checkpoint.state import deepspeed_universal

        world, out = self.accelerator.num_processes, path.parent / f".tmp-universal-{path.name}"
        self.say(
            f"resume: {path.name} was saved by DeepSpeed on {processes} processes; reading it "
            f"on {world} through DeepSpeed's universal checkpoint (a correct continuation, not "
            "a bit-identical one: the global batch and each process's noise change)"
        )
        failed = None
        if self.main:
            try:
                shutil.rmtree(out, ignore_errors=True)
                deepspeed_universal(path, out)
            except Exception as exc:  # noqa: BLE001 - told to every process, below
                failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
        said = self.ranks.broadcast(failed)
        if said is not None:
            if self.main:
                shutil.rmtree(out, ignore_errors=True)
            raise CheckpointError(
                f"{path}: DeepSpeed could not convert it to its universal checkpoint for "
                f"{world} processes ({said}); resume it with --num_processes {processes}"
            )
        try:
            return load_deepspeed_state(
                path, self.objects, self.ctx.engine, self.ranks, self.parts, universal=out
            )
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - DeepSpeed's own, as one line
            first = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise CheckpointError(
                f"{path}: DeepSpeed could not read its universal checkpoint on {world} "
                f"processes ({first}); resume it with --num_processes {processes}"
            ) from exc
        finally:
            self.ranks.broadcast(None)  # every process has read its part
            if self.main:
                shutil.rmtree(out, ignore_errors=True)

    @property
    def parts(self):
        """ZeRO-3: how a process's partition of a weight and the whole one relate (None when
        every process holds the weights whole)."""
        return Zero3Parts if self.zero_stage == 3 else None


def setup(cfg: RunConfig, run_dir: Path, resume_from: Path | None, say) -> Run:
    """Build the run `cfg` describes in `run_dir` (prepared), from scratch or `resume_from`."""
    accelerator, track = _accelerator(cfg, run_dir)
    main = accelerator.is_main_process
    if not main:  # one voice: the main process speaks and writes the run directory
        say = _silent
    if cfg.train.mixed_precision != "no" and accelerator.device.type != "cuda":
        say(
            f"train.mixed_precision={cfg.train.mixed_precision} ignored: no GPU, training in float32"
        )
    torch.manual_seed(derive_seed(cfg.seed, "setup", accelerator.process_index))
    if main:
        clean_temporaries(run_dir / "checkpoints", say)
    config_toml = to_toml(cfg)
    if main:
        (run_dir / "config.toml").write_text(config_toml)
    bundle, trainable, architecture = _model(cfg, run_dir, main, say)
    if is_sharded(accelerator) or is_deepspeed(accelerator):
        by = "FSDP" if is_sharded(accelerator) else "DeepSpeed"
        check_sharded(cfg, trainable, bundle.arch.denoiser, by)
    bundle.to(accelerator.device)
    data = _data(cfg, bundle, run_dir, accelerator, say)
    # epochs become steps now that the images are counted (config.toml keeps what was asked)
    cfg, said = in_steps(cfg, len(data.train), accelerator.num_processes)
    for line in said:
        say(line)
    objects, ctx = _training(cfg, bundle, data, trainable, architecture, accelerator, say)
    state = TrainingProgress()
    run = Run(
        cfg,
        run_dir,
        say,
        accelerator,
        track,
        bundle,
        data,
        objects,
        ctx,
        state,
        None,
        None,
        [],
        config_toml,
    )  # noqa: E501
    if is_sharded(accelerator) or run.zero_stage == 3:
        run.gathered = Gathered(
            lambda: _model(cfg, run_dir, False, _silent)[0],
            bundle,
            objects.trainable,
            objects.ema,
            cfg.train.ema_decay,
            run.ranks,
            run.parts,
        )
    if resume_from is not None:
        run.state = run.restore(resume_from)
        say(f"resumed from {resume_from} (step {run.state.step}, epoch {run.state.position.epoch})")
        if main:
            evaluated = any(r["step"] == run.state.step for r in run.state.evaluations)
            truncate_metrics(run_dir / "metrics.jsonl", run.state.step, evaluated)
            truncate_metrics(run_dir / "events.jsonl", run.state.step, True)
        run.last_saved = run.state.step
    ctx.guard.load(run.state)
    from sdtune.train.curriculum import Curriculum

    group = cfg.train.batch_size * accelerator.num_processes
    run.curriculum = Curriculum(cfg, data, bundle, group)
    ctx.source.prepare(run.curriculum.known_views())  # their latent caches, before the run
    run.curriculum.apply(run)  # the stage the position counts in
    ctx.source.restart(run.state.position)
    run.log = MetricsLog(run_dir, purge_step=run.state.step + 1) if main else None
    if run.log is not None and resume_from is not None:
        run.log.event(run.state.step, "resumed", f"resumed from {resume_from.name}")
    run.prompts = grid_prompts(cfg, [r.caption for r in data.train.records])
    if main:  # what the grids' rows show, for the report
        _write_grid_prompts(cfg, run_dir, run.prompts)
    run.progress = Progress(cfg.train.max_steps, initial=run.state.step, quiet=not main)
    return run


def _accelerator(cfg: RunConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    use_cuda = torch.cuda.is_available()
    trackers = _check_trackers(cfg.monitor.trackers)
    check_launch()
    check_speed_options(cfg.train, use_cuda)
    if use_cuda:
        set_tf32(cfg.train.tf32)
    # the text encoder may stop training midway (train.text_encoder_steps): DDP must allow it
    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=cfg.train.text_encoder_steps is not None
    )
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision if use_cuda else "no",
        cpu=not use_cuda,
        log_with=trackers or None,
        project_dir=str(run_dir),
        kwargs_handlers=[ddp],
    )
    route_fsdp(accelerator)
    route_deepspeed(accelerator, cfg)
    if trackers:
        accelerator.init_trackers(cfg.monitor.project, config=_flat(to_dict(cfg)))
    return accelerator, accelerator.log if trackers else None


def _write_grid_prompts(cfg: RunConfig, run_dir: Path, prompts: list[str]) -> None:
    from sdtune.files import atomic_output

    e = cfg.evaluate
    settings = {
        "prompts": prompts,
        "num_per_prompt": e.num_per_prompt,
        "seed": e.seed,
        "scheduler": e.scheduler,
        "sample_steps": e.sample_steps,
        "guidance_scale": e.guidance_scale,
    }
    (run_dir / "samples").mkdir(exist_ok=True)
    with atomic_output(run_dir / "samples" / "prompts.json") as tmp:
        tmp.write_text(json.dumps(settings, indent=2) + "\n")


def random_weights_note(cfg: RunConfig) -> str:
    """What a preset base means: random weights. Trained from scratch that is the point; a
    fine-tune of it (adapters, a token, part of the model) learns on top of noise."""
    base = cfg.model.base
    fine_tune = (
        cfg.lora.enabled
        or cfg.textual_inversion.token is not None
        or cfg.dreambooth.instance_prompt is not None
    )
    if not fine_tune:
        return f"model: {base} starts from random weights (training from scratch)"
    return (
        f"model: {base} has random weights, so this fine-tune learns on top of noise and its "
        "samples stay noise; to see a fine-tune work on a CPU, start from a trained model "
        "(e.g. the quickstart's runs/quickstart/model, as examples/finetune_folder.toml does)"
    )


def _model(cfg: RunConfig, run_dir: Path, main: bool, say):
    """The base model made into what the config trains, its trainable parameters, and the
    architecture record a checkpoint must match."""
    bundle = load_model(cfg.model, cfg.diffusion, cfg.seed)
    say(describe(bundle))
    if cfg.model.base.startswith("preset:"):
        say(random_weights_note(cfg))
    freeze = prepare_model(bundle, cfg)  # textual-inversion token, freezing, LoRA
    say(freeze.table())
    if cfg.lora.enabled and cfg.lora.variant == "dora":
        say(
            "lora: DoRA: RUN/model holds the diffusers/peft file; ComfyUI and AUTOMATIC1111 "
            "read DoRA's magnitude along other axes than peft trains it, so for them export "
            "the merged model (sdtune export RUN --format single-file)"
        )
    if main:
        (run_dir / "trainable.txt").write_text(freeze.table() + "\n")
    multiple = bundle.arch.resolution_multiple(bundle)
    if cfg.data.resolution % multiple:
        raise ConfigError(
            f"data.resolution: {cfg.data.resolution} is not a multiple of {multiple} "
            f"(this model downsamples by {multiple})"
        )
    named = {f"{c}.{n}": p for c, m in bundle.components().items() for n, p in m.named_parameters()}
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    frozen = frozen_fingerprint({n: p for n, p in named.items() if not p.requires_grad})
    return bundle, trainable, architecture_record(bundle, trainable, frozen, cfg.model.base)


def bucket_step(cfg: RunConfig, bundle) -> int:
    """data.bucket_step, checked against the model, or the family's."""
    from sdtune.data.buckets import check_sizes

    multiple = bundle.arch.resolution_multiple(bundle)
    if cfg.data.bucket_step is not None and cfg.data.bucket_step % multiple:
        raise ConfigError(
            f"data.bucket_step: {cfg.data.bucket_step} is not a multiple of {multiple} "
            f"(this model downsamples by {multiple})"
        )
    if isinstance(cfg.data.buckets, list):
        check_sizes(cfg.data.buckets, multiple)
    if cfg.evaluate.sample_size is not None:
        check_sizes([cfg.evaluate.sample_size], multiple, "evaluate.sample_size")
    return cfg.data.bucket_step or bundle.arch.bucket_step(bundle, cfg.data.resolution)


def _data(cfg: RunConfig, bundle, run_dir: Path, accelerator, say):
    main, report_path = accelerator.is_main_process, run_dir / "data_report.json"
    data = build_datasets(
        cfg.data, bundle.image_channels, cfg.seed, say, report_path if main else None
    )
    if cfg.dreambooth.instance_prompt is not None:
        data = with_dreambooth(cfg, data, bundle, run_dir, accelerator.device, accelerator, say)
    num_examples, micro, world = len(data.train), cfg.train.batch_size, accelerator.num_processes
    apply_buckets(data, cfg.data, bucket_step(cfg, bundle), micro * world, say)
    if main:
        write_report(data.report, report_path, cfg.data.on_bad_file)
    if num_examples < micro * world:
        raise DataError(
            f"data: {num_examples} training image(s) in {data.source}, fewer than "
            f"train.batch_size={micro} x {world} process(es); lower the batch size or add images"
        )
    report_long_prompts(bundle, [r.caption for r in data.train.records], say)
    val_n = len(data.val) if data.val else 0
    say(f"data: {num_examples} training / {val_n} validation images from {data.source}")
    if world > 1:
        accum = cfg.train.grad_accum
        say(
            f"processes: {world}; global batch {micro * accum * world} images per step "
            f"(train.batch_size={micro} x train.grad_accum={accum} x {world} processes); "
            "images/s is the total of all processes"
        )
    return data


def _training(cfg: RunConfig, bundle, data, trainable, architecture, accelerator, say):
    """The training objects (optimizer, schedule, EMA, ...) and the step's context."""
    arch, device = bundle.arch, accelerator.device
    denoiser, encoders = bundle.denoiser, bundle.text_encoders
    training_text = {n: any(p.requires_grad for p in e.parameters()) for n, e in encoders.items()}
    if bundle.vae is not None:
        bundle.vae.eval()
    for name, encoder in encoders.items():
        encoder.train(training_text[name])
    denoiser.train()
    if cfg.model.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    prepare_denoiser(denoiser, cfg.train)
    precision = accelerator.mixed_precision
    if is_deepspeed(accelerator):  # Accelerate's says "no": sdtune's autocast runs under it
        precision = cfg.train.mixed_precision if device.type == "cuda" else "no"
    cache = None  # latents / text states computed once, on disk (data.cache_*)
    if cfg.data.cache_latents or cfg.data.cache_text:
        cache = _build_cache(cfg, data.train, bundle, precision, accelerator, say)
    preserve = None  # LoRA output preservation (lora.preserve_prompts)
    if cfg.lora.preserve_prompts:
        preserve = OutputPreservation(cfg, bundle, device, autocast(accelerator, cfg))
        report_long_prompts(bundle, preserve.prompts, say, "lora.preserve_prompts", "prompt")
        say(
            f"lora: output preservation on {len(preserve.prompts)} prompt(s), weight {preserve.weight:g}"
        )  # noqa: E501
    prior = None  # DreamBooth's prior loss toward the base (dreambooth.prior_target = 'base')
    if cfg.dreambooth.instance_prompt and cfg.dreambooth.prior_target == "base":
        prior = BasePrior(bundle)
        say("dreambooth: the class images' target is the frozen base's prediction")
    groups = param_groups(trainable, cfg, arch)
    say(
        "optimizer groups: "
        + "; ".join(f"{g['name']} ({len(g['params'])} tensors, lr {g['lr']:g})" for g in groups)
    )
    optimizer = build_optimizer(groups, cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train)
    if is_sharded(accelerator) or is_deepspeed(accelerator):
        same_start(trainable)
    # only modules that train are wrapped (DDP refuses one without gradients)
    wrapped_names = [n for n in encoders if training_text[n]]
    prepared = accelerator.prepare(denoiser, *[encoders[n] for n in wrapped_names], optimizer)
    denoiser, optimizer = prepared[0], prepared[-1]
    encoders = {**encoders, **dict(zip(wrapped_names, prepared[1:-1]))}
    if is_sharded(accelerator):  # FSDP put each process's shard in the parameters' place
        name = bundle.arch.denoiser
        sharded = {f"{name}.{n}": p for n, p in bundle.denoiser.named_parameters()}
        trainable = {n: sharded[n] for n in trainable}
    # ZeRO-3 (like FSDP) keeps each process's part of the weights: EMA averages that part
    part = Zero3Parts.part if zero_stage(accelerator) == 3 else None
    ema = EMA(list(trainable.values()), cfg.train.ema_decay, part) if cfg.train.ema else None
    objects = TrainingObjects(
        trainable, optimizer, lr_scheduler, ema, accelerator.scaler, architecture
    )
    pin = cfg.data.pin_memory and device.type == "cuda"
    shard = (accelerator.process_index, accelerator.num_processes)
    source = BatchSource(
        data, cache, cfg.train.batch_size, cfg.seed, shard, cfg.data.num_workers, pin,
        lambda view: _build_cache(cfg, view, bundle, precision, accelerator, say, False).latents,
    )  # fmt: skip
    ctx = StepContext(
        cfg=cfg,
        bundle=bundle,
        objective=arch.objective(bundle, cfg.diffusion, device),
        accelerator=accelerator,
        objects=objects,
        source=source,
        guard=StepGuard(cfg.train.spike_factor, cfg.train.spike_window, device),
        denoiser=training_forward(denoiser, cfg.train),
        encoders=encoders,
        train_text=any(training_text.values()),
        # fused optimizers skip a bad step on the device; others (and fp16's scaler) read it
        device_skip=skips_on_device(optimizer) and accelerator.scaler is None,
        preserve=preserve,
        prior=prior,
        autocast=autocast(accelerator, cfg),
        engine=deepspeed_engine(accelerator),
    )
    return objects, ctx


def _build_cache(cfg: RunConfig, train, bundle, precision, accelerator, say, text=True):
    """The latent (and, with `text`, text) cache of `train`, the training set or a curriculum
    stage's view of it: built on the main process, read by all."""
    from sdtune.data.cache import build_cache, default_cache_dir

    def build():
        return build_cache(
            train.records,
            train.spec,
            bundle,
            cfg.data.cache_dir or default_cache_dir(),
            latents=cfg.data.cache_latents,
            text=cfg.data.cache_text and text,
            batch_size=cfg.train.batch_size,
            precision=precision,
            say=say,
        )

    cache = build() if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return cache if cache is not None else build()  # other ranks find every entry built


def report_long_prompts(bundle, prompts: list[str], say, key: str = "data", noun: str = "caption"):
    limit = bundle.arch.max_tokens(bundle)
    counts = bundle.arch.token_counts(bundle, prompts)
    long = [c for c, n in zip(prompts, counts) if n > limit]
    if long:
        say(
            f"{key}: {len(long)} {noun}(s) exceed the text encoder's {limit} tokens and are "
            f"truncated (e.g. {long[0][:60]!r})"
        )


def _check_trackers(trackers: list[str]) -> list[str]:
    """Weights & Biases / MLflow through Accelerate, only when installed (clear error if not)."""
    import importlib.util

    for name in trackers:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"monitor.trackers: '{name}' is asked for but not installed (pip install {name})"
            )
    return list(trackers)


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"train": {"max_steps": 3}} -> {"train.max_steps": 3}: MLflow's params are flat strings."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = (
                value if isinstance(value, (int, float, str, bool)) else str(value)
            )
    return flat


def _silent(*args, **kwargs) -> None:
    """`say` on the processes other than the main one."""
