"""The training loop: setup -> train -> save -> final evaluation, readable top to bottom.

Built for exact resume: every random draw of step s (timesteps, noise, VAE sampling, dropout)
comes from generators seeded by (seed, s, micro-batch, process), and the data order is a pure
function of (seed, epoch); so the state of a run at step s is its weights, optimizer, LR
schedule, EMA, data position and counters, all of which a checkpoint holds.

Built for speed: a step reads nothing back from the GPU. The stability guard decides on the
device whether the update is applied (see train/guard.py) and the host learns the outcome one
step later, or at once where it must (a metrics row, an evaluation, a checkpoint, the end).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from sdtune.checkpoint.rotation import rotate
from sdtune.checkpoint.state import (
    TrainingProgress,
    architecture_record,
    clean_temporaries,
    crash_point,
    frozen_fingerprint,
    load_training_state,
    save_training_state,
)
from sdtune.config import RunConfig, to_dict, to_toml
from sdtune.data import build_datasets, next_batch
from sdtune.data.cache import cached_batch
from sdtune.data.order import derive_seed, generator
from sdtune.diffusion.schedules import add_noise, sample_timesteps, snr
from sdtune.diffusion.targets import diffusion_loss, min_snr_weights, offset_noise, training_target
from sdtune.errors import ConfigError, DataError, UserError
from sdtune.evaluate.early_stop import early_stop_reason, overfitting
from sdtune.files import NoSpaceError, atomic_output, free_bytes
from sdtune.models import describe, load_model
from sdtune.models.adapt import prepare_model
from sdtune.models.bundle import ModelBundle
from sdtune.monitor.logging import MetricsLog, Progress
from sdtune.monitor.report import write_report
from sdtune.train.dreambooth import with_dreambooth
from sdtune.train.ema import EMA, maybe_ema
from sdtune.train.guard import StepGuard
from sdtune.train.optim import (
    build_lr_scheduler,
    build_optimizer,
    param_groups,
    skips_on_device,
    step_unless,
)
from sdtune.train.parts import (
    EXIT_INTERRUPTED,
    EXIT_NO_SPACE,
    StopRequest,
    batches,
    evaluate,
    grid_prompts,
    poisoned,
    spiked,
    truncate_metrics,
)
from sdtune.train.preserve import OutputPreservation
from sdtune.train.speed import (
    attention_kernel,
    check_speed_options,
    prepare_unet,
    set_tf32,
    training_forward,
)


class TrainingInterrupted(UserError):
    """Stopped by SIGTERM/SIGINT after saving a checkpoint."""

    exit_code = EXIT_INTERRUPTED


class TrainingNoSpace(UserError):
    """Stopped because a checkpoint does not fit on the disk; the earlier ones are intact."""

    exit_code = EXIT_NO_SPACE


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    train_seconds: float
    final_loss: float
    val_loss: float | None
    model_dir: Path
    judged_accuracy: float | None = None


def _check_resolution(bundle: ModelBundle, resolution: int) -> None:
    levels = len(bundle.unet.config.block_out_channels) - 1
    multiple = bundle.downsample_factor * 2**levels
    if resolution % multiple:
        raise ConfigError(
            f"data.resolution: {resolution} is not a multiple of {multiple} "
            f"(this model downsamples by {multiple})"
        )


def train(cfg: RunConfig, run_dir: Path, resume_from: Path | None = None, say=print) -> TrainResult:
    """Train as `cfg` says into `run_dir` (prepared), from scratch or from a verified checkpoint."""
    # ---------------------------------------------------------------- setup
    use_cuda = torch.cuda.is_available()
    precision = cfg.train.mixed_precision if use_cuda else "no"
    trackers = _check_trackers(cfg.monitor.trackers)
    check_speed_options(cfg.train, use_cuda)
    if use_cuda:
        set_tf32(cfg.train.tf32)
    from accelerate.utils import DistributedDataParallelKwargs

    # the text encoder may stop training midway (train.text_encoder_steps): DDP must allow it
    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=cfg.train.text_encoder_steps is not None
    )
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=not use_cuda,
        log_with=trackers or None,
        project_dir=str(run_dir),
        kwargs_handlers=[ddp],
    )
    track = accelerator.log if trackers else None
    if trackers:
        accelerator.init_trackers(cfg.monitor.project, config=_flat(to_dict(cfg)))
    device, rank = accelerator.device, accelerator.process_index
    world, main = accelerator.num_processes, accelerator.is_main_process
    if not main:  # one voice: the main process speaks and writes the run directory
        say = _silent
    if cfg.train.mixed_precision != "no" and not use_cuda:
        say(
            f"train.mixed_precision={cfg.train.mixed_precision} ignored: no GPU, training in float32"
        )
    seed = cfg.seed
    torch.manual_seed(derive_seed(seed, "setup", rank))
    ckpt_root = run_dir / "checkpoints"
    if main:
        clean_temporaries(ckpt_root, say)

    config_toml = to_toml(cfg)
    if main:
        (run_dir / "config.toml").write_text(config_toml)
    bundle = load_model(cfg.model, cfg.diffusion, seed)
    say(describe(bundle))
    freeze = prepare_model(bundle, cfg)  # textual-inversion token, freezing, LoRA
    say(freeze.table())
    if main:
        (run_dir / "trainable.txt").write_text(freeze.table() + "\n")
    _check_resolution(bundle, cfg.data.resolution)
    named = {f"{c}.{n}": p for c, m in bundle.components().items() for n, p in m.named_parameters()}
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    architecture = architecture_record(
        bundle,
        trainable,
        frozen_fingerprint({n: p for n, p in named.items() if not p.requires_grad}),
        cfg.model.base,
    )

    bundle.to(device)
    data = build_datasets(cfg.data, bundle.image_channels, seed, say)
    if cfg.dreambooth.instance_prompt is not None:
        data = with_dreambooth(cfg, data, bundle, run_dir, device, accelerator, say)
    if main:
        report = json.dumps(data.report.to_dict(), indent=2) + "\n"
        (run_dir / "data_report.json").write_text(report)
    num_examples, micro = len(data.train), cfg.train.batch_size
    if num_examples < micro * world:
        raise DataError(
            f"data: {num_examples} training image(s) in {data.source}, fewer than "
            f"train.batch_size={micro} x {world} process(es); lower the batch size or add images"
        )
    val_n = len(data.val) if data.val else 0
    _report_long_captions(bundle, [r.caption for r in data.train.records], say)
    say(f"data: {num_examples} training / {val_n} validation images from {data.source}")

    unet, text_encoder, vae = bundle.unet, bundle.text_encoder, bundle.vae
    train_te = any(p.requires_grad for p in text_encoder.parameters())
    if vae is not None:
        vae.eval()
    text_encoder.train(train_te)
    unet.train()
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    prepare_unet(unet, cfg.train)

    cache = None  # latents / text states computed once, on disk (data.cache_*)
    if cfg.data.cache_latents or cfg.data.cache_text:
        cache = _build_cache(cfg, data, bundle, precision, micro, accelerator, say)
    cached_latents = cache is not None and cache.latents is not None
    cached_text = cache is not None and cache.text is not None

    preserve = None  # LoRA output preservation (lora.preserve_prompts)
    if cfg.lora.preserve_prompts:
        preserve = OutputPreservation(cfg, bundle, device, accelerator.autocast)
        _report_long_captions(bundle, preserve.prompts, say, "lora.preserve_prompts", "prompt")
        say(
            f"lora: output preservation on {len(preserve.prompts)} prompt(s), "
            f"weight {preserve.weight:g}"
        )

    groups = param_groups(trainable, cfg)
    say(
        "optimizer groups: "
        + "; ".join(f"{g['name']} ({len(g['params'])} tensors, lr {g['lr']:g})" for g in groups)
    )
    params = list(trainable.values())
    optimizer = build_optimizer(groups, cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train)
    ema = EMA(params, cfg.train.ema_decay) if cfg.train.ema else None
    if train_te:  # only modules that train are wrapped (DDP refuses one without gradients)
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    unet_forward = training_forward(unet, cfg.train)
    # fused optimizers skip a bad step on the device; others (and fp16's loss scaler) read it
    device_skip = skips_on_device(optimizer) and accelerator.scaler is None
    guard = StepGuard(cfg.train.spike_factor, cfg.train.spike_window, device)

    def restore(path: Path) -> TrainingProgress:
        return load_training_state(
            path,
            trainable,
            optimizer,
            lr_scheduler,
            ema,
            accelerator.scaler,
            architecture,
            rank,
        )

    state = TrainingProgress()
    if resume_from is not None:
        state = restore(resume_from)
        say(f"resumed from {resume_from} (step {state.step}, epoch {state.position.epoch})")
        if main:
            evaluated = any(r["step"] == state.step for r in state.evaluations)
            truncate_metrics(run_dir / "metrics.jsonl", state.step, evaluated)
            truncate_metrics(run_dir / "events.jsonl", state.step, True)
    guard.load(state)
    last_saved = state.step if resume_from is not None else -1

    def save(must: bool = False) -> None:
        """A checkpoint of this step; `must` (at the end, on a signal): a full disk stops the
        run instead of skipping the save."""
        nonlocal last_saved, last_save_time
        if not main or last_saved == state.step:
            return
        guard.store(state)
        if ema is not None:
            state.ema_steps = ema.optimization_step
        path = _save(
            ckpt_root,
            state,
            trainable,
            optimizer,
            lr_scheduler,
            ema,
            accelerator.scaler,
            config_toml,
            architecture,
            rank,
            cfg,
            say,
            must,
        )
        if path is not None:
            last_saved, last_save_time = state.step, time.monotonic()

    def loader(position):  # decoded images, unless every latent comes from the cache
        if cached_latents:
            return None
        pin = cfg.data.pin_memory and device.type == "cuda"
        shard = (rank, world)
        return batches(data.train, micro, seed, position, cfg.data.num_workers, pin, shard)

    loader_iter = loader(state.position)
    log = MetricsLog(run_dir, purge_step=state.step + 1) if main else None
    ac = bundle.noise_scheduler.alphas_cumprod.to(device)
    num_t = int(bundle.noise_scheduler.config.num_train_timesteps)
    pred_type = bundle.prediction_type
    prompts = grid_prompts(cfg, [r.caption for r in data.train.records])
    progress = Progress(cfg.train.max_steps, initial=state.step, quiet=not main)
    window_images, window_start = 0, time.monotonic()
    last_loss = float("nan")
    last_save_time = time.monotonic()
    log_ratio = cfg.train.log_update_ratio

    # ---------------------------------------------------------------- train
    t_start = time.monotonic()
    with StopRequest(progress.write) as stop:
        while state.step < cfg.train.max_steps and state.stop_reason is None:
            step = state.step
            torch.manual_seed(derive_seed(seed, "step", step, rank))  # dropout: a function of step
            step_loss = torch.zeros((), device=device)
            step_kept = torch.zeros((), device=device) if preserve is not None else None
            names: list[str] = []
            te_steps = cfg.train.text_encoder_steps
            train_te_now = train_te and (te_steps is None or step < te_steps)
            for m in range(cfg.train.grad_accum):
                # this process's share of the global batch at this position
                keys, state.position = next_batch(
                    state.position, micro, num_examples, seed, (rank, world)
                )
                gen = generator(seed, "noise", step, m, rank, device=device)
                if cached_latents:  # no image decoded: the same draws from gen as encode_images
                    batch = cached_batch(cache, data.train, keys, gen, device)
                    latents = batch["latents"]
                else:
                    batch = next(loader_iter)
                    pixels = batch["pixel_values"].to(device, non_blocking=True)
                    with torch.no_grad():
                        latents = bundle.encode_images(pixels, gen)
                names += batch["names"]
                noise = torch.randn(latents.shape, generator=gen, device=device)
                noise = offset_noise(noise, cfg.diffusion.noise_offset, gen)
                timesteps = sample_timesteps(latents.shape[0], num_t, gen, device)
                noisy = add_noise(latents, noise, timesteps, ac)
                target = training_target(pred_type, latents, noise, timesteps, ac)
                pick = preserve.draw(latents.shape[0], gen) if preserve is not None else None
                sync = m == cfg.train.grad_accum - 1
                with nullcontext() if sync else accelerator.no_sync(unet), accelerator.autocast():
                    if pick is not None:  # the base's predictions to keep (lora.preserve_*)
                        with attention_kernel(cfg.train):
                            kept = preserve.target(noisy, timesteps, pick)
                    # the preserved prompts' states: the text encoder's own where its adapters
                    # change them (in the same call as the captions), else the base's
                    read_kept = pick is not None and preserve.te_adapted and not cached_text
                    if cached_text:  # the text encoder is frozen
                        hidden = cache.text.states(batch["captions"], device)
                    else:
                        ids = bundle.tokenize(batch["captions"]).to(device, non_blocking=True)
                        if read_kept:  # one text-encoder call for both halves
                            ids = torch.cat([ids, preserve.ids[pick]])
                        with nullcontext() if train_te_now else torch.no_grad():
                            hidden = text_encoder(ids)[0]
                    if pick is not None and not read_kept:
                        hidden = torch.cat([hidden, preserve.base_states[pick].to(hidden)])
                    inputs, t_in = noisy, timesteps
                    if pick is not None:  # one UNet call: instance half, preservation half
                        inputs, t_in = torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps])
                    with attention_kernel(cfg.train):
                        pred = unet_forward(inputs, t_in, encoder_hidden_states=hidden).sample
                    # per-image weights: DreamBooth's prior-loss weight, else ones (exact)
                    weights = batch["weights"].to(device, non_blocking=True)
                    snr_weights = None
                    if cfg.diffusion.min_snr_gamma is not None:
                        gamma = cfg.diffusion.min_snr_gamma
                        snr_weights = min_snr_weights(snr(ac, timesteps), gamma, pred_type)
                        weights = snr_weights * weights
                    if pick is None:
                        loss = diffusion_loss(pred, target, weights)
                    else:
                        pred, pred_kept = pred.chunk(2)
                        kept_loss = diffusion_loss(pred_kept, kept, snr_weights)
                        loss = diffusion_loss(pred, target, weights) + preserve.weight * kept_loss
                        step_kept += kept_loss.detach() / cfg.train.grad_accum
                    if poisoned(step + 1):
                        loss = loss * float("nan")
                    if spiked(step + 1, state.rollbacks):
                        loss = loss * 1000.0
                accelerator.backward(loss / cfg.train.grad_accum)
                step_loss += loss.detach() / cfg.train.grad_accum

            if cfg.train.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
            else:
                accelerator.unscale_gradients()  # fp16: the norm in true units (else a no-op)
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in params if p.grad is not None]
                )
            if accelerator.num_processes > 1:  # every process decides on the same numbers
                step_loss = accelerator.reduce(step_loss, reduction="mean")
                if step_kept is not None:
                    step_kept = accelerator.reduce(step_kept, reduction="mean")
            log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.max_steps
            before = _ratio_sample(params) if log_now and log_ratio else None
            if accelerator.scaler is None:
                skip = guard.check(step_loss, grad_norm, step_kept)  # on the device: no sync
                if device_skip:
                    step_unless(optimizer, skip)
                elif not guard.read_now(skip):
                    optimizer.step()
            else:  # fp16: an overflowing gradient is the loss scaler's to skip, not a bad step
                skip = guard.check(step_loss, part=step_kept)
                if not guard.read_now(skip):
                    optimizer.step()
                else:
                    accelerator.scaler.update()  # its bookkeeping, without the step
                skip = torch.maximum(skip, (~torch.isfinite(grad_norm)).float())
            if ema is not None:
                ema.step(skip)  # left as it was where the update was skipped
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            guard.push(state.step, names)
            crash_point("step", state.step)

            # -------------------------------------------------------- watch
            every, done = cfg.evaluate.every_steps, state.step >= cfg.train.max_steps
            evaluate_now = bool(every) and state.step % every == 0 and not done
            every_ckpt, minutes = cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes
            stopping = bool(stop.requested)  # read once: a later signal waits for the next step
            clock_due = (
                main and minutes is not None and time.monotonic() - last_save_time >= minutes * 60
            )
            if accelerator.num_processes > 1:  # every process must reach the same host points
                stopping, clock_due = _agree(accelerator, stopping, clock_due, log_now)
            save_due = bool(every_ckpt and state.step % every_ckpt == 0) or clock_due
            # the host reads the previous step's outcome; all of them where it must know now
            host_point = log_now or evaluate_now or save_due or done or stopping
            reports = guard.reports(all_steps=host_point)
            rolled_back = False
            for report in reports:
                last_loss = report.loss
                # the host's float64 sums, as the metrics row and the evaluation read them
                state.window_loss += report.loss
                state.window_preserve += report.part
                state.eval_loss_sum += report.loss
                if not report.bad:
                    state.bad_streak = 0
                    continue
                state.skipped_steps += 1
                state.bad_streak += not report.finite
                what = "loss spike" if report.spike else "non-finite loss/gradient"
                what = (
                    f"{what} ({report.loss:.4g}), update skipped (batch: {', '.join(report.names)})"
                )
                progress.write(f"step {report.step}: {what}")
                if log is not None:
                    log.event(report.step, "skipped_step", what)
                if report.spike or state.bad_streak >= cfg.train.max_bad_steps:
                    state = _roll_back(
                        state,
                        report.step,
                        ckpt_root,
                        restore,
                        optimizer,
                        lr_scheduler,
                        cfg,
                        log,
                        progress.write,
                    )
                    guard.load(state)
                    if log is not None:
                        evaluated = any(r["step"] == state.step for r in state.evaluations)
                        log.rewind(state.step, evaluated)
                    loader_iter = loader(state.position)
                    last_saved = state.step
                    rolled_back = True
                    break
            if rolled_back:
                continue

            state.window_steps += 1
            state.eval_loss_steps += 1
            window_images += micro * cfg.train.grad_accum * accelerator.num_processes
            if log_now:
                elapsed = time.monotonic() - window_start
                ratio = float("nan")
                if before is not None and not reports[-1].bad:  # |update| / |weights|
                    ratio = _update_ratio(params, before)
                row = {
                    "loss": state.window_loss / state.window_steps,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "update_ratio": ratio,
                    "images_per_s": window_images / max(elapsed, 1e-9),
                    "epoch": state.position.epoch,
                    "skipped_steps": state.skipped_steps,
                }
                if preserve is not None:  # the preservation term, unweighted (in "loss" weighted)
                    row["preserve_loss"] = state.window_preserve / state.window_steps
                if log is not None:
                    log.log(state.step, row)
                if track is not None:
                    track(row, step=state.step)
                progress.update(state.step, row["loss"], row["lr"], row["images_per_s"], True)
                state.window_loss, state.window_steps, state.window_preserve = 0.0, 0, 0.0
                window_images, window_start = 0, time.monotonic()
            else:
                progress.update(state.step, last_loss, lr_scheduler.get_last_lr()[0], 0.0, False)

            if main and evaluate_now:
                row, grid = evaluate(cfg, bundle, data, ema, prompts, run_dir, state.step, device)
                _record_evaluation(state, row, grid, log, progress.write, track)
                _check_metric_names(cfg, row)
                if _is_new_best(cfg, state):
                    save()
                if overfitting(state.evaluations, cfg.evaluate.overfit_patience):
                    warning = (
                        f"validation loss rose for {cfg.evaluate.overfit_patience} evaluations in a "
                        "row while training loss fell: the model is overfitting"
                    )
                    progress.write(f"warning: {warning}")
                    if log is not None:
                        log.event(state.step, "overfitting", warning)
                state.stop_reason = early_stop_reason(state.evaluations, cfg.evaluate.early_stop)
            if accelerator.num_processes > 1 and evaluate_now:  # every process stops together
                flag = [state.stop_reason]
                broadcast_object_list(flag)
                state.stop_reason = flag[0]
            if state.stop_reason is not None:
                progress.write(f"early stop at step {state.step}: {state.stop_reason}")
                if log is not None:
                    log.event(state.step, "early_stop", state.stop_reason)
                done = True
            if save_due and not done:
                save()
            if stopping:
                save(must=True)
                progress.close()
                if log is not None:
                    log.close()
                raise TrainingInterrupted(
                    f"stopped by {stop.requested} after step {state.step}; checkpoint saved in "
                    f"{ckpt_root}; resume with: sdtune train CONFIG --output {run_dir} --resume"
                )
    train_seconds = time.monotonic() - t_start
    progress.close()
    say(f"trained to step {state.step} in {train_seconds:.1f}s ({state.skipped_steps} skipped)")

    # ---------------------------------------------------------------- save
    result = TrainResult(run_dir, state.step, train_seconds, last_loss, None, run_dir / "model")
    if main:
        save(must=True)
        with maybe_ema(ema):
            _save_final_model(bundle, result.model_dir, ema, state.step, cfg)
        say(f"model saved to {result.model_dir}")
        if state.evaluations and state.evaluations[-1]["step"] == state.step:
            row = state.evaluations[-1]  # evaluated at this step already (early stop)
        else:
            row, grid = evaluate(cfg, bundle, data, ema, prompts, run_dir, state.step, device)
            _record_evaluation(state, row, grid, log, say, track)
        crash_point("end", state.step)
        result.val_loss = row.get("val_loss_ema", row.get("val_loss"))
        _write_summary(run_dir, cfg, state, result, say)
        say(f"report: {write_report(run_dir)}")
        if log is not None:
            log.close()
        if cfg.evaluate.judge:
            from sdtune.evaluate.judge import run_judge

            with maybe_ema(ema):
                result.judged_accuracy = run_judge(bundle, cfg, run_dir, device, say)
    accelerator.end_training()
    return result


def _record_evaluation(
    state: TrainingProgress, row: dict, grid: Path, log, say, track=None
) -> None:
    text = f"step {state.step}: samples {grid}"
    if row:
        if state.eval_loss_steps:
            row["train_loss"] = state.eval_loss_sum / state.eval_loss_steps
        state.eval_loss_sum, state.eval_loss_steps = 0.0, 0
        shown = [k for k in ("val_loss", "val_loss_ema", "train_loss") if k in row]
        text += " | " + " ".join(f"{k} {row[k]:.4f}" for k in shown)
        if "val_loss_low" in row:
            buckets = "/".join(f"{row[f'val_loss_{b}']:.4f}" for b in ("low", "mid", "high"))
            text += f" (low/mid/high noise {buckets})"
        if log is not None:
            log.log(state.step, row)
        if track is not None:  # W&B / MLflow see the evaluations too, not only the steps
            track({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=state.step)
        state.evaluations.append({"step": state.step, **row})
    say(text)
    if log is not None:  # the report follows the run
        write_report(log.path.parent)


def _write_summary(run_dir: Path, cfg: RunConfig, state: TrainingProgress, result, say) -> None:
    """run_summary.json: how the run ended and which checkpoint is best."""
    from sdtune.checkpoint.rotation import best_step

    metric = cfg.checkpoint.keep_best or cfg.evaluate.early_stop.metric or "val_loss"
    mode = (
        cfg.checkpoint.keep_best_mode if cfg.checkpoint.keep_best else cfg.evaluate.early_stop.mode
    )
    saved = {int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")}
    best = best_step(state.evaluations, metric, mode, saved)
    summary = {
        "steps": state.step,
        "stopped": state.stop_reason or "reached train.max_steps",
        "skipped_steps": state.skipped_steps,
        "final_val_loss": result.val_loss,
        "best_checkpoint": None if best is None else f"checkpoints/step-{best:07d}",
        "best_metric": {
            "name": metric,
            "value": next(r[metric] for r in state.evaluations if r["step"] == best),
        }
        if best is not None
        else None,
        "train_seconds": result.train_seconds,
    }
    (run_dir / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if best is not None:
        say(
            f"best checkpoint by {metric}: {summary['best_checkpoint']} ({summary['best_metric']['value']:.4f})"
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


# |update| / |weights| is measured on a copy of the weights taken before the step, of at most
# this many bytes: every weight while they fit (the tiny presets, adapters), else every k-th
# element of every tensor (a full SD 1.5 UNet would need 3.2 GiB more on the logged steps)
UPDATE_RATIO_SAMPLE_BYTES = 64 * 2**20


def _ratio_stride(params: list[torch.nn.Parameter]) -> int:
    total = sum(p.numel() * p.element_size() for p in params)
    return max(1, -(-total // UPDATE_RATIO_SAMPLE_BYTES))


def _sampled(p: torch.Tensor, stride: int) -> torch.Tensor:
    flat = p.detach().reshape(-1)
    return flat if stride == 1 else flat[::stride]


def _ratio_sample(params: list[torch.nn.Parameter]) -> tuple[int, list[torch.Tensor]]:
    """The weights (or an evenly strided sample of them) before a logged step."""
    stride = _ratio_stride(params)
    return stride, [_sampled(p, stride).clone() for p in params]


def _update_ratio(
    params: list[torch.nn.Parameter], before: tuple[int, list[torch.Tensor]]
) -> float:
    """|update| / |weights| over the sample `_ratio_sample` took (all weights when they fit)."""
    stride, old = before
    delta, norm = [], []
    for p, b in zip(params, old):  # one tensor's sample alive at a time (a channels-last
        now = _sampled(p, stride).float()  # weight is copied to be flattened)
        delta.append((now - b.float()).pow(2).sum())
        norm.append(now.pow(2).sum())
    return float(torch.stack(delta).sum().sqrt() / torch.stack(norm).sum().sqrt().clamp(min=1e-12))


def _silent(*args, **kwargs) -> None:
    """`say` on the processes other than the main one."""


def _agree(accelerator, stopping: bool, clock_due: bool, log_now: bool) -> tuple[bool, bool]:
    """Several processes: a stop signal or the main process's save clock counts on a logged step,
    where all processes learn of it together (a rollback or a save at different steps on
    different processes would pair their collectives one step apart)."""
    if not log_now:
        return False, False
    flags = torch.tensor([float(stopping), float(clock_due)], device=accelerator.device)
    flags = accelerator.reduce(flags, reduction="sum")
    return bool(flags[0] > 0), bool(flags[1] > 0)


def _roll_back(
    state, at_step, root, restore, optimizer, lr_scheduler, cfg, log, say
) -> TrainingProgress:
    """Back to the newest verified checkpoint with the learning rate scaled down, or a clear stop."""
    from sdtune.checkpoint.state import find_checkpoint

    if state.rollbacks >= cfg.train.max_rollbacks:
        raise UserError(
            f"training diverged at step {at_step} after {state.rollbacks} rollback(s) "
            f"(train.max_rollbacks={cfg.train.max_rollbacks}); lower train.learning_rate or check the data"
        )
    path = find_checkpoint(root, say)
    if path is None:
        raise UserError(
            f"training diverged at step {at_step} and there is no checkpoint to roll back to; "
            "lower train.learning_rate or set checkpoint.every_steps"
        )
    rollbacks, scale = state.rollbacks + 1, state.lr_scale * cfg.train.rollback_lr_factor
    restored = restore(path)
    ratio = scale / restored.lr_scale  # the checkpoint's LRs carry its own scale already
    lr_scheduler.base_lrs = [lr * ratio for lr in lr_scheduler.base_lrs]
    for group, lr in zip(optimizer.param_groups, lr_scheduler.get_last_lr()):
        group["lr"] = lr * ratio
    lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    restored.rollbacks, restored.lr_scale = rollbacks, scale
    message = (
        f"diverged at step {at_step}: rolled back to {path.name} with the learning rate "
        f"x{scale:g} (rollback {rollbacks} of at most {cfg.train.max_rollbacks})"
    )
    say(message)
    if log is not None:
        log.event(at_step, "rollback", message)
    return restored


def _check_metric_names(cfg: RunConfig, row: dict) -> None:
    """A metric named in the config must be one the evaluation measures."""
    for key, metric in (
        ("evaluate.early_stop.metric", cfg.evaluate.early_stop.metric),
        ("checkpoint.keep_best", cfg.checkpoint.keep_best),
    ):
        if metric is not None and metric not in row:
            raise ConfigError(
                f"{key}: '{metric}' is not measured; the evaluation gives {', '.join(sorted(row))}"
            )


def _is_new_best(cfg: RunConfig, state: TrainingProgress) -> bool:
    metric = cfg.checkpoint.keep_best
    if metric is None or not state.evaluations or metric not in state.evaluations[-1]:
        return False
    sign = 1 if cfg.checkpoint.keep_best_mode == "min" else -1
    values = [sign * r[metric] for r in state.evaluations if metric in r]
    return values[-1] == min(values)


def _save(
    root,
    state,
    trainable,
    optimizer,
    lr_scheduler,
    ema,
    scaler,
    config_toml,
    architecture,
    rank,
    cfg,
    say,
    must=False,
):
    """A checkpoint if the disk has room for it, then rotation; None (and a message) if not,
    or, when the save `must` happen or the disk fills up during it, TrainingNoSpace (the
    checkpoints already written, and `latest`, stay as they were)."""
    previous = sorted(p for p in root.glob("step-*") if p.is_dir())
    if previous:
        needed = sum(f.stat().st_size for f in previous[-1].iterdir() if f.is_file())
    else:  # before the first checkpoint: weights, optimizer moments, EMA
        weights = sum(p.numel() * p.element_size() for p in trainable.values())
        needed = weights * (3 + (ema is not None)) + 2**20
    free = free_bytes(root)
    kept = (
        f"the last checkpoint, {previous[-1].name}, is intact"
        if previous
        else "there is no checkpoint yet (--resume starts again from scratch)"
    )

    def no_space(what: str) -> TrainingNoSpace:
        return TrainingNoSpace(
            f"checkpoint: {what} step {state.step}: {free_bytes(root) / 2**20:.0f} MiB free in "
            f"{root}, a checkpoint needs about {needed / 2**20:.0f} MiB; {kept}: free space, "
            f"then resume with: sdtune train CONFIG --output {root.parent} --resume"
        )

    if free < needed:
        if must:
            raise no_space("cannot save")
        say(
            f"checkpoint: NOT saving step {state.step}: {free / 2**20:.0f} MiB free in {root}, "
            f"a checkpoint needs about {needed / 2**20:.0f} MiB; free space (training goes on)"
        )
        return None
    try:
        path = save_training_state(
            root,
            state,
            trainable,
            optimizer,
            lr_scheduler,
            ema,
            scaler,
            config_toml,
            architecture,
            rank,
        )
    except NoSpaceError:
        raise no_space("the disk filled up while saving") from None
    c = cfg.checkpoint
    for gone in rotate(
        root, c.keep_last, c.keep_every, c.keep_best, c.keep_best_mode, state.evaluations
    ):
        say(f"checkpoint: removed {gone.name} (rotation)")
    return path


def _build_cache(cfg: RunConfig, data, bundle, precision, micro, accelerator, say):
    """The latent/text cache of the training set: built on the main process, read by all."""
    from sdtune.data.cache import build_cache, default_cache_dir

    def build():
        return build_cache(
            data.train.records,
            data.train.spec,
            bundle,
            cfg.data.cache_dir or default_cache_dir(),
            latents=cfg.data.cache_latents,
            text=cfg.data.cache_text,
            batch_size=micro,
            precision=precision,
            say=say,
        )

    cache = build() if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return cache if cache is not None else build()  # other ranks find every entry built


def _save_final_model(
    bundle: ModelBundle, directory: Path, ema, steps: int, cfg: RunConfig
) -> None:
    """The final model, swapped into place whole: the adapter files alone (LoRA in diffusers and
    kohya format, the textual-inversion embedding) when only adapters were trained, else a
    diffusers-layout folder (with any LoRA merged and new tokens folded in)."""
    from sdtune.checkpoint.adapters import final_model_files

    meta = {"weights": "ema" if ema else "raw", "steps": steps, "resolution": cfg.data.resolution}
    with atomic_output(directory, folder=True) as tmp:
        final_model_files(bundle, tmp, cfg, meta)


def _report_long_captions(
    bundle: ModelBundle, captions: list[str], say, key: str = "data", noun: str = "caption"
) -> None:
    limit = bundle.tokenizer.model_max_length
    lengths = [len(ids) for ids in bundle.tokenizer(captions, truncation=False).input_ids]
    long = [c for c, n in zip(captions, lengths) if n > limit]
    if long:
        say(
            f"{key}: {len(long)} {noun}(s) exceed the text encoder's {limit} tokens and are "
            f"truncated (e.g. {long[0][:60]!r})"
        )
