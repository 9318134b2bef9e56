"""Generate a fixed set of images and measure them (used by `sdtune eval` and during training)."""

from __future__ import annotations

import torch

from sdtune.data.dataset import collate
from sdtune.evaluate.metrics import generator_metrics, judged_metrics
from sdtune.evaluate.sampling import generate_as_configured


def _images(dataset, count: int) -> torch.Tensor:
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    return (collate(items)["pixel_values"] + 1) / 2


def assess(bundle, cfg, data, device, num_images: int) -> tuple[dict[str, float], list[str]]:
    """Generator metrics of `num_images` images from fixed prompts and seed against the data."""
    if data.val is None:
        return {}, ["generator metrics skipped: no held-out images (data.val_fraction = 0)"]
    if len(data.val) < 2:
        return {}, [
            f"generator metrics skipped: {len(data.val)} held-out image; they need at least 2 "
            "(raise data.val_fraction or add images)"
        ]
    labels = None
    if cfg.data.source == "digits":
        from sdtune.evaluate.judge import judge_prompts

        prompts, labels = judge_prompts(max(1, num_images // 10))
    else:
        captions = [r.caption for r in data.val.records] or [r.caption for r in data.train.records]
        prompts = [captions[i % len(captions)] for i in range(num_images)]
    fake = generate_as_configured(bundle, cfg, prompts, 2, device)
    report = generator_metrics(
        fake, _images(data.val, len(fake)), _images(data.train, 4 * len(fake))
    )
    values = dict(report.values)
    if labels is not None:
        from sdtune.evaluate.judge import DigitsJudge

        values.update(judged_metrics(DigitsJudge(cfg.data.resolution, seed=cfg.seed), fake, labels))
    return values, report.notes
