"""The loop in-process: determinism (the basis of exact resume) and its options."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main

BASE = [
    "--set",
    "model.base=preset:tiny-sd",
    "--set",
    "data.resolution=32",
    "--set",
    "train.max_steps=3",
    "--set",
    "train.batch_size=2",
    "--set",
    "evaluate.sample_steps=1",
    "--set",
    "evaluate.num_per_prompt=1",
    "--set",
    "evaluate.val_batches=1",
]


@pytest.fixture
def config(tmp_path, tiny_image_folder):
    path = tmp_path / "cfg.toml"
    path.write_text(f'seed = 3\n[data]\npath = "{tiny_image_folder}"\nval_fraction = 0.34\n')
    return path


def _weights(run):
    return load_file(str(run / "checkpoints" / "step-0000003" / "model.safetensors"))


def test_same_seed_same_weights_bit_for_bit(tmp_path, config):
    extra = [
        "--set",
        "data.hflip=0.5",
        "--set",
        "data.caption_dropout=0.5",
        "--set",
        "model.dropout=0.1",
        "--set",
        "diffusion.noise_offset=0.05",
        "--set",
        "train.grad_accum=2",
    ]
    assert main(["train", str(config), "--output", str(tmp_path / "a"), *BASE, *extra]) == 0
    assert main(["train", str(config), "--output", str(tmp_path / "b"), *BASE, *extra]) == 0
    assert (
        main(
            [
                "train",
                str(config),
                "--output",
                str(tmp_path / "c"),
                *BASE,
                *extra,
                "--set",
                "seed=4",
            ]
        )
        == 0
    )
    a, b, c = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)
    progress = json.loads(
        (tmp_path / "a" / "checkpoints" / "step-0000003" / "progress.json").read_text()
    )
    assert progress["step"] == 3
    assert progress["position"] == {
        "epoch": 2,
        "index": 4,
    }  # 4 images, 3 steps x 2 micro-batches of 2


@pytest.mark.parametrize(
    "options",
    [
        [
            "--set",
            "diffusion.prediction_type=v_prediction",
            "--set",
            "diffusion.min_snr_gamma=5",
            "--set",
            "train.optimizer=rmsprop",
            "--set",
            "train.lr_schedule=cosine",
            "--set",
            "train.warmup_steps=1",
        ],
        [
            "--set",
            "train.optimizer=sgd",
            "--set",
            "train.lr_schedule=linear",
            "--set",
            "train.ema=false",
            "--set",
            "diffusion.noise_schedule=squaredcos_cap_v2",
            "--set",
            "model.trainable=[unet.*, text_encoder.*]",
            "--set",
            "train.text_encoder_lr=1e-5",
            "--set",
            "model.gradient_checkpointing=true",
        ],
        [
            "--set",
            "train.optimizer=adam",
            "--set",
            "train.max_grad_norm=null",
            "--set",
            "diffusion.noise_schedule=linear",
        ],
    ],
    ids=["vpred-minsnr-rmsprop-cosine", "sgd-linear-noema-te", "adam-noclip"],
)
def test_loop_options_train_and_log(tmp_path, config, options):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(config),
                "--output",
                str(run),
                *BASE,
                *options,
                "--set",
                "train.log_every=1",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)
    lrs = [r["lr"] for r in rows if "lr" in r]
    if "cosine" in " ".join(options):
        assert lrs[0] > lrs[-1]  # warmed up, then decayed toward 0


def test_a_full_disk_skips_the_save_with_a_message(tmp_path, config, monkeypatch, capsys):
    from sdtune.train import loop, watch

    calls = []  # room for the first checkpoint only, then a full disk

    def free(path):
        calls.append(path)
        return 2**40 if len(calls) == 1 else 0

    monkeypatch.setattr(watch, "free_bytes", free)
    run = tmp_path / "run"
    code = main(
        ["train", str(config), "--output", str(run), *BASE, "--set", "checkpoint.every_steps=1"]
    )
    out, err = capsys.readouterr()
    assert "NOT saving step 2" in out and "free space (training goes on)" in out
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000001"]
    # the save at the end is not skipped: the run stops, saying what it needs, and keeps the last
    assert code == loop.EXIT_NO_SPACE
    assert len(err.strip().splitlines()) == 1 and "step-0000001, is intact" in err
    assert "MiB" in err and "--resume" in err
    assert not (run / "model").exists()


def test_the_free_space_check_before_the_first_checkpoint(tmp_path, config, monkeypatch, capsys):
    from sdtune.train import loop, watch

    monkeypatch.setattr(watch, "free_bytes", lambda path: 2**20)  # less than the estimate
    code = main(["train", str(config), "--output", str(tmp_path / "run"), *BASE])
    err = capsys.readouterr().err
    assert code == loop.EXIT_NO_SPACE and "no checkpoint yet" in err
    assert "cannot save step" in err and "1 MiB free" in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not list(
        (tmp_path / "run" / "checkpoints").glob("step-*")
    )


def test_update_ratio_is_logged(tmp_path, config):
    run = tmp_path / "run"
    assert (
        main(["train", str(config), "--output", str(run), *BASE, "--set", "train.log_every=1"]) == 0
    )
    rows = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert all(0 < r["update_ratio"] < 0.1 for r in rows)


def test_update_ratio_copies_at_most_its_budget_and_estimates_the_whole(monkeypatch):
    from sdtune.train import step

    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32, 3, 3), (4096, 128), (333,), (7, 11)]  # 4-D ones channels-last, as trained
    params = [
        torch.nn.Parameter(torch.randn(shape, generator=gen) * scale)
        for shape, scale in zip(shapes, [0.5, 2.0, 1.0, 3.0])
    ]
    params[0].data = params[0].data.to(memory_format=torch.channels_last)
    update = [torch.randn(p.shape, generator=gen) * 1e-3 * (i + 1) for i, p in enumerate(params)]

    def ratio(budget: int) -> tuple[float, int]:
        monkeypatch.setattr(step, "UPDATE_RATIO_SAMPLE_BYTES", budget)
        before = step.ratio_sample(params)
        copied = sum(t.numel() * t.element_size() for t in before[1])
        with torch.no_grad():
            for p, u in zip(params, update):
                p.add_(u)
        value = step.update_ratio(params, before)
        with torch.no_grad():  # back as they were, for the next measurement
            for p, u in zip(params, update):
                p.sub_(u)
        return value, copied

    exact, copied_all = ratio(2**30)  # everything fits: every weight copied, the exact ratio
    total = sum(p.numel() * 4 for p in params)
    assert copied_all == total
    delta = sum(float(u.pow(2).sum()) for u in update) ** 0.5
    weights = sum(float((p.detach() + u).pow(2).sum()) for p, u in zip(params, update)) ** 0.5
    assert exact == pytest.approx(delta / weights, rel=1e-4)
    estimate, copied = ratio(64 * 1024)  # a 64 KiB budget: every 35th element or so
    assert copied <= 64 * 1024 + 4 * len(params)
    assert estimate == pytest.approx(exact, rel=0.05)


def test_missing_tracker_is_a_clear_error(tmp_path, config, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    assert (
        main(
            [
                "train",
                str(config),
                "--output",
                str(tmp_path / "r"),
                *BASE,
                "--set",
                "monitor.trackers=[wandb]",
            ]
        )
        == 2
    )
    assert (
        "monitor.trackers: 'wandb' is asked for but not installed (pip install wandb)"
        in capsys.readouterr().err
    )


def test_mlflow_tracker_receives_steps_and_evaluations(tmp_path, config, monkeypatch):
    pytest.importorskip("mlflow")  # in the dev extras (mlflow-skinny): a real local file store
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # no database needed for a test
    args = ["--set", "monitor.trackers=[mlflow]", "--set", "train.log_every=1"]
    assert main(["train", str(config), "--output", str(tmp_path / "r"), *BASE, *args]) == 0
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "sdtune"]
    (run,) = client.search_runs([experiment.experiment_id])
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3]
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    assert [m.value for m in losses] == pytest.approx([r["loss"] for r in logged if "loss" in r])
    (val,) = client.get_metric_history(run.info.run_id, "val_loss")
    assert val.step == 3
    assert run.data.params["train.max_steps"] == "3"


class HostReads:
    """Reads of tensor values by the host (`.item()`, `bool()`, `float()`: a host-device sync on
    a GPU) while it is `active`, other than the data pipeline's own (CPU tensors) and the
    guard's deferred reports. Counted at the dispatcher, so it works on a CPU."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.active, self.found = False, []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if outer.active and func is torch.ops.aten._local_scalar_dense.default:
                    outer.record()
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def record(self):
        import traceback

        ours = [f for f in traceback.extract_stack() if "/src/sdtune/" in f.filename]
        where = ours[-1] if ours else None
        if where is None or "/sdtune/data/" in where.filename or where.name == "reports":
            return
        self.found.append(
            f"{where.filename.split('/src/')[-1]}:{where.lineno} {where.name}: {where.line}"
        )


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop"])
def test_a_step_reads_nothing_back_from_the_device(tmp_path, config, optimizer):
    """Between the 2nd and the 8th optimizer step (no metrics row, evaluation or checkpoint in
    between), the loop never waits on a tensor's value: the guard decides on the device. Only
    an optimizer without a fused kernel (RMSprop) must read the guard's flag at every step."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    reads, steps = HostReads(), []

    def after_step(optimizer, args, kwargs):
        steps.append(1)
        reads.active = 2 <= len(steps) < 8

    handle = register_optimizer_step_post_hook(after_step)
    extra = ["--set", "train.max_steps=8", "--set", "train.log_every=100"]
    extra += ["--set", "train.spike_factor=3", "--set", "train.spike_window=5"]
    extra += ["--set", f"train.optimizer={optimizer}"]
    try:
        with reads.mode:
            assert main(["train", str(config), "--output", str(tmp_path / "r"), *BASE, *extra]) == 0
    finally:
        handle.remove()
    assert len(steps) == 8
    if optimizer == "adamw":
        assert reads.found == []
    else:  # one read of the flag per step, and nothing else
        assert len(reads.found) == 6 and all("read_now" in r for r in reads.found), reads.found


def test_dataloader_workers_give_the_same_run(tmp_path, config):
    """Batches loaded in worker processes come in the exact order, with the same augmentations."""
    extra = ["--set", "data.hflip=0.5", "--set", "data.caption_dropout=0.5"]
    for workers in (0, 2):
        run = tmp_path / f"w{workers}"
        args = ["train", str(config), "--output", str(run), *BASE, *extra]
        assert main([*args, "--set", f"data.num_workers={workers}"]) == 0
    a, b = _weights(tmp_path / "w0"), _weights(tmp_path / "w2")
    assert all(torch.equal(a[k], b[k]) for k in a)
