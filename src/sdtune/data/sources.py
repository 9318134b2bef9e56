"""Where examples come from: the bundled digits set, or a folder of images with captions.

A folder is scanned once at start: every image is decoded and every caption looked up, and
each problem is reported with the file's name (fatal or skipped, as data.on_bad_file says).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdtune.errors import DataError, UserError
from sdtune.files import read_user_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_prompt(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[label]}"


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

    def image_size(self) -> tuple[int, int]:
        if self.size is None:
            if self.image is not None:
                self.size = self.image.size
            else:
                assert self.path is not None
                try:
                    with Image.open(self.path) as im:
                        self.size = im.size
                except (OSError, UnidentifiedImageError, ValueError) as exc:
                    raise DataError(f"{self.path}: cannot read image: {exc}") from exc
        return self.size

    def open(self) -> Image.Image:
        if self.image is not None:
            return self.image
        assert self.path is not None
        try:
            with Image.open(self.path) as im:
                im.load()
                return im.copy()
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"{self.path}: cannot read image: {exc}") from exc


@dataclass
class ScanReport:
    """What a scan found wrong; nothing is ever dropped without a line here."""

    problems: list[tuple[str, str]] = field(default_factory=list)
    small: list[str] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)
    """How many images of each PIL mode the folder holds (what is converted, and to what)."""
    transparent: int = 0
    """Images with transparency (flattened onto white)."""
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
        self, channels: int, resolution: int, cropped: bool, scaled: bool = True
    ) -> list[str]:
        """What preprocessing does to these images, each said once (not per image)."""
        lines = []
        grey = sum(n for m, n in self.modes.items() if m in ("L", "LA", "1", "I", "I;16", "F"))
        colour = sum(self.modes.values()) - grey
        if channels == 3 and grey:
            lines.append(f"{grey} greyscale image(s) converted to RGB")
        if channels == 1 and colour:
            lines.append(f"{colour} colour image(s) converted to one (grey) channel")
        if self.transparent:
            lines.append(f"{self.transparent} image(s) with transparency flattened onto white")
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


def _check_image(path: Path, report: ScanReport) -> tuple[str | None, tuple[int, int] | None]:
    try:
        with Image.open(path) as im:
            im.load()
            report.modes[im.mode] = report.modes.get(im.mode, 0) + 1
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                report.transparent += 1
            return None, im.size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        return f"cannot read image ({exc})", None


def _metadata_row(path: Path, n: int, file_name, text) -> tuple[str, str, int]:
    """One checked row: a file name and a caption that are both text."""
    if not isinstance(file_name, str) or not file_name.strip():
        raise DataError(f"{path}:{n}: 'file_name' must be a file name (got {file_name!r})")
    if not isinstance(text, str):
        raise DataError(
            f"{path}:{n}: 'text' must be a caption string (got {text!r}); write \"\" for none"
        )
    return file_name, text, n


def _metadata_rows(path: Path) -> list[tuple[str, str, int]]:
    """(file_name, text, line) rows of metadata.jsonl or metadata.csv, with one-line errors."""
    rows: list[tuple[str, str, int]] = []
    text = read_user_text(path)
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
                raise DataError(f"{path}:{n}: each line needs 'file_name' and 'text'")
            rows.append(_metadata_row(path, n, row["file_name"], row["text"]))
    else:
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            missing = {"file_name", "text"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
            for row in reader:
                n = reader.line_num
                if None in row or any(v is None for v in row.values()):
                    raise DataError(f"{path}:{n}: not as many fields as the header has columns")
                rows.append(_metadata_row(path, n, row["file_name"], row["text"]))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    return rows


def folder_records(
    root: Path, caption_extension: str, resolution: int, report: ScanReport
) -> list[Record]:
    """Records of an image folder (same-stem captions) or of its metadata.jsonl/.csv."""
    if not root.exists():
        raise DataError(f"data.path: {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder")
    meta = next(
        (root / m for m in ("metadata.jsonl", "metadata.csv") if (root / m).is_file()), None
    )
    entries: list[tuple[Path, str | None]] = []
    if meta is not None:
        for file_name, text, line in _metadata_rows(meta):
            path = root / file_name
            if not path.is_file():
                report.problems.append((str(path), f"listed in {meta.name}:{line} but missing"))
                continue
            entries.append((path, text))
    else:
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            caption_file = path.with_suffix(caption_extension)
            if not caption_file.is_file():
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
        records.append(Record(str(path.relative_to(root)), text or "", path=path, size=size))
    if not records and not report.problems:
        kinds = "/".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"data.path: {root} holds no images ({kinds}) and no metadata file")
    return records
