"""The names of the metrics an evaluation measures, known from the config alone, so that a
metric named in the config (checkpoint.keep_best, evaluate.early_stop.metric) is checked
before any work instead of after a run that kept no best."""

from __future__ import annotations

BUCKETS = ("low", "mid", "high")  # validation noise levels: thirds of the schedule
VALIDATION = ("val_loss", *(f"val_loss_{b}" for b in BUCKETS))
GENERATOR = ("gen_precision", "gen_recall", "diversity", "memorisation", "fid", "kid")
JUDGED = ("judged_accuracy", "judged_precision", "judged_recall", "judged_f1")


def measured_metrics(cfg) -> list[str]:
    """Every metric name an evaluation row of a run with `cfg` can hold (FID/KID only where
    torchmetrics and its weights are on disk: that is known at the first evaluation)."""
    held_out = cfg.data.val_path is not None or cfg.data.val_fraction > 0
    names: list[str] = []
    if held_out and cfg.evaluate.val_batches > 0:
        names += VALIDATION
        if cfg.train.ema:
            names += [f"{n}_ema" for n in VALIDATION]
    if held_out and cfg.evaluate.metrics_every:
        names += GENERATOR
        if cfg.data.source == "digits":
            names += JUDGED
    if names:
        names.append("train_loss")  # the mean training loss since the last evaluation
    return names
