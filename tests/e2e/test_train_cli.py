"""End-to-end: the real CLI on tiny presets, asserting on what is written."""

import json

import pytest
from PIL import Image

from sdtune.checkpoint.store import verify_checkpoint

TINY_SD = [
    "--set",
    "model.base=preset:tiny-sd",
    "--set",
    "data.resolution=32",
    "--set",
    "data.val_fraction=0.34",
    "--set",
    "train.max_steps=4",
    "--set",
    "train.batch_size=2",
    "--set",
    "train.log_every=1",
    "--set",
    "evaluate.every_steps=2",
    "--set",
    "evaluate.sample_steps=2",
    "--set",
    "evaluate.num_per_prompt=1",
    "--set",
    "checkpoint.every_steps=2",
]


@pytest.fixture
def folder_config(tmp_path, tiny_image_folder):
    path = tmp_path / "cfg.toml"
    path.write_text(f'seed = 1\n[data]\npath = "{tiny_image_folder}"\n')
    return path


@pytest.mark.slow  # over 40 s: run with -m slow
def test_train_latent_model_on_folder_writes_everything(cli, tmp_path, folder_config):
    run = tmp_path / "run"
    proc = cli("train", folder_config, "--output", run, *TINY_SD)
    assert "family custom" in proc.stdout and "trainable" in proc.stdout
    assert (run / "config.toml").read_text().count("max_steps = 4") == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(r["images_per_s"] > 0 and r["lr"] > 0 for r in train_rows)
    assert any("val_loss" in r for r in rows)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    for step in (2, 4):
        grid = Image.open(run / "samples" / f"step-{step:07d}.png")
        assert grid.size[1] >= 32
    for step in (2, 4):
        manifest = verify_checkpoint(run / "checkpoints" / f"step-{step:07d}")
        assert manifest["step"] == step
        assert {"model.safetensors", "optimizer.pt", "ema.safetensors", "progress.json"} <= set(
            manifest["files"]
        )
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(run / "model", safety_checker=None)
    assert pipe.unet.config.sample_size == 16

    # never clobber a run without --overwrite; one line, non-zero
    again = cli("train", folder_config, "--output", run, *TINY_SD, check=False)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0
    assert "already holds a training run; pass --overwrite" in again.stderr
    assert (run / "metrics.jsonl").exists()

    # a trained model is a valid base: fine-tune the run's model (diffusers folder)
    cli(
        "train",
        folder_config,
        "--output",
        tmp_path / "run2",
        *TINY_SD,
        "--set",
        f"model.base={run / 'model'}",
        "--set",
        "train.max_steps=1",
        "--set",
        "checkpoint.every_steps=0",
        "--set",
        "evaluate.every_steps=0",
    )

    # ... and so is a single-file checkpoint with original SD key names
    from safetensors.torch import save_file

    from sdtune.checkpoint.convert import bundle_to_single_file
    from sdtune.config import DiffusionConfig, ModelConfig
    from sdtune.models import load_model

    single = tmp_path / "single.safetensors"
    save_file(
        bundle_to_single_file(
            load_model(ModelConfig(base=str(run / "model")), DiffusionConfig(), 0)
        ),
        str(single),
    )
    proc = cli(
        "train",
        folder_config,
        "--output",
        tmp_path / "run3",
        *TINY_SD,
        "--set",
        f"model.base={single}",
        "--set",
        f"model.config_source={run / 'model'}",
        "--set",
        "train.max_steps=1",
        "--set",
        "checkpoint.every_steps=0",
        "--set",
        "evaluate.every_steps=0",
    )
    assert f"model: {single}" in proc.stdout

    out = tmp_path / "grid.png"
    proc = cli(
        "sample",
        run,
        "--prompt",
        "a red square",
        "--prompt",
        "a photo",
        "--num",
        "3",
        "--steps",
        "2",
        "--out",
        out,
    )
    assert Image.open(out).size == (3 * 33 + 1, 2 * 33 + 1)


def test_quickstart_model_judges_itself(cli, tmp_path):
    run = tmp_path / "q"
    proc = cli(
        "train",
        "examples/quickstart.toml",
        "--output",
        run,
        "--set",
        "train.max_steps=3",
        "--set",
        "train.batch_size=8",
        "--set",
        "evaluate.every_steps=0",
        "--set",
        "checkpoint.every_steps=0",
        "--set",
        "evaluate.judge_per_class=2",
        "--set",
        "evaluate.sample_steps=2",
        "--set",
        "train.log_every=1",
    )
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("judged_accuracy=0.") or lines[-1] == "judged_accuracy=1.00"
    assert "held-out accuracy 0.9" in proc.stdout
    judged = json.loads((run / "judge.json").read_text())
    assert judged["num_images"] == 20 and 0 <= judged["judged_accuracy"] <= 1
    # the report is written last, so that it holds the judged accuracy too
    assert (
        f"<th>judged accuracy</th><td>{judged['judged_accuracy']:.3f}"
        in (run / "report.html").read_text()
    )
    assert Image.open(run / "judge_samples.png").size == (2 * 17 + 1, 10 * 17 + 1)


def test_user_errors_are_one_line(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmax_stepz = 3\n")
    proc = cli("train", bad, "--output", tmp_path / "r", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"sdtune: error: {bad}: unknown key 'train.max_stepz' (did you mean 'train.max_steps'?)"
    )
    assert not (tmp_path / "r").exists()
    proc = cli("--debug", "train", bad, "--output", tmp_path / "r", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = cli(
        "train",
        "examples/quickstart.toml",
        "--output",
        tmp_path / "r",
        "--set",
        "model.base=preset:nope",
        check=False,
    )
    assert proc.returncode == 2 and "unknown preset 'preset:nope'" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_config_show_prints_defaults_with_help(cli):
    proc = cli("config", "show", "examples/quickstart.toml", "--set", "train.max_steps=7")
    assert "max_steps = 7" in proc.stdout
    assert "# Number of optimizer steps to train." in proc.stdout
    assert 'base = "preset:tiny-digits"' in proc.stdout


@pytest.mark.parametrize(
    "task",
    # the LoRA template (the one the README starts from) in the default suite, the others -m slow
    [pytest.param(t, marks=pytest.mark.slow) for t in ("full", "dreambooth")]
    + ["lora", pytest.param("textual-inversion", marks=pytest.mark.slow)],
)
def test_config_init_writes_a_config_that_trains(cli, tmp_path, tiny_image_folder, task):
    out = tmp_path / f"{task}.toml"
    proc = cli("config", "init", task, "--base", "preset:tiny-sd", "--data", tiny_image_folder,
               "--resolution", "32", "--out", out)  # fmt: skip
    assert f"sdtune train {out}" in proc.stdout
    text = out.read_text()
    assert text.startswith("# sdtune config: ") and 'base = "preset:tiny-sd"' in text
    assert all(line.strip() == "" or "#" in line or "=" in line or line.startswith("[")
               for line in text.splitlines())  # fmt: skip
    fast = ["--set", "train.max_steps=1", "--set", "train.batch_size=2", "--set",
            "evaluate.sample_steps=2", "--set", "evaluate.num_per_prompt=1", "--set",
            "dreambooth.num_class_images=2", "--set", "dreambooth.class_sample_steps=2"]  # fmt: skip
    run = tmp_path / "run"
    cli("train", out, "--output", run, *fast)
    assert (run / "model").is_dir()
    again = cli("config", "init", task, "--out", out, check=False)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
