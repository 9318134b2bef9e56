"""Exponential moving average of the trainable weights, updated on the device.

The decay warms up as diffusers' EMAModel does by default, (1 + k) / (10 + k) capped at
`train.ema_decay` after k applied updates (0 at the first, which copies the weights). Written
by hand because EMAModel decides each update on the host, while an update the stability guard
skips (known on the device only, until the host reads it a step later) must leave the average
and its counter untouched without a host-device sync.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


def _itself(p: torch.Tensor) -> torch.Tensor:
    return p


class EMA:
    """The average of `params`, or with `part` of the part of each that this process holds
    (DeepSpeed ZeRO-3's partitions, read anew at each update: train/shard.py `Zero3Parts`)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, part=None) -> None:
        self.params = list(params)
        self.decay = decay
        self.part = part or _itself
        self.shadow_params = [self.part(p).detach().clone() for p in self.params]
        device = self.shadow_params[0].device if self.params else torch.device("cpu")
        self._updates = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def optimization_step(self) -> int:
        """Updates applied so far (reads the device: at checkpoints only)."""
        return int(self._updates)

    @optimization_step.setter
    def optimization_step(self, value: int) -> None:
        self._updates.fill_(value)

    @torch.no_grad()
    def step(self, skip: torch.Tensor | None = None) -> None:
        """shadow <- shadow - (1 - decay) (shadow - weights), unless `skip` (a device flag,
        1.0 for a step whose update was skipped) says the weights did not move."""
        applied = 1.0 - skip.to(torch.float64) if skip is not None else 1.0
        self._updates += applied
        k = self._updates - 1
        decay = torch.where(k <= 0, 0.0, torch.clamp((1 + k) / (10 + k), max=self.decay))
        weight = ((1 - decay) * applied).to(self.shadow_params[0].dtype)
        diffs = torch._foreach_sub(self.shadow_params, [self.part(p).detach() for p in self.params])
        torch._foreach_mul_(diffs, weight)
        torch._foreach_sub_(self.shadow_params, diffs)

    @contextmanager
    def swapped_in(self):
        """The EMA weights in place of the trained ones, for evaluation; restored after."""
        if self.part is not _itself:  # a partition's weights are DeepSpeed's to change
            raise RuntimeError("EMA of partitions: evaluate the gathered copy (shard.Gathered)")
        with torch.no_grad():
            saved = [self.part(p).detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow_params):
                self.part(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    self.part(p).copy_(s)


def maybe_ema(ema: EMA | None):
    return ema.swapped_in() if ema is not None else nullcontext()
