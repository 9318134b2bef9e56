import json

import torch

from sdtune.cli import main
from sdtune.config import EarlyStopConfig, load_config
from sdtune.data import build_datasets
from sdtune.evaluate.early_stop import early_stop_reason, overfitting
from sdtune.evaluate.validation import bucket_timesteps, validation_loss
from sdtune.models import load_model


def test_validation_loss_is_exactly_repeatable_with_buckets():
    cfg = load_config(None, ["model.base=preset:tiny-sd", "data.resolution=32"])
    bundle = load_model(cfg.model, cfg.diffusion, 0)
    split = build_datasets(cfg.data, 3, 0, lambda s: None)
    first = validation_loss(bundle, split.val, 4, 2, "cpu")
    second = validation_loss(bundle, split.val, 4, 2, "cpu")
    assert first == second
    assert set(first) == {"val_loss", "val_loss_low", "val_loss_mid", "val_loss_high"}
    assert (
        abs(
            first["val_loss"]
            - (first["val_loss_low"] + first["val_loss_mid"] + first["val_loss_high"]) / 3
        )
        < 1e-6
    )
    with torch.no_grad():
        next(bundle.unet.parameters()).add_(0.01)
    assert validation_loss(bundle, split.val, 4, 2, "cpu") != first
    t = bucket_timesteps(5, 1000)
    assert 0 <= t[0] < 333 <= t[1] < 666 <= t[2] < 1000
    assert torch.equal(t, bucket_timesteps(5, 1000))


def _rows(values, train=None):
    return [
        {"step": 10 * (i + 1), "val_loss": v, **({"train_loss": train[i]} if train else {})}
        for i, v in enumerate(values)
    ]


def test_early_stop_reason():
    cfg = EarlyStopConfig(metric="val_loss", patience=2)
    assert early_stop_reason(_rows([3, 2, 1, 1.5]), cfg) is None
    reason = early_stop_reason(_rows([3, 2, 1, 1.5, 1.2]), cfg)
    assert "for 2 evaluations (best 1 at step 30)" in reason
    assert early_stop_reason(
        _rows([3, 2.95, 2.9]), EarlyStopConfig(metric="val_loss", patience=2, min_delta=0.1)
    )
    assert (
        early_stop_reason(
            _rows([1, 2, 3]), EarlyStopConfig(metric="val_loss", patience=2, mode="max")
        )
        is None
    )
    assert early_stop_reason(_rows([1, 2, 3]), EarlyStopConfig()) is None


def test_overfitting_needs_rising_val_and_falling_train():
    assert overfitting(_rows([1, 1.1, 1.2, 1.3], [1, 0.9, 0.8, 0.7]), 3)
    assert not overfitting(_rows([1, 1.1, 1.05, 1.3], [1, 0.9, 0.8, 0.7]), 3)
    assert not overfitting(_rows([1, 1.1, 1.2, 1.3], [1, 0.9, 0.95, 0.7]), 3)
    assert not overfitting(_rows([1, 1.1, 1.2], [1, 0.9, 0.8]), 3)
    assert not overfitting(_rows([1, 1.1, 1.2, 1.3], [1, 0.9, 0.8, 0.7]), 0)


OVERFIT = [
    "--set",
    "model.base=preset:tiny-digits",
    "--set",
    "data.resolution=16",
    "--set",
    "data.limit=16",
    "--set",
    "train.batch_size=16",
    "--set",
    "train.learning_rate=3e-3",
    "--set",
    "train.ema=false",
    "--set",
    "train.max_steps=1500",
    "--set",
    "checkpoint.keep_best=val_loss",
    "--set",
    "evaluate.every_steps=25",
    "--set",
    "evaluate.val_batches=2",
    "--set",
    "evaluate.sample_steps=2",
    "--set",
    "evaluate.num_per_prompt=1",
    "--set",
    "evaluate.early_stop.metric=val_loss",
    "--set",
    "evaluate.early_stop.patience=2",
]


def test_early_stop_on_an_overfitting_run_keeps_the_best(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "examples/quickstart.toml",
                "--output",
                str(run),
                *OVERFIT,
                "--set",
                "evaluate.judge=false",
                "--set",
                "checkpoint.every_steps=0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    stop_step = evals[-1]["step"]
    assert stop_step < 1500, "the run should have stopped early"
    assert stop_step == best["step"] + 2 * 25  # within two evaluations of the minimum
    assert len({r["step"] for r in evals}) == len(evals)  # the last evaluation is not repeated
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["best_checkpoint"] == f"checkpoints/step-{best['step']:07d}"
    assert (run / summary["best_checkpoint"] / "manifest.json").is_file()
    assert "has not improved" in summary["stopped"]
    assert f"early stop at step {stop_step}" in out
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "early_stop" for e in events)


def test_a_nan_loss_is_skipped_and_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDTUNE_POISON_STEPS", "2")
    run = tmp_path / "run"
    args = [
        "train",
        "examples/quickstart.toml",
        "--output",
        str(run),
        "--set",
        "train.max_steps=3",
        "--set",
        "train.batch_size=4",
        "--set",
        "evaluate.judge=false",
        "--set",
        "train.log_every=1",
        "--set",
        "evaluate.sample_steps=1",
        "--set",
        "evaluate.num_per_prompt=1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "step 2: non-finite loss/gradient (nan), update skipped (batch: digits#" in out
    rows = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    from safetensors.torch import load_file

    weights = load_file(str(run / "checkpoints" / "step-0000003" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "skipped_step" and events[0]["step"] == 2


GUARDED = [
    "train",
    "examples/quickstart.toml",
    "--set",
    "train.max_steps=10",
    "--set",
    "train.batch_size=4",
    "--set",
    "evaluate.judge=false",
    "--set",
    "train.log_every=1",
    "--set",
    "evaluate.sample_steps=1",
    "--set",
    "evaluate.num_per_prompt=1",
    "--set",
    "checkpoint.every_steps=3",
    "--set",
    "evaluate.every_steps=0",
    "--set",
    "train.spike_factor=3",
    "--set",
    "train.spike_window=5",
    "--set",
    "train.lr_schedule=constant",
    "--set",
    "train.warmup_steps=0",
]


def test_a_forced_divergence_rolls_back_and_recovers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDTUNE_SPIKE_AT", "8")
    run = tmp_path / "run"
    assert main([*GUARDED, "--output", str(run)]) == 0
    out = capsys.readouterr().out
    assert "diverged at step 8: rolled back to step-0000006 with the learning rate x0.5" in out
    rows = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert [r["step"] for r in rows] == list(range(1, 11))
    lrs = {r["step"]: r["lr"] for r in rows}
    assert lrs[10] == 0.5 * lrs[1]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["skipped_step", "rollback"]
    progress = json.loads((run / "checkpoints" / "step-0000010" / "progress.json").read_text())
    assert progress["rollbacks"] == 1 and progress["lr_scale"] == 0.5


def test_rollbacks_are_limited(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDTUNE_SPIKE_AT", "8")
    assert (
        main([*GUARDED, "--output", str(tmp_path / "run"), "--set", "train.max_rollbacks=0"]) == 2
    )
    err = capsys.readouterr().err
    assert "training diverged at step 8 after 0 rollback(s) (train.max_rollbacks=0)" in err


def test_generator_metrics_see_collapse_and_copying():
    from sdtune.evaluate.metrics import (
        MetricUnavailable,
        diversity,
        fid_kid,
        image_features,
        memorisation,
        precision_recall,
    )

    g = torch.Generator().manual_seed(0)
    real = torch.rand(60, 1, 16, 16, generator=g)
    train = torch.rand(200, 1, 16, 16, generator=g)
    fr, ft = image_features(real), image_features(train)
    p, r = precision_recall(fr, fr.clone())
    assert p == 1.0 and r == 1.0
    collapsed = image_features(
        real[:1].repeat(60, 1, 1, 1) + 1e-3 * torch.rand(60, 1, 16, 16, generator=g)
    )
    p, r = precision_recall(fr, collapsed)
    assert r < 0.2 and diversity(fr, collapsed) < 0.05
    assert 0.8 < diversity(fr, image_features(torch.rand(60, 1, 16, 16, generator=g))) < 1.2
    assert memorisation(ft, fr, ft[:30]) == 1.0
    assert memorisation(ft, fr, fr) < 0.2
    try:
        fid_kid(real, real)
    except MetricUnavailable as exc:
        assert "torchmetrics" in str(exc) or "Inception weights" in str(exc)


def test_sdtune_eval_and_metrics_during_training(tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "train",
        "examples/quickstart.toml",
        "--output",
        str(run),
        "--set",
        "train.max_steps=4",
        "--set",
        "train.batch_size=8",
        "--set",
        "evaluate.judge=false",
        "--set",
        "evaluate.sample_steps=2",
        "--set",
        "evaluate.num_per_prompt=1",
        "--set",
        "evaluate.every_steps=2",
        "--set",
        "evaluate.metrics_every=2",
        "--set",
        "evaluate.metrics_images=20",
        "--set",
        "evaluate.early_stop.metric=judged_accuracy",
        "--set",
        "evaluate.early_stop.mode=max",
        "--set",
        "evaluate.early_stop.patience=5",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if "gen_recall" in r]
    assert [r["step"] for r in measured] == [2, 4]
    assert all(0 <= r["judged_accuracy"] <= 1 and r["diversity"] > 0 for r in measured)
    capsys.readouterr()
    assert main(["eval", str(run), "--num-images", "20"]) == 0
    out = capsys.readouterr().out
    assert "gen_precision" in out and "judged_accuracy" in out and "FID/KID skipped" in out
    # written beside the checkpoint, never inside the verified directory
    saved = json.loads((run / "checkpoints" / "eval-step-0000004.json").read_text())
    assert saved["weights"] == "ema" and 0 <= saved["memorisation"] <= 1
    assert not (run / "checkpoints" / "step-0000004" / "eval.json").exists()
    assert "few reference images" in out  # 20 images against 20 held-out ones: rough numbers
    from sdtune.checkpoint.store import verify_checkpoint

    verify_checkpoint(run / "checkpoints" / "step-0000004")


def test_deferred_guard_gives_the_run_of_an_immediate_one(tmp_path, monkeypatch, capsys):
    """The host learns of a bad step one step late unless it logs: the run must not differ."""
    from safetensors.torch import load_file

    monkeypatch.setenv("SDTUNE_SPIKE_AT", "8")
    monkeypatch.setenv("SDTUNE_POISON_STEPS", "2")
    runs = {}
    for log_every in (1, 100):
        run = tmp_path / f"log{log_every}"
        args = [*GUARDED, "--output", str(run), "--set", f"train.log_every={log_every}"]
        assert main(args) == 0
        runs[log_every] = run
    out = capsys.readouterr().out
    assert out.count("diverged at step 8: rolled back to step-0000006") == 2
    final = "checkpoints/step-0000010"
    a, b = (load_file(str(runs[k] / final / "model.safetensors")) for k in (1, 100))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema = [load_file(str(runs[k] / final / "ema.safetensors")) for k in (1, 100)]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    events = [
        [(e["step"], e["event"]) for e in map(json.loads, (r / "events.jsonl").open())]
        for r in runs.values()
    ]
    assert events[0] == events[1] == [(2, "skipped_step"), (8, "skipped_step"), (8, "rollback")]
    progress = [json.loads((r / final / "progress.json").read_text()) for r in runs.values()]
    for key in ("skipped_steps", "recent_losses", "rollbacks", "lr_scale", "bad_streak"):
        assert progress[0][key] == progress[1][key], key


def test_generator_metrics_need_two_held_out_images():
    from types import SimpleNamespace

    from sdtune.evaluate.assess import assess

    data = SimpleNamespace(val=[object()], train=[object()] * 5)
    values, notes = assess(None, None, data, "cpu", 10)
    assert values == {} and "1 held-out image; they need at least 2" in notes[0]
