"""DreamBooth (Ruiz et al. 2023): instance images under an identifier prompt, and class images
under the class prompt whose loss (weighted by prior_loss_weight) keeps the class prior.

Class images come from dreambooth.class_path or RUN/class_images; missing ones are sampled from
the base model before the first step, one file at a time (written atomically, so a killed
generation resumes where it stopped and gives the same images as an uninterrupted one).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sdtune.config import RunConfig
from sdtune.data.order import derive_seed
from sdtune.data.sources import IMAGE_SUFFIXES, Record
from sdtune.errors import DataError
from sdtune.files import atomic_output, read_user_text

CLASS_PREFIX = "class:"  # the names of class images (other code tells them apart by it)


def is_class_image(name: str) -> bool:
    """Whether a record (or a batch's row) of this name is a class image, not an instance."""
    return name.startswith(CLASS_PREFIX)


GEN_BATCH = 8


def class_dir(cfg: RunConfig, run_dir: Path) -> Path:
    return cfg.dreambooth.class_path or run_dir / "class_images"


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _class_prompt(cfg: RunConfig, index: int) -> str:
    prompts = cfg.dreambooth.class_prompt
    return prompts[index % len(prompts)]


def ensure_class_images(cfg: RunConfig, bundle, run_dir: Path, device, say) -> Path:
    """Top up the class folder to num_class_images by sampling the base model; returns it."""
    from torchvision.utils import save_image

    from sdtune.evaluate.sampling import generate

    db = cfg.dreambooth
    folder = class_dir(cfg, run_dir)
    images = _images_in(folder)
    own = [p for p in images if not p.name.startswith("class-")]  # the user's own class images
    needed = max(0, db.num_class_images - len(own))
    missing = [i for i in range(needed) if not (folder / f"class-{i:05d}.png").exists()]
    if not missing:
        say(f"dreambooth: {len(images)} class images in {folder}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    say(f"dreambooth: generating {len(missing)} class images into {folder} (base model)")
    # batches are aligned to GEN_BATCH and seeded by their first index, so an image is the same
    # whether it is generated in one go or after a kill
    for first in sorted({i - i % GEN_BATCH for i in missing}):
        indices = range(first, min(first + GEN_BATCH, needed))
        prompts = [_class_prompt(cfg, i) for i in indices]
        images_t = generate(
            bundle,
            prompts,
            seed=derive_seed(cfg.seed, "class-images", first) % 2**31,
            steps=db.class_sample_steps,
            guidance_scale=db.class_guidance_scale,
            sampler=cfg.evaluate.scheduler,
            resolution=cfg.data.resolution,
            device=device,
        )
        for i, image, prompt in zip(indices, images_t, prompts):
            path = folder / f"class-{i:05d}.png"
            if path.exists():
                continue
            (folder / f"class-{i:05d}.txt").write_text(prompt + "\n")
            with atomic_output(path) as tmp:  # the image last: a caption alone is rewritten
                save_image(image, tmp, format="PNG")
        done = needed - sum(1 for i in missing if i >= first + GEN_BATCH)
        say(f"dreambooth: {done}/{needed} generated class images")
    return folder


def class_records(cfg: RunConfig, folder: Path) -> list[Record]:
    """The first num_class_images class images, captioned by their .txt or the class prompt."""
    paths = _images_in(folder)[: cfg.dreambooth.num_class_images]
    if len(paths) < cfg.dreambooth.num_class_images:
        raise DataError(
            f"{folder}: {len(paths)} class images, dreambooth.num_class_images="
            f"{cfg.dreambooth.num_class_images}"
        )
    records = []
    for i, path in enumerate(paths):
        caption_file = path.with_suffix(".txt")
        caption = (
            read_user_text(caption_file).strip()
            if caption_file.is_file()
            else _class_prompt(cfg, i)
        )
        records.append(
            Record(
                name=f"{CLASS_PREFIX}{path.name}",
                caption=caption,
                path=path,
                weight=cfg.dreambooth.prior_loss_weight,
            )
        )
    return records


def dreambooth_records(
    instance: list[Record], classes: list[Record], instance_prompt: str
) -> list[Record]:
    """Instance images under the identifier prompt, repeated to balance the class images
    (as kohya's sd-scripts do), followed by the class images."""
    captioned = [replace(r, caption=instance_prompt) for r in instance]
    repeats = max(1, -(-len(classes) // len(captioned)))  # ceil: instances never outnumbered
    return [r for _ in range(repeats) for r in captioned] + classes


def with_dreambooth(cfg: RunConfig, data, bundle, run_dir: Path, device, accelerator, say):
    """The DataSplit with instance captions set and the class images (prior) added to training."""
    from sdtune.data.dataset import DataSplit, ImageTextDataset

    db = cfg.dreambooth
    assert db.instance_prompt is not None
    classes: list[Record] = []
    if db.prior_loss_weight > 0 and db.num_class_images > 0:
        if accelerator.is_main_process:
            ensure_class_images(cfg, bundle, run_dir, device, say)
        accelerator.wait_for_everyone()
        classes = class_records(cfg, class_dir(cfg, run_dir))
        for record in classes:
            record.open()  # a bad class image fails now, naming the file
    train = data.train
    records = dreambooth_records(train.records, classes, db.instance_prompt)
    say(
        f"dreambooth: {len(train.records)} instance images "
        f"x{(len(records) - len(classes)) // len(train.records)} + {len(classes)} class images "
        f"(prior loss weight {db.prior_loss_weight:g})"
    )
    new_train = ImageTextDataset(records, train.spec, train.seed, train.caption_dropout, True)
    new_train.tags = train.tags
    if classes:  # each batch half instance, half class images (DreamBooth's paired batches)
        new_train.paired = len(records) - len(classes)
    val = data.val
    if val is not None:
        val_records = [replace(r, caption=db.instance_prompt) for r in val.records]
        val = ImageTextDataset(val_records, val.spec, val.seed, 0.0, augment=False)
    return DataSplit(new_train, val, data.report, data.source)
