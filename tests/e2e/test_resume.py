"""Exact resume after real process kills (SIGKILL mid-step and mid-save), signals, fallback."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.conftest import run_cli
from tests.e2e.launcher import sdtune

CONFIG = """
seed = 1
[model]
base = "preset:tiny-sd"
[data]
source = "digits"
resolution = 32
limit = 40
[train]
max_steps = 6
batch_size = 4
log_every = 1
[checkpoint]
every_steps = 2
keep_last = 2
[evaluate]
every_steps = 3
sample_steps = 2
num_per_prompt = 1
val_batches = 1
"""


def _train(config, run, *extra, crash=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if crash:
        env["SDTUNE_CRASH_AT"] = crash
    return sdtune("train", config, "--output", run, *extra, env=env, timeout=600)


def _final_state(run, step=6):
    ckpt = run / "checkpoints" / f"step-{step:07d}"
    weights = load_file(str(ckpt / "model.safetensors"))
    ema = load_file(str(ckpt / "ema.safetensors"))
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("images_per_s", None)
    return weights, ema, opt, rows


def _assert_identical(a, b):
    wa, ea, oa, ra = a
    wb, eb, ob, rb = b
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert oa["state"].keys() == ob["state"].keys()
    for pid, state in oa["state"].items():
        _assert_same_state(state, ob["state"][pid])
    assert ra == rb, "metrics.jsonl differs (duplicated, missing or different rows)"


def _assert_resume_is_exact(config, root, crash: str, step: int = 6):
    """Train straight into root/a; train into root/b killed at `crash`, resumed; same state."""
    straight = _train(config, root / "a")
    assert straight.returncode == 0, straight.stderr
    killed = _train(config, root / "b", crash=crash)
    assert killed.returncode != 0
    resumed = _train(config, root / "b", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _final_state(root / "a", step), _final_state(root / "b", step)
    _assert_identical(a, b)
    return a


def _assert_same_state(x, y):
    """Optimizer state, exactly: tensors, numbers and nested dicts (bitsandbytes' quant state)."""
    if isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys()
        for key in x:
            _assert_same_state(x[key], y[key])
    else:
        assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    config = root / "cfg.toml"
    config.write_text(CONFIG)
    proc = _train(config, root / "run")
    assert proc.returncode == 0, proc.stderr
    return config, root / "run"


def test_killed_anywhere_then_resumed_is_bit_identical(straight, tmp_path):
    config, reference = straight
    run = tmp_path / "run"
    first = _train(
        config, run, "--resume", crash="step:3"
    )  # SIGKILL after step 3 (checkpoint 2 exists)
    assert first.returncode == -signal.SIGKILL
    assert "no checkpoint in" in first.stdout and "starting from scratch" in first.stdout
    second = _train(config, run, "--resume", crash="save:4:3")  # SIGKILL inside the save of step 4
    assert second.returncode == -signal.SIGKILL
    assert "resumed from" in second.stdout and "step-0000002" in second.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    third = _train(config, run, "--resume", crash="step:5")
    assert third.returncode == -signal.SIGKILL
    assert "left by an interrupted save" in third.stdout
    fourth = _train(config, run, "--resume", crash="end:6")  # killed after the final save and eval
    assert fourth.returncode == -signal.SIGKILL
    assert "resumed from" in fourth.stdout and "step-0000004" in fourth.stdout
    last = _train(config, run, "--resume")
    assert last.returncode == 0, last.stderr
    assert "resumed from" in last.stdout and "step-0000006" in last.stdout
    _assert_identical(_final_state(reference), _final_state(run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest",
        "step-0000004",
        "step-0000006",
    ]

    # a flipped bit in the newest checkpoint: inspect fails naming the file; resume falls back
    target = run / "checkpoints" / "step-0000006" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    proc = run_cli("inspect", run, check=False)
    assert proc.returncode == 1 and "model.safetensors: sha256 does not match" in proc.stdout
    again = _train(config, run, "--resume")
    assert again.returncode == 0, again.stderr
    assert "falling back to step-0000004" in again.stdout
    _assert_identical(_final_state(reference), _final_state(run))


def test_sigterm_saves_and_exits_with_resume_hint(tmp_path):
    config = tmp_path / "cfg.toml"
    config.write_text(
        CONFIG.replace("max_steps = 6", "max_steps = 500").replace(
            "every_steps = 3", "every_steps = 0"
        )
    )
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sdtune",
            "train",
            str(config),
            "--output",
            str(run),
            "--set",
            "checkpoint.every_steps=0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "stopped by SIGTERM" in err and "--resume" in err and err.strip().count("\n") == 0
    # not an error, and the resume command is the one to type: this config, this folder
    assert "error" not in err
    assert f"sdtune train {config} --set checkpoint.every_steps=0 --output {run} --resume" in err
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("-")[1])
    assert 2 <= step < 500
    resumed = _train(
        config,
        run,
        "--resume",
        "--set",
        f"train.max_steps={step + 1}",
        "--set",
        "checkpoint.every_steps=0",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"(step {step}," in resumed.stdout
        and "config changes allowed on resume: train.max_steps" in resumed.stdout
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-2:] == [step, step + 1]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["event"]) for e in events[-2:]] == [(step, "stopped"), (step, "resumed")]


def test_resume_refuses_a_changed_config(straight, tmp_path):
    config, reference = straight
    proc = _train(config, reference, "--resume", "--set", "train.learning_rate=0.5")
    assert proc.returncode == 2
    assert (
        "config differs from the one step-0000006 was trained with in train.learning_rate"
        in proc.stderr
    )
    proc = _train(config, reference, "--resume", "--overwrite")
    assert proc.returncode == 2 and "contradict" in proc.stderr


def test_exports_load_in_diffusers_with_the_same_outputs(straight, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdtune.checkpoint.export import load_checkpoint_model
    from sdtune.config import DiffusionConfig, ModelConfig
    from sdtune.models import load_model

    _, run = straight
    for fmt, out in [
        ("single-file", tmp_path / "m.safetensors"),
        ("diffusers", tmp_path / "pipe"),
        ("ckpt", tmp_path / "m.ckpt"),
    ]:
        run_cli("export", run, "--format", fmt, "--out", out)
    assert (
        run_cli(
            "export", run, "--format", "ckpt", "--out", tmp_path / "m.ckpt", check=False
        ).returncode
        == 2
    )

    bundle, meta = load_checkpoint_model(run / "checkpoints" / "step-0000006")
    assert meta["weights"] == "ema" and meta["steps"] == "6"
    pipes = [
        StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None),
        StableDiffusionPipeline.from_single_file(
            str(tmp_path / "m.safetensors"),
            config=str(tmp_path / "pipe"),
            local_files_only=True,
            safety_checker=None,
        ),
    ]
    g = torch.Generator().manual_seed(0)
    x, t, h = (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.tensor([10, 500]),
        torch.randn(2, 77, 32, generator=g),
    )
    with torch.no_grad():
        expected = bundle.unet(x, t, encoder_hidden_states=h).sample
        for pipe in pipes:
            assert torch.equal(pipe.unet(x, t, encoder_hidden_states=h).sample, expected)
            ids = bundle.tokenize(["a handwritten digit one"])
            assert torch.equal(pipe.text_encoder(ids)[0], bundle.text_encoder(ids)[0])
    # model.base accepts the export back; the single file names its base in its metadata
    again = load_model(ModelConfig(base=str(tmp_path / "m.safetensors")), DiffusionConfig(), 0)
    with torch.no_grad():
        assert torch.equal(again.unet(x, t, encoder_hidden_states=h).sample, expected)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as fh:
        assert fh.metadata()["sdtune.base_model"] == "preset:tiny-sd"
