"""Decisions over the evaluation history: early stopping and the overfitting warning.
Pure functions of the recorded rows, so a resumed run decides exactly as an uninterrupted one."""

from __future__ import annotations

import math

from sdtune.config import EarlyStopConfig


def _series(evaluations: list[dict], metric: str) -> list[tuple[int, float]]:
    return [(r["step"], r[metric]) for r in evaluations if metric in r and math.isfinite(r[metric])]


def early_stop_reason(evaluations: list[dict], cfg: EarlyStopConfig) -> str | None:
    """Why to stop now, or None: `patience` evaluations in a row without an improvement of the
    best value by more than `min_delta`."""
    if cfg.metric is None:
        return None
    series = _series(evaluations, cfg.metric)
    if not series:
        return None
    sign = 1.0 if cfg.mode == "min" else -1.0
    best_step, best = series[0][0], sign * series[0][1]
    since = 0
    for step, value in series[1:]:
        if sign * value < best - cfg.min_delta:
            best_step, best, since = step, sign * value, 0
        else:
            since += 1
    if since >= cfg.patience:
        return (
            f"{cfg.metric} has not improved by more than {cfg.min_delta} for {since} evaluations "
            f"(best {sign * best:.6g} at step {best_step})"
        )
    return None


def overfitting(evaluations: list[dict], patience: int, metric: str = "val_loss") -> bool:
    """True when `metric` rose and the training loss fell over each of the last `patience`
    evaluations (the classic picture of memorising the training set)."""
    rows = [r for r in evaluations if metric in r and "train_loss" in r][-(patience + 1) :]
    if patience == 0 or len(rows) < patience + 1:
        return False
    pairs = list(zip(rows, rows[1:]))
    return all(b[metric] > a[metric] and b["train_loss"] < a["train_loss"] for a, b in pairs)
