"""The training loop: setup -> train -> save -> final evaluation, readable top to bottom.

Built for exact resume: every random draw of step s (timesteps, noise, VAE sampling, dropout)
comes from generators seeded by (seed, s, micro-batch, process), and the data order is a pure
function of (seed, epoch); so the state of a run at step s is its weights, optimizer, LR
schedule, EMA and data position, nothing hidden.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from sdtune.checkpoint.store import write_checkpoint
from sdtune.config import RunConfig, to_toml
from sdtune.data import DataPosition, build_datasets, collate, digit_prompt, next_batch
from sdtune.data.order import derive_seed, generator
from sdtune.diffusion.schedules import add_noise, sample_timesteps, snr
from sdtune.diffusion.targets import diffusion_loss, min_snr_weights, offset_noise, training_target
from sdtune.errors import ConfigError, DataError
from sdtune.evaluate.sampling import generate, save_grid
from sdtune.evaluate.validation import validation_loss
from sdtune.models import apply_freezing, describe, load_model, save_bundle
from sdtune.models.bundle import ModelBundle
from sdtune.monitor.logging import MetricsLog, Progress
from sdtune.train.optim import build_lr_scheduler, build_optimizer


@dataclass
class TrainingProgress:
    """Where the run is: the optimizer step done last and the data position after it."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    skipped_steps: int = 0


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    train_seconds: float
    final_loss: float
    val_loss: float | None
    model_dir: Path
    judged_accuracy: float | None = None


def _grid_prompts(cfg: RunConfig, captions: list[str]) -> list[str]:
    if cfg.evaluate.prompts:
        return list(cfg.evaluate.prompts)
    if cfg.data.source == "digits":
        return [digit_prompt(k) for k in range(10)]
    return sorted(set(captions))[:4] or [""]


def _check_resolution(bundle: ModelBundle, resolution: int) -> None:
    levels = len(bundle.unet.config.block_out_channels) - 1
    multiple = bundle.downsample_factor * 2**levels
    if resolution % multiple:
        raise ConfigError(
            f"data.resolution: {resolution} is not a multiple of {multiple} "
            f"(this model downsamples by {multiple})"
        )


class _EMA:
    """EMA of the trainable weights (diffusers' EMAModel), with a swap-in for evaluation."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.params = params
        self.model = EMAModel(params, decay=decay)

    def step(self) -> None:
        self.model.step(self.params)

    def swapped_in(self):
        ema = self

        class _Swap:
            def __enter__(self):
                ema.model.store(ema.params)
                ema.model.copy_to(ema.params)

            def __exit__(self, *exc):
                ema.model.restore(ema.params)

        return _Swap()


def train(cfg: RunConfig, run_dir: Path, say=print) -> TrainResult:
    """Train as `cfg` says, writing everything into `run_dir` (already prepared)."""
    # ---------------------------------------------------------------- setup
    use_cuda = torch.cuda.is_available()
    precision = cfg.train.mixed_precision if use_cuda else "no"
    if cfg.train.mixed_precision != "no" and not use_cuda:
        say(
            f"train.mixed_precision={cfg.train.mixed_precision} ignored: no GPU, training in float32"
        )
    accelerator = Accelerator(mixed_precision=precision, cpu=not use_cuda)
    device, rank = accelerator.device, accelerator.process_index
    main = accelerator.is_main_process
    seed = cfg.seed
    torch.manual_seed(derive_seed(seed, "setup", rank))

    (run_dir / "config.toml").write_text(to_toml(cfg))
    bundle = load_model(cfg.model, cfg.diffusion, seed)
    say(describe(bundle))
    freeze = apply_freezing(bundle, cfg.model.trainable, cfg.model.frozen)
    say(freeze.table())
    (run_dir / "trainable.txt").write_text(freeze.table() + "\n")
    _check_resolution(bundle, cfg.data.resolution)

    data = build_datasets(cfg.data, bundle.image_channels, seed, say)
    (run_dir / "data_report.json").write_text(json.dumps(data.report.to_dict(), indent=2) + "\n")
    num_examples, micro = len(data.train), cfg.train.batch_size
    if num_examples < micro:
        raise DataError(
            f"data: {num_examples} training image(s) in {data.source}, fewer than "
            f"train.batch_size={micro}; lower the batch size or add images"
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
    bundle.to(device)

    unet_params = [p for p in unet.parameters() if p.requires_grad]
    te_params = [p for p in text_encoder.parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": cfg.train.learning_rate}] if unet_params else []
    if te_params:
        groups.append(
            {"params": te_params, "lr": cfg.train.text_encoder_lr or cfg.train.learning_rate}
        )
    params = unet_params + te_params
    optimizer = build_optimizer(groups, cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train)
    ema = _EMA(params, cfg.train.ema_decay) if cfg.train.ema else None
    unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)

    loader_iter = _batches(data.train, micro, seed, DataPosition(), cfg.data.num_workers)
    log = MetricsLog(run_dir) if main else None
    ac = bundle.noise_scheduler.alphas_cumprod.to(device)
    num_t = int(bundle.noise_scheduler.config.num_train_timesteps)
    pred_type = bundle.prediction_type
    prompts = _grid_prompts(cfg, [r.caption for r in data.train.records])
    progress = Progress(cfg.train.max_steps)
    state = TrainingProgress()
    window_loss, window_images, window_start = 0.0, 0, time.monotonic()
    last_loss = float("nan")
    train_seconds = 0.0

    # ---------------------------------------------------------------- train
    t_start = time.monotonic()
    while state.step < cfg.train.max_steps:
        step = state.step
        torch.manual_seed(derive_seed(seed, "step", step, rank))  # dropout: a function of the step
        step_loss = torch.zeros((), device=device)
        names: list[str] = []
        for m in range(cfg.train.grad_accum):
            batch = next(loader_iter)
            _, state.position = next_batch(state.position, micro, num_examples, seed)
            names += batch["names"]
            gen = generator(seed, "noise", step, m, rank, device=device)
            pixels = batch["pixel_values"].to(device, non_blocking=True)
            with torch.no_grad():
                latents = bundle.encode_images(pixels, gen)
            noise = offset_noise(
                torch.randn(latents.shape, generator=gen, device=device),
                cfg.diffusion.noise_offset,
                gen,
            )
            timesteps = sample_timesteps(latents.shape[0], num_t, gen, device)
            noisy = add_noise(latents, noise, timesteps, ac)
            target = training_target(pred_type, latents, noise, timesteps, ac)
            ids = bundle.tokenize(batch["captions"]).to(device)
            sync = m == cfg.train.grad_accum - 1
            with nullcontext() if sync else accelerator.no_sync(unet), accelerator.autocast():
                with nullcontext() if train_te else torch.no_grad():
                    hidden = text_encoder(ids)[0]
                pred = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
                weights = None
                if cfg.diffusion.min_snr_gamma is not None:
                    weights = min_snr_weights(
                        snr(ac, timesteps), cfg.diffusion.min_snr_gamma, pred_type
                    )
                loss = diffusion_loss(pred, target, weights)
            accelerator.backward(loss / cfg.train.grad_accum)
            step_loss += loss.detach() / cfg.train.grad_accum

        if cfg.train.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in params if p.grad is not None]
            )
        if torch.isfinite(step_loss) and torch.isfinite(grad_norm):
            optimizer.step()
            if ema is not None:
                ema.step()
        else:  # a non-finite loss or gradient never reaches the weights
            state.skipped_steps += 1
            progress.write(
                f"step {step + 1}: non-finite loss/gradient, update skipped (batch: {', '.join(names[:8])})"
            )
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        # ------------------------------------------------------------ watch
        last_loss = float(step_loss)
        window_loss += last_loss
        window_images += micro * cfg.train.grad_accum * accelerator.num_processes
        log_now = state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps
        if log_now:
            elapsed = time.monotonic() - window_start
            n_steps = (state.step - 1) % cfg.train.log_every + 1
            row = {
                "loss": window_loss / n_steps,
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "images_per_s": window_images / max(elapsed, 1e-9),
                "epoch": state.position.epoch,
                "skipped_steps": state.skipped_steps,
            }
            if log is not None:
                log.log(state.step, row)
            progress.update(state.step, row["loss"], row["lr"], row["images_per_s"], True)
            window_loss, window_images, window_start = 0.0, 0, time.monotonic()
        else:
            progress.update(state.step, last_loss, lr_scheduler.get_last_lr()[0], 0.0, False)

        every = cfg.evaluate.every_steps
        if main and every and state.step % every == 0 and state.step < cfg.train.max_steps:
            _evaluate(
                cfg, bundle, data, ema, prompts, run_dir, state.step, device, log, progress
            )
        every_ckpt = cfg.checkpoint.every_steps
        if (
            main
            and every_ckpt
            and state.step % every_ckpt == 0
            and state.step < cfg.train.max_steps
        ):
            _save_checkpoint(cfg, run_dir, state, params, bundle, optimizer, lr_scheduler, ema)
    train_seconds = time.monotonic() - t_start
    progress.close()
    say(f"trained {state.step} steps in {train_seconds:.1f}s ({state.skipped_steps} skipped)")

    # ---------------------------------------------------------------- save
    result = TrainResult(run_dir, state.step, train_seconds, last_loss, None, run_dir / "model")
    if main:
        _save_checkpoint(cfg, run_dir, state, params, bundle, optimizer, lr_scheduler, ema)
        with ema.swapped_in() if ema else nullcontext():
            save_bundle(
                bundle,
                result.model_dir,
                {
                    "weights": "ema" if ema else "raw",
                    "steps": state.step,
                    "resolution": cfg.data.resolution,
                },
            )
        say(f"model saved to {result.model_dir}")
        result.val_loss = _evaluate(
            cfg, bundle, data, ema, prompts, run_dir, state.step, device, log, None
        )
        if log is not None:
            log.close()
        if cfg.evaluate.judge:
            from sdtune.evaluate.judge import run_judge

            with ema.swapped_in() if ema else nullcontext():
                result.judged_accuracy = run_judge(bundle, cfg, run_dir, device, say)
    accelerator.end_training()
    return result


def _report_long_captions(bundle: ModelBundle, captions: list[str], say) -> None:
    limit = bundle.tokenizer.model_max_length
    lengths = [len(ids) for ids in bundle.tokenizer(captions, truncation=False).input_ids]
    long = [c for c, n in zip(captions, lengths) if n > limit]
    if long:
        say(
            f"data: {len(long)} caption(s) exceed the text encoder's {limit} tokens and are "
            f"truncated (e.g. {long[0][:60]!r})"
        )


def _batches(dataset, batch_size: int, seed: int, start: DataPosition, workers: int):
    """Collated batches in the exact order of `next_batch`, from `start`, forever."""

    def keys():
        position = start
        while True:
            batch_keys, position = next_batch(position, batch_size, len(dataset), seed)
            yield batch_keys

    if workers == 0:
        for batch_keys in keys():
            yield collate([dataset[k] for k in batch_keys])
    else:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=keys(),
            num_workers=workers,
            collate_fn=collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=True,
        )
        yield from loader


def _evaluate(
    cfg, bundle, data, ema, prompts, run_dir, step, device, log, progress
) -> float | None:
    """Validation loss (raw and EMA weights) and a sample grid from fixed prompts and seed."""
    row: dict[str, float] = {}
    with torch.no_grad():
        if data.val is not None and cfg.evaluate.val_batches > 0:
            args = (bundle, data.val, cfg.train.batch_size, cfg.evaluate.val_batches, device)
            row["val_loss"] = validation_loss(*args)
            if ema is not None:
                with ema.swapped_in():
                    row["val_loss_ema"] = validation_loss(*args)
        with ema.swapped_in() if ema else nullcontext():
            images = generate(
                bundle,
                [p for p in prompts for _ in range(cfg.evaluate.num_per_prompt)],
                seed=cfg.evaluate.seed,
                steps=cfg.evaluate.sample_steps,
                guidance_scale=cfg.evaluate.guidance_scale,
                sampler=cfg.evaluate.scheduler,
                resolution=cfg.data.resolution,
                device=device,
            )
    grid = save_grid(
        images, run_dir / "samples" / f"step-{step:07d}.png", nrow=cfg.evaluate.num_per_prompt
    )
    text = f"step {step}: samples {grid}"
    if row:
        text += " | " + " ".join(f"{k} {v:.4f}" for k, v in row.items())
        if log is not None:
            log.log(step, row)
    (progress.write if progress else print)(text)
    return row.get("val_loss_ema", row.get("val_loss"))


def _save_checkpoint(cfg, run_dir, state, params, bundle, optimizer, lr_scheduler, ema) -> Path:
    """Trainable weights, EMA, optimizer, LR schedule and progress, written atomically."""
    names = {
        id(p): n
        for c, m in bundle.components().items()
        for n_, p in m.named_parameters()
        for n in [f"{c}.{n_}"]
    }
    weights = {names[id(p)]: p.detach().cpu().contiguous() for p in params}
    writers = {
        "model.safetensors": lambda path: save_file(weights, str(path)),
        "optimizer.pt": lambda path: torch.save(optimizer.state_dict(), path),
        "lr_scheduler.pt": lambda path: torch.save(lr_scheduler.state_dict(), path),
        "progress.json": lambda path: path.write_text(
            json.dumps(
                {
                    "step": state.step,
                    "position": state.position.to_dict(),
                    "skipped_steps": state.skipped_steps,
                    "seed": cfg.seed,
                },
                indent=2,
            )
        ),
        "config.toml": lambda path: path.write_text(to_toml(cfg)),
    }
    if ema is not None:
        ema_weights = {
            names[id(p)]: s.detach().cpu().contiguous()
            for p, s in zip(params, ema.model.shadow_params)
        }
        writers["ema.safetensors"] = lambda path: save_file(ema_weights, str(path))
    return write_checkpoint(run_dir / "checkpoints", state.step, writers)
