"""The training and validation datasets, their split, and batch collation."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdtune.config import DataConfig
from sdtune.data.order import BucketIds, generator
from sdtune.data.sources import (
    Record,
    ScanReport,
    TagSpec,
    apply_tags,
    digits_records,
    folder_records,
    kohya_records,
)
from sdtune.data.transforms import TransformSpec, transform_with_mask
from sdtune.errors import DataError

MEMO_BYTES = 512 * 2**20


class ImageTextDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by (epoch, example index): augmentations and caption dropout
    are drawn from a generator seeded by (seed, epoch, index), so they are reproducible."""

    def __init__(
        self,
        records: list[Record],
        spec: TransformSpec,
        seed: int,
        caption_dropout: float = 0.0,
        augment: bool = True,
    ) -> None:
        self.records = records
        self.spec = spec
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.augment = augment
        # Without random augmentation an image's tensor never changes: keep it when it fits.
        size = len(records) * spec.channels * spec.resolution**2 * 4
        self._memo: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = (
            {} if not spec.is_random and size <= MEMO_BYTES else None
        )
        self.tags = TagSpec()
        """Tag shuffling and dropout of the captions (training only: augment)."""
        self.bucket_ids: tuple[int, ...] | None = None
        """Each record's aspect-ratio bucket, where there are several (see set_buckets)."""
        self.paired: int | None = None
        """With DreamBooth, how many records (the first) are instance images: the rest are
        class images, and each epoch's order deals one of each in turn (data.order)."""

    def set_buckets(self, sizes: list[tuple[int, int]] | None) -> None:
        """Train record i at sizes[i] (width, height); batches then keep to one size."""
        for record, size in zip(self.records, sizes or [None] * len(self.records)):
            record.bucket = size
        distinct = sorted(set(sizes or []))
        index = {size: i for i, size in enumerate(distinct)}
        self.bucket_ids = (
            BucketIds(index[s] for s in sizes) if sizes and len(distinct) > 1 else None
        )
        if self._memo is not None:
            self._memo.clear()

    def tagged(self, caption: str, epoch: int, index: int) -> str:
        """`caption` of example `index` after its tag shuffling and dropout in `epoch` (its
        dataset's options, else data.*'s): the same for the image path and the cache's."""
        return apply_tags(caption, self.records[index].tags or self.tags, self.seed, epoch, index)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        record = self.records[index]
        rng = generator(self.seed, "example", epoch, index) if self.augment else None
        memo = self._memo.get(index) if self._memo is not None else None
        if memo is None:
            random = rng if self.spec.is_random else None
            try:
                memo = transform_with_mask(
                    record.open(), record.open_mask(), self.spec, random, size=record.bucket
                )
            except ValueError as exc:  # a mask that does not fit its image
                raise DataError(f"{record.path or record.name}: {exc}") from None
            if self._memo is not None:
                self._memo[index] = memo
        pixels, geometry, mask = memo
        caption = record.caption
        if rng is not None and self.caption_dropout > 0:
            if float(torch.rand((), generator=rng)) < self.caption_dropout:
                caption = ""
        if rng is not None:
            caption = self.tagged(caption, epoch, index)
        return {
            "pixel_values": pixels,
            "caption": caption,
            "label": record.label,
            "name": record.name,
            "weight": record.weight,
            "geometry": geometry,
            "mask": mask,
        }


def collate(items: list[dict]) -> dict:
    batch = {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "captions": [it["caption"] for it in items],
        "labels": torch.tensor([it["label"] for it in items]),
        "names": [it["name"] for it in items],
        "weights": torch.tensor([it.get("weight", 1.0) for it in items]),
        "geometry": torch.stack([it["geometry"] for it in items]),
    }
    masks = [it.get("mask") for it in items]
    if any(m is not None for m in masks):  # an image without a mask counts whole
        shape = (1, *items[0]["pixel_values"].shape[-2:])
        batch["masks"] = torch.stack([m if m is not None else torch.ones(shape) for m in masks])
    return batch


@dataclass
class DataSplit:
    train: ImageTextDataset
    val: ImageTextDataset | None
    report: ScanReport
    source: str


def _split(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    if fraction <= 0:
        return records, []
    order = np.random.default_rng([seed, 7]).permutation(len(records))
    n_val = max(1, int(round(len(records) * fraction)))
    val_ids = set(order[:n_val].tolist())
    train = [r for i, r in enumerate(records) if i not in val_ids]
    val = [r for i, r in enumerate(records) if i in val_ids]
    return train, val


def _apply_policy(
    report: ScanReport, cfg: DataConfig, say: Callable[[str], None], report_path: Path | None
) -> None:
    """Skip the bad files (listed), or stop with every one of them listed (up to 20 here, all in
    data_report.json, written first) so that they can be fixed at once."""
    if not report.problems:
        return
    n = len(report.problems)
    verb = "skipped" if cfg.on_bad_file == "skip" else "bad file"
    for file, reason in report.problems[:20]:
        say(f"{verb} {file}: {reason}")
    if n > 20:
        say(f"... and {n - 20} more (all listed in data_report.json)")
    if cfg.on_bad_file == "error":
        if report_path is not None:
            write_report(report, report_path, cfg.on_bad_file)
        first_file, first_reason = report.problems[0]
        more = f" ({n} bad files in total, listed above" if n > 1 else ""
        if more:
            more += f" and in {report_path})" if report_path is not None else ")"
        raise DataError(
            f"{first_file}: {first_reason}{more}; fix it, or set data.on_bad_file='skip' to leave bad files out"
        )
    say(f"data: skipped {n} bad file(s) (data.on_bad_file='skip')")


def write_report(report: ScanReport, path: Path, policy: str) -> None:
    """data_report.json: every bad file and why, what was upscaled, and the policy applied."""
    found = report.to_dict()
    if policy == "error":  # nothing was skipped: the run stopped on them
        found["bad_files"] = found.pop("skipped")
    path.write_text(json.dumps({**found, "on_bad_file": policy}, indent=2) + "\n")


def apply_buckets(data: DataSplit, cfg: DataConfig, step: int, group: int, say):
    """Put every training and held-out image in its aspect-ratio bucket (data.buckets) and say
    the table (kept in data.report for data_report.json); none with data.buckets = false."""
    from sdtune.data.buckets import (
        BucketSettings,
        assign_buckets,
        validation_buckets,
    )

    if cfg.buckets is False:
        return None
    explicit = None if cfg.buckets is True else tuple(tuple(s) for s in cfg.buckets)
    settings = BucketSettings(cfg.resolution, step, cfg.max_aspect, cfg.bucket_no_upscale, explicit)
    records = data.train.records
    sizes = [r.image_size() for r in records]
    chosen, table = assign_buckets([r.name for r in records], sizes, settings, group)
    data.train.set_buckets(chosen)
    if data.val is not None:
        val_sizes = [r.image_size() for r in data.val.records]
        data.val.set_buckets(validation_buckets(val_sizes, table))
    for line in table.lines():
        say(f"data: {line}")
    data.report.buckets = table.to_dict()
    return table


def _folder_sources(cfg: DataConfig, report: ScanReport, say) -> tuple[list[Record], str]:
    """The records of data.path or of every [[data.datasets]] entry: captions with each
    entry's prefix, suffix and template, each record's repeats (applied after the validation
    split, so that no held-out image is trained on) and its entry's tag options."""
    from sdtune.config import DatasetEntry

    entries = cfg.datasets or [DatasetEntry(path=cfg.path, kohya_folders=cfg.kohya_folders)]
    out: list[Record] = []
    described = []
    for entry in entries:

        def own(key: str, entry: DatasetEntry = entry):
            value = getattr(entry, key)
            return getattr(cfg, key) if value is None else value

        ext, column = own("caption_extension"), own("caption_column")
        masks = (cfg.uses_masks, None if cfg.datasets else cfg.mask_path)
        if entry.kohya_folders:
            found = kohya_records(entry.path, ext, cfg.resolution, report, column, masks)
        else:
            records = folder_records(entry.path, ext, cfg.resolution, report, column, False, *masks)
            found = [(r, 1, "") for r in records]
        template = own("caption_template")
        tags = TagSpec(own("shuffle_tags"), own("keep_tokens"), own("tag_dropout"))
        folders: dict[str, int] = {}
        for record, repeats, folder_text in found:
            caption = record.caption
            if folder_text:  # kohya: the folder's text goes first, as a tag of its own
                caption = f"{folder_text}, {caption}" if caption else folder_text
            record.caption = caption
            _template([record], template)  # then the entry's prefix and suffix around it
            record.caption = entry.caption_prefix + record.caption + entry.caption_suffix
            record.repeats = repeats * entry.repeats
            record.tags = tags
            if cfg.datasets and record.path is not None:  # unique across the folders
                record.name = str(record.path)
            folders[folder_text] = folders.get(folder_text, 0) + 1
            out.append(record)
        if cfg.datasets or entry.kohya_folders:
            parts = ", ".join(f"{n} in '{t}'" if t else f"{n}" for t, n in folders.items())
            say(
                f"data: {entry.path}: {len(found)} images ({parts}), x{entry.repeats:g}"
                + (f", caption prefix {entry.caption_prefix!r}" if entry.caption_prefix else "")
            )
        described.append(f"{entry.path}" + (f" (x{entry.repeats:g})" if entry.repeats != 1 else ""))
    return out, ", ".join(described)


def _template(records: list[Record], template: str | None) -> None:
    """Each caption put into data.caption_template (or its dataset's) at '{caption}'."""
    if template is not None:
        for record in records:
            record.caption = template.replace("{caption}", record.caption)


def _repeated(records: list[Record], seed: int) -> list[Record]:
    """Each record `repeats` times (whole copies, then a fixed seeded share of them for a
    fraction: 1.5 is every image once and half of them twice), in a stable order."""
    from dataclasses import replace

    if all(r.repeats == 1 for r in records):
        return records
    out: list[Record] = []
    rng = np.random.default_rng([seed, 11])
    fractions = rng.random(len(records))
    for record, draw in zip(records, fractions):
        whole = int(record.repeats)
        copies = whole + (draw < record.repeats - whole)
        out += [record if i == 0 else replace(record) for i in range(copies)]
    return out


def build_datasets(
    cfg: DataConfig,
    channels: int,
    seed: int,
    say: Callable[[str], None] = print,
    report_path: Path | None = None,
) -> DataSplit:
    """Scan the source, report problems, split train/validation deterministically from `seed`.
    With `report_path`, bad files that stop the run are written there before it stops."""
    report = ScanReport()
    split_seed = cfg.split_seed if cfg.split_seed is not None else seed  # which images
    if cfg.source == "digits":
        records = digits_records()
        source = "digits (UCI handwritten digits, scikit-learn)"
        if cfg.labels is not None:
            records = [r for r in records if r.label in set(cfg.labels)]
            source += f", digits {', '.join(map(str, sorted(set(cfg.labels))))}"
        _template(records, cfg.caption_template)
    else:
        records, source = _folder_sources(cfg, report, say)  # each folder templated its own
    val_records: list[Record] = []
    if cfg.val_path is not None:
        val_records = folder_records(
            cfg.val_path, cfg.caption_extension, cfg.resolution, report, cfg.caption_column,
            False, cfg.uses_masks, None,
        )  # fmt: skip
        _template(val_records, cfg.caption_template)
    _apply_policy(report, cfg, say, report_path)
    if cfg.val_path is None:
        records, val_records = _split(records, cfg.val_fraction, split_seed)
    records = _repeated(records, split_seed)
    if cfg.uses_masks and not any(r.mask for r in records):
        say(
            "data: warning: data.masks is on but no training image has a mask (cat_mask.png "
            "beside cat.png, or the same name in data.mask_path): every image counts whole"
        )
    if cfg.limit is not None:
        records = records[: cfg.limit]
    if not records:
        raise DataError(f"data: no usable training images in {source}")
    square = cfg.buckets is False  # with buckets, their table says what is scaled and cut
    names = {(255, 255, 255): "white", (0, 0, 0): "black"}
    background = names.get(tuple(cfg.background), f"RGB {tuple(cfg.background)}")
    for line in report.conversions(
        channels, cfg.resolution, cropped=square, scaled=square, background=background
    ):
        say(f"data: {line}")
    spec = TransformSpec(
        resolution=cfg.resolution,
        channels=channels,
        center_crop=cfg.center_crop,
        hflip=cfg.hflip,
        rotation=cfg.rotation,
        color_jitter=cfg.color_jitter,
        background=tuple(cfg.background),
    )
    train = ImageTextDataset(records, spec, seed, cfg.caption_dropout, augment=True)
    train.tags = TagSpec(cfg.shuffle_tags, cfg.keep_tokens, cfg.tag_dropout)
    val = ImageTextDataset(val_records, spec, seed, 0.0, augment=False) if val_records else None
    return DataSplit(train, val, report, source)
