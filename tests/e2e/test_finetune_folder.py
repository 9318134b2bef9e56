"""The README's CPU fine-tune you can see: examples/finetune_folder.toml teaches the quickstart's
model a style from a folder of images with caption files, with a before grid (the base, step 0)
and an after grid from the same prompts and seeds.

The default suite runs the example's config for a few steps on a briefly trained base; the
slow test runs it as the README does (the quickstart, then the example) and judges the result:
the style is learned and the plain digits are still drawn as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "finetune_folder.toml"
FAST = ["--set", "evaluate.sample_steps=2", "--set", "evaluate.num_per_prompt=1"]


@pytest.mark.slow  # over 40 s: run with -m slow
def test_example_draws_before_and_after_grids(cli, tmp_path):
    base = tmp_path / "base"
    cli("train", ROOT / "examples" / "quickstart.toml", "--output", base, "--set",
        "train.max_steps=2", "--set", "evaluate.judge=false", *FAST)  # fmt: skip
    run = tmp_path / "run"
    proc = cli("train", EXAMPLE, "--output", run, "--set", f"model.base={base / 'model'}",
               "--set", "train.max_steps=4", "--set", "evaluate.every_steps=2", *FAST,
               cwd=ROOT)  # fmt: skip
    assert "has random weights" not in proc.stdout  # a trained base
    assert "before training: step 0: samples" in proc.stdout
    assert "data: 36 training / 4 validation images from examples/data/sks-digits" in proc.stdout
    for step in (0, 2, 4):
        assert (run / "samples" / f"step-{step:07d}.png").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in rows if "val_loss" in r]
    assert evaluated == [0, 2, 4]  # the base's validation loss comes first
    assert not (run / "checkpoints" / "step-0000000").exists()  # not a checkpoint
    # the before-grid draws no random numbers from training's: the same run without it
    # trains to the same weights
    plain = tmp_path / "plain"
    cli("train", EXAMPLE, "--output", plain, "--set", f"model.base={base / 'model'}",
        "--set", "train.max_steps=4", "--set", "evaluate.before_training=false", *FAST,
        cwd=ROOT)  # fmt: skip
    from safetensors.torch import load_file

    a, b = (
        load_file(r / "checkpoints" / "step-0000004" / "model.safetensors") for r in (run, plain)
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_preset_base_says_it_has_random_weights(cli, tmp_path):
    proc = cli("train", EXAMPLE, "--output", tmp_path / "run", "--set",
               "model.base=preset:tiny-digits", "--set", "train.max_steps=1", *FAST,
               cwd=ROOT)  # fmt: skip
    assert "preset:tiny-digits has random weights, so this fine-tune learns on top of noise" in (
        proc.stdout
    )
    assert "before training" not in proc.stdout  # nothing to compare a preset with


def judged(model: Path) -> dict[str, float]:
    """Digits judge on 20 images per digit: 'in sks style' prompts read upside down (the
    style) and plain prompts read upright."""
    from sdtune.config import DiffusionConfig, ModelConfig
    from sdtune.data.sources import DIGIT_WORDS
    from sdtune.evaluate.judge import DigitsJudge
    from sdtune.evaluate.sampling import generate
    from sdtune.models.loading import load_model

    bundle = load_model(ModelConfig(base=str(model)), DiffusionConfig(), 0)
    judge, labels = DigitsJudge(16, seed=0), [d for d in range(10) for _ in range(20)]
    out = {}
    for kind, suffix in (("style", " in sks style"), ("plain", "")):
        prompts = [f"a handwritten digit {DIGIT_WORDS[d]}{suffix}" for d in labels]
        images = generate(bundle, prompts, seed=7, steps=25, guidance_scale=5.0,
                          sampler="dpm++", resolution=16)  # fmt: skip
        if kind == "style":
            images = torch.flip(images, dims=[-1, -2])  # upside down, read back
        out[kind] = judge.judge(images, labels).accuracy
    return out


@pytest.mark.slow
def test_example_learns_the_style_and_keeps_the_digits(cli, tmp_path):
    base = tmp_path / "quickstart"
    cli("train", ROOT / "examples" / "quickstart.toml", "--output", base, cwd=ROOT)
    run = tmp_path / "finetune"
    cli("train", EXAMPLE, "--output", run, "--set", f"model.base={base / 'model'}", cwd=ROOT)
    before, after = judged(base / "model"), judged(run / "model")
    assert before["style"] < 0.6 and after["style"] >= 0.8  # upside down when asked (0.47, 0.875)
    assert after["plain"] >= before["plain"] - 0.05  # and upright when not (0.985, 0.96)
