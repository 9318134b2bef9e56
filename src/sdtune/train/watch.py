"""What happens on the host after each step: the guard's reports (skipped steps, rollbacks),
the metrics row, evaluation, early stopping, checkpoints and a stop signal.

The host reads a step's outcome one step later, or at once at a host point (a metrics row,
an evaluation, a save, the end, a stop), so that logs and checkpoints are written after the
previous step's report is read. Several processes decide every host point together.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sdtune.checkpoint.rotation import rotate
from sdtune.checkpoint.state import (
    find_checkpoint,
    save_deepspeed_state,
    save_sharded_state,
    save_training_state,
)
from sdtune.errors import ConfigError, UserError
from sdtune.evaluate.early_stop import early_stop_reason, overfitting
from sdtune.files import NoSpaceError, free_bytes
from sdtune.monitor.report import write_report
from sdtune.train.optim import effective_lr, evaluation_weights, is_schedule_free
from sdtune.train.parts import EXIT_INTERRUPTED, EXIT_NO_SPACE, evaluate
from sdtune.train.shard import whole_numel
from sdtune.train.step import StepResult, update_ratio


class TrainingInterrupted(UserError):
    """Stopped by SIGTERM/SIGINT after saving a checkpoint: not a failure (the CLI prints the
    resume command with the real config path and output folder)."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, signal_name: str, step: int, ckpt_root, run_dir) -> None:
        self.signal_name, self.step, self.ckpt_root, self.run_dir = (
            signal_name, step, ckpt_root, run_dir
        )  # fmt: skip
        super().__init__(self.describe(f"sdtune train CONFIG --output {run_dir} --resume"))

    def describe(self, resume_command: str) -> str:
        return (
            f"stopped by {self.signal_name} after step {self.step}; checkpoint saved in "
            f"{self.ckpt_root}; resume with: {resume_command}"
        )


class TrainingNoSpace(UserError):
    """Stopped because a checkpoint does not fit on the disk; the earlier ones are intact."""

    exit_code = EXIT_NO_SPACE


def is_log_step(cfg, step: int) -> bool:
    """Whether optimizer step `step` (1-based) writes a metrics row."""
    return step % cfg.train.log_every == 0 or step == cfg.train.max_steps


def watch(run, result: StepResult, log_now: bool, stop) -> None:
    """Everything the host does after the step `run.state.step` just took."""
    cfg, state = run.cfg, run.state
    every, done = cfg.evaluate.every_steps, state.step >= cfg.train.max_steps
    evaluate_now = bool(every) and state.step % every == 0 and not done
    minutes = cfg.checkpoint.every_minutes
    stopping = bool(stop.requested)  # read once: a later signal waits for the next step
    clock_due = (
        run.main and minutes is not None and time.monotonic() - run.last_save_time >= minutes * 60
    )
    if run.accelerator.num_processes > 1:  # every process must reach the same host points
        stopping, clock_due = _agree(run.accelerator, stopping, clock_due, log_now)
    every_ckpt = cfg.checkpoint.every_steps
    save_due = bool(every_ckpt and state.step % every_ckpt == 0) or clock_due
    # the host reads the previous step's outcome; all of them where it must know now
    host_point = log_now or evaluate_now or save_due or done or stopping
    reports = run.ctx.guard.reports(all_steps=host_point)
    if _read_reports(run, reports):
        return  # rolled back: the steps since the checkpoint are taken again
    state = run.state
    state.window_steps += 1
    state.eval_loss_steps += 1
    run.window_images += cfg.train.batch_size * cfg.train.grad_accum * run.accelerator.num_processes
    if log_now:
        _log_row(run, result, reports)
    else:
        lr = run.objects.lr_scheduler.get_last_lr()[0]
        run.progress.update(state.step, run.last_loss, lr, 0.0, False)
    if evaluate_now:
        run.gather()  # sharded: the whole weights, for the main process to evaluate
        new_best = _evaluate(run) if run.main else False
        if run.saves_together:  # every process writes its part of the new best
            new_best = run.ranks.broadcast(new_best)
        if new_best:
            save(run)
        if run.main:
            _after_evaluation(run)
        if run.accelerator.num_processes > 1:  # every process stops together
            from accelerate.utils import broadcast_object_list

            flag = [state.stop_reason]
            broadcast_object_list(flag)
            state.stop_reason = flag[0]
    if state.stop_reason is not None:
        run.progress.write(f"early stop at step {state.step}: {state.stop_reason}")
        if run.log is not None:
            run.log.event(state.step, "early_stop", state.stop_reason)
        done = True
    if save_due and not done:
        save(run)
    if stopping:
        save(run, must=True)
        run.progress.close()
        if run.log is not None:
            run.log.event(state.step, "stopped", f"stopped by {stop.requested}, checkpoint saved")
            run.log.close()
        raise TrainingInterrupted(stop.requested, state.step, run.ckpt_root, run.run_dir)


def _read_reports(run, reports) -> bool:
    """Count the reported steps' losses and bad steps; roll back when the guard says so
    (returns True then)."""
    state, cfg = run.state, run.cfg
    for report in reports:
        run.last_loss = report.loss
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
        what = f"{what} ({report.loss:.4g}), update skipped (batch: {', '.join(report.names)})"
        run.progress.write(f"step {report.step}: {what}")
        if run.log is not None:
            run.log.event(report.step, "skipped_step", what)
        if report.spike or state.bad_streak >= cfg.train.max_bad_steps:
            roll_back(run, report.step)
            return True
    return False


def _log_row(run, result: StepResult, reports) -> None:
    state, objects = run.state, run.objects
    elapsed = time.monotonic() - run.window_start
    ratio = float("nan")
    if result.ratio_before is not None and not reports[-1].bad:  # |update| / |weights|
        ratio = update_ratio(objects.params, result.ratio_before, run.sharded)
    row = {
        "loss": state.window_loss / state.window_steps,
        "lr": objects.lr_scheduler.get_last_lr()[0],
        "grad_norm": float(result.grad_norm),
        "update_ratio": ratio,
        "images_per_s": run.window_images / max(elapsed, 1e-9),
        "epoch": state.position.epoch,
        "skipped_steps": state.skipped_steps,
    }
    stepped = effective_lr(objects.optimizer)  # Prodigy's d x lr, schedule-free's warmup
    if stepped is not None:
        row["lr_effective"] = stepped
    if run.ctx.preserve is not None:  # the preservation term, unweighted (in "loss" weighted)
        row["preserve_loss"] = state.window_preserve / state.window_steps
    if run.log is not None:
        run.log.log(state.step, row)
    if run.track is not None:
        run.track(row, step=state.step)
    run.progress.update(state.step, row["loss"], row["lr"], row["images_per_s"], True)
    state.window_loss, state.window_steps, state.window_preserve = 0.0, 0, 0.0
    run.window_images, run.window_start = 0, time.monotonic()


def evaluate_before(run) -> None:
    """The base model's validation loss and sample grid at step 0, before training: the
    'before' of a fine-tune's before/after (not a checkpoint, not counted by early stopping)."""
    cfg = run.cfg
    wanted = cfg.evaluate.before_training
    if wanted is None:
        wanted = not cfg.model.base.startswith("preset:")
    if not wanted or run.state.step != 0:
        return
    run.gather()  # sharded: every process gives its shard
    if not run.main:
        return
    with evaluation_weights(run.objects.optimizer), run.readable() as (bundle, ema):
        row, grid = evaluate(cfg, bundle, run.data, ema, run.prompts, run.run_dir, 0, run.device)
    record_evaluation(run, row, grid, lambda text: run.progress.write(f"before training: {text}"))
    _check_metric_names(cfg, row)


def _evaluate(run) -> bool:
    """Validation, samples (and metrics) now; whether this evaluation is a new best (saved at
    once by the caller, before `_after_evaluation`: when sharded every process saves)."""
    cfg, state = run.cfg, run.state
    with evaluation_weights(run.objects.optimizer), run.readable() as (bundle, ema):
        row, grid = evaluate(
            cfg, bundle, run.data, ema, run.prompts, run.run_dir, state.step, run.device
        )
    record_evaluation(run, row, grid, run.progress.write)
    _check_metric_names(cfg, row)
    return _is_new_best(cfg, state)


def _after_evaluation(run) -> None:
    """After an evaluation (and the save of a new best): the overfitting warning, early stop."""
    cfg, state = run.cfg, run.state
    if overfitting(state.evaluations, cfg.evaluate.overfit_patience):
        warning = (
            f"validation loss rose for {cfg.evaluate.overfit_patience} evaluations in a "
            "row while training loss fell: the model is overfitting"
        )
        run.progress.write(f"warning: {warning}")
        if run.log is not None:
            run.log.event(state.step, "overfitting", warning)
    state.stop_reason = early_stop_reason(state.evaluations, cfg.evaluate.early_stop)


def record_evaluation(run, row: dict, grid: Path, say) -> None:
    state, log = run.state, run.log
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
        if run.track is not None:  # W&B / MLflow see the evaluations too, not only the steps
            values = {k: v for k, v in row.items() if isinstance(v, (int, float))}
            run.track(values, step=state.step)
        state.evaluations.append({"step": state.step, **row})
    say(text)
    if log is not None:  # the report follows the run
        write_report(log.path.parent)


def _agree(accelerator, stopping: bool, clock_due: bool, log_now: bool) -> tuple[bool, bool]:
    """Several processes: a stop signal or the main process's save clock counts on a logged step,
    where all processes learn of it together (a rollback or a save at different steps on
    different processes would pair their collectives one step apart)."""
    if not log_now:
        return False, False
    flags = torch.tensor([float(stopping), float(clock_due)], device=accelerator.device)
    flags = accelerator.reduce(flags, reduction="sum")
    return bool(flags[0] > 0), bool(flags[1] > 0)


def roll_back(run, at_step: int) -> None:
    """Back to the newest verified checkpoint with the learning rate scaled down, or a clear stop."""
    state, cfg = run.state, run.cfg
    if state.rollbacks >= cfg.train.max_rollbacks:
        raise UserError(
            f"training diverged at step {at_step} after {state.rollbacks} rollback(s) "
            f"(train.max_rollbacks={cfg.train.max_rollbacks}); lower train.learning_rate or check the data"
        )
    path = find_checkpoint(run.ckpt_root, run.progress.write)
    if path is None:
        raise UserError(
            f"training diverged at step {at_step} and there is no checkpoint to roll back to; "
            "lower train.learning_rate or set checkpoint.every_steps"
        )
    rollbacks, scale = state.rollbacks + 1, state.lr_scale * cfg.train.rollback_lr_factor
    restored = run.restore(path)
    optimizer, lr_scheduler = run.objects.optimizer, run.objects.lr_scheduler
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
    run.progress.write(message)
    if run.log is not None:
        run.log.event(at_step, "rollback", message)
    run.state = restored
    run.ctx.guard.load(restored)
    if run.log is not None:
        evaluated = any(r["step"] == restored.step for r in restored.evaluations)
        run.log.rewind(restored.step, evaluated)
    run.curriculum.apply(run)  # the stage the restored position counts in
    run.ctx.source.restart(restored.position)
    run.last_saved = restored.step


def _check_metric_names(cfg, row: dict) -> None:
    """A metric named in the config must be one the evaluation measures (FID/KID, say, are
    known to be missing only now)."""
    for key, metric in (
        ("evaluate.early_stop.metric", cfg.evaluate.early_stop.metric),
        ("checkpoint.keep_best", cfg.checkpoint.keep_best),
    ):
        if metric is not None and metric not in row:
            raise ConfigError(
                f"{key}: '{metric}' is not measured; the evaluation gives {', '.join(sorted(row))}"
            )


def _is_new_best(cfg, state) -> bool:
    metric = cfg.checkpoint.keep_best
    if metric is None or not state.evaluations or metric not in state.evaluations[-1]:
        return False
    sign = 1 if cfg.checkpoint.keep_best_mode == "min" else -1
    values = [sign * r[metric] for r in state.evaluations if metric in r]
    return values[-1] == min(values)


def save(run, must: bool = False) -> None:
    """A checkpoint of this step, if the disk has room for it, then rotation. `must` (at the
    end, on a signal): a full disk stops the run (TrainingNoSpace) instead of skipping the
    save, as a disk that fills up during any save does; the checkpoints already written, and
    `latest`, stay as they were."""
    state, root = run.state, run.ckpt_root
    if run.last_saved == state.step or not (run.main or run.saves_together):
        return  # sharded: every process writes its part; else the main process writes all
    run.ctx.guard.store(state)
    if run.objects.ema is not None:
        state.ema_steps = run.objects.ema.optimization_step
    previous = sorted(p for p in root.glob("step-*") if p.is_dir()) if run.main else []
    if previous:
        needed = sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file())
    else:  # before the first checkpoint: weights, optimizer moments, EMA
        weights = sum(whole_numel(p) * p.element_size() for p in run.objects.params)
        copies = 3 + (run.objects.ema is not None) + is_schedule_free(run.objects.optimizer)
        copies += 2 * run.deepspeed  # its own copy of the weights, and the float32 masters
        needed = weights * copies + 2**20
    free = free_bytes(root)
    last = previous[-1].name if previous else None
    if run.saves_together:  # the main process's disk check (and its view of the folder) for all
        free, needed, last = run.ranks.broadcast((free, needed, last))
    kept = (
        f"the last checkpoint, {last}, is intact"
        if last
        else "there is no checkpoint yet (--resume starts again from scratch)"
    )

    def no_space(what: str) -> TrainingNoSpace:
        return TrainingNoSpace(
            f"checkpoint: {what} step {state.step}: {free_bytes(root) / 2**20:.0f} MiB free in "
            f"{root}, a checkpoint needs about {needed / 2**20:.0f} MiB; {kept}: free space, "
            f"then resume with: sdtune train CONFIG --output {run.run_dir} --resume"
        )

    if free < needed:
        if must:
            raise no_space("cannot save")
        run.say(
            f"checkpoint: NOT saving step {state.step}: {free / 2**20:.0f} MiB free in {root}, "
            f"a checkpoint needs about {needed / 2**20:.0f} MiB; free space (training goes on)"
        )
        return
    started = time.monotonic()
    try:
        if run.deepspeed:
            path = save_deepspeed_state(
                root, state, run.objects, run.config_toml, run.ranks, run.ctx.engine, run.parts
            )
        elif run.sharded:
            path = save_sharded_state(
                root, state, run.objects, run.config_toml, run.ranks, run.bundle.denoiser
            )
        else:
            path = save_training_state(
                root, state, run.objects, run.config_toml, run.accelerator.process_index
            )
    except NoSpaceError:
        raise no_space("the disk filled up while saving") from None
    if not run.main:
        run.last_saved, run.last_save_time = state.step, time.monotonic()
        return
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    run.say(
        f"checkpoint: saved {path.name} ({size / 2**20:.1f} MiB in "
        f"{time.monotonic() - started:.1f} s)"
    )
    c = run.cfg.checkpoint
    for gone in rotate(
        root, c.keep_last, c.keep_every, c.keep_best, c.keep_best_mode, state.evaluations
    ):
        run.say(f"checkpoint: removed {gone.name} (rotation)")
    run.last_saved, run.last_save_time = state.step, time.monotonic()
