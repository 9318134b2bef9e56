"""The training recipe, top to bottom: set up, then step and watch until done, then finish.

Built for exact resume: every random draw of step s (timesteps, noise, VAE sampling, dropout)
comes from generators seeded by (seed, s, micro-batch, process), and the data order is a pure
function of (seed, epoch); so the state of a run at step s is its weights, optimizer, LR
schedule, EMA, data position and counters, all of which a checkpoint holds.

Built for speed: a step reads nothing back from the GPU. The stability guard decides on the
device whether the update is applied (train/guard.py) and the host learns the outcome one
step later, or at once where it must (a metrics row, an evaluation, a checkpoint, the end).

The pieces: train/setup.py builds the run, train/step.py takes one optimizer step,
train/watch.py does what the host does after it (logs, evaluation, early stop, rollbacks,
saves), and `finish` below saves the final model and the summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sdtune.checkpoint.state import crash_point
from sdtune.config import RunConfig
from sdtune.files import atomic_output
from sdtune.monitor.report import write_report
from sdtune.train.ema import maybe_ema
from sdtune.train.optim import evaluation_weights
from sdtune.train.parts import EXIT_NO_SPACE, StopRequest, evaluate
from sdtune.train.setup import Run, setup
from sdtune.train.step import train_step
from sdtune.train.watch import (
    TrainingInterrupted,
    TrainingNoSpace,
    evaluate_before,
    is_log_step,
    record_evaluation,
    save,
    watch,
)

__all__ = ["EXIT_NO_SPACE", "TrainResult", "TrainingInterrupted", "TrainingNoSpace", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    train_seconds: float
    final_loss: float
    val_loss: float | None
    model_dir: Path
    judged_accuracy: float | None = None


def train(cfg: RunConfig, run_dir: Path, resume_from: Path | None = None, say=print) -> TrainResult:
    """Train as `cfg` says into `run_dir` (prepared), from scratch or from a verified checkpoint."""
    run = setup(cfg, run_dir, resume_from, say)
    evaluate_before(run)  # a fresh fine-tune: the base's samples and loss, to compare with
    started = time.monotonic()
    cfg = run.cfg  # with any *_epochs turned into steps
    with StopRequest(run.progress.write) as stop:
        while run.state.step < cfg.train.max_steps and run.state.stop_reason is None:
            run.curriculum.enter(run)  # a new stage's data, timesteps and rate, at its first step
            log_now = is_log_step(cfg, run.state.step + 1)
            result = train_step(run.ctx, run.state, log_now)
            watch(run, result, log_now, stop)
    return finish(run, time.monotonic() - started)


def finish(run: Run, train_seconds: float) -> TrainResult:
    """The last checkpoint, the final model, the final evaluation, the summary and report."""
    cfg, state, say = run.cfg, run.state, run.say
    run.progress.close()
    say(f"trained to step {state.step} in {train_seconds:.1f}s ({state.skipped_steps} skipped)")
    result = TrainResult(
        run.run_dir, state.step, train_seconds, run.last_loss, None, run.run_dir / "model"
    )
    save(run, must=True)  # the main process's (every process's shard, when sharded)
    run.gather()  # sharded: the whole weights, for the main process to save and evaluate
    if run.main:
        with evaluation_weights(run.objects.optimizer), run.readable() as (bundle, ema):
            with maybe_ema(ema):  # schedule-free: its averaged weights; EMA's if kept
                _save_final_model(bundle, result.model_dir, ema, state.step, cfg)
            say(f"model saved to {result.model_dir}")
            if state.evaluations and state.evaluations[-1]["step"] == state.step:
                row = state.evaluations[-1]  # evaluated at this step already (early stop)
            else:
                row, grid = evaluate(
                    cfg, bundle, run.data, ema, run.prompts, run.run_dir, state.step, run.device
                )
                record_evaluation(run, row, grid, say)
            crash_point("end", state.step)
            result.val_loss = row.get("val_loss_ema", row.get("val_loss"))
            _write_summary(run, result)
            if run.log is not None:
                run.log.close()
            if cfg.evaluate.judge:
                from sdtune.evaluate.judge import run_judge

                with maybe_ema(ema):
                    result.judged_accuracy = run_judge(bundle, cfg, run.run_dir, run.device, say)
            say(f"report: {write_report(run.run_dir)}")  # last: it holds every end-of-run number
    run.accelerator.end_training()
    return result


def _write_summary(run: Run, result: TrainResult) -> None:
    """run_summary.json: how the run ended and which checkpoint is best."""
    from sdtune.checkpoint.rotation import best_step

    cfg, state = run.cfg, run.state
    metric = cfg.checkpoint.keep_best or cfg.evaluate.early_stop.metric or "val_loss"
    mode = (
        cfg.checkpoint.keep_best_mode if cfg.checkpoint.keep_best else cfg.evaluate.early_stop.mode
    )
    saved = {int(p.name.split("-")[1]) for p in run.ckpt_root.glob("step-*")}
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
    (run.run_dir / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if best is not None:
        run.say(
            f"best checkpoint by {metric}: {summary['best_checkpoint']} ({summary['best_metric']['value']:.4f})"
        )


def _save_final_model(bundle, directory: Path, ema, steps: int, cfg: RunConfig) -> None:
    """The final model, swapped into place whole: the adapter files alone (LoRA in diffusers and
    kohya format, the textual-inversion embedding) when only adapters were trained, else a
    diffusers-layout folder (with any LoRA merged and new tokens folded in)."""
    from sdtune.checkpoint.adapters import final_model_files

    meta = {"weights": "ema" if ema else "raw", "steps": steps, "resolution": cfg.data.resolution}
    with atomic_output(directory, folder=True) as tmp:
        final_model_files(bundle, tmp, cfg, meta)
