"""Aspect-ratio buckets end to end on a folder of square, wide and tall images: the table at
start and in data_report.json, every batch of one size, and a run killed midway and resumed
bit for bit with one process and with two; the latent cache and SDXL's size conditioning."""

import json

import pytest
from PIL import Image

from tests.e2e.test_distributed import _launch
from tests.e2e.test_resume import _assert_identical, _assert_resume_is_exact, _final_state, _train

CONFIG = """
seed = 1
[model]
base = "preset:{base}"
[data]
path = "{folder}"
resolution = 32
val_fraction = 0.125
hflip = 0.5
[train]
max_steps = 6
batch_size = 2
log_every = 1
[checkpoint]
every_steps = 2
keep_last = 2
[evaluate]
every_steps = 3
sample_steps = 2
num_per_prompt = 1
val_batches = 2
sample_size = [44, 20]
"""


def _photos(folder):
    """24 images of three shapes (and, so that they differ, three colours each)."""
    folder.mkdir()
    shapes = [(40, 40), (80, 40), (36, 72)]
    for i in range(24):
        w, h = shapes[i % 3]
        image = Image.new("RGB", (w, h), (30 * (i % 8), 200 - 20 * (i % 8), 90))
        image.paste((255, 255, 255), (w // 4, h // 4, w // 2, h // 2))
        image.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a {['square', 'wide', 'tall'][i % 3]} photo {i}\n")
    return folder


def _config(tmp_path, base="tiny-sd", data_extra=""):
    path = tmp_path / "cfg.toml"
    folder = _photos(tmp_path / "photos")
    text = CONFIG.format(base=base, folder=folder)
    path.write_text(text.replace("hflip = 0.5\n", "hflip = 0.5\n" + data_extra))
    return path


def test_buckets_resume_bit_for_bit_and_say_their_table(tmp_path):
    config = _config(tmp_path)
    _assert_resume_is_exact(config, tmp_path, crash="step:3")
    report = json.loads((tmp_path / "a" / "data_report.json").read_text())
    sizes = {(b["width"], b["height"]): b["images"] for b in report["buckets"]["buckets"]}
    assert set(sizes) == {(32, 32), (44, 20), (20, 44)} and sum(sizes.values()) == 21
    grid = Image.open(tmp_path / "a" / "samples" / "step-0000006.png")
    assert grid.size == (44 + 2, 4 * (20 + 1) + 1)  # evaluate.sample_size: 4 wide samples


@pytest.mark.slow  # over 40 s: run with -m slow
def test_buckets_with_two_processes_resume_bit_for_bit(tmp_path):
    config = _config(tmp_path)
    straight = _launch(config, tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "every global batch of 4 holds one size" in straight.stdout
    killed = _launch(config, tmp_path / "b", crash="step:3")
    assert killed.returncode != 0
    resumed = _launch(config, tmp_path / "b", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_identical(_final_state(tmp_path / "a"), _final_state(tmp_path / "b"))


def test_buckets_with_the_latent_cache_and_sdxl(tmp_path):
    """SDXL is told each bucket's real size and crop (its time ids come from the batch), and
    the cache keeps one entry per image at its bucket's size, flipped and not."""
    cache = tmp_path / "cache"
    config = _config(tmp_path, "tiny-sdxl", f'cache_latents = true\ncache_dir = "{cache}"\n')
    proc = _train(config, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cache: latents: 42 to encode" in proc.stdout
    from safetensors import safe_open

    shapes = set()
    for shard in (cache / "latents").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as fh:
            shapes |= {tuple(fh.get_slice(k).get_shape()) for k in fh.keys() if "/" not in k}
    assert {s[1:] for s in shapes} == {(16, 16), (10, 22), (22, 10)}  # latents /2


def test_masked_training_in_buckets_cached_and_not(tmp_path):
    """data.masks: the loss of masked images is their masked part's; the latent cache's path
    builds the same masks as the image path, so both runs see the same first-step loss."""
    losses = {}
    for cached in (False, True):
        root = tmp_path / ("cached" if cached else "plain")
        root.mkdir()
        extra = f'masks = true\ncache_latents = {str(cached).lower()}\ncache_dir = "{root / "c"}"\n'
        config = _config(root, data_extra=extra)
        for image in sorted((root / "photos").glob("*.png"))[::2]:
            with Image.open(image) as im:
                mask = Image.new("L", im.size, 0)
                mask.paste(255, (0, 0, im.size[0] // 2, im.size[1]))
            mask.save(image.with_name(f"{image.stem}_mask.png"))
        config.write_text(config.read_text().replace("max_steps = 6", "max_steps = 2"))
        proc = _train(config, root / "run")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "12 image(s) with a loss mask (data.masks)" in proc.stdout
        rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").open()]
        losses[cached] = next(r["loss"] for r in rows if "loss" in r)
    assert abs(losses[True] - losses[False]) < 1e-3 * abs(losses[False])


def test_dreambooth_with_preservation_and_a_token_train_in_buckets(tmp_path):
    """DreamBooth's class images (sampled square) join the square bucket beside the instance
    photos of every shape; LoRA output preservation and a textual-inversion token train on
    bucketed batches."""
    config = _config(tmp_path)
    extra = """
[dreambooth]
instance_prompt = "a photo of <sks> dog"
class_prompt = ["a photo of a dog"]
num_class_images = 4
class_sample_steps = 2
[lora]
enabled = true
rank = 4
preserve_prompts = ["a photo of a dog"]
[textual_inversion]
token = "<sks>"
init_word = "dog"
"""
    text = config.read_text().replace("max_steps = 6", "max_steps = 3") + extra
    config.write_text(text.replace("every_steps = 3", "every_steps = 0"))
    proc = _train(config, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    sizes = {(b["width"], b["height"]): b["images"] for b in report["buckets"]["buckets"]}
    assert set(sizes) == {(32, 32), (44, 20), (20, 44)}
    assert sizes[(32, 32)] >= 4 + 7  # the class images are in the square bucket
