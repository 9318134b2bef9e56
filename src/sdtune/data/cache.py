"""On-disk cache of VAE latent distributions and text-encoder hidden states (safetensors shards).

A key is a sha256 over all its value depends on: a latent's on the image file's bytes, the
VAE (weights and config) and the transform (resolution, channels, centre crop, flip); a text
entry's on the caption's token ids, the text encoder and the autocast precision. A changed
image, caption or model recomputes exactly the entries it affects; nothing stale is served.
A latent entry is the posterior's parameters, not a sample: training samples them with its own
seeded generator as `ModelBundle.encode_images` does, so cached and uncached runs agree.

Layout: `cache_dir/latents/` and `cache_dir/text/` hold shards of tensors named by key; the
index is the union of the shards' headers. Each shard is written to a temporary file, fsynced
and renamed, so a killed build leaves every finished shard and the next one computes only
what is missing. Written by hand: no library caches model outputs with content-exact
invalidation and crash-safe shards. One builder at a time (under DDP, the main process first).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from sdtune.config import check_cacheable
from sdtune.data.order import generator
from sdtune.data.sources import Record
from sdtune.data.transforms import DECODE_VERSION, TransformSpec, transform_with_geometry
from sdtune.errors import ConfigError, DataError
from sdtune.files import TMP_GLOB, atomic_output
from sdtune.models.families.base import Conditioning

POOLED = "/pooled"  # the key suffix of a caption's pooled text embedding (families with one)
GEOMETRY = "/geometry"  # of an image's latents: original size and crop offsets (time ids)

if TYPE_CHECKING:
    from sdtune.data.dataset import ImageTextDataset
    from sdtune.models.bundle import ModelBundle

FORMAT = "sdtune-cache-1"  # bump when what an entry means changes (transforms, layout)
_CONFIG_NOISE = {"transformers_version", "architectures", "torch_dtype", "dtype"}


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/sdtune` (or ~/.cache/sdtune): entries are keyed by content, so runs share it."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdtune"


def component_hash(module: torch.nn.Module) -> str:
    """sha256 over a model component: its class, its config, and every state-dict tensor
    (name, dtype, shape, raw bytes) in name order. Equal for a saved and reloaded copy."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}\n".encode())
    config = getattr(module, "config", None)
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    # private keys and versions say where a config came from, not what the model computes
    items = {k: v for k, v in items.items() if not k.startswith("_") and k not in _CONFIG_NOISE}
    h.update(json.dumps(items, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes: any dtype, bf16 included
    return h.hexdigest()


def image_hash(record: Record) -> str:
    """sha256 of the image file's bytes (or, for an in-memory image, of its mode, size and pixels)."""
    h = hashlib.sha256()
    if record.path is not None:
        try:
            with record.path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as exc:
            raise DataError(f"{record.path}: cannot read image for the cache: {exc}") from exc
        return h.hexdigest()
    assert record.image is not None
    h.update(f"{record.image.mode}|{record.image.size}\n".encode())
    h.update(record.image.tobytes())
    return h.hexdigest()


def _key(parts: dict) -> str:
    return hashlib.sha256(
        json.dumps({"format": FORMAT, **parts}, sort_keys=True).encode()
    ).hexdigest()


def latent_key(
    image: str, vae: str, spec: TransformSpec, flipped: bool, bucket: tuple[int, int] | None = None
) -> str:
    """Key of one latent entry: image hash + VAE hash + the transform it went through (with its
    aspect-ratio bucket's size where that is not the data.resolution square)."""
    size = {"resolution": spec.resolution, "channels": spec.channels, "crop": "center"}
    if bucket is not None and bucket != (spec.resolution, spec.resolution):
        size["bucket"] = list(bucket)
    if tuple(spec.background) != (255, 255, 255):
        size["background"] = list(spec.background)
    parts = {"kind": "latents", "image": image, "vae": vae, **size, "flip": flipped}
    return _key({**parts, "decode": DECODE_VERSION})


def text_key(ids: torch.Tensor, text_encoder: str, precision: str) -> str:
    """Key of one text entry: the token ids the encoder sees + its hash + the autocast precision."""
    tokens = [int(i) for i in ids.reshape(-1)]
    parts = {"kind": "text", "ids": tokens, "text_encoder": text_encoder, "precision": precision}
    return _key(parts)


def _autocast(device: torch.device, precision: str):
    """The autocast context the training loop runs the text encoder in (as Accelerate sets it)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class ShardStore:
    """The shards of one kind (latents or text): key -> tensor, read lazily (memory-mapped)."""

    def __init__(self, folder: Path, say: Callable[[str], None] = print) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for tmp in folder.glob(TMP_GLOB):  # a killed build's unfinished shard
            tmp.unlink(missing_ok=True)
        self.where: dict[str, Path] = {}
        self._handles: dict[Path, safe_open] = {}
        for path in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(path, "pt") as f:
                    keys, meta = list(f.keys()), f.metadata() or {}
            except (OSError, SafetensorError) as exc:
                say(f"cache: {path} is unreadable ({exc}); removed, its entries will be recomputed")
                path.unlink(missing_ok=True)
                continue
            if meta.get("format") == FORMAT:  # another format's shards are left alone, unused
                self.where.update(dict.fromkeys(keys, path))

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        path = self.where[key]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path].get_tensor(key)

    def write(self, tensors: dict[str, torch.Tensor]) -> Path:
        """Add one shard atomically; its name is a hash of its keys."""
        name = hashlib.sha256("\n".join(sorted(tensors)).encode()).hexdigest()[:24]
        path = self.folder / f"{name}.safetensors"
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        with atomic_output(path) as tmp:
            tmp.write_bytes(save_safetensors(data, metadata={"format": FORMAT}))
        self._handles.pop(path, None)
        self.where.update(dict.fromkeys(tensors, path))
        return path


class LatentCache:
    """Cached VAE posteriors of a record list, by (record index, flipped)."""

    def __init__(self, store: ShardStore, keys: list[dict[bool, str]], scaling_factor: float):
        self.store, self.keys, self.scaling_factor = store, keys, scaling_factor
        self.masks: dict[tuple[int, bool], torch.Tensor] = {}
        """Loss masks at the latents' resolution, by (record index, flipped): read once, not
        decoded every step."""

    def mask(self, record, index: int, flipped: bool, square: int, latent_size) -> torch.Tensor:
        """Record `index`'s loss mask (ones where it has none) as the dataset gives it, then
        area-averaged to the latents' size as the step does (which leaves it as it is)."""
        key = (index, flipped)
        if key not in self.masks:
            from sdtune.data.transforms import mask_at

            width, height = record.bucket or (square, square)
            image = record.open_mask()
            m = mask_at(image, (width, height), flipped) if image else torch.ones(1, height, width)
            self.masks[key] = torch.nn.functional.interpolate(
                m[None], size=tuple(latent_size), mode="area"
            )[0]
        return self.masks[key]

    def parameters(self, index: int, flipped: bool = False) -> torch.Tensor:
        """The posterior's parameters (mean and log-variance stacked on channels), 2C x h x w."""
        if flipped not in self.keys[index]:
            raise KeyError(f"record {index}: flipped latents are cached only when data.hflip > 0")
        return self.store.get(self.keys[index][flipped])

    def sample(
        self,
        indices: Sequence[int],
        flipped: Sequence[bool],
        generator: torch.Generator | None,
        device: torch.device | str,
    ) -> torch.Tensor:
        """Scaled latents of a batch, drawn as `ModelBundle.encode_images(pixels, generator)` draws
        them: one normal draw of the batch's shape from `generator`, then mean + std * draw."""
        params = torch.stack([self.parameters(i, f) for i, f in zip(indices, flipped)])
        dist = DiagonalGaussianDistribution(params.to(device, non_blocking=True))  # no stream sync
        return dist.sample(generator=generator) * self.scaling_factor

    def geometry(self, indices: Sequence[int], flipped: Sequence[bool]) -> torch.Tensor:
        """(original height, width, crop top, left) of each cached image, as the dataset gives
        them."""
        return torch.stack(
            [self.store.get(self.keys[i][f] + GEOMETRY) for i, f in zip(indices, flipped)]
        )


class TextCache:
    """Cached text-encoder hidden states, by caption."""

    def __init__(self, store: ShardStore, tokenize: Callable, te_hash: str, precision: str):
        self.store = store
        self._tokenize = tokenize
        self._hash, self._precision = te_hash, precision
        self.keys: dict[str, str] = {}

    def key(self, caption: str) -> str:
        if caption not in self.keys:
            ids = self._tokenize([caption])[0]
            self.keys[caption] = text_key(ids, self._hash, self._precision)
        return self.keys[caption]

    def _missing(self, keys: list[str], captions: Sequence[str]) -> None:
        missing = [c for c, k in zip(captions, keys) if k not in self.store]
        if missing:
            raise KeyError(
                f"captions not in the text cache (build it from these records): {missing}"
            )

    def states(self, captions: Sequence[str], device: torch.device | str) -> torch.Tensor:
        """Hidden states of `captions` (B x tokens x width), as the text encoders give them."""
        keys = [self.key(c) for c in captions]
        self._missing(keys, captions)
        return torch.stack([self.store.get(k) for k in keys]).to(device, non_blocking=True)

    def conditioning(self, captions: Sequence[str], device: torch.device | str) -> Conditioning:
        """The text conditioning of `captions` (hidden states, and the pooled embedding where
        the family has one), as `arch.encode` gives it."""
        keys = [self.key(c) for c in captions]
        hidden = self.states(captions, device)
        pooled = None
        if keys and keys[0] + POOLED in self.store:
            pooled = torch.stack([self.store.get(k + POOLED) for k in keys])
            pooled = pooled.to(device, non_blocking=True)
        return Conditioning(hidden, pooled)


@dataclass
class BuildStats:
    """What a build did: entries computed now and entries found already cached."""

    latents_computed: int = 0
    latents_reused: int = 0
    text_computed: int = 0
    text_reused: int = 0


@dataclass
class DataCache:
    """A built cache; `latents` is None for pixel-space models or when not asked for."""

    latents: LatentCache | None = None
    text: TextCache | None = None
    stats: BuildStats = field(default_factory=BuildStats)


def _fill(
    store: ShardStore,
    wanted: dict,
    encode: Callable,
    sizes: tuple[int, int],
    what,
    say,
    parts: tuple[str, ...] = ("",),
):
    """Compute the entries of `wanted` (key -> input) that `store` lacks (any of the key
    suffixes `parts`), `encode` taking a list of inputs and giving a batch of tensors (or
    several, as {key suffix: batch}); each `shard_size` entries are one shard. Returns
    (computed, reused)."""
    batch_size, shard_size = sizes
    todo = [(k, x) for k, x in wanted.items() if any(k + part not in store for part in parts)]
    reused = len(wanted) - len(todo)
    say(f"cache: {what}: {len(todo)} to encode, {reused} already in {store.folder}")
    with tqdm(total=len(todo), desc=f"cache {what}", disable=None) as bar:
        for start in range(0, len(todo), shard_size):
            chunk, shard = todo[start : start + shard_size], {}
            for first in range(0, len(chunk), batch_size):
                part = chunk[first : first + batch_size]
                with torch.no_grad():
                    out = encode([x for _, x in part])
                for suffix, values in (out if isinstance(out, dict) else {"": out}).items():
                    values = [v.cpu() for v in values]  # a batch, or a list of entries
                    shard.update(zip([key + suffix for key, _ in part], values))
                bar.update(len(part))
            store.write(shard)
    return len(todo), reused


def _build_latents(records, spec, bundle, cache_dir, sizes, stats, say) -> LatentCache:
    check_cacheable(spec)
    vae, arch = bundle.vae, bundle.arch
    vae_hash = component_hash(vae)
    flips = (False, True) if spec.hflip > 0 else (False,)
    keys = []
    for record in records:
        digest = image_hash(record)
        keys.append({f: latent_key(digest, vae_hash, spec, f, record.bucket) for f in flips})
    store = ShardStore(cache_dir / "latents", say)
    wanted = {k: (i, f) for i, ks in enumerate(keys) for f, k in ks.items()}  # equal images: once
    device = next(vae.parameters()).device

    def encode(items: list[tuple[int, bool]]) -> dict[str, list[torch.Tensor]]:
        made = [
            transform_with_geometry(records[i].open(), spec, None, f, records[i].bucket)
            for i, f in items
        ]
        params: list[torch.Tensor | None] = [None] * len(made)
        by_size: dict[tuple[int, ...], list[int]] = {}  # one VAE call per bucket size
        for j, (x, _) in enumerate(made):
            by_size.setdefault(tuple(x.shape), []).append(j)
        for group in by_size.values():
            pixels = torch.stack([made[j][0] for j in group])
            with arch.vae_precision(bundle, pixels):
                out = vae.encode(pixels.to(device, vae.dtype)).latent_dist.parameters
            for j, p in zip(group, out):
                params[j] = p
        return {"": params, GEOMETRY: [g for _, g in made]}

    was_training = vae.training
    vae.eval()
    try:
        computed = _fill(store, wanted, encode, sizes, "latents", say, ("", GEOMETRY))
    finally:
        vae.train(was_training)
    stats.latents_computed, stats.latents_reused = computed
    return LatentCache(store, keys, float(vae.config.scaling_factor))


def _build_text(records, bundle, cache_dir, sizes, precision, stats, say) -> TextCache:
    arch, encoders = bundle.arch, list(bundle.text_encoders.values())
    if any(p.requires_grad for e in encoders for p in e.parameters()):
        raise ConfigError(
            "data.cache_text: the text encoder has trainable parameters (model.trainable, a LoRA or "
            "a textual-inversion token), so its outputs change every step; set data.cache_text=false"
        )
    hashes = [component_hash(e) for e in encoders]
    te_hash = (
        hashes[0] if len(hashes) == 1 else hashlib.sha256("|".join(hashes).encode()).hexdigest()
    )

    def tokenize(captions):
        return arch.tokenize(bundle, list(captions))

    text = TextCache(ShardStore(cache_dir / "text", say), tokenize, te_hash, precision)
    captions = sorted({r.caption for r in records} | {""})  # "" is what caption dropout feeds
    wanted = {}
    for caption, ids in zip(captions, tokenize(captions)):
        text.keys[caption] = text_key(ids, te_hash, precision)
        wanted[text.keys[caption]] = ids
    device = next(encoders[0].parameters()).device

    def encode(ids: list[torch.Tensor]):
        with _autocast(device, precision):
            cond = arch.encode(bundle, torch.stack(ids).to(device))
        return {"": cond.hidden} if cond.pooled is None else {"": cond.hidden, POOLED: cond.pooled}

    stats.text_computed, stats.text_reused = _fill(text.store, wanted, encode, sizes, "text", say)
    return text


def build_cache(
    records: Sequence[Record],
    spec: TransformSpec,
    bundle: ModelBundle,
    cache_dir: Path,
    *,
    latents: bool = True,
    text: bool = True,
    batch_size: int = 8,
    shard_size: int = 256,
    precision: str = "no",
    say: Callable[[str], None] = print,
) -> DataCache:
    """Compute the missing cache entries of `records` (on the device the bundle is on) and return
    lookups for all of them. `precision` is the training's mixed precision ('no', 'fp16',
    'bf16'): the text encoder runs under the same autocast as in the loop. Resumable: every
    `shard_size` entries are one atomic shard, and a rerun computes only what is missing."""
    records, cache_dir, sizes = list(records), Path(cache_dir), (batch_size, shard_size)
    result = DataCache()
    if latents and bundle.vae is None:
        say("cache: this model works in pixel space (no VAE), so there are no latents to cache")
    elif latents:
        result.latents = _build_latents(records, spec, bundle, cache_dir, sizes, result.stats, say)
    if text:
        args = (records, bundle, cache_dir, sizes, precision, result.stats, say)
        result.text = _build_text(*args)
    return result


def example_choices(dataset: ImageTextDataset, epoch: int, index: int) -> tuple[bool, bool]:
    """(flipped, caption dropped) of example `index` in `epoch`: the draws `ImageTextDataset`
    makes for it, in its order (valid for cacheable transforms, where a flip is the only one)."""
    spec = dataset.spec
    check_cacheable(spec)
    if not dataset.augment:
        return False, False
    rng = generator(dataset.seed, "example", epoch, index)
    flipped = spec.hflip > 0 and float(torch.rand((), generator=rng)) < spec.hflip
    p = dataset.caption_dropout
    dropped = p > 0 and float(torch.rand((), generator=rng)) < p
    return flipped, dropped


def cached_batch(
    cache: DataCache,
    dataset: ImageTextDataset,
    keys: Sequence[tuple[int, int]],
    gen: torch.Generator | None,
    device: torch.device | str,
) -> dict:
    """The training inputs of the batch `keys` ((epoch, index) pairs from `next_batch`) from the
    cache, without decoding an image: latents sampled from `gen` as `encode_images` would,
    captions after dropout, and their hidden states when the text cache is built."""
    assert cache.latents is not None, "cached_batch needs cached latents"
    choices = [example_choices(dataset, epoch, index) for epoch, index in keys]
    indices = [index for _, index in keys]
    latents = cache.latents.sample(indices, [f for f, _ in choices], gen, device)
    captions = [
        "" if dropped else dataset.tagged(dataset.records[i].caption, e, i)
        for (e, i), (_, dropped) in zip(keys, choices)
    ]
    hidden = cache.text.states(captions, device) if cache.text is not None else None  # as before
    records = [dataset.records[i] for i in indices]
    geometry = cache.latents.geometry(indices, [f for f, _ in choices])
    extra = {}
    if any(r.mask is not None for r in records):  # loss masks, as the dataset gives them
        size, square = latents.shape[-2:], dataset.spec.resolution
        extra["masks"] = torch.stack(
            [
                cache.latents.mask(r, i, flipped, square, size)
                for r, i, (flipped, _) in zip(records, indices, choices)
            ]
        )
    return {
        **extra,
        "geometry": geometry,
        "latents": latents,
        "captions": captions,
        "encoder_hidden_states": hidden,
        "names": [r.name for r in records],
        "weights": torch.tensor([r.weight for r in records]),  # as `collate` gives them
    }
