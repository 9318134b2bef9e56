"""Aspect-ratio buckets: each image is trained at the size of about data.resolution² pixels
whose aspect ratio is nearest its own, instead of a square crop of it.

The table is a pure function of the images' sizes and the settings, and so is each image's
bucket; the order of batches (data/order.py) keeps every global batch, across processes, in
one bucket. Policies, stated where they apply:
- a bucket with fewer images than a global batch (train.batch_size x processes) cannot form a
  batch: it joins the bucket nearest its aspect ratio (with data.bucket_no_upscale, a bucket
  that fits inside both, so nothing is upscaled), until every bucket fills a batch;
- each epoch, a bucket's last images that do not fill a global batch wait for the next epoch
  (the order is reshuffled every epoch, so no image is left out every time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from sdtune.errors import ConfigError

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class BucketSettings:
    resolution: int
    step: int
    max_aspect: float = 2.5
    no_upscale: bool = False
    explicit: tuple[Size, ...] | None = None


def bucket_sizes(settings: BucketSettings) -> list[Size]:
    """The sizes images may go to: data.resolution² itself, and for each width a multiple of
    the step the tallest multiple of it within that area, both ways round, up to max_aspect."""
    if settings.explicit is not None:
        return sorted(set(settings.explicit))
    res, step = settings.resolution, settings.step
    area = res * res
    sizes = {(res, res)}
    width = step
    while width <= res * settings.max_aspect:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= settings.max_aspect + 1e-9:
            sizes.update({(width, height), (height, width)})
        width += step
    return sorted(sizes)


def _log_aspect(size: Size) -> float:
    return math.log(size[0] / size[1])


def nearest(image: Size, sizes: Sequence[Size]) -> Size:
    """The size whose aspect ratio is nearest the image's (in log ratio; ties: the larger)."""
    target = _log_aspect(image)
    return min(sizes, key=lambda s: (abs(_log_aspect(s) - target), -s[0] * s[1], s))


def cover_scale(image: Size, bucket: Size) -> float:
    """How much the image is scaled to cover the bucket (then cropped to it)."""
    return max(bucket[0] / image[0], bucket[1] / image[1])


def own_size(image: Size, settings: BucketSettings) -> Size:
    """data.bucket_no_upscale: the image's own size, brought down to about resolution² and to
    multiples of the step (at least one step each way)."""
    w, h = image
    scale = min(1.0, settings.resolution / math.sqrt(w * h))
    step = settings.step
    return (max(step, int(w * scale) // step * step), max(step, int(h * scale) // step * step))


@dataclass
class Bucket:
    size: Size
    members: list[int] = field(default_factory=list)  # record indices
    joined: list[tuple[Size, int]] = field(default_factory=list)  # (from size, images)


@dataclass
class BucketTable:
    """The training set's buckets and what they do to the images."""

    settings: BucketSettings
    group: int
    buckets: list[Bucket]
    upscaled: dict[Size, int]
    far_below: list[tuple[str, float]]  # (image, upscale factor) for factors above 2
    crop: list[tuple[str, float]]  # (image, fraction of its resized area cut off)

    def rows(self) -> list[dict]:
        return [
            {
                "width": b.size[0],
                "height": b.size[1],
                "images": len(b.members),
                "upscaled": self.upscaled.get(b.size, 0),
                "joined_from": [{"width": s[0], "height": s[1], "images": n} for s, n in b.joined],
            }
            for b in self.buckets
        ]

    def to_dict(self) -> dict:
        s = self.settings
        return {
            "step": s.step,
            "area": s.resolution**2,
            "max_aspect": s.max_aspect,
            "no_upscale": s.no_upscale,
            "global_batch": self.group,
            "buckets": self.rows(),
            "far_below_bucket": [{"file": f, "upscale": round(x, 2)} for f, x in self.far_below],
            "policy": (
                "buckets smaller than a global batch join the nearest bucket by aspect ratio; "
                "each epoch a bucket's images that do not fill a global batch wait for the "
                "next epoch's shuffle"
            ),
        }

    def lines(self) -> list[str]:
        """The table as printed at start."""
        s = self.settings
        head = (
            f"buckets ({'the sizes listed in data.buckets' if s.explicit else f'about {s.resolution}x{s.resolution} px, sides multiples of {s.step}, aspect up to {s.max_aspect:g}'}"
            f"{', no upscaling' if s.no_upscale else ''}; every global batch of {self.group} "
            "holds one size):"
        )
        out = [head]
        for b in self.buckets:
            up = self.upscaled.get(b.size, 0)
            line = f"  {b.size[0]}x{b.size[1]}: {len(b.members)} image(s)"
            if up:
                line += f", {up} upscaled"
            for size, n in b.joined:
                line += f"; {n} joined from {size[0]}x{size[1]} (too few for a batch)"
            out.append(line)
        if self.far_below:
            name, factor = max(self.far_below, key=lambda item: item[1])
            out.append(
                f"  {len(self.far_below)} image(s) far below their bucket's size (upscaled more "
                f"than 2x, up to {factor:.1f}x: {name}); data.bucket_no_upscale keeps them small"
            )
        if self.crop:
            name, worst = max(self.crop, key=lambda item: item[1])
            if worst > 0.05:
                out.append(
                    f"  cropping to the buckets cuts off up to {worst:.0%} of an image ({name})"
                )
        return out


def _merge_small(buckets: dict[Size, Bucket], sizes_of: list[Size], group: int, no_upscale: bool):
    """Fold buckets with fewer than `group` images into their nearest neighbour (by aspect
    ratio), the smallest first, until each fills a global batch or one bucket is left."""
    while len(buckets) > 1:
        small = [b for b in buckets.values() if len(b.members) < group]
        if not small:
            return
        victim = min(small, key=lambda b: (len(b.members), b.size))
        others = [s for s in buckets if s != victim.size]
        target = nearest(victim.size, others)
        new_size = target
        if no_upscale:  # a size inside both: its images are only ever scaled down
            new_size = (min(target[0], victim.size[0]), min(target[1], victim.size[1]))
        merged = buckets.pop(target)
        del buckets[victim.size]
        if new_size == target:
            into = merged
        else:  # both move to the size inside them (a third bucket may have it already)
            into = buckets.pop(new_size, None) or Bucket(new_size)
            into.members += merged.members
            into.joined += [*merged.joined, (target, len(merged.members))]
            for i in merged.members:
                sizes_of[i] = new_size
        into.members += victim.members
        into.joined += [*victim.joined, (victim.size, len(victim.members))]
        for i in victim.members:
            sizes_of[i] = new_size
        buckets[new_size] = into


def assign_buckets(
    names: Sequence[str], sizes: Sequence[Size], settings: BucketSettings, group: int
) -> tuple[list[Size], BucketTable]:
    """Each training image's bucket (by index) and the table."""
    table_sizes = bucket_sizes(settings)
    chosen: list[Size] = []
    for image in sizes:
        size = nearest(image, table_sizes)
        if settings.no_upscale and settings.explicit is None and cover_scale(image, size) > 1:
            size = own_size(image, settings)
        chosen.append(size)
    buckets: dict[Size, Bucket] = {}
    for i, size in enumerate(chosen):
        buckets.setdefault(size, Bucket(size)).members.append(i)
    _merge_small(buckets, chosen, group, settings.no_upscale)
    upscaled: dict[Size, int] = {}
    far, crop = [], []
    for name, image, size in zip(names, sizes, chosen):
        scale = cover_scale(image, size)
        if scale > 1 + 1e-9:
            upscaled[size] = upscaled.get(size, 0) + 1
        if scale > 2:
            far.append((name, scale))
        resized = (image[0] * scale, image[1] * scale)
        cut = 1 - (size[0] * size[1]) / (resized[0] * resized[1])
        if cut > 1e-6:
            crop.append((name, cut))
    ordered = sorted(buckets.values(), key=lambda b: (b.size[0] / b.size[1], b.size))
    return chosen, BucketTable(settings, group, ordered, upscaled, far, crop)


def validation_buckets(sizes: Sequence[Size], table: BucketTable) -> list[Size]:
    """The held-out images' buckets: the training table's nearest (a batch there may be
    partial; with no_upscale, an image smaller than it keeps its own size)."""
    available = [b.size for b in table.buckets]
    out = []
    for image in sizes:
        size = nearest(image, available)
        if table.settings.no_upscale and cover_scale(image, size) > 1:
            size = own_size(image, table.settings)
        out.append(size)
    return out


def check_sizes(sizes: Sequence[Size], multiple: int, key: str = "data.buckets") -> None:
    for w, h in sizes:
        if w % multiple or h % multiple or w <= 0 or h <= 0:
            raise ConfigError(
                f"{key}: {w}x{h} is not a size this model takes: both sides must be positive "
                f"multiples of {multiple}"
            )
