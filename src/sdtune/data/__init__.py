"""Data: sources (bundled digits, image folders), transforms, exact ordering, datasets."""

from sdtune.data.dataset import DataSplit, ImageTextDataset, build_datasets, collate
from sdtune.data.order import DataPosition, next_batch
from sdtune.data.sources import DIGIT_WORDS, digit_prompt

__all__ = [
    "DIGIT_WORDS",
    "DataPosition",
    "DataSplit",
    "ImageTextDataset",
    "build_datasets",
    "collate",
    "digit_prompt",
    "next_batch",
]
