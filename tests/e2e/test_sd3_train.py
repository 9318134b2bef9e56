"""SD3 end to end through the family seam: the pixel-space digits model trained with flow
matching from scratch and killed then resumed bit for bit; a LoRA on tiny-sd3 from the latent
and text caches, exported and loaded by diffusers' StableDiffusion3Pipeline."""

import pytest
import torch

from tests.e2e.conftest import run_cli
from tests.e2e.test_resume import _assert_resume_is_exact

DIGITS = """
seed = 2
[model]
base = "preset:tiny-digits-sd3"
[data]
source = "digits"
resolution = 16
limit = 64
[diffusion]
flow_weighting = "cosmap"
[train]
max_steps = 6
batch_size = 8
learning_rate = 0.001
ema = true
log_every = 1
[checkpoint]
every_steps = 2
[evaluate]
every_steps = 3
sample_steps = 2
num_per_prompt = 1
val_batches = 1
"""

LORA = """
seed = 3
[model]
base = "preset:tiny-sd3"
[data]
path = "{images}"
val_fraction = 0.34
resolution = 32
cache_latents = true
cache_text = true
cache_dir = "{cache}"
[lora]
enabled = true
rank = 4
[train]
max_steps = 4
batch_size = 2
learning_rate = 0.001
log_every = 1
[checkpoint]
every_steps = 2
[evaluate]
sample_steps = 2
num_per_prompt = 1
val_batches = 1
"""


def test_digits_sd3_trains_with_flow_matching_and_resumes_exactly(tmp_path):
    config = tmp_path / "cfg.toml"
    config.write_text(DIGITS)
    weights, _, _, rows = _assert_resume_is_exact(config, tmp_path, crash="step:3")
    assert any(k.startswith("transformer.") for k in weights)
    val = [r for r in rows if "val_loss" in r]
    assert val and all(torch.isfinite(torch.tensor(r["val_loss"])) for r in val)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_image_folder_module):
    root = tmp_path_factory.mktemp("sd3-lora")
    config = root / "cfg.toml"
    config.write_text(LORA.format(images=tiny_image_folder_module, cache=root / "cache"))
    proc = run_cli("train", config, "--output", root / "run")
    assert "text: " in proc.stdout and "to encode" in proc.stdout  # all three encoders cached
    return root


def test_lora_export_loads_in_diffusers_sd3_pipeline(lora_run, tmp_path):
    """The exported LoRA on the base, in diffusers' pipeline, is the model sdtune exports with
    the LoRA baked in (also loaded by the pipeline); the run samples."""
    from diffusers import StableDiffusion3Pipeline

    from sdtune.models import save_bundle
    from sdtune.models.presets import build_preset

    lora, merged = tmp_path / "lora.safetensors", tmp_path / "merged"
    for fmt, out in (("lora", lora), ("diffusers", merged)):
        run_cli("export", lora_run / "run", "--format", fmt, "--out", out, "--weights", "raw")
    save_bundle(build_preset("tiny-sd3", 3), tmp_path / "base")  # the run's base (seed 3)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def output(folder, lora_file=None):
        pipe = StableDiffusion3Pipeline.from_pretrained(folder)
        if lora_file is not None:
            pipe.load_lora_weights(str(lora_file))
        embeds, _, pooled, _ = pipe.encode_prompt(
            "a red square", None, None, do_classifier_free_guidance=False, max_sequence_length=16
        )
        with torch.no_grad():
            return pipe.transformer(
                hidden_states=x,
                timestep=torch.tensor([500.0]),
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
            ).sample

    baked = output(merged)
    assert torch.allclose(output(tmp_path / "base", lora), baked, atol=1e-4)
    assert not torch.allclose(output(tmp_path / "base"), baked, atol=1e-5)  # it learned
    run_cli("sample", lora_run / "run", "--prompt", "a red square", "--out", tmp_path / "g.png",
            "--steps", "2")  # fmt: skip
    assert (tmp_path / "g.png").is_file()


@pytest.mark.slow  # about 100 s: the whole quickstart
def test_quickstart_sd3_is_judged_at_least_0_9(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "quickstart_sd3.toml"
    proc = run_cli("train", example, "--output", tmp_path / "run")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("judged_accuracy="))
    assert float(line.split("=")[1]) >= 0.90, proc.stdout[-2000:]


@pytest.mark.slow  # about 50 s; tests/test_sd3.py checks the loading, conditioning and saving
def test_a_run_without_t5_trains_exports_and_samples_without_it(tmp_path, tiny_image_folder):
    """model.text_encoder_3 = false end to end: the run says what it saves, its LoRA and its
    merged export are models without T5 (diffusers loads them with text_encoder_3=None and
    predicts the same), and the run's adapter folder samples without loading T5."""
    import json

    from diffusers import StableDiffusion3Pipeline

    config = tmp_path / "cfg.toml"
    text = LORA.format(images=tiny_image_folder, cache=tmp_path / "cache")
    config.write_text(text.replace("[model]\n", "[model]\ntext_encoder_3 = false\n"))
    proc = run_cli("train", config, "--output", tmp_path / "run")
    assert "no T5 (its states zeros: 0.1M weights not loaded" in proc.stdout
    info = json.loads((tmp_path / "run" / "model" / "sdtune_model.json").read_text())
    assert info["left_out"] == ["text_encoder_3"]
    merged, single = tmp_path / "merged", tmp_path / "merged.safetensors"
    run_cli("export", tmp_path / "run", "--format", "diffusers", "--out", merged)
    run_cli("export", tmp_path / "run", "--format", "single-file", "--out", single)
    assert not (merged / "text_encoder_3").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(merged, text_encoder_3=None)
    embeds, _, pooled, _ = pipe.encode_prompt(
        "a red square", None, None, do_classifier_free_guidance=False, max_sequence_length=16
    )
    assert embeds[:, 16:].abs().sum() == 0  # T5's place: zeros
    proc = run_cli("sample", tmp_path / "run", "--prompt", "a red square", "--out",
                   tmp_path / "g.png", "--steps", "2")  # fmt: skip
    assert (tmp_path / "g.png").is_file()
    proc = run_cli("sample", single, "--prompt", "a red square", "--out", tmp_path / "s.png",
                   "--steps", "2")  # fmt: skip
    assert (tmp_path / "s.png").is_file()
