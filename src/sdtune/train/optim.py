"""Optimizers and learning-rate schedules from the config."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from sdtune.config import TrainConfig


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled decay, Loshchilov & Hutter 2019), Adam, RMSprop or SGD over param groups."""
    fused = bool(groups) and all(p.is_cuda for g in groups for p in g["params"])
    if cfg.optimizer in ("adamw", "adam"):
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        return cls(
            groups,
            lr=cfg.learning_rate,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            fused=fused or None,
        )
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            groups,
            lr=cfg.learning_rate,
            eps=cfg.adam_eps,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.SGD(
        groups, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant, linear decay to 0 or cosine decay to 0 at max_steps."""
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.max_steps,
    )
