"""Where examples come from: the bundled digits set, or a folder of images with captions.

A folder is scanned once at start: every image is decoded and every caption looked up, and
each problem is reported with the file's name (fatal or skipped, as data.on_bad_file says).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sdtune.data.order import generator
from sdtune.errors import DataError, UserError
from sdtune.files import read_user_text

TEXT_SUFFIXES = (".txt", ".caption", ".json", ".jsonl", ".csv", ".toml", ".md")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_prompt(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[label]}"


@dataclass(frozen=True)
class TagSpec:
    """Caption tag options (data.shuffle_tags, data.keep_tokens, data.tag_dropout)."""

    shuffle: bool = False
    keep: int = 0
    dropout: float = 0.0

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout > 0


def apply_tags(caption: str, spec: TagSpec, seed: int, epoch: int, index: int) -> str:
    """The caption's comma-separated tags after the first `spec.keep`: each dropped with
    probability `spec.dropout`, then shuffled; drawn from a generator of (seed, epoch, index)
    of its own, so a resumed run and the latent cache see the same caption."""
    if not spec.active or not caption:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, rest = tags[: spec.keep], tags[spec.keep :]
    rng = generator(seed, "tags", epoch, index)
    if spec.dropout > 0 and rest:
        draws = torch.rand(len(rest), generator=rng).tolist()
        rest = [t for t, d in zip(rest, draws) if d >= spec.dropout]
    if spec.shuffle and len(rest) > 1:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=rng).tolist()]
    return ", ".join(head + rest)


@dataclass
class Record:
    """One example before preprocessing: an image (in memory or a file), its caption and label."""

    name: str
    caption: str
    image: Image.Image | None = None
    path: Path | None = None
    label: int = -1
    weight: float = 1.0
    """Loss weight of this example (DreamBooth's class images carry the prior-loss weight)."""
    size: tuple[int, int] | None = None
    """The image's (width, height) in pixels, as scanned (None: read when needed)."""
    bucket: tuple[int, int] | None = None
    """The (width, height) it is trained at (data.buckets); None: the data.resolution square."""
    tags: TagSpec | None = None
    """Its dataset's own tag options ([[data.datasets]]); None: data.*'s."""
    repeats: float = 1.0
    """How many times it counts per epoch ([[data.datasets]] repeats, kohya folders' N)."""
    mask: Path | None = None
    """Its loss mask image (data.masks), or None: every pixel counts."""
    difficulty: float | None = None
    """Its difficulty score from the metadata's difficulty column (curriculum stages select
    by it); None: the metadata has none for it."""

    def open_mask(self) -> Image.Image | None:
        return None if self.mask is None else _read_upright(self.mask, "mask")

    def image_size(self) -> tuple[int, int]:
        if self.size is None:
            if self.image is not None:
                self.size = self.image.size
            else:
                assert self.path is not None
                try:
                    with Image.open(self.path) as im:
                        self.size = _upright_size(im)
                except (OSError, UnidentifiedImageError, ValueError) as exc:
                    raise DataError(f"{self.path}: cannot read image: {exc}") from exc
        return self.size

    def open(self) -> Image.Image:
        if self.image is not None:
            return self.image
        assert self.path is not None
        return _read_upright(self.path, "image")


def _read_upright(path: Path, what: str) -> Image.Image:
    """The image file decoded, turned upright by its EXIF orientation (a phone's rotated shot)."""
    try:
        with Image.open(path) as im:
            im.load()
            upright = ImageOps.exif_transpose(im)
            return upright if upright is not im else im.copy()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path}: cannot read {what}: {exc}") from exc


@dataclass
class ScanReport:
    """What a scan found wrong; nothing is ever dropped without a line here."""

    problems: list[tuple[str, str]] = field(default_factory=list)
    small: list[str] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)
    """How many images of each PIL mode the folder holds (what is converted, and to what)."""
    transparent: int = 0
    """Images with transparency (flattened onto data.background)."""
    rotated: int = 0
    """Images turned upright by their EXIF orientation."""
    masked: int = 0
    """Images with a loss mask (data.masks)."""
    crop_loss: list[tuple[str, float]] = field(default_factory=list)
    """(image, fraction of its area a square crop cuts off), for images that are not square."""

    buckets: dict | None = None
    """The aspect-ratio bucket table (data.buckets), once the images are in their buckets."""

    def to_dict(self) -> dict:
        out = {
            "skipped": [{"file": f, "reason": r} for f, r in self.problems],
            "smaller_than_resolution": self.small,
            "modes": self.modes,
            "transparent": self.transparent,
        }
        if self.buckets is None:
            out["square_crop_cuts"] = [
                {"file": f, "fraction": round(c, 4)} for f, c in self.crop_loss
            ]
        else:
            out["buckets"] = self.buckets
        return out

    def conversions(
        self,
        channels: int,
        resolution: int,
        cropped: bool,
        scaled: bool = True,
        background: str = "white",
    ) -> list[str]:
        """What preprocessing does to these images, each said once (not per image)."""
        lines = []
        grey = sum(n for m, n in self.modes.items() if m in ("L", "LA", "1", "I", "I;16", "F"))
        colour = sum(self.modes.values()) - grey
        if channels == 3 and grey:
            lines.append(f"{grey} greyscale image(s) converted to RGB")
        if channels == 1 and colour:
            lines.append(f"{colour} colour image(s) converted to one (grey) channel")
        if self.modes.get("CMYK"):
            lines.append(f"{self.modes['CMYK']} CMYK image(s) converted to RGB")
        if self.transparent:
            lines.append(
                f"{self.transparent} image(s) with transparency flattened onto {background}"
            )
        if self.rotated:
            lines.append(f"{self.rotated} image(s) turned upright by their EXIF orientation")
        if self.masked:
            lines.append(f"{self.masked} image(s) with a loss mask (data.masks)")
        if scaled and self.small:
            lines.append(
                f"{len(self.small)} image(s) smaller than data.resolution={resolution} are "
                f"upscaled (e.g. {self.small[0]})"
            )
        if cropped and self.crop_loss:
            name, worst = max(self.crop_loss, key=lambda item: item[1])
            over = sum(1 for _, c in self.crop_loss if c > 0.1)
            lines.append(
                f"{len(self.crop_loss)} image(s) not square: the square crop cuts off up to "
                f"{worst:.0%} of an image ({name}); {over} lose more than 10%"
            )
        return lines


def digits_records() -> list[Record]:
    """The UCI handwritten digits (1,797 8x8 images, shipped inside scikit-learn), captioned."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return [
        Record(f"digits#{i}", digit_prompt(int(label)), Image.fromarray(img, "L"), label=int(label))
        for i, (img, label) in enumerate(zip(pixels, digits.target))
    ]


def _find_mask(path: Path, root: Path, mask_root: Path | None, size) -> tuple[Path | None, str]:
    """The image's mask (beside it as <stem>_mask.*, or under mask_root by its relative
    name), checked to be readable and of the image's size: (mask or None, problem or "")."""
    if mask_root is not None:
        rel = path.relative_to(root).with_suffix("")
        candidates = [mask_root / rel.with_suffix(s) for s in sorted(IMAGE_SUFFIXES)]
    else:
        candidates = [path.with_name(f"{path.stem}_mask{s}") for s in sorted(IMAGE_SUFFIXES)]
    found = [c for c in candidates if c.is_file()]
    if not found:
        return None, ""
    mask = found[0]
    try:
        with Image.open(mask) as im:
            im.load()
            mask_size = _upright_size(im)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"cannot read its mask {mask.name} ({exc})"
    if size is not None and mask_size != size:
        return None, (
            f"its mask {mask.name} is {mask_size[0]}x{mask_size[1]} px, the image "
            f"{size[0]}x{size[1]}: a mask must have the image's size"
        )
    return mask, ""


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels as stored
        return 1


def _upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied (5-8 turn it by 90 degrees)."""
    return im.size[::-1] if _orientation(im) in (5, 6, 7, 8) else im.size


def _check_image(path: Path, report: ScanReport) -> tuple[str | None, tuple[int, int] | None]:
    try:
        with Image.open(path) as im:
            im.load()
            report.modes[im.mode] = report.modes.get(im.mode, 0) + 1
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                report.transparent += 1
            orientation = _orientation(im)
            report.rotated += orientation != 1
            return None, im.size[::-1] if orientation in (5, 6, 7, 8) else im.size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        return f"cannot read image ({exc})", None


DIFFICULTY = "difficulty"  # the metadata column of an example's difficulty score


def _metadata_row(path: Path, n: int, row: dict, column: str = "text"):
    """One checked row: a file name and a caption that are both text, and the difficulty
    score when the row has one (a number; empty in a CSV: none)."""
    file_name, text = row["file_name"], row[column]
    if not isinstance(file_name, str) or not file_name.strip():
        raise DataError(f"{path}:{n}: 'file_name' must be a file name (got {file_name!r})")
    if not isinstance(text, str):
        raise DataError(
            f"{path}:{n}: '{column}' must be a caption string (got {text!r}); write \"\" for none"
        )
    raw = row.get(DIFFICULTY)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return file_name, text, n, None
    try:
        score = float("nan") if isinstance(raw, bool) else float(raw)
    except (TypeError, ValueError):
        score = float("nan")
    if not math.isfinite(score):
        raise DataError(
            f"{path}:{n}: '{DIFFICULTY}' must be a number (got {raw!r}); leave it empty for none"
        )
    return file_name, text, n, score


def _metadata_rows(path: Path, column: str = "text") -> list[tuple[str, str, int, float | None]]:
    """(file_name, caption, line, difficulty) rows of metadata.jsonl or metadata.csv, the
    caption from `column` (data.caption_column), with one-line errors."""
    rows: list[tuple[str, str, int, float | None]] = []
    text = read_user_text(path)
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or "file_name" not in row or column not in row:
                raise DataError(f"{path}:{n}: each line needs 'file_name' and '{column}'")
            rows.append(_metadata_row(path, n, row, column))
    else:
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            missing = {"file_name", column} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
            for row in reader:
                n = reader.line_num
                if None in row or any(v is None for v in row.values()):
                    raise DataError(f"{path}:{n}: not as many fields as the header has columns")
                rows.append(_metadata_row(path, n, row, column))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    return rows


def folder_records(
    root: Path,
    caption_extension: str,
    resolution: int,
    report: ScanReport,
    column: str = "text",
    captions_optional: bool = False,
    masks: bool = False,
    mask_root: Path | None = None,
) -> list[Record]:
    """Records of an image folder (same-stem captions) or of its metadata.jsonl/.csv; with
    `captions_optional`, an image without a caption file is captioned "" (kohya's folders)."""
    if not root.exists():
        raise DataError(f"data.path: {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder")
    meta = next(
        (root / m for m in ("metadata.jsonl", "metadata.csv") if (root / m).is_file()), None
    )
    entries: list[tuple[Path, str | None]] = []
    scores: dict[Path, float] = {}
    if meta is not None:
        for file_name, text, line, score in _metadata_rows(meta, column):
            path = root / file_name
            if not path.is_file():
                report.problems.append((str(path), f"listed in {meta.name}:{line} but missing"))
                continue
            entries.append((path, text))
            if score is not None:
                scores[path] = score
    else:
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if masks and mask_root is None:  # cat_mask.png is cat.png's mask, not an image
            images = [p for p in images if not p.stem.endswith("_mask")]
        for path in images:
            caption_file = path.with_suffix(caption_extension)
            if not caption_file.is_file():
                if captions_optional:
                    entries.append((path, ""))
                    continue
                report.problems.append((str(path), f"no caption file {caption_file.name}"))
                continue
            try:
                entries.append((path, read_user_text(caption_file).strip()))
            except UserError as exc:  # named with its line; fatal or skipped as configured
                where, _, reason = str(exc).partition(": ")
                report.problems.append((where, f"cannot read caption ({reason})"))
    records = []
    for path, text in entries:
        problem, size = _check_image(path, report)
        if problem:
            report.problems.append((str(path), problem))
            continue
        if size is not None and min(size) < resolution:
            report.small.append(str(path))
        if size is not None and size[0] != size[1]:
            report.crop_loss.append((str(path), 1 - min(size) / max(size)))
        mask = None
        if masks or mask_root is not None:
            mask, problem = _find_mask(path, root, mask_root, size)
            if problem:
                report.problems.append((str(path), problem))
                continue
            report.masked += mask is not None
        records.append(
            Record(
                str(path.relative_to(root)),
                text or "",
                path=path,
                size=size,
                mask=mask,
                difficulty=scores.get(path),
            )  # fmt: skip
        )
    if not records and not report.problems:
        kinds = "/".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"data.path: {root} holds no images ({kinds}) and no metadata file")
    return records


KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


def kohya_records(
    root: Path,
    caption_extension: str,
    resolution: int,
    report: ScanReport,
    column: str = "text",
    masks: tuple[bool, Path | None] = (False, None),
) -> list[tuple[Record, int, str]]:
    """(record, repeats, caption prefix) of a folder laid out as kohya-ss's trainers read it:
    each subfolder 'N_text' holds images repeated N times, 'text' going before their captions.
    Anything else in the folder is an error naming it (never a silent skip)."""
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder")
    out: list[tuple[Record, int, str]] = []
    for sub in sorted(root.iterdir()):
        if sub.name.startswith(".") or sub.name.endswith(TEXT_SUFFIXES):
            continue
        match = KOHYA_FOLDER.match(sub.name) if sub.is_dir() else None
        if match is None or int(match.group(1)) < 1:
            what = "subfolder" if sub.is_dir() else "file"
            raise DataError(
                f"{sub}: a {what} that data.kohya_folders cannot read: images go in subfolders "
                "named N_text (e.g. '10_sks dog': ten repeats, 'sks dog' before the captions)"
            )
        records = folder_records(
            sub, caption_extension, resolution, report, column, True, masks[0], None
        )
        for record in records:
            record.name = f"{sub.name}/{record.name}"
            out.append((record, int(match.group(1)), match.group(2).strip()))
    if not out:
        raise DataError(f"data.path: {root} holds no N_text subfolders of images")
    return out
