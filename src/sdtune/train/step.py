"""One optimizer step: the micro-batches' forward and backward, clipping, the guard's decision
on the device, the update, EMA and the LR schedule. It reads nothing back from the GPU.

Every random draw of step s comes from generators seeded by (seed, s, micro-batch, process)
and the global seed set from (seed, s, process) for dropout, so a step is a function of the
training state alone: a resumed run takes exactly the steps an uninterrupted one takes.
Optional behaviour plugs in: output preservation (`preserve`), and the test hooks that poison
or spike a loss (`FaultHooks`).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from sdtune.data import next_batch
from sdtune.data.cache import cached_batch
from sdtune.data.order import derive_seed, generator
from sdtune.models.families import Conditioning
from sdtune.train.optim import step_unless
from sdtune.train.parts import batches
from sdtune.train.shard import local, whole, whole_numel
from sdtune.train.speed import attention_kernel

# |update| / |weights| is measured on a copy of the weights taken before the step, of at most
# this many bytes: every weight while they fit (the tiny presets, adapters), else every k-th
# element of every tensor (a full SD 1.5 UNet would need 3.2 GiB more on the logged steps)
UPDATE_RATIO_SAMPLE_BYTES = 64 * 2**20


@dataclass
class TrainingObjects:
    """The live training state that a checkpoint saves and loads, besides the progress."""

    trainable: dict[str, torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    scaler: Any
    architecture: dict

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(self.trainable.values())


class FaultHooks:
    """Test hooks (environment variables) that make a step's loss bad, to test the guard:
    SDTUNE_POISON_STEPS=3,7 makes those steps' loss NaN; SDTUNE_SPIKE_AT=N multiplies step N's
    loss by 1000 before any rollback."""

    def __init__(self) -> None:
        self.poison = set(filter(None, os.environ.get("SDTUNE_POISON_STEPS", "").split(",")))
        self.spike = os.environ.get("SDTUNE_SPIKE_AT")

    def apply(self, loss: torch.Tensor, step: int, rollbacks: int) -> torch.Tensor:
        if str(step) in self.poison:
            loss = loss * float("nan")
        if rollbacks == 0 and self.spike == str(step):
            loss = loss * 1000.0
        return loss


class BatchSource:
    """This process's micro-batches in the order of `next_batch`: decoded images through the
    loader, or, with every latent cached, straight from the cache (nothing decoded)."""

    def __init__(
        self, data, cache, micro: int, seed: int, shard, workers: int, pin: bool,
        latents_for=None,
    ):  # fmt: skip
        self.data, self.cache, self.micro, self.seed, self.shard = data, cache, micro, seed, shard
        self.workers, self.pin = workers, pin
        self.cached_latents = cache is not None and cache.latents is not None
        self.cached_text = cache is not None and cache.text is not None
        self._loader = None
        self.train = data.train
        """The examples read: the training set, or a curriculum stage's part of it."""
        self.order_seed = seed
        self._latents_for = latents_for
        """dataset -> its LatentCache (built, or found built, on disk): a curriculum stage's
        view has its own records and maybe its own resolution, so its own entries."""
        self._latents = {id(data.train): (data.train, cache.latents)} if self.cached_latents else {}
        """id(view) -> (view, its LatentCache): each view's built once (the view is kept so
        that its id stays its own)."""

    def prepare(self, views) -> None:
        """Build the latent caches of `views` now (at set-up: not in the middle of the run)."""
        if self.cached_latents:
            for view in views:
                self._latents_of(view)

    def _latents_of(self, view):
        if id(view) not in self._latents:
            assert self._latents_for is not None, "a view's latents need a builder"
            self._latents[id(view)] = (view, self._latents_for(view))
        return self._latents[id(view)][1]

    def use(self, train, order_seed: int) -> None:
        """Read `train` (a curriculum stage's view) in the order of `order_seed` from the next
        restart on; with cached latents, from the view's own cache entries."""
        if self.cached_latents and train is not self.train:
            self.cache = replace(self.cache, latents=self._latents_of(train))
        self.train, self.order_seed = train, order_seed

    def restart(self, position) -> None:
        """Read from `position` on (a run's start, a resume, a rollback)."""
        if not self.cached_latents:
            self._loader = batches(
                self.train, self.micro, self.order_seed, position, self.workers, self.pin,
                self.shard,
            )  # fmt: skip

    def take(self, position, gen: torch.Generator, bundle, device):
        """(batch, latents, the position after it); the latents drawn from `gen` exactly as the
        VAE's encoding draws them, whether cached or not."""
        train = self.train
        keys, position = next_batch(
            position,
            self.micro,
            len(train),
            self.order_seed,
            self.shard,
            train.bucket_ids,
            train.paired,
        )
        if self.cached_latents:  # no image decoded: the same draws from gen as encode_images
            batch = cached_batch(self.cache, train, keys, gen, device)
            return batch, batch["latents"], position
        batch = next(self._loader)
        pixels = batch["pixel_values"].to(device, non_blocking=True)
        with torch.no_grad():
            latents = bundle.encode_images(pixels, gen)
        return batch, latents, position


@dataclass
class StepContext:
    """What a step needs that does not change from step to step."""

    cfg: Any  # the RunConfig
    bundle: Any
    objective: Any
    accelerator: Any
    objects: TrainingObjects
    source: BatchSource
    guard: Any
    denoiser: torch.nn.Module  # the wrapped (DDP) and maybe compiled denoiser
    encoders: dict[str, torch.nn.Module]  # the text encoders, wrapped where they train
    train_text: bool  # whether any text encoder trains
    device_skip: bool  # whether the optimizer skips a bad step on the device
    preserve: Any = None  # OutputPreservation (lora.preserve_prompts), or None
    prior: Any = None  # BasePrior (dreambooth.prior_target = 'base'), or None
    hooks: FaultHooks = field(default_factory=FaultHooks)
    autocast: Any = nullcontext  # the forward's autocast (Accelerate's, or shard.autocast)
    engine: Any = None  # the DeepSpeed engine, which takes the backward and the update


@dataclass
class StepResult:
    grad_norm: torch.Tensor
    names: list[str]
    ratio_before: tuple[int, list[torch.Tensor]] | None
    """The sample of the weights before the update (logged steps), for |update| / |weights|."""


def train_step(ctx: StepContext, state, log_now: bool) -> StepResult:
    """Take optimizer step `state.step` (and advance state.step and state.position)."""
    cfg, accelerator = ctx.cfg, ctx.accelerator
    device, rank = accelerator.device, accelerator.process_index
    step, accum = state.step, cfg.train.grad_accum
    torch.manual_seed(derive_seed(cfg.seed, "step", step, rank))  # dropout: a function of step
    step_loss = torch.zeros((), device=device)
    step_kept = torch.zeros((), device=device) if ctx.preserve is not None else None
    te_steps = cfg.train.text_encoder_steps
    train_text_now = ctx.train_text and (te_steps is None or step < te_steps)
    names: list[str] = []
    engine, skip = ctx.engine, None
    for m in range(accum):
        gen = generator(cfg.seed, "noise", step, m, rank, device=device)
        batch, latents, state.position = ctx.source.take(state.position, gen, ctx.bundle, device)
        names += batch["names"]
        sync = m == accum - 1
        with nullcontext() if sync else accelerator.no_sync(ctx.denoiser), ctx.autocast():
            loss, kept = _micro_batch_loss(ctx, batch, latents, gen, train_text_now)
            loss = ctx.hooks.apply(loss, step + 1, state.rollbacks)
        step_loss += loss.detach() / accum
        if kept is not None:
            step_kept += kept / accum
        if engine is None:
            accelerator.backward(loss / accum)
            continue
        engine.set_gradient_accumulation_boundary(sync)
        if sync:  # the guard decides before the last backward: the engine updates at once
            step_loss, step_kept = _mean_over_processes(accelerator, step_loss, step_kept)
            skip = ctx.guard.check(step_loss, None, step_kept)
            # a bad step's gradients made NaN: DeepSpeed discards a step whose gradients are
            # not finite (optimizer state and weights untouched), decided on the device
            loss = loss * torch.where(skip > 0, float("nan"), 1.0).to(loss.dtype)
        engine.backward(loss / accum, scale_wrt_gas=False)
    if engine is not None:
        return _update_deepspeed(ctx, state, skip, names, log_now)
    return _update(ctx, state, step_loss, step_kept, names, log_now)


def _mean_over_processes(accelerator, step_loss, step_kept):
    """The step's loss (and preservation part) averaged over the processes: every process
    decides on the same numbers."""
    if accelerator.num_processes > 1:
        step_loss = accelerator.reduce(step_loss, reduction="mean")
        if step_kept is not None:
            step_kept = accelerator.reduce(step_kept, reduction="mean")
    return step_loss, step_kept


def _micro_batch_loss(ctx: StepContext, batch, latents, gen, train_text_now: bool):
    """(loss, the unweighted preservation loss or None) of one micro-batch."""
    bundle, arch, device, preserve = (
        ctx.bundle,
        ctx.bundle.arch,
        ctx.accelerator.device,
        ctx.preserve,
    )
    noised = ctx.objective.draw(latents, gen)
    pick = preserve.draw(latents.shape[0], gen) if preserve is not None else None
    attention = ctx.cfg.train
    # with DreamBooth, preservation is taken on the instance images alone
    rows = preserve.rows(batch, device) if pick is not None else None
    nothing_kept = rows is not None and rows.numel() == 0  # class images alone
    if nothing_kept:
        pick = None
    kept_target = None
    if pick is not None:  # the base's predictions to keep (lora.preserve_*)
        with attention_kernel(attention):
            kept_target = preserve.target(noised.noisy, noised.timesteps, pick, batch, rows)
    cond = _conditioning(ctx, batch, pick, train_text_now, rows)
    target = noised.target
    if ctx.prior is not None:  # the class images' target: the base's own prediction
        target = _base_prior_target(ctx, batch, noised, cond)
    inputs, t_in = noised.noisy, noised.timesteps
    if pick is not None:  # one denoiser call: the batch, then the preservation rows
        kept_in, kept_t = (inputs, t_in) if rows is None else (inputs[rows], t_in[rows])
        inputs, t_in = torch.cat([inputs, kept_in]), torch.cat([t_in, kept_t])
    with attention_kernel(attention):
        pred = arch.predict(bundle, inputs, t_in, cond, denoiser=ctx.denoiser)
    # per-image weights: DreamBooth's prior-loss weight, else ones (exact)
    weights = batch["weights"].to(device, non_blocking=True)
    if noised.weights is not None:
        weights = noised.weights * weights
    masks = batch.get("masks")  # data.masks: the loss per pixel, at the latents' resolution
    if masks is not None:
        masks = torch.nn.functional.interpolate(
            masks.to(device, non_blocking=True).float(), size=latents.shape[-2:], mode="area"
        )
    loss_of = ctx.objective.loss  # diffusion.loss: MSE, Huber or pseudo-Huber
    if pick is None:
        kept = torch.zeros((), device=device) if nothing_kept else None
        return loss_of(pred, target, weights, masks), kept
    n = latents.shape[0]
    pred, pred_kept = pred[:n], pred[n:]
    kept_weights = noised.weights
    if kept_weights is not None and rows is not None:
        kept_weights = kept_weights[rows]  # the instance rows' per-timestep weights
    kept_loss = loss_of(pred_kept, kept_target, kept_weights)
    loss = loss_of(pred, target, weights, masks) + preserve.weight * kept_loss
    return loss, kept_loss.detach()


def _base_prior_target(ctx: StepContext, batch, noised, cond) -> torch.Tensor:
    """noised.target with the class images' rows replaced by the frozen base's prediction."""
    device, prior = ctx.accelerator.device, ctx.prior
    rows = prior.rows(batch, device)
    if rows.numel() == 0:
        return noised.target
    ids = None
    if prior.te_adapted and not ctx.source.cached_text:
        ids = ctx.bundle.arch.tokenize(ctx.bundle, batch["captions"]).to(device)
    with attention_kernel(ctx.cfg.train):
        base = prior.target(noised.noisy, noised.timesteps, cond, rows, batch, ids)
    target = noised.target.clone()
    target[rows] = base.to(target.dtype)
    return target


def _conditioning(ctx: StepContext, batch, pick, train_text_now: bool, rows=None) -> Conditioning:
    """The batch's conditioning (and, with preservation, the preserved prompts' after it, at
    `rows` of the batch when given): the text encoders' own where they read the preserved
    prompts (their adapters change them, in the same call as the captions), else the base's,
    computed once."""
    bundle, arch, device, preserve = (
        ctx.bundle,
        ctx.bundle.arch,
        ctx.accelerator.device,
        ctx.preserve,
    )
    n = len(batch["captions"])
    read_kept = pick is not None and preserve.te_adapted and not ctx.source.cached_text
    if ctx.source.cached_text:  # the text encoders are frozen
        text = ctx.source.cache.text.conditioning(batch["captions"], device)
    else:
        ids = arch.tokenize(bundle, batch["captions"]).to(device, non_blocking=True)
        if read_kept:  # one text-encoder call for both halves
            ids = torch.cat([ids, preserve.ids[pick]])
        with nullcontext() if train_text_now else torch.no_grad():
            text = arch.encode(bundle, ids, ctx.encoders)
    cond = arch.condition(bundle, text[:n], batch)
    if pick is None:
        return cond
    kept = text[n:] if read_kept else preserve.base[pick].to(device=device, dtype=text.hidden.dtype)
    kept = arch.condition(bundle, kept, batch)
    return Conditioning.cat([cond, kept if rows is None else kept[rows]])


def _update(ctx: StepContext, state, step_loss, step_kept, names, log_now: bool) -> StepResult:
    """Clip, let the guard decide on the device, update, EMA, LR schedule, count the step."""
    accelerator, objects, cfg = ctx.accelerator, ctx.objects, ctx.cfg
    params = objects.params
    if cfg.train.max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
    else:
        accelerator.unscale_gradients()  # fp16: the norm in true units (else a no-op)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    grad_norm = whole(grad_norm)  # sharded: the norm of every process's gradients together
    step_loss, step_kept = _mean_over_processes(accelerator, step_loss, step_kept)
    before = ratio_sample(params) if log_now and cfg.train.log_update_ratio else None
    optimizer, guard = objects.optimizer, ctx.guard
    if accelerator.scaler is None:
        skip = guard.check(step_loss, grad_norm, step_kept)  # on the device: no sync
        if ctx.device_skip:
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
    optimizer.zero_grad(set_to_none=True)
    return _finish_step(ctx, state, skip, grad_norm, names, before)


def _finish_step(ctx: StepContext, state, skip, grad_norm, names, before) -> StepResult:
    """After the update (or its skip): EMA, the LR schedule, the step counted and reported."""
    from sdtune.checkpoint.state import crash_point

    objects = ctx.objects
    if objects.ema is not None:
        objects.ema.step(skip)  # left as it was where the update was skipped
    objects.lr_scheduler.step()
    state.step += 1
    ctx.guard.push(state.step, names)
    crash_point("step", state.step)
    return StepResult(grad_norm, names, before)


def _update_deepspeed(ctx: StepContext, state, skip, names, log_now: bool) -> StepResult:
    """DeepSpeed's update: the engine clips (`gradient_clipping`, from train.max_grad_norm)
    and steps, or discards a step the guard made NaN; a step whose gradients were not finite
    though its loss was is discarded by DeepSpeed and counted bad here. Reads the host: the
    engine's norm is a number on the host, and DeepSpeed syncs in its step anyway."""
    cfg, engine = ctx.cfg, ctx.engine
    params = ctx.objects.params
    before = ratio_sample(params) if log_now and cfg.train.log_update_ratio else None
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = float("nan") if norm is None else float(norm)
    applied = engine.was_step_applied()
    if not applied and not bool(skip):
        ctx.guard.not_finite()  # finite loss, gradients that were not
    grad_norm = torch.tensor(norm if applied else float("nan"), device=ctx.accelerator.device)
    skip = torch.tensor(0.0 if applied else 1.0, device=ctx.accelerator.device)
    return _finish_step(ctx, state, skip, grad_norm, names, before)


def _ratio_stride(params: list[torch.nn.Parameter]) -> int:
    total = sum(whole_numel(p) * p.element_size() for p in params)
    return max(1, -(-total // UPDATE_RATIO_SAMPLE_BYTES))


def _sampled(p: torch.Tensor, stride: int) -> torch.Tensor:
    flat = local(p).detach().reshape(-1)  # sharded: this process's shard
    return flat if stride == 1 else flat[::stride]


def ratio_sample(params: list[torch.nn.Parameter]) -> tuple[int, list[torch.Tensor]]:
    """The weights (or an evenly strided sample of them) before a logged step."""
    stride = _ratio_stride(params)
    return stride, [_sampled(p, stride).clone() for p in params]


def update_ratio(
    params: list[torch.nn.Parameter], before: tuple[int, list[torch.Tensor]], sharded: bool = False
) -> float:
    """|update| / |weights| over the sample `ratio_sample` took (all weights when they fit);
    `sharded`: over every process's shards (a collective)."""
    stride, old = before
    delta, norm = [], []
    for p, b in zip(params, old):  # one tensor's sample alive at a time (a channels-last
        now = _sampled(p, stride).float()  # weight is copied to be flattened)
        delta.append((now - b.float()).pow(2).sum())
        norm.append(now.pow(2).sum())
    sums = torch.stack([torch.stack(delta).sum(), torch.stack(norm).sum()])
    if sharded:
        torch.distributed.all_reduce(sums)
    return float(sums[0].sqrt() / sums[1].sqrt().clamp(min=1e-12))
