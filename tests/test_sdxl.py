"""The SDXL family against diffusers' own SDXL pipeline: conditioning, time ids, sampling,
the VAE's precision, loading and file layouts."""

import pytest
import torch
from PIL import Image

from sdtune.config import validate_config
from sdtune.data.dataset import ImageTextDataset, collate
from sdtune.data.sources import Record
from sdtune.data.transforms import TransformSpec, transform_with_geometry
from sdtune.errors import ModelError
from sdtune.evaluate.sampling import generate
from sdtune.models.bundle import save_bundle
from sdtune.models.loading import load_folder
from sdtune.models.presets import build_preset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """preset:tiny-sdxl, saved as a diffusers folder, and diffusers' pipeline of that folder."""
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path_factory.mktemp("xl") / "model"
    bundle = build_preset("tiny-sdxl", 0)
    save_bundle(bundle, folder)
    return bundle, folder, StableDiffusionXLPipeline.from_pretrained(folder)


def test_conditioning_is_diffusers_sdxl_conditioning(tiny):
    bundle, _, pipe = tiny
    prompts = ["a photo of a cat", "a red square"]
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=True
    )
    cond = bundle.arch.conditioning(bundle, prompts, "cpu")
    assert cond.hidden.shape == (2, 16, 32 + 64) and cond.pooled.shape == (2, 64)
    assert torch.equal(cond.hidden, embeds) and torch.equal(cond.pooled, pooled)
    # the empty prompt is zeros, as the pipeline guides with no negative prompt
    empty = bundle.arch.conditioning(bundle, ["", "a cat", ""], "cpu")
    assert torch.equal(empty.hidden[0], negative[0]) and not empty.hidden[0].any()
    assert not empty.pooled[2].any() and not negative_pooled.any()
    assert empty.hidden[1].abs().sum() > 0
    ids = pipe._get_add_time_ids(
        (32, 48), (0, 8), (32, 32), dtype=torch.float32, text_encoder_projection_dim=64
    )
    batch = {"geometry": torch.tensor([[32, 48, 0, 8]]), "target_size": (32, 32)}
    timed = bundle.arch.condition(bundle, cond[:1], batch)
    assert torch.equal(timed.extra["time_ids"], ids)


def test_sampling_is_diffusers_sdxl_sampling(tiny):
    """sdtune's sampler loop gives the pipeline's images from the same starting noise."""
    from diffusers import EulerDiscreteScheduler

    from sdtune.data.order import generator

    bundle, _, pipe = tiny
    pipe.scheduler = EulerDiscreteScheduler.from_config(bundle.noise_scheduler.config)
    ours = generate(
        bundle, ["a cat"], seed=3, steps=4, guidance_scale=4.0, sampler="euler", width=48, height=32
    )
    noise = torch.randn(4, 16, 24, generator=generator(3, "sample", 0))[None]
    theirs = pipe(
        "a cat",
        height=32,
        width=48,
        num_inference_steps=4,
        guidance_scale=4.0,
        latents=noise,  # the pipeline scales it by init_noise_sigma
        output_type="pt",
    ).images
    assert ours.shape == (1, 3, 32, 48)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_transforms_record_original_size_and_crop():
    image = Image.new("RGB", (64, 32))  # 2:1, resized to 32 x 16 for resolution 16
    spec = TransformSpec(resolution=16)
    x, geometry = transform_with_geometry(image, spec, None)
    assert x.shape == (3, 16, 16) and geometry.tolist() == [32, 64, 0, 8]
    _, flipped = transform_with_geometry(image, spec, None, flip=True)
    assert flipped.tolist() == [32, 64, 0, 8]  # the centre is the centre either way
    random_crop = TransformSpec(resolution=16, center_crop=False, hflip=1.0)
    rng = torch.Generator().manual_seed(0)
    _, g = transform_with_geometry(image, random_crop, rng)
    rng = torch.Generator().manual_seed(0)
    torch.randint(0, 1, (), generator=rng)  # the top offset (the only one: 0)
    left = int(torch.randint(0, 32 - 16 + 1, (), generator=rng))  # in the unflipped image
    assert g.tolist()[:3] == [32, 64, 0] and g.tolist()[3] == 32 - left - 16


def test_dataset_and_cache_give_the_same_geometry(tmp_path):
    from sdtune.data.cache import build_cache, cached_batch

    folder = tmp_path / "img"
    folder.mkdir()
    records = []
    for i, size in enumerate([(64, 32), (40, 80), (32, 32)]):
        Image.new("RGB", size, (50 * i, 90, 200)).save(folder / f"{i}.png")
        records.append(Record(f"{i}.png", f"image {i}", path=folder / f"{i}.png"))
    spec = TransformSpec(resolution=32, hflip=0.5)
    bundle = build_preset("tiny-sdxl", 0)
    dataset = ImageTextDataset(records, spec, seed=1)
    cache = build_cache(records, spec, bundle, tmp_path / "cache", text=False, say=lambda _: None)
    keys = [(e, i) for e in range(3) for i in range(3)]
    from_data = collate([dataset[k] for k in keys])["geometry"]
    from_cache = cached_batch(cache, dataset, keys, torch.Generator(), "cpu")["geometry"]
    assert torch.equal(from_data, from_cache)
    assert from_data[:3].tolist() == [[32, 64, 0, 16], [80, 40, 16, 0], [32, 32, 0, 0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_vae_leaves_autocast_unless_declared_fp16_safe(dtype):
    bundle = build_preset("tiny-sdxl", 0)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    exact = bundle.encode_images(pixels, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=dtype):
        latents = bundle.encode_images(pixels, torch.Generator().manual_seed(0))
        images = bundle.decode_latents(latents)
    assert latents.dtype == torch.float32 and torch.equal(latents, exact)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    bundle.vae.register_to_config(force_upcast=False)  # an fp16-fix VAE: autocast applies
    with torch.autocast("cpu", dtype=dtype):
        assert bundle.decode_latents(latents).dtype == dtype


def test_each_text_encoder_has_its_own_learning_rate():
    from sdtune.train.optim import param_groups

    bundle = build_preset("tiny-sdxl", 0)
    trainable = {
        f"{c}.{n}": p
        for c in ("unet", "text_encoder", "text_encoder_2")
        for n, p in bundle.modules[c].named_parameters()
    }
    cfg = validate_config(
        {
            "model": {"base": "preset:tiny-sdxl"},
            "train": {"learning_rate": 1e-4, "text_encoder_lr": 3e-5, "text_encoder_2_lr": 1e-5},
        }
    )
    rates = {g["name"]: g["lr"] for g in param_groups(trainable, cfg, bundle.arch)}
    assert rates == {"unet": 1e-4, "text_encoder": 3e-5, "text_encoder_2": 1e-5}
    cfg = validate_config({"train": {"text_encoder_lr": 3e-5}})
    rates = {g["name"]: g["lr"] for g in param_groups(trainable, cfg, bundle.arch)}
    assert rates["text_encoder_2"] == 3e-5


def test_folders_load_as_their_family(tiny, tmp_path):
    bundle, folder, _ = tiny
    loaded = load_folder(folder, str(folder))
    assert loaded.family == "sdxl-custom" and list(loaded.modules) == list(bundle.modules)
    for name, module in bundle.modules.items():
        theirs = loaded.modules[name].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items())
    digits = tmp_path / "digits"
    save_bundle(build_preset("tiny-digits-xl", 0), digits)
    assert load_folder(digits, "x").family == "pixel-xl"
    broken = tmp_path / "broken"
    save_bundle(build_preset("tiny-sdxl", 0), broken)
    import shutil

    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ModelError, match="has no tokenizer_2/ folder"):
        load_folder(broken, "x")


def test_embedding_file_holds_clip_l_and_clip_g(tmp_path):
    from sdtune.models.embeddings import read_embedding_file

    bundle = build_preset("tiny-sdxl", 0)
    vectors = {"text_encoder": torch.randn(2, 32), "text_encoder_2": torch.randn(2, 64)}
    state = bundle.arch.embedding_file(vectors)
    assert set(state) == {"clip_l", "clip_g"}
    from safetensors.torch import save_file

    save_file(state, tmp_path / "e.safetensors")
    back = read_embedding_file(bundle, tmp_path / "e.safetensors")
    assert all(torch.equal(back[k], vectors[k]) for k in vectors)
