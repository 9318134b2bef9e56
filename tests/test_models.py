import json

import pytest
import torch

from sdtune.config import load_config
from sdtune.errors import ConfigError, ModelError
from sdtune.models import apply_freezing, load_model, save_bundle
from sdtune.models.families import detect_family
from sdtune.models.tokenizer import build_tiny_tokenizer


def _load(base, *sets):
    cfg = load_config(None, [f"model.base={base}", *sets])
    return load_model(cfg.model, cfg.diffusion, cfg.seed)


def test_tiny_tokenizer_is_local_and_round_trips():
    tok = build_tiny_tokenizer(16)
    ids = tok(["a handwritten digit seven"], padding="max_length", max_length=16).input_ids[0]
    assert ids[0] == tok.bos_token_id and len(ids) == 16
    assert tok.decode(ids, skip_special_tokens=True) == "a handwritten digit seven"
    other = tok(["a handwritten digit nine"]).input_ids[0]
    assert other != tok(["a handwritten digit seven"]).input_ids[0]


def test_presets_are_seeded():
    a, b = _load("preset:tiny-sd"), _load("preset:tiny-sd")
    c = _load("preset:tiny-sd", "seed=1")
    pa, pb, pc = (next(m.unet.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.vae is not None and a.downsample_factor == 2
    digits = _load("preset:tiny-digits")
    assert digits.vae is None and digits.family == "pixel" and digits.image_channels == 1


def test_unknown_preset_and_bad_bases(tmp_path):
    with pytest.raises(ModelError, match="unknown preset 'preset:huge'"):
        _load("preset:huge")
    with pytest.raises(ModelError, match="is not a preset:NAME, an existing folder"):
        _load(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ModelError, match="not a diffusers pipeline folder"):
        _load(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .safetensors or .ckpt"):
        _load(str(tmp_path / "weights.bin"))


def test_uncached_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match="is not in the local Hugging Face cache"):
        _load("someone/some-model")


def test_diffusers_folder_round_trip(tmp_path):
    bundle = _load("preset:tiny-sd")
    save_bundle(bundle, tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    again = _load(str(tmp_path / "pipe"))
    for (na, pa), (nb, pb) in zip(
        bundle.unet.state_dict().items(), again.unet.state_dict().items()
    ):
        assert na == nb and torch.equal(pa, pb)
    assert again.tokenize(["a dog"]).tolist() == bundle.tokenize(["a dog"]).tolist()
    # the folder loads in diffusers as a pipeline too
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
    assert pipe.unet.config.cross_attention_dim == 32


def test_cached_hub_id_resolves_offline(tmp_path, monkeypatch):
    bundle = _load("preset:tiny-sd")
    hub = tmp_path / "hub"
    repo = hub / "models--someone--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_bundle(bundle, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    loaded = _load("someone/tiny")
    assert loaded.source == "someone/tiny"
    assert torch.equal(next(loaded.unet.parameters()), next(bundle.unet.parameters()))


def test_diffusion_overrides():
    b = _load("preset:tiny-sd", "diffusion.prediction_type=v_prediction")
    assert b.prediction_type == "v_prediction"
    b = _load("preset:tiny-sd", "diffusion.noise_schedule=linear")
    assert b.noise_scheduler.config.beta_schedule == "linear"
    b = _load("preset:tiny-sd", "model.dropout=0.2")
    assert b.unet.config.dropout == 0.2
    drops = [m.p for m in b.unet.modules() if isinstance(m, torch.nn.Dropout)]
    assert 0.2 in drops


def test_family_detection():
    sd = {
        "in_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 768,
    }
    assert detect_family(sd, False, True) == "sd1"
    assert detect_family({**sd, "cross_attention_dim": 1024}, False, True) == "sd2"
    assert detect_family({**sd, "addition_embed_type": "text_time"}, False, True) == "sdxl"
    assert detect_family(sd, False, False) == "pixel"
    assert detect_family({**sd, "cross_attention_dim": 32}, False, True) == "custom"


def test_freezing_by_pattern():
    bundle = _load("preset:tiny-sd")
    report = apply_freezing(
        bundle, ["unet.*attn*", "re:text_encoder\\..*layers\\.1\\..*"], ["*.to_out.*"]
    )
    names = {n for n, p in bundle.unet.named_parameters() if p.requires_grad}
    assert names and all("attn" in n and ".to_out." not in n for n in names)
    te = {n for n, p in bundle.text_encoder.named_parameters() if p.requires_grad}
    assert te and all(".layers.1." in n for n in te)
    assert not any(p.requires_grad for p in bundle.vae.parameters())
    total = sum(p.numel() for m in bundle.components().values() for p in m.parameters())
    assert report.trainable + report.frozen == total
    assert report.trainable == sum(
        p.numel() for m in bundle.components().values() for p in m.parameters() if p.requires_grad
    )
    assert "total" in report.table()


def test_freezing_errors():
    bundle = _load("preset:tiny-sd")
    with pytest.raises(ConfigError, match="pattern 'unet.nothing.*' matches no parameter"):
        apply_freezing(bundle, ["unet.nothing.*"], [])
    with pytest.raises(ConfigError, match="the VAE stays frozen"):
        apply_freezing(bundle, ["vae.*"], [])
    from sdtune.config import load_config
    from sdtune.models.adapt import prepare_model

    cfg = load_config(None, ["model.trainable=[unet.*]", "model.frozen=[unet.*]"])
    with pytest.raises(ConfigError, match="no parameter is trainable"):
        prepare_model(bundle, cfg)
    with pytest.raises(ConfigError, match="bad regular expression"):
        apply_freezing(bundle, ["re:("], [])


def test_single_file_checkpoint_loads_exactly(tmp_path):
    from safetensors.torch import save_file

    from sdtune.checkpoint.convert import bundle_to_single_file

    bundle = _load("preset:tiny-sd")
    save_bundle(bundle, tmp_path / "config")
    save_file(bundle_to_single_file(bundle), str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match="needs its component configs: set model.config_source"):
        _load(str(tmp_path / "model.safetensors"))
    loaded = _load(
        str(tmp_path / "model.safetensors"), f"model.config_source={tmp_path / 'config'}"
    )
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(bundle, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(ours) == set(theirs)
        for key in ours:
            assert torch.equal(ours[key], theirs[key].reshape(ours[key].shape)), key
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="cannot load single-file checkpoint"):
        _load(str(tmp_path / "broken.safetensors"), f"model.config_source={tmp_path / 'config'}")


def test_single_file_layout_of_a_full_sd15_shaped_model(tmp_path):
    """The LDM key map on SD 1.5's block layout (4 levels, 2 layers per block), small channels."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    from sdtune.checkpoint.convert import bundle_to_single_file
    from sdtune.models.families.sd import CUSTOM

    base = _load("preset:tiny-sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    bundle = CUSTOM.bundle(
        unet, base.text_encoder, base.tokenizer, base.noise_scheduler, vae, "test"
    )
    save_bundle(bundle, tmp_path / "config")
    state = bundle_to_single_file(bundle)
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in state  # SD 1.5's first downsampler
    assert (
        "model.diffusion_model.output_blocks.2.1.conv.weight" in state
    )  # first upsampler, no attention
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in state
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in state
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    save_file(state, str(tmp_path / "m.safetensors"))
    pipe = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "m.safetensors"),
        config=str(tmp_path / "config"),
        local_files_only=True,
        safety_checker=None,
    )
    for name in ("unet", "vae"):
        ours, theirs = getattr(bundle, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k].reshape(ours[k].shape)) for k in ours)
