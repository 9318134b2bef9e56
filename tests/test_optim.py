"""The optimizers' pieces that sdtune adds around them: schedule-free AdamW's evaluation
weights, the logged step size of optimizers that set their own."""

import copy

import torch
from schedulefree import AdamWScheduleFree

from sdtune.config import TrainConfig
from sdtune.train.optim import (
    build_lr_scheduler,
    build_optimizer,
    effective_lr,
    evaluation_weights,
    is_schedule_free,
)


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(32, 4)
    return model, x, x.sum(1, keepdim=True)


def _train(model, optimizer, x, y, steps: int, evaluate_every: int = 0):
    for step in range(1, steps + 1):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if evaluate_every and step % evaluate_every == 0:
            with evaluation_weights(optimizer):
                pass
    return [p.detach().clone() for p in model.parameters()]


def test_schedule_free_evaluates_its_average_and_trains_on_bit_for_bit():
    cfg = TrainConfig(optimizer="adamw_schedulefree", learning_rate=1e-2, warmup_steps=3)
    model, x, y = _model_and_data()
    optimizer = build_optimizer([{"params": list(model.parameters())}], cfg)
    assert isinstance(optimizer, AdamWScheduleFree) and is_schedule_free(optimizer)
    _train(model, optimizer, x, y, 10)
    train_weights = [p.detach().clone() for p in model.parameters()]
    with evaluation_weights(optimizer):
        averaged = [p.detach().clone() for p in model.parameters()]
        beta1 = optimizer.param_groups[0]["betas"][0]
        for p, w in zip(model.parameters(), train_weights):  # x = y + (1 - 1/b1)(z - y)
            z = optimizer.state[p]["z"]
            torch.testing.assert_close(p, w + (1 - 1 / beta1) * (z - w))
    assert any(not torch.equal(a, w) for a, w in zip(averaged, train_weights))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), train_weights))
    assert optimizer.param_groups[0]["train_mode"]
    # evaluating every few steps leaves the run exactly as if it never evaluated
    runs = []
    for every in (0, 2):
        model, x, y = _model_and_data()
        optimizer = build_optimizer([{"params": list(model.parameters())}], cfg)
        runs.append(_train(model, optimizer, x, y, 8, every))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_schedule_free_warms_up_itself_under_a_flat_schedule():
    cfg = TrainConfig(optimizer="adamw_schedulefree", learning_rate=1e-2, warmup_steps=4)
    model, x, y = _model_and_data()
    optimizer = build_optimizer([{"params": list(model.parameters())}], cfg)
    scheduler = build_lr_scheduler(optimizer, cfg)
    rates = []
    for _ in range(6):
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        rates.append(effective_lr(optimizer))
        assert optimizer.param_groups[0]["lr"] == 1e-2  # the schedule adds no second warmup
    assert rates == [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01]


def test_other_optimizers_evaluate_the_weights_as_they_are():
    for name, lr in (("adamw", 1e-2), ("lion", 1e-3), ("prodigy", 1.0)):
        model, x, y = _model_and_data()
        optimizer = build_optimizer(
            [{"params": list(model.parameters())}], TrainConfig(optimizer=name, learning_rate=lr)
        )
        before = _train(model, optimizer, x, y, 3)
        with evaluation_weights(optimizer):
            assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))
        assert (effective_lr(optimizer) is not None) == (name == "prodigy")


def test_prodigy_lion_and_adafactor_lower_the_loss():
    for name, lr in (("lion", 3e-3), ("prodigy", 1.0), ("adafactor", 1e-2)):
        model, x, y = _model_and_data()
        optimizer = build_optimizer(
            [{"params": list(model.parameters())}],
            TrainConfig(optimizer=name, learning_rate=lr, weight_decay=0.0),
        )
        start = torch.nn.functional.mse_loss(model(x), y).item()
        _train(model, optimizer, x, y, 100)
        assert torch.nn.functional.mse_loss(model(x), y).item() < 0.5 * start, name


def test_adafactor_keeps_factored_moments_and_restores_them_exactly():
    model, x, y = _model_and_data()
    cfg = TrainConfig(optimizer="adafactor", learning_rate=1e-2)
    optimizer = build_optimizer([{"params": list(model.parameters())}], cfg)
    _train(model, optimizer, x, y, 3)
    states = list(optimizer.state_dict()["state"].values())
    assert any("exp_avg_sq_row" in s and "exp_avg_sq" not in s for s in states)
    twin, _, _ = _model_and_data()
    twin.load_state_dict(model.state_dict())
    again = build_optimizer([{"params": list(twin.parameters())}], cfg)
    again.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from disk: not aliased
    a = _train(model, optimizer, x, y, 2)
    b = _train(twin, again, x, y, 2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
