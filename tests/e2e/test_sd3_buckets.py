"""SD3 in aspect-ratio buckets (sides a multiple of the VAE's 4 x the patch's 2) through the
real CLI: DreamBooth with class images from SD3's sampler, LoRA with output preservation and a
textual-inversion token; a partial fine-tune killed and resumed bit for bit."""

from pathlib import Path

from tests.e2e.test_resume import _assert_resume_is_exact


def _sd3_bucket_config(tmp_path, extra: str = "") -> Path:
    from tests.e2e.test_buckets_train import _config

    config = _config(tmp_path, base="tiny-sd3")
    text = config.read_text().replace("sample_size = [44, 20]", "sample_size = [48, 24]")
    config.write_text(text + extra)
    return config


def _bucket_sizes(run) -> dict:
    import json

    report = json.loads((run / "data_report.json").read_text())
    return {(b["width"], b["height"]): b["images"] for b in report["buckets"]["buckets"]}


def test_sd3_dreambooth_with_preservation_and_a_token_in_buckets(tmp_path):
    """DreamBooth's class images (sampled by SD3's flow sampler) and the photos of every shape
    in buckets whose sides are multiples of the VAE's 4 x the patch's 2; LoRA on the
    transformer and both CLIP encoders with output preservation, and a textual-inversion
    token in all three encoders, train together."""
    import json

    from tests.e2e.test_resume import _train

    config = _sd3_bucket_config(tmp_path, """
[dreambooth]
instance_prompt = "a photo of <sks> dog"
class_prompt = ["a photo of a dog"]
num_class_images = 4
class_sample_steps = 2
[lora]
enabled = true
rank = 4
text_encoder = true
preserve_prompts = ["a photo of a dog"]
[textual_inversion]
token = "<sks>"
init_word = "dog"
""")  # fmt: skip
    config.write_text(config.read_text().replace("max_steps = 6", "max_steps = 3"))
    proc = _train(config, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = _bucket_sizes(tmp_path / "run")
    assert len(sizes) == 3 and all(w % 8 == 0 and h % 8 == 0 for w, h in sizes)
    assert sizes[(32, 32)] >= 4 + 7  # the class images are in the square bucket
    assert len(list((tmp_path / "run" / "class_images").glob("*.png"))) == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert any(r.get("preserve_loss", 0) > 0 for r in rows)


def test_sd3_partial_fine_tune_in_buckets_resumes_exactly(tmp_path):
    """Full weights of one transformer block only (the rest frozen), in buckets, killed at
    step 3 and resumed bit for bit."""
    import torch

    from sdtune.models.presets import build_preset

    config = _sd3_bucket_config(tmp_path)
    text = config.read_text().replace(
        'base = "preset:tiny-sd3"',
        'base = "preset:tiny-sd3"\ntrainable = ["unet.transformer_blocks.1.*"]',
    )
    config.write_text(text)
    weights, *_ = _assert_resume_is_exact(config, tmp_path, crash="step:3")
    base = build_preset("tiny-sd3", 1).denoiser.state_dict()
    saved = {k.removeprefix("transformer."): v for k, v in weights.items()}
    assert saved.keys() <= base.keys()
    changed = {k for k, v in saved.items() if not torch.equal(v, base[k])}
    assert changed and all(k.startswith("transformer_blocks.1.") for k in changed)
