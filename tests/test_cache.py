import os
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from sdtune.config import load_config
from sdtune.data import DataPosition, build_datasets, collate, next_batch
from sdtune.data.cache import (
    ShardStore,
    build_cache,
    cached_batch,
    check_cacheable,
    component_hash,
    example_choices,
    image_hash,
)
from sdtune.data.order import generator
from sdtune.data.sources import Record
from sdtune.data.transforms import TransformSpec, apply_transform
from sdtune.errors import ConfigError
from sdtune.models import apply_freezing, load_model, save_bundle

# entries encoded in batches of another size differ in the last bits (float summation order)
CLOSE = {"rtol": 1e-4, "atol": 1e-5}


def _bundle(base="preset:tiny-sd", trainable=("unet.*",)):
    cfg = load_config(None, [f"model.base={base}"])
    bundle = load_model(cfg.model, cfg.diffusion, cfg.seed)
    apply_freezing(bundle, list(trainable), [])
    return bundle


def _data(folder, **sets):
    sets = {"data.path": folder, "data.resolution": 32, "data.val_fraction": 0, **sets}
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    return build_datasets(cfg.data, 3, seed=0, say=lambda s: None).train


def _build(dataset, bundle, cache_dir, **kwargs):
    kwargs = {"batch_size": 4, "shard_size": 4, "say": lambda s: None, **kwargs}
    return build_cache(dataset.records, dataset.spec, bundle, cache_dir, **kwargs)


def _pixels(dataset, index):
    return apply_transform(dataset.records[index].open(), dataset.spec, None)


def _stats(cache):
    s = cache.stats
    return (s.latents_computed, s.latents_reused, s.text_computed, s.text_reused)


@pytest.fixture(scope="module")
def bundle():
    return _bundle()


def test_cached_latents_and_text_equal_fresh_encoding(tiny_image_folder, bundle, tmp_path):
    dataset = _data(tiny_image_folder)
    cache = _build(dataset, bundle, tmp_path / "cache", batch_size=6, shard_size=6)
    assert _stats(cache) == (6, 0, 7, 0)  # 6 images; 6 captions and the empty one
    assert len(list((tmp_path / "cache" / "latents").glob("*.safetensors"))) == 1
    pixels = torch.stack([_pixels(dataset, i) for i in range(6)])
    with torch.no_grad():
        fresh = bundle.encode_images(pixels, torch.Generator().manual_seed(3))
    cached = cache.latents.sample(range(6), [False] * 6, torch.Generator().manual_seed(3), "cpu")
    assert cached.shape == (6, 4, 16, 16)
    assert torch.equal(cached, fresh)  # same batch through the VAE: bit-identical
    captions = [r.caption for r in dataset.records] + [""]
    with torch.no_grad():
        fresh_text = bundle.text_encoder(bundle.tokenize(captions))[0]
    torch.testing.assert_close(cache.text.states(captions, "cpu"), fresh_text)

    again = _build(dataset, bundle, tmp_path / "cache")
    assert _stats(again) == (0, 6, 0, 7)
    assert torch.equal(again.latents.parameters(5), cache.latents.parameters(5))


def test_changed_image_or_caption_recomputes_only_its_entry(tiny_image_folder, bundle, tmp_path):
    _build(_data(tiny_image_folder), bundle, tmp_path / "cache")
    Image.new("RGB", (40, 36), (1, 2, 3)).save(tiny_image_folder / "img2.png")
    dataset = _data(tiny_image_folder)
    cache = _build(dataset, bundle, tmp_path / "cache")
    assert _stats(cache) == (1, 5, 0, 7)
    with torch.no_grad():
        fresh = bundle.vae.encode(_pixels(dataset, 2)[None]).latent_dist.parameters[0]
    torch.testing.assert_close(cache.latents.parameters(2), fresh, **CLOSE)

    (tiny_image_folder / "img3.txt").write_text("a photo of a blue circle\n")
    dataset = _data(tiny_image_folder)
    cache = _build(dataset, bundle, tmp_path / "cache")
    assert _stats(cache) == (0, 6, 1, 6)
    with torch.no_grad():
        fresh = bundle.encode_prompts(["a photo of a blue circle"], "cpu")
    torch.testing.assert_close(cache.text.states(["a photo of a blue circle"], "cpu"), fresh)


def test_changed_vae_recomputes_all_latents_and_no_text(tiny_image_folder, tmp_path):
    bundle = _bundle()
    dataset = _data(tiny_image_folder)
    before = _build(dataset, bundle, tmp_path / "cache")
    with torch.no_grad():
        next(bundle.vae.parameters()).add_(0.01)
    after = _build(dataset, bundle, tmp_path / "cache")
    assert _stats(after) == (6, 0, 0, 7)
    assert not torch.equal(after.latents.parameters(0), before.latents.parameters(0))


def test_component_hash_survives_save_and_load_and_sees_weights(tmp_path, bundle):
    save_bundle(bundle, tmp_path / "pipe")
    reloaded = _bundle(str(tmp_path / "pipe"))
    assert component_hash(reloaded.vae) == component_hash(bundle.vae)
    assert component_hash(reloaded.text_encoder) == component_hash(bundle.text_encoder)
    with torch.no_grad():
        next(reloaded.text_encoder.parameters())[0, 0] += 1e-6
    assert component_hash(reloaded.text_encoder) != component_hash(bundle.text_encoder)


def test_in_memory_images_are_hashed_by_pixels():
    a = Record("a", "", Image.new("L", (8, 8), 10))
    assert image_hash(a) == image_hash(Record("b", "x", Image.new("L", (8, 8), 10)))
    assert image_hash(a) != image_hash(Record("a", "", Image.new("L", (8, 8), 11)))


def test_hflip_caches_both_orientations(tiny_image_folder, bundle, tmp_path):
    dataset = _data(tiny_image_folder, **{"data.hflip": 0.5, "data.caption_dropout": 0.3})
    cache = _build(dataset, bundle, tmp_path / "cache")
    assert _stats(cache) == (12, 0, 7, 0)
    seen, pixels, cached = set(), [], []
    for epoch in range(4):
        for index in range(6):
            item = dataset[(epoch, index)]
            flipped, dropped = example_choices(dataset, epoch, index)
            seen.add((flipped, dropped))
            plain = _pixels(dataset, index)
            assert torch.equal(
                item["pixel_values"], TF.horizontal_flip(plain) if flipped else plain
            )
            assert (item["caption"] == "") == dropped
            pixels.append(item["pixel_values"])
            cached.append(cache.latents.parameters(index, flipped))
    assert len(seen) == 4  # both flips and both caption outcomes occurred
    with torch.no_grad():  # what the dataset's (flipped or not) images encode to
        fresh = bundle.vae.encode(torch.stack(pixels)).latent_dist.parameters
    torch.testing.assert_close(torch.stack(cached), fresh, **CLOSE)
    no_flip_spec = replace(dataset.spec, hflip=0.0)
    no_flip = build_cache(dataset.records, no_flip_spec, bundle, tmp_path, say=lambda s: None)
    with pytest.raises(KeyError, match="data.hflip > 0"):
        no_flip.latents.parameters(0, True)


@pytest.mark.parametrize("hflip", [0.5, 0.0])
def test_cached_batch_matches_the_uncached_training_step(
    hflip, tiny_image_folder, bundle, tmp_path
):
    dataset = _data(tiny_image_folder, **{"data.hflip": hflip, "data.caption_dropout": 0.5})
    cache = _build(dataset, bundle, tmp_path / "cache")
    position = DataPosition()
    for _ in range(3):  # the third batch: the second epoch's first, a new order
        keys, position = next_batch(position, 4, 6, 0)
    gen_a, gen_b = generator(0, "noise", 2), generator(0, "noise", 2)
    batch = collate([dataset[k] for k in keys])
    with torch.no_grad():
        latents = bundle.encode_images(batch["pixel_values"], gen_a)
        hidden = bundle.text_encoder(bundle.tokenize(batch["captions"]))[0]
    got = cached_batch(cache, dataset, keys, gen_b, "cpu")
    assert got["captions"] == batch["captions"] and got["names"] == batch["names"]
    assert torch.equal(got["weights"], batch["weights"])
    assert "" in got["captions"]  # a dropped caption is in this batch (and, for 0.5, a flip)
    torch.testing.assert_close(got["latents"], latents, **CLOSE)
    torch.testing.assert_close(got["encoder_hidden_states"], hidden)
    # the generator is left where encode_images leaves it, so the noise drawn next is equal
    assert torch.equal(torch.randn(3, generator=gen_a), torch.randn(3, generator=gen_b))


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        ({"center_crop": False}, "data.center_crop=false"),
        ({"rotation": 10.0}, "data.rotation=10"),
        ({"color_jitter": 0.2}, "data.color_jitter=0.2"),
    ],
)
def test_random_transforms_cannot_be_cached(sets, key, tiny_image_folder, bundle, tmp_path):
    spec = TransformSpec(32, **sets)
    with pytest.raises(ConfigError, match=rf"data.cache_latents: {key}.*data.cache_latents=false"):
        check_cacheable(spec)
    records = _data(tiny_image_folder).records
    with pytest.raises(ConfigError, match=key):
        build_cache(records, spec, bundle, tmp_path, say=lambda s: None)
    # text embeddings do not depend on image transforms
    assert (
        build_cache(records, spec, bundle, tmp_path, latents=False, say=lambda s: None).text
        is not None
    )
    check_cacheable(TransformSpec(32, hflip=1.0))


def test_trained_text_encoder_is_not_cached(tiny_image_folder, tmp_path):
    bundle = _bundle(trainable=("unet.*", "text_encoder.*"))
    with pytest.raises(ConfigError, match=r"data.cache_text: the text encoder has trainable"):
        _build(_data(tiny_image_folder), bundle, tmp_path, latents=False)


def test_pixel_space_model_caches_text_only(tmp_path):
    bundle = _bundle("preset:tiny-digits")
    records = [
        Record(f"d{i}", f"a handwritten digit {i}", Image.new("L", (16, 16), i)) for i in range(3)
    ]
    said = []
    cache = build_cache(records, TransformSpec(16, 1), bundle, tmp_path, say=said.append)
    assert cache.latents is None and "pixel space" in said[0]
    assert _stats(cache) == (0, 0, 4, 0)
    with torch.no_grad():
        fresh = bundle.encode_prompts(["a handwritten digit 1", ""], "cpu")
    torch.testing.assert_close(cache.text.states(["a handwritten digit 1", ""], "cpu"), fresh)


def test_interrupted_build_resumes_from_finished_shards(
    tiny_image_folder, bundle, tmp_path, monkeypatch
):
    dataset = _data(tiny_image_folder, **{"data.hflip": 0.5})
    clean = _build(dataset, bundle, tmp_path / "clean", shard_size=2)
    write = ShardStore.write
    calls = []

    def write_then_die(self, tensors):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(write(self, tensors))

    monkeypatch.setattr(ShardStore, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _build(dataset, bundle, tmp_path / "cache", shard_size=2)
    monkeypatch.setattr(ShardStore, "write", write)
    resumed = _build(dataset, bundle, tmp_path / "cache", shard_size=2)
    assert _stats(resumed) == (8, 4, 7, 0)
    _assert_same_entries(resumed, clean)


def _assert_same_entries(a, b):
    for i in range(6):
        for flipped in (False, True):
            pa, pb = a.latents.parameters(i, flipped), b.latents.parameters(i, flipped)
            torch.testing.assert_close(pa, pb, **CLOSE)
    assert a.text.keys == b.text.keys
    for key in a.text.keys.values():
        torch.testing.assert_close(a.text.store.get(key), b.text.store.get(key))


KILL_SCRIPT = """
import os, signal, stat, sys
from pathlib import Path
from tests.test_cache import _build, _bundle, _data

fsync, files = os.fsync, []

def fsync_or_die(fd):
    if stat.S_ISREG(os.fstat(fd).st_mode):
        files.append(fd)
        if len(files) == 3:  # killed while the third shard is only half on disk
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    fsync(fd)

os.fsync = fsync_or_die
_build(_data(Path(sys.argv[1]), **{"data.hflip": 0.5}), _bundle(), Path(sys.argv[2]), shard_size=2)
"""


def test_sigkill_mid_write_leaves_a_valid_cache(tiny_image_folder, bundle, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [sys.executable, "-c", KILL_SCRIPT, tiny_image_folder, tmp_path / "c"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: threads only contend
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    latents_dir = tmp_path / "c" / "latents"
    assert len(list(latents_dir.glob("*.safetensors"))) == 2
    assert len(list(latents_dir.glob(".*.tmp"))) == 1
    dataset = _data(tiny_image_folder, **{"data.hflip": 0.5})
    resumed = _build(dataset, bundle, tmp_path / "c", shard_size=2)
    assert _stats(resumed) == (8, 4, 7, 0)
    assert not list(latents_dir.glob(".*.tmp"))
    _assert_same_entries(resumed, _build(dataset, bundle, tmp_path / "clean", shard_size=2))


def test_unreadable_shard_is_dropped_and_recomputed(tiny_image_folder, bundle, tmp_path):
    dataset = _data(tiny_image_folder)
    _build(dataset, bundle, tmp_path)
    shards = (tmp_path / "latents").glob("*.safetensors")
    shard = max(shards, key=lambda p: (p.stat().st_size, p.name))  # the one of 4 entries
    shard.write_bytes(shard.read_bytes()[:100])
    said = []
    cache = _build(dataset, bundle, tmp_path, say=said.append)
    assert _stats(cache) == (4, 2, 0, 7)
    assert any("is unreadable" in line for line in said)
