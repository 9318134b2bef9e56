"""Image preprocessing with torchvision: resize, crop, flip, rotation, colour jitter, [-1, 1].

Every random choice is drawn from a generator passed in by the caller (seeded per example and
epoch), never from global state, so augmentations are identical after a resume and across
DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    background: tuple[int, int, int] = (255, 255, 255)

    @property
    def is_random(self) -> bool:
        return (
            (not self.center_crop) or self.hflip > 0 or self.rotation > 0 or self.color_jitter > 0
        )


def _uniform(rng: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=rng))


# how a file's pixels become [0, 1] values; part of the cache key (a change re-encodes)
DECODE_VERSION = 3  # 3: EXIF orientation applied


def _flatten_alpha(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Transparent pixels onto `background` (white: the usual background of cut-outs)."""
    rgba = image.convert("RGBA")
    under = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(under, rgba).convert("RGB")


def to_tensor(image: Image.Image, channels: int, background=(255, 255, 255)) -> torch.Tensor:
    """PIL image to a float tensor in [0, 1] with `channels` channels (1: grey, 3: RGB).

    16-bit greyscale is scaled from its own range (PIL's RGB conversion would clip it to white),
    transparency is flattened onto `background` (palette ones included, without PIL's
    warning), and CMYK goes through PIL's conversion to RGB."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        full = 1.0 if image.mode == "F" else 65535.0  # 16-bit PNGs open as "I" too
        grey = torch.from_numpy(np.asarray(image, dtype=np.float32) / full).clamp_(0, 1)[None]
        return grey if channels == 1 else grey.expand(3, -1, -1).contiguous()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = _flatten_alpha(image, background)
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    return TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)


def apply_transform(
    image: Image.Image, spec: TransformSpec, rng: torch.Generator | None
) -> torch.Tensor:
    """Preprocess one image to a CxHxW tensor in [-1, 1]; `rng` None means no random change."""
    return transform_with_geometry(image, spec, rng)[0]


def center_crop_offsets(height: int, width: int, size: int, size_w: int | None = None):
    """(top, left) of torchvision's centre crop of `size` x `size_w` (default square) from a
    height x width image."""
    size_w = size if size_w is None else size_w
    return int(round((height - size) / 2.0)), int(round((width - size_w) / 2.0))


def _cover(x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """Resized (bicubic, antialiased) to the smallest size that covers th x tw; a square target
    as torchvision's resize to a shorter side gives it."""
    if th == tw:
        return TF.resize(x, th, interpolation=InterpolationMode.BICUBIC, antialias=True)
    h, w = x.shape[-2:]
    scale = max(th / h, tw / w)
    size = [max(th, round(h * scale)), max(tw, round(w * scale))]
    return TF.resize(x, size, interpolation=InterpolationMode.BICUBIC, antialias=True)


def transform_with_geometry(
    image: Image.Image,
    spec: TransformSpec,
    rng: torch.Generator | None,
    flip: bool = False,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_transform`, and where the result came from: (original height, original width,
    crop top, crop left) as int64, the offsets in the resized image (SDXL's micro-conditioning
    reads them). A flipped image's left offset is measured in the flipped image. `flip` flips
    without `rng` (the latent cache's flipped entries: the dataset flips after the crop too).
    `size`: the (width, height) to train at, an aspect-ratio bucket (default: the square of
    spec.resolution); the image is resized to cover it and cropped to it."""
    pixels, geometry, _ = transform_with_mask(image, None, spec, rng, flip, size)
    return pixels, geometry


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """A loss mask image as 1 x H x W weights in [0, 1] (white: learn, black: ignore; its
    alpha channel where it has one and no colour, else its grey level)."""
    if mask.mode in ("RGBA", "LA") and mask.getextrema()[0] == mask.getextrema()[-1]:
        mask = mask.getchannel("A")
    return to_tensor(mask, 1)


def transform_with_mask(
    image: Image.Image,
    mask: Image.Image | None,
    spec: TransformSpec,
    rng: torch.Generator | None,
    flip: bool = False,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`transform_with_geometry`, and the image's loss mask (data.masks) through the same
    resize, crop, rotation and flip (not the colour jitter): 1 x H x W in [0, 1], or None."""
    x = to_tensor(image, spec.channels, spec.background)
    original = x.shape[-2:]
    if mask is not None:
        m = mask_tensor(mask)
        if m.shape[-2:] != original:
            raise ValueError(
                f"its mask is {m.shape[-1]}x{m.shape[-2]} px, the image "
                f"{original[1]}x{original[0]}: a mask must have the image's size"
            )
        x = torch.cat([x, m])
    tw, th = size if size is not None else (spec.resolution, spec.resolution)
    x = _cover(x, th, tw).clamp_(0, 1)
    h, w = x.shape[-2:]
    if spec.center_crop or rng is None:
        top, left = center_crop_offsets(h, w, th, tw)
        x = TF.center_crop(x, [th, tw])
    else:
        top = int(torch.randint(0, h - th + 1, (), generator=rng))
        left = int(torch.randint(0, w - tw + 1, (), generator=rng))
        x = TF.crop(x, top, left, th, tw)
    if rng is not None:
        if spec.rotation > 0:
            angle = _uniform(rng, -spec.rotation, spec.rotation)
            x = TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR)
        if spec.hflip > 0 and float(torch.rand((), generator=rng)) < spec.hflip:
            flip = True
        if flip:
            x = TF.horizontal_flip(x)
        x, m_out = (x[:-1], x[-1:]) if mask is not None else (x, None)
        if spec.color_jitter > 0:
            s = spec.color_jitter
            x = TF.adjust_brightness(x, _uniform(rng, 1 - s, 1 + s))
            x = TF.adjust_contrast(x, _uniform(rng, 1 - s, 1 + s))
            if spec.channels == 3:
                x = TF.adjust_saturation(x, _uniform(rng, 1 - s, 1 + s))
    else:
        if flip:
            x = TF.horizontal_flip(x)
        x, m_out = (x[:-1], x[-1:]) if mask is not None else (x, None)
    if flip:
        left = w - left - tw
    geometry = torch.tensor([original[0], original[1], max(top, 0), max(left, 0)])
    return x.clamp(0, 1) * 2.0 - 1.0, geometry, None if m_out is None else m_out.clamp(0, 1)


def mask_at(mask: Image.Image, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """A mask through the deterministic part of `transform_with_mask` (cover, centre crop,
    flip): what the dataset gives for a cacheable transform, channel for channel."""
    tw, th = size
    m = _cover(mask_tensor(mask), th, tw).clamp_(0, 1)
    m = TF.center_crop(m, [th, tw])
    return TF.horizontal_flip(m) if flip else m
