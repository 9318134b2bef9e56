"""Optimizers and learning-rate schedules from the config."""

from __future__ import annotations

import contextlib
import io

import torch
from diffusers.optimization import get_scheduler

from sdtune.config import RunConfig, TrainConfig
from sdtune.errors import ConfigError


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled decay, Loshchilov & Hutter 2019), Adam, RMSprop, SGD, 8-bit AdamW
    (Dettmers et al. 2022, bitsandbytes), Adafactor, Prodigy, Lion or schedule-free AdamW over
    param groups; fused kernels where asked and able."""
    params = [p for g in groups for p in g["params"]]
    fused = cfg.fused_optimizer and all(p.device.type in ("cuda", "cpu") for p in params)
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
    if cfg.optimizer == "adamw8bit":
        bnb = require_bitsandbytes()
        return bnb.optim.AdamW8bit(
            groups,
            lr=cfg.learning_rate,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
    if cfg.optimizer == "adafactor":  # Shazeer & Stern 2018, transformers' implementation
        from transformers.optimization import Adafactor

        # at the configured rate and schedule (its relative step size off), as fine-tuning
        # recipes for diffusion models run it
        return Adafactor(
            groups,
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    if cfg.optimizer == "prodigy":  # Mishchenko & Defazio 2024, the authors' package
        from prodigyopt import Prodigy

        with contextlib.redirect_stdout(io.StringIO()):  # it prints its weight-decay mode
            return Prodigy(
                groups,
                lr=cfg.learning_rate,
                betas=cfg.adam_betas,
                eps=cfg.adam_eps,
                weight_decay=cfg.weight_decay,
                d_coef=cfg.prodigy_d_coef,
                # its authors' advice under a warmup: the estimate does not run ahead of it
                safeguard_warmup=cfg.warmup_steps > 0,
            )
    if cfg.optimizer == "lion":  # Chen et al. 2023, lucidrains' lion-pytorch
        from lion_pytorch import Lion

        return Lion(
            groups, lr=cfg.learning_rate, betas=cfg.lion_betas, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw_schedulefree":  # Defazio et al. 2024, the authors' package
        from schedulefree import AdamWScheduleFree

        optimizer = AdamWScheduleFree(
            groups,
            lr=cfg.learning_rate,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps,  # its own warmup; the LR schedule stays flat
        )
        optimizer.train()
        return optimizer
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            groups,
            lr=cfg.learning_rate,
            eps=cfg.adam_eps,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.SGD(
        groups,
        lr=cfg.learning_rate,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


def require_bitsandbytes():
    """The bitsandbytes module, or a one-line error saying how to install it."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "train.optimizer='adamw8bit' needs bitsandbytes, which is not installed "
            "(pip install 'sdtune[bnb]')"
        )
    import bitsandbytes

    return bitsandbytes


def skips_on_device(optimizer) -> bool:
    """Whether a device flag can leave `optimizer.step()` undone: fused kernels read it as
    `found_inf`, return early and do not count the step. Not fused SGD with momentum: a
    skipped first step would keep its uninitialised momentum buffers."""
    inner = _inner(optimizer)
    if isinstance(inner, torch.optim.SGD) and any(g["momentum"] for g in inner.param_groups):
        return False
    return bool(getattr(inner, "_step_supports_amp_scaling", False))


def step_unless(optimizer, skip: torch.Tensor) -> None:
    """`optimizer.step()`, left undone on the device where `skip` (a float32 flag on the
    parameters' device) is 1.0; needs `skips_on_device(optimizer)`. Reads nothing on the host."""
    inner = _inner(optimizer)
    inner.found_inf = skip
    try:
        optimizer.step()
    finally:
        del inner.found_inf


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper


def is_schedule_free(optimizer) -> bool:
    """Whether the optimizer trains at one point (y) and is evaluated at another (x, the
    average of its iterates): schedule-free AdamW's train/eval modes."""
    inner = _inner(optimizer)
    return hasattr(inner, "eval") and "train_mode" in inner.defaults


@contextlib.contextmanager
def evaluation_weights(optimizer):
    """A schedule-free optimizer's evaluated weights (x) in the parameters, for validation,
    samples, exports and the checkpoint's model file; the training weights (y) put back bit for
    bit after (x -> y by its own formula would round differently, and a resumed run would then
    part from the uninterrupted one). Any other optimizer: the weights as they are."""
    inner = _inner(optimizer)
    if not is_schedule_free(inner):
        yield
        return
    params = [p for g in inner.param_groups for p in g["params"]]
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
    inner.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        for group in inner.param_groups:
            group["train_mode"] = True


def effective_lr(optimizer) -> float | None:
    """The step size the first group really takes where the optimizer sets it itself:
    Prodigy's estimate d times the rate, schedule-free AdamW's warmed-up rate; else None."""
    group = _inner(optimizer).param_groups[0]
    if "d" in group and "d_coef" in group:
        return float(group["d"]) * float(group["lr"])
    if "scheduled_lr" in group:
        return float(group["scheduled_lr"])
    return None


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant, linear decay to 0 or cosine decay to 0 at max_steps."""
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    own_warmup = cfg.optimizer == "adamw_schedulefree"  # warms up inside the optimizer
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=0 if own_warmup else cfg.warmup_steps,
        num_training_steps=cfg.max_steps,
    )


def param_groups(trainable: dict[str, torch.nn.Parameter], cfg: RunConfig, arch) -> list[dict]:
    """Optimizer groups: optimizer.param_groups first (a parameter joins the first group whose
    pattern matches), then one group per component: the denoiser at train.learning_rate, each
    text encoder (the family says which components are) at train.text_encoder_lr, SDXL's
    second at train.text_encoder_2_lr (unset: text_encoder_lr). Each group is named, for the
    log."""
    from sdtune.models.freezing import compile_pattern

    te_lr = cfg.train.text_encoder_lr or cfg.train.learning_rate
    own_lr = {"text_encoder_2": cfg.train.text_encoder_2_lr or te_lr}
    if cfg.train.text_encoder_2_lr is not None and "text_encoder_2" not in arch.text_encoders:
        raise ConfigError(
            "train.text_encoder_2_lr: this model has no second text encoder (it is SDXL's); "
            "leave the key out, or use train.text_encoder_lr"
        )
    user = [
        (i, g, [compile_pattern(p, f"optimizer.param_groups[{i}].params") for p in g.params])
        for i, g in enumerate(cfg.optimizer.param_groups)
    ]
    members: dict[str, list[torch.nn.Parameter]] = {}
    settings: dict[str, dict] = {}
    for name, param in trainable.items():
        component = name.split(".", 1)[0]
        default_lr = te_lr if arch.is_text_encoder(component) else cfg.train.learning_rate
        default_lr = own_lr.get(component, default_lr)
        for i, group, patterns in user:
            if any(rx.fullmatch(name) for rx in patterns):
                key = f"group{i}" if group.lr is not None else f"group{i}.{component}"
                settings.setdefault(
                    key,
                    {
                        "lr": group.lr if group.lr is not None else default_lr,
                        "weight_decay": group.weight_decay
                        if group.weight_decay is not None
                        else cfg.train.weight_decay,
                    },
                )
                break
        else:
            key = component
            settings.setdefault(key, {"lr": default_lr, "weight_decay": cfg.train.weight_decay})
        members.setdefault(key, []).append(param)
    for i, group, _ in user:
        if not any(k == f"group{i}" or k.startswith(f"group{i}.") for k in members):
            raise ConfigError(
                f"optimizer.param_groups[{i}].params: {group.params} match no trainable parameter"
            )
    return [{"name": k, "params": members[k], **settings[k]} for k in members]
