"""The stability guard, decided on the device and read by the host a step later.

A step is bad when its loss or gradient norm is not finite, or (with `train.spike_factor`) when
its loss exceeds that multiple of the median of the last `train.spike_window` applied steps'
losses. A bad step's update never reaches the weights: the check yields a device flag that the
fused optimizer reads as `found_inf` and the EMA as a zero weight, so the step needs no
host-device synchronisation. The flags, the loss and the running sums are copied to the host
without blocking; the loop reads them one step later (when the GPU has long finished that
step) to count, log and roll back, or at once where it must know (a metrics row, an evaluation,
a checkpoint, the end). Written by hand: no training library decides this without a sync.

The device state, the window of recent losses, is `TrainingProgress.recent_losses` kept on the
device between `load` and `store`; a checkpoint stores it, so a resumed run decides exactly as
before. The loss sums of a metrics row and of an evaluation are kept by the host from the
reports, which it has all read by then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtune.checkpoint.state import TrainingProgress


@dataclass
class StepReport:
    """What the host learns of one finished step."""

    step: int
    """The step's number (the value of `TrainingProgress.step` after it)."""
    loss: float
    finite: bool
    spike: bool
    names: list[str]
    """The files of the step's batch, for the message when it was bad."""
    part: float = 0.0
    """The part of the loss given to `check` as `part` (LoRA output preservation), else 0."""

    @property
    def bad(self) -> bool:
        return not self.finite or self.spike


class StepGuard:
    def __init__(self, spike_factor: float | None, spike_window: int, device) -> None:
        self.factor, self.window = spike_factor, spike_window
        self.device = torch.device(device)
        self._pending: list[tuple[int, torch.Tensor, list[str], torch.cuda.Event | None]] = []
        self._no_part = torch.zeros((), dtype=torch.float64, device=self.device)

    # ------------------------------------------------------------ device state <-> progress
    def load(self, progress: TrainingProgress) -> None:
        """Take the window of recent losses from `progress` (a fresh run, a resume, a rollback)
        and forget the pending reports (a rollback abandons the steps they belong to)."""
        recent = progress.recent_losses[-self.window :]
        self._recent = torch.zeros(self.window, dtype=torch.float64, device=self.device)
        if recent:
            self._recent[-len(recent) :] = torch.tensor(recent, dtype=torch.float64)
        self._count = torch.tensor(len(recent), device=self.device)
        self._pending.clear()

    def store(self, progress: TrainingProgress) -> None:
        """Write the window into `progress` (reads the device: at checkpoints only)."""
        count = int(self._count)
        progress.recent_losses = self._recent[self.window - count :].tolist() if count else []

    # ------------------------------------------------------------ per step, on the device
    @torch.no_grad()
    def check(
        self,
        loss: torch.Tensor,
        grad_norm: torch.Tensor | None = None,
        part: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decide the step whose (global mean) loss and gradient norm are given: a float flag on
        the device, 1.0 when its update must be skipped. Queues work only; reads nothing.
        `part`, a term of the loss logged on its own, travels to the host with the flags."""
        loss64 = loss.detach().to(torch.float64).reshape(())
        part64 = self._no_part if part is None else part.detach().to(torch.float64).reshape(())
        finite = torch.isfinite(loss64)
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm.detach()).reshape(())
        if self.factor is None:
            spike = torch.zeros((), dtype=torch.bool, device=self.device)
        else:  # statistics.median of the window: the middle value, or the mean of the two
            ordered = torch.sort(self._recent).values
            half = self.window // 2
            median = ordered[half] if self.window % 2 else (ordered[half - 1] + ordered[half]) / 2
            full = self._count >= self.window
            spike = finite & full & (loss64 > self.factor * median)
        applied = finite & ~spike
        self._before = (self._recent, self._count)  # for `not_finite`
        # only applied steps' losses enter the window (a spike must not raise its own bar)
        shifted = torch.cat([self._recent[1:], loss64.reshape(1)])
        self._recent = torch.where(applied, shifted, self._recent)
        self._count = torch.clamp(self._count + applied.long(), max=self.window)
        flags = [finite.to(torch.float64), spike.to(torch.float64)]
        self._last = torch.stack([loss64, *flags, part64])
        return (~applied).to(torch.float32)

    def not_finite(self) -> None:
        """The step just checked turned out to have non-finite gradients (found by DeepSpeed,
        which discarded its update): a bad step, whose loss leaves the window again."""
        self._recent, self._count = self._before
        self._last = self._last.clone()
        self._last[1] = 0.0

    def push(self, step: int, names: list[str]) -> None:
        """Start copying the last checked step's flags to the host, without waiting."""
        flags = self._last
        if self.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = flags.clone(), None
        self._pending.append((step, host, names, event))

    # ------------------------------------------------------------ on the host
    def reports(self, all_steps: bool) -> list[StepReport]:
        """The finished steps' reports, oldest first: every pending one when `all_steps` (a
        sync), else all but the newest (whose flags the device may still be computing)."""
        ready = self._pending if all_steps else self._pending[:-1]
        self._pending = [] if all_steps else self._pending[-1:]
        out = []
        for step, host, names, event in ready:
            if event is not None:
                event.synchronize()  # waits for that step only, not for the queued ones
            loss, finite, spike, part = host.tolist()
            out.append(StepReport(step, loss, bool(finite), bool(spike), names, part))
        return out

    def read_now(self, skip: torch.Tensor) -> bool:
        """Whether the step just checked is bad, read at once (a sync): for optimizers that
        cannot skip an update on the device."""
        return bool(skip)
