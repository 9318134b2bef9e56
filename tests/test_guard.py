"""The device-side stability guard and EMA: same decisions as the host rules, deferred reports,
exact round trips through a checkpoint's progress record."""

import math
import statistics

import pytest
import torch

from sdtune.checkpoint.state import TrainingProgress
from sdtune.train.ema import EMA
from sdtune.train.guard import StepGuard
from sdtune.train.optim import skips_on_device, step_unless


def host_rules(losses, factor, window):
    """The guard's rules written plainly on the host: (finite, spike) per step, and the window."""
    recent, out = [], []
    for loss in losses:
        finite = math.isfinite(loss)
        spike = (
            finite
            and factor is not None
            and len(recent) >= window
            and loss > factor * statistics.median(recent)
        )
        if finite and not spike:
            recent = (recent + [loss])[-window:]
        out.append((finite, spike))
    return out, recent


@pytest.mark.parametrize("window", [5, 6])
def test_guard_decides_as_the_host_rules(window):
    g = torch.Generator().manual_seed(0)
    losses = (torch.rand(40, generator=g) * 0.1 + 0.5).tolist()
    losses[7], losses[12], losses[20] = float("nan"), 10.0, float("inf")
    losses[30] = float(torch.tensor(1.7))  # a spike of 3x a ~0.55 median, float32-exact
    expected, recent = host_rules(losses, 3.0, window)
    guard = StepGuard(3.0, window, "cpu")
    guard.load(TrainingProgress())
    got = []
    for i, loss in enumerate(losses):
        skip = guard.check(torch.tensor(loss), torch.tensor(1.0))
        guard.push(i + 1, [f"img{i}"])
        (report,) = guard.reports(all_steps=True)
        assert float(skip) == float(report.bad)
        got.append((report.finite, report.spike))
    assert got == expected
    assert any(spike for _, spike in got) and not all(finite for finite, _ in got)
    progress = TrainingProgress()
    guard.store(progress)
    assert progress.recent_losses == recent  # float32 losses, exactly


def test_non_finite_gradient_is_bad_and_reports_are_one_step_late():
    guard = StepGuard(None, 5, "cpu")
    guard.load(TrainingProgress())
    guard.check(torch.tensor(0.5), torch.tensor(float("nan")))
    guard.push(1, ["a.png"])
    assert guard.reports(all_steps=False) == []  # the newest step may still be computing
    guard.check(torch.tensor(0.4), torch.tensor(1.0))
    guard.push(2, ["b.png"])
    (first,) = guard.reports(all_steps=False)
    assert (first.step, first.bad, first.finite, first.names) == (1, True, False, ["a.png"])
    (second,) = guard.reports(all_steps=True)
    assert (second.step, second.bad, second.loss) == (2, False, pytest.approx(0.4))
    assert guard.reports(all_steps=True) == []


def test_gradients_found_not_finite_after_the_check_make_the_step_bad():
    """DeepSpeed's order: the guard checks the loss before the update; when the engine then
    finds the gradients not finite, the step is bad and its loss leaves the window again."""
    guard = StepGuard(2.0, 3, "cpu")
    guard.load(TrainingProgress(recent_losses=[0.5, 0.6]))
    skip = guard.check(torch.tensor(0.55, dtype=torch.float64))
    assert float(skip) == 0.0
    guard.not_finite()
    guard.push(3, ["c.png"])
    (report,) = guard.reports(all_steps=True)
    assert (report.bad, report.finite, report.spike) == (True, False, False)
    stored = TrainingProgress()
    guard.store(stored)
    assert stored.recent_losses == [0.5, 0.6]


def test_window_round_trip_is_exact():
    progress = TrainingProgress(recent_losses=[0.1, 0.2, 0.30000001])
    guard = StepGuard(2.0, 4, "cpu")
    guard.load(progress)
    again = TrainingProgress()
    guard.store(again)
    assert again.recent_losses == [0.1, 0.2, 0.30000001]
    guard.check(torch.tensor(0.25, dtype=torch.float64), torch.tensor(1.0))
    guard.store(again)
    assert again.recent_losses == [0.1, 0.2, 0.30000001, 0.25]


def test_ema_matches_diffusers_and_leaves_skipped_steps_alone():
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(7, 3, generator=g)) for _ in range(3)]
    ours, theirs = EMA(params, 0.99), EMAModel(params, decay=0.99)
    for _ in range(6):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g))
        ours.step(torch.tensor(0.0))
        theirs.step(params)
    assert all(torch.equal(a, b) for a, b in zip(ours.shadow_params, theirs.shadow_params))
    assert ours.optimization_step == theirs.optimization_step == 6
    kept = [s.clone() for s in ours.shadow_params]
    with torch.no_grad():
        params[0].add_(1.0)
    ours.step(torch.tensor(1.0))  # a skipped step: average and counter unchanged
    assert all(torch.equal(a, b) for a, b in zip(ours.shadow_params, kept))
    assert ours.optimization_step == 6
    with ours.swapped_in():
        assert torch.equal(params[1], kept[1])
    assert not torch.equal(params[1], kept[1])


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_step_is_undone_on_the_device(name):
    p = torch.nn.Parameter(torch.ones(10))
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.SGD
    opt = cls([p], lr=0.1, fused=True)
    assert skips_on_device(opt)
    p.grad = torch.ones(10)
    step_unless(opt, torch.tensor(1.0))  # a skipped first step leaves AdamW's state at zero
    assert torch.equal(p.detach(), torch.ones(10)) and not hasattr(opt, "found_inf")
    step_unless(opt, torch.tensor(0.0))
    reference = torch.nn.Parameter(torch.ones(10))
    ref = cls([reference], lr=0.1)
    reference.grad = torch.ones(10)
    ref.step()
    assert torch.equal(p.detach(), reference.detach())  # as if the skipped step never was


def test_optimizers_that_cannot_skip_on_the_device_are_known():
    p = torch.nn.Parameter(torch.ones(10))
    assert not skips_on_device(torch.optim.RMSprop([p], lr=0.1))
    # a skipped first step would keep fused SGD's uninitialised momentum buffers
    assert not skips_on_device(torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True))


def test_progress_eta_is_smoothed(monkeypatch, capsys):
    """Without a terminal, each log line's ETA comes from a moving average of the step time:
    one slow interval (an evaluation) moves it by a third, not all the way."""
    from sdtune.monitor import logging as log

    clock = iter([0.0, 10.0, 20.0, 50.0])
    monkeypatch.setattr(log.time, "monotonic", lambda: next(clock))
    progress = log.Progress(100, quiet=False)
    progress.interactive = False
    for step in (10, 20, 30):
        progress.update(step, 0.5, 1e-4, 1.0, True)
    etas = [line.split("eta ")[1] for line in capsys.readouterr().out.splitlines()]
    # 1 s/step, 1 s/step, then a 3 s/step interval: 0.7 * 1 + 0.3 * 3 = 1.6 s/step
    assert etas == ["90s", "80s", "112s"]
