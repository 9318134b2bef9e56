"""SDXL end to end on preset:tiny-sdxl through the real CLI: LoRA on the UNet and both text
encoders with output preservation and cached latents, killed and resumed bit for bit; every
export loaded by diffusers' SDXL pipeline and accepted back by sdtune; DreamBooth with the
text cache; textual inversion into both encoders."""

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.e2e.conftest import run_cli
from tests.e2e.test_resume import _assert_resume_is_exact

LORA = """
seed = 1
[model]
base = "preset:tiny-sdxl"
[data]
source = "folder"
path = "{images}"
resolution = 32
hflip = 0.5
cache_latents = true
cache_dir = "{cache}"
[train]
max_steps = 6
batch_size = 2
log_every = 1
text_encoder_lr = 5e-4
text_encoder_2_lr = 2e-4
learning_rate = 1e-3
[lora]
enabled = true
rank = 4
text_encoder = true
preserve_prompts = ["a photo of a dog"]
[checkpoint]
every_steps = 2
keep_last = 2
[evaluate]
every_steps = 3
sample_steps = 2
num_per_prompt = 1
val_batches = 1
prompts = ["a photo of a cat"]
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Non-square photos of several sizes (their time ids differ), with captions."""
    folder = tmp_path_factory.mktemp("xl") / "images"
    folder.mkdir()
    for i in range(6):
        size = [(48, 32), (32, 48), (40, 40)][i % 3]
        Image.new("RGB", size, (40 * i, 255 - 40 * i, 128)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of a red square number {i}\n")
    return folder


@pytest.fixture(scope="module")
def lora_run(images, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    config = root / "lora.toml"
    config.write_text(LORA.format(images=images, cache=root / "cache"))
    _assert_resume_is_exact(config, root, crash="step:3")  # root/a straight, root/b resumed
    return root / "a"


def _pipeline(folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder)


def _unet_out(pipe, prompt="a photo of a cat"):
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]])
    added = {"text_embeds": pooled, "time_ids": ids}
    with torch.no_grad():
        return pipe.unet(x, 500, encoder_hidden_states=embeds, added_cond_kwargs=added).sample


@pytest.mark.slow  # over 40 s: run with -m slow
def test_lora_exports_load_in_diffusers_and_back_in_sdtune(lora_run, tmp_path):
    from sdtune.models.bundle import save_bundle
    from sdtune.models.presets import build_preset

    out = {"base": tmp_path / "base"}
    save_bundle(build_preset("tiny-sdxl", 1), out["base"])  # the run's base (seed 1)
    for fmt, name in [
        ("diffusers", "full"),
        ("merged", "merged"),
        ("lora", "lora.safetensors"),
        ("kohya", "kohya.safetensors"),
    ]:
        out[fmt] = tmp_path / name
        run_cli("export", lora_run, "--format", fmt, "--out", out[fmt], "--weights", "raw")
    with safe_open(str(out["kohya"]), framework="pt") as fh:
        prefixes = {k.split("_", 2)[1] for k in fh.keys() if k.startswith("lora_")}
        assert {"unet", "te1", "te2"} <= prefixes
        assert fh.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    merged = _unet_out(_pipeline(out["merged"]))
    assert torch.equal(merged, _unet_out(_pipeline(out["diffusers"])))  # both bake it in
    assert not torch.allclose(merged, _unet_out(_pipeline(out["base"])), atol=1e-5)
    for fmt in ("lora", "kohya"):  # either LoRA file on the base gives the merged model
        pipe = _pipeline(out["base"])
        pipe.load_lora_weights(str(out[fmt]))
        assert torch.allclose(_unet_out(pipe), merged, atol=1e-4), fmt
    # accepted back: the merged folder as a model, the base with the kohya file, wide images
    grid = tmp_path / "grid.png"
    run_cli(
        "sample",
        out["merged"],
        "--prompt",
        "a cat",
        "--num",
        "1",
        "--steps",
        "2",
        "--width",
        "48",
        "--height",
        "32",
        "--out",
        grid,
    )
    assert Image.open(grid).size == (48, 32)
    run_cli(
        "sample",
        out["diffusers"],
        "--prompt",
        "a cat",
        "--lora",
        out["kohya"],
        "--num",
        "1",
        "--steps",
        "2",
        "--out",
        grid,
        "--overwrite",
    )
    # the single file in the original SDXL layout: diffusers reads back every weight exactly
    from diffusers import StableDiffusionXLPipeline

    single = tmp_path / "xl.safetensors"
    run_cli("export", lora_run, "--format", "single-file", "--out", single, "--weights", "raw")
    with safe_open(str(single), framework="pt") as fh:
        names = set(fh.keys())
    assert "conditioner.embedders.1.model.text_projection" in names
    assert "model.diffusion_model.label_emb.0.0.weight" in names
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in names)
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(single), config=str(out["merged"]), local_files_only=True
    )
    folder = _pipeline(out["merged"])
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        theirs, ours = getattr(pipe, name).state_dict(), getattr(folder, name).state_dict()
        assert all(torch.equal(theirs[k], v) for k, v in ours.items()), name
    run_cli(
        "sample",
        single,
        "--prompt",
        "a cat",
        "--num",
        "1",
        "--steps",
        "2",
        "--out",
        grid,
        "--overwrite",
    )  # its base's configs come from the file's own metadata


def test_dreambooth_with_cached_text_then_textual_inversion_on_its_model(images, tmp_path):
    config = tmp_path / "db.toml"
    config.write_text(f"""
seed = 2
[model]
base = "preset:tiny-sdxl"
trainable = ["unet.*"]
[data]
source = "folder"
path = "{images}"
resolution = 32
cache_latents = true
cache_text = true
cache_dir = "{tmp_path / "cache"}"
[train]
max_steps = 3
batch_size = 2
[dreambooth]
instance_prompt = "a photo of sks square"
class_prompt = ["a photo of a square"]
num_class_images = 4
class_sample_steps = 2
[evaluate]
every_steps = 0
sample_steps = 2
num_per_prompt = 1
val_batches = 1
""")
    proc = run_cli("train", config, "--output", tmp_path / "db")
    assert "text: 3 to encode" in proc.stdout  # instance, class prompt and ""
    ti = tmp_path / "ti.toml"
    ti.write_text(f"""
seed = 3
[model]
base = "{tmp_path / "db" / "model"}"
[data]
source = "folder"
path = "{images}"
resolution = 32
[train]
max_steps = 2
batch_size = 2
learning_rate = 1e-2
[textual_inversion]
token = "<sq>"
init_word = "square"
num_vectors = 2
[evaluate]
every_steps = 0
sample_steps = 2
num_per_prompt = 1
val_batches = 0
""")
    run_cli("train", ti, "--output", tmp_path / "ti")
    emb = tmp_path / "sq.safetensors"
    run_cli("export", tmp_path / "ti", "--format", "embedding", "--out", emb)
    with safe_open(str(emb), framework="pt") as fh:
        shapes = {k: tuple(fh.get_tensor(k).shape) for k in fh.keys()}
    assert shapes == {"clip_l": (2, 32), "clip_g": (2, 64)}
    run_cli(
        "sample",
        tmp_path / "db" / "model",
        "--prompt",
        "a photo of <sq>",
        "--embedding",
        f"{emb}:<sq>",
        "--num",
        "1",
        "--steps",
        "2",
        "--out",
        tmp_path / "s.png",
    )
