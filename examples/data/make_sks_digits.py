"""Write examples/data/sks-digits/: forty real UCI digits (four of each), turned upside down
and enlarged to 64x64 like small photos, each with a same-stem caption file that says "in sks
style". The folder is committed; this script is how it was made (run it to make it again).

    python examples/data/make_sks_digits.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from sdtune.data.sources import DIGIT_WORDS, digits_records

FOLDER = Path(__file__).resolve().parent / "sks-digits"
PER_DIGIT = 4


def main() -> None:
    FOLDER.mkdir(exist_ok=True)
    taken = {d: 0 for d in range(10)}
    # from the end of the set, so that these are not the quickstart's first images
    for record in reversed(digits_records()):
        if taken[record.label] == PER_DIGIT:
            continue
        taken[record.label] += 1
        name = f"{DIGIT_WORDS[record.label]}-{taken[record.label]}"
        image = record.open().rotate(180).resize((64, 64), Image.Resampling.BICUBIC)
        image.save(FOLDER / f"{name}.png", optimize=True)
        caption = f"a handwritten digit {DIGIT_WORDS[record.label]} in sks style\n"
        (FOLDER / f"{name}.txt").write_text(caption)
    print(f"wrote {sum(taken.values())} images with captions to {FOLDER}")


if __name__ == "__main__":
    main()
