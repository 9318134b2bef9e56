"""The SD3 family against diffusers' own StableDiffusion3Pipeline: conditioning, sampling,
latents' shift, loading, LoRA targets and the flow-matching objective's settings."""

import pytest
import torch

from sdtune.config import validate_config
from sdtune.errors import ConfigError, ModelError
from sdtune.evaluate.sampling import generate
from sdtune.models.bundle import save_bundle
from sdtune.models.loading import load_folder
from sdtune.models.presets import build_preset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """preset:tiny-sd3, saved as a diffusers folder, and diffusers' pipeline of that folder."""
    from diffusers import StableDiffusion3Pipeline

    folder = tmp_path_factory.mktemp("sd3") / "model"
    bundle = build_preset("tiny-sd3", 0)
    save_bundle(bundle, folder)
    return bundle, folder, StableDiffusion3Pipeline.from_pretrained(folder)


def test_conditioning_is_diffusers_sd3_conditioning(tiny):
    bundle, _, pipe = tiny
    prompts = ["a photo of a cat", "a red square"]
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=True, max_sequence_length=16
    )
    cond = bundle.arch.conditioning(bundle, prompts, "cpu")
    # CLIP-L 32 + CLIP-G 64 wide, padded to T5's 64, then T5's 16 tokens after CLIP's 16
    assert cond.hidden.shape == (2, 16 + 16, 64) and cond.pooled.shape == (2, 32 + 64)
    torch.testing.assert_close(cond.hidden, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    empty = bundle.arch.conditioning(bundle, ["", ""], "cpu")  # encoded, not zeros
    torch.testing.assert_close(empty.hidden, negative)
    torch.testing.assert_close(empty.pooled, negative_pooled)
    assert empty.pooled.abs().sum() > 0


def test_sampling_is_diffusers_sd3_sampling(tiny):
    """sdtune's sampler loop gives the pipeline's images from the same starting noise (the
    flow-matching Euler scheduler at shift 3, the VAE's shift and scale undone)."""
    from sdtune.data.order import generator

    bundle, _, pipe = tiny
    ours = generate(bundle, ["a cat"], seed=3, steps=4, guidance_scale=4.0, width=48, height=32)
    noise = torch.randn(16, 8, 12, generator=generator(3, "sample", 0))[None]
    theirs = pipe(
        "a cat",
        height=32,
        width=48,
        num_inference_steps=4,
        guidance_scale=4.0,
        latents=noise,
        max_sequence_length=16,
        output_type="pt",
    ).images
    assert ours.shape == (1, 3, 32, 48)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    from sdtune.errors import UserError

    with pytest.raises(UserError, match="at most 64 px a side"):  # 8 latents of 4 px, x2
        generate(bundle, ["a cat"], seed=3, steps=1, width=96, height=32)


def test_latents_carry_the_vae_shift_and_round_trip(tiny):
    bundle = tiny[0]
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    latents = bundle.encode_images(pixels, gen)
    dist = bundle.vae.encode(pixels).latent_dist
    expected = (dist.sample(torch.Generator().manual_seed(0)) - 0.0609) * 1.5305
    torch.testing.assert_close(latents, expected)
    decoded = bundle.decode_latents(latents)
    torch.testing.assert_close(decoded, bundle.vae.decode(latents / 1.5305 + 0.0609).sample)
    assert bundle.arch.resolution_multiple(bundle) == 8  # 4 px a latent, 2-latent patches


def test_folders_load_as_their_family(tiny, tmp_path):
    bundle, folder, _ = tiny
    loaded = load_folder(folder, str(folder))
    assert loaded.family == "sd3-custom" and loaded.denoiser.config.qk_norm == "rms_norm"
    for name, module in bundle.components().items():
        theirs = dict(loaded.modules[name].state_dict())
        assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items()), name
    ids = bundle.tokenize(["a photo of a dog"])
    assert torch.equal(loaded.tokenize(["a photo of a dog"]), ids) and ids.shape == (1, 48)
    pixel = build_preset("tiny-digits-sd3", 0)
    save_bundle(pixel, tmp_path / "pixel")
    assert load_folder(tmp_path / "pixel", "p").family == "pixel-sd3"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "transformer").mkdir()
    (tmp_path / "broken" / "transformer" / "config.json").write_text(
        '{"_class_name": "SD3Transformer2DModel"}'
    )
    with pytest.raises(ModelError, match="has no text_encoder/"):
        load_folder(tmp_path / "broken", "b")


def test_lora_adapts_the_transformer_and_the_clip_encoders_not_t5():
    from sdtune.config import LoraConfig
    from sdtune.models.lora import add_lora, has_lora

    bundle = build_preset("tiny-sd3", 0)
    add_lora(bundle, LoraConfig(enabled=True, rank=2, text_encoder=True))
    assert has_lora(bundle.denoiser)
    assert has_lora(bundle.modules["text_encoder"]) and has_lora(bundle.modules["text_encoder_2"])
    assert not has_lora(bundle.modules["text_encoder_3"])
    names = [n for n, p in bundle.denoiser.named_parameters() if p.requires_grad]
    assert any("add_q_proj.lora_A" in n for n in names)  # the text stream's attention too
    assert any("ff_context.net.2.lora_B" in n for n in names)


def test_flow_settings_reach_the_objective_and_ddpm_ones_are_refused():
    bundle = build_preset("tiny-sd3", 0)
    arch = bundle.arch
    cfg = validate_config(
        {"diffusion": {"flow_weighting": "cosmap", "flow_sampling": "mode", "flow_shift": 2.0}}
    )
    arch.apply_diffusion_settings(bundle, cfg.diffusion)
    objective = arch.objective(bundle, cfg.diffusion, "cpu")
    assert (objective.weighting, objective.sampling, objective.shift) == ("cosmap", "mode", 2.0)
    assert bundle.noise_scheduler.config.shift == 2.0  # samples at the shift it trains with
    assert arch.objective(bundle, validate_config({}).diffusion, "cpu").shift == 2.0
    for key, value in [("min_snr_gamma", 5.0), ("prediction_type", "v_prediction")]:
        with pytest.raises(ConfigError, match=f"diffusion.{key}: .* flow matching"):
            arch.objective(bundle, validate_config({"diffusion": {key: value}}).diffusion, "cpu")


def test_an_embedding_file_holds_a_vector_set_per_encoder(tmp_path):
    from sdtune.models.embeddings import add_tokens

    bundle = build_preset("tiny-sd3", 0)
    widths = {n: e.get_input_embeddings().weight.shape[1] for n, e in bundle.text_encoders.items()}
    vectors = {n: torch.randn(2, w) for n, w in widths.items()}
    add_tokens(bundle, "<sks>", vectors)
    assert bundle.tokenize(["a <sks> cat"]).shape == (1, 48)
    state = bundle.arch.embedding_file(vectors)
    assert sorted(state) == ["clip_g", "clip_l", "t5"]
    back = bundle.arch.read_embedding(state, tmp_path / "e.safetensors")
    assert all(torch.equal(back[n], vectors[n]) for n in vectors)


def test_t5_left_out_is_not_loaded_and_conditions_as_diffusers_without_it(tiny, tmp_path):
    """model.text_encoder_3 = false: T5 is not read from the folder, its states are zeros as
    StableDiffusion3Pipeline(text_encoder_3=None) gives, the saving is said, and the model
    saves and loads back as a pipeline without T5."""
    import json

    from diffusers import StableDiffusion3Pipeline

    from sdtune.config import DiffusionConfig, ModelConfig
    from sdtune.models.loading import describe, load_model

    bundle, folder, _ = tiny
    t5_weights = sum(p.numel() for p in bundle.modules["text_encoder_3"].parameters())
    no_t5 = load_model(ModelConfig(base=str(folder), text_encoder_3=False), DiffusionConfig(), 0)
    assert "text_encoder_3" not in no_t5.modules and list(no_t5.text_encoders) == [
        "text_encoder",
        "text_encoder_2",
    ]
    assert no_t5.left_out == {"text_encoder_3": t5_weights}  # counted from its config
    assert f"no T5 (its states zeros: {t5_weights / 1e6:,.1f}M weights not loaded" in describe(
        no_t5
    )
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None)
    prompts = ["a photo of a cat", "a red square"]
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=16
    )
    cond = no_t5.arch.conditioning(no_t5, prompts, "cpu")
    torch.testing.assert_close(cond.hidden, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    assert cond.hidden[:, 16:].abs().sum() == 0  # T5's part
    # saved without T5: a pipeline folder diffusers loads with text_encoder_3 = None
    out = tmp_path / "no-t5"
    save_bundle(no_t5, out)
    assert not (out / "text_encoder_3").exists() and (out / "tokenizer_3").is_dir()
    assert json.loads((out / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    assert json.loads((out / "sdtune_model.json").read_text())["left_out"] == ["text_encoder_3"]
    # diffusers asks for it by name (text_encoder_3 is not one of its optional components)
    assert StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None).transformer
    again = load_folder(out, str(out))  # loads as a model without T5, unasked
    assert "text_encoder_3" not in again.modules and again.left_out == {"text_encoder_3": 0}
    torch.testing.assert_close(again.arch.conditioning(again, prompts, "cpu").hidden, embeds)
    # a preset leaves it out too, and only SD3 has a T5 to leave out
    preset = load_model(
        ModelConfig(base="preset:tiny-sd3", text_encoder_3=False), DiffusionConfig(), 0
    )
    assert preset.left_out == {"text_encoder_3": t5_weights}
    with pytest.raises(
        ConfigError, match=r"model.text_encoder_3 = false: preset:tiny-sd .*only SD 3"
    ):
        load_model(ModelConfig(base="preset:tiny-sd", text_encoder_3=False), DiffusionConfig(), 0)
