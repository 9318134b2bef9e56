"""The fast-path switches end to end on CPU: each trains, 8-bit AdamW resumes bit for bit, and
a switch this machine cannot honour is a one-line error before any work."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main
from tests.e2e.test_resume import CONFIG, _assert_resume_is_exact

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _config(tmp_path, extra: str = ""):
    path = tmp_path / "cfg.toml"
    path.write_text(CONFIG.replace("[train]\n", "[train]\n" + extra))
    return path


@pytest.mark.slow  # over 40 s: run with -m slow
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes (the 'bnb' extra) is not installed")
def test_8bit_adamw_trains_and_resumes_bit_for_bit(tmp_path):
    config = _config(tmp_path, 'optimizer = "adamw8bit"\n')
    a = _assert_resume_is_exact(config, tmp_path, crash="step:3")
    quant = [s["__bnb_optimizer_quant_state__"] for s in a[2]["state"].values()]
    assert any(q["state1"].dtype == torch.uint8 for q in quant)  # the moments really are 8-bit


@pytest.mark.slow  # a plain torch optimizer (transformers'): test_optim-style checks suffice by default
def test_adafactor_trains_and_resumes_bit_for_bit(tmp_path):
    config = _config(tmp_path, 'optimizer = "adafactor"\n')
    a = _assert_resume_is_exact(config, tmp_path, crash="step:3")
    states = list(a[2]["state"].values())
    # factored second moments: a row and a column vector for each matrix, no full moment
    assert any("exp_avg_sq_row" in s and "exp_avg_sq" not in s for s in states)


@pytest.mark.slow  # a plain torch optimizer: test_optim covers it in the default suite
def test_prodigy_trains_and_resumes_bit_for_bit(tmp_path):
    config = _config(tmp_path, 'optimizer = "prodigy"\nlearning_rate = 1.0\n')
    _assert_resume_is_exact(config, tmp_path, crash="step:3")
    rows = [
        json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    ]
    stepped = [r["lr_effective"] for r in rows if "lr_effective" in r]
    # the step size it estimated (d x lr), logged: grows from its d0 = 1e-6
    assert len(stepped) == 6 and stepped[-1] > stepped[0] > 0


@pytest.mark.slow  # a plain torch optimizer: test_optim covers it in the default suite
def test_lion_trains_and_resumes_bit_for_bit(tmp_path):
    config = _config(tmp_path, 'optimizer = "lion"\nlearning_rate = 3e-5\n')
    a = _assert_resume_is_exact(config, tmp_path, crash="step:3")
    states = list(a[2]["state"].values())
    assert states and all(set(s) == {"exp_avg"} for s in states)  # one moment per weight


@pytest.mark.slow  # over 40 s: run with -m slow
def test_schedule_free_adamw_resumes_bit_for_bit_and_saves_its_average(tmp_path):
    """Its checkpoints hold the evaluated average (model.safetensors: what export, eval and
    sample read) and the weights training goes on from (train_weights.safetensors)."""
    config = _config(tmp_path, 'optimizer = "adamw_schedulefree"\nwarmup_steps = 2\n')
    _assert_resume_is_exact(config, tmp_path, crash="step:3")
    ckpt = "checkpoints/step-0000006"
    y = [load_file(str(tmp_path / run / ckpt / "train_weights.safetensors")) for run in "ab"]
    x = load_file(str(tmp_path / "a" / ckpt / "model.safetensors"))
    assert all(torch.equal(y[0][k], y[1][k]) for k in y[0])
    assert any(not torch.equal(x[k], y[0][k]) for k in x)  # the average is not the iterate
    rows = [
        json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    ]
    warm = [r["lr_effective"] for r in rows if "lr_effective" in r]
    assert warm[:3] == pytest.approx([5e-5, 1e-4, 1e-4])  # its own warmup, not the schedule's


@pytest.mark.slow  # over 40 s: run with -m slow
def test_epochs_become_steps_and_resume_exactly(tmp_path):
    """train.max_epochs and checkpoint/evaluate.every_epochs: counted in steps once the images
    are known (40 training images at batch 4: 10 steps an epoch), resumed bit for bit."""
    config = tmp_path / "cfg.toml"
    config.write_text(
        CONFIG.replace("max_steps = 6\n", "max_epochs = 1.5\n")
        .replace("[checkpoint]\nevery_steps = 2\n", "[checkpoint]\nevery_epochs = 1\n")
        .replace("[evaluate]\nevery_steps = 3\n", "[evaluate]\nevery_epochs = 0.5\n")
    )
    _assert_resume_is_exact(config, tmp_path, crash="step:12", step=15)
    log = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_loss" in r] == [5, 10, 15]
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step-*")) == [
        "step-0000010", "step-0000015",
    ]  # fmt: skip
    assert "max_epochs = 1.5" in (tmp_path / "a" / "config.toml").read_text()  # as asked


def test_fast_path_switches_train_on_cpu(tmp_path, capsys):
    extra = "\n".join(
        [
            'attention = "math"',
            "channels_last = true",
            "fused_optimizer = false",
            "tf32 = false",
            "log_update_ratio = false",
        ]
    )
    config = _config(tmp_path, extra + "\n")
    run = tmp_path / "run"
    args = ["train", str(config), "--output", str(run), "--set", "data.pin_memory=false"]
    assert main([*args, "--set", "train.max_steps=2", "--set", "evaluate.every_steps=0"]) == 0
    rows = (run / "metrics.jsonl").read_text()
    assert '"update_ratio": NaN' in rows and '"loss"' in rows


@pytest.mark.parametrize(
    "setting, message",
    [
        ("train.attention=efficient", "train.attention='efficient' needs a CUDA GPU"),
        ("train.attention=xformers", "train.attention='xformers' needs a CUDA GPU"),
        ("train.optimizer=adamw8bit", "needs bitsandbytes, which is not installed"),
    ],
)
def test_unavailable_switch_is_a_one_line_error(tmp_path, capsys, monkeypatch, setting, message):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("bitsandbytes", "xformers") else real(name, *a),
    )
    config = _config(tmp_path)
    assert main(["train", str(config), "--output", str(tmp_path / "r"), "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.slow
def test_compiled_unet_trains_like_the_eager_one(tmp_path):
    """torch.compile of the UNet (about a minute to compile on CPU): the same run, to rounding."""
    from safetensors.torch import load_file

    config = _config(tmp_path)
    for name, compile_ in (("eager", "false"), ("compiled", "true")):
        args = ["train", str(config), "--output", str(tmp_path / name)]
        args += ["--set", f"train.compile={compile_}", "--set", "train.max_steps=2"]
        assert main([*args, "--set", "evaluate.every_steps=0"]) == 0
    final = "checkpoints/step-0000002/model.safetensors"
    eager, compiled = (load_file(str(tmp_path / n / final)) for n in ("eager", "compiled"))
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-4)
