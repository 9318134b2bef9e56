"""Image preprocessing with torchvision: resize, crop, flip, rotation, colour jitter, [-1, 1].

Every random choice is drawn from a generator passed in by the caller (seeded per example and
epoch), never from global state, so augmentations are identical after a resume and across
DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class TransformSpec:
    resolution: int
    channels: int = 3
    center_crop: bool = True
    hflip: float = 0.0
    rotation: float = 0.0
    color_jitter: float = 0.0

    @property
    def is_random(self) -> bool:
        return (
            (not self.center_crop) or self.hflip > 0 or self.rotation > 0 or self.color_jitter > 0
        )


def _uniform(rng: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=rng))


def to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    """PIL image to a float tensor in [0, 1] with `channels` channels (1: grey, 3: RGB)."""
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    return TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)


def apply_transform(
    image: Image.Image, spec: TransformSpec, rng: torch.Generator | None
) -> torch.Tensor:
    """Preprocess one image to a CxHxW tensor in [-1, 1]; `rng` None means no random change."""
    x = to_tensor(image, spec.channels)
    size = spec.resolution
    x = TF.resize(x, size, interpolation=InterpolationMode.BICUBIC, antialias=True).clamp_(0, 1)
    h, w = x.shape[-2:]
    if spec.center_crop or rng is None:
        x = TF.center_crop(x, [size, size])
    else:
        top = int(torch.randint(0, h - size + 1, (), generator=rng))
        left = int(torch.randint(0, w - size + 1, (), generator=rng))
        x = TF.crop(x, top, left, size, size)
    if rng is not None:
        if spec.rotation > 0:
            angle = _uniform(rng, -spec.rotation, spec.rotation)
            x = TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR)
        if spec.hflip > 0 and float(torch.rand((), generator=rng)) < spec.hflip:
            x = TF.horizontal_flip(x)
        if spec.color_jitter > 0:
            s = spec.color_jitter
            x = TF.adjust_brightness(x, _uniform(rng, 1 - s, 1 + s))
            x = TF.adjust_contrast(x, _uniform(rng, 1 - s, 1 + s))
            if spec.channels == 3:
                x = TF.adjust_saturation(x, _uniform(rng, 1 - s, 1 + s))
    return x.clamp(0, 1) * 2.0 - 1.0
