"""Generator metrics: is the model improving, collapsing, or copying its training set?

- judged accuracy and per-class precision/recall/F1 for labelled data (the digits judge);
- generative precision and recall on k-NN manifolds (Kynkäänniemi et al. 2019): precision is
  the share of generated images inside the real manifold (fidelity), recall the share of real
  images inside the generated one (coverage; mode collapse shows as low recall);
- diversity: mean pairwise distance of generated images over that of real ones (1 is healthy,
  near 0 is collapse);
- memorisation: share of generated images closer to a training image than `ratio` times the
  typical distance of a held-out image to the training set (copying, on small fine-tunes);
- FID/KID through torchmetrics, only when its Inception weights are on disk (never downloaded).

Features are images resized to 16x16 (grey for one channel): exact and dependency-free; on
photographs FID's Inception features are the stronger signal where available.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


class MetricUnavailable(Exception):
    """A metric cannot be computed here; the message says which file or package is missing."""


def image_features(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """N x C x H x W images in [0, 1] to N x D float64 features (area-resized pixels)."""
    x = (
        F.interpolate(images.float(), size=(size, size), mode="area")
        if images.shape[-1] != size
        else images.float()
    )
    return x.flatten(1).double()


def _kth_nn_radius(feats: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, sec. 3) with k-NN radii."""
    k = min(k, len(real) - 1, len(fake) - 1)
    if k < 1:
        raise MetricUnavailable("precision/recall need at least 2 real and 2 generated images")
    real_r, fake_r = _kth_nn_radius(real, k), _kth_nn_radius(fake, k)
    d = torch.cdist(fake, real)  # fake x real
    precision = (d <= real_r[None, :]).any(dim=1).double().mean()
    recall = (d.T <= fake_r[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)


def diversity(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Mean pairwise distance among generated images over that among real ones."""

    def mean_pairwise(x: torch.Tensor) -> float:
        d = torch.cdist(x, x)
        n = len(x)
        return float(d.sum() / max(n * (n - 1), 1))

    return mean_pairwise(fake) / max(mean_pairwise(real), 1e-12)


def memorisation(
    train: torch.Tensor, held_out: torch.Tensor, fake: torch.Tensor, ratio: float = 0.5
) -> float:
    """Share of generated images nearer a training image than `ratio` x the median distance of
    held-out images to their nearest training image."""
    typical = torch.cdist(held_out, train).min(dim=1).values.median()
    nearest = torch.cdist(fake, train).min(dim=1).values
    return float((nearest < ratio * typical).double().mean())


def fid_kid(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """FID and KID (torchmetrics) if the package and its Inception weights are present locally."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as exc:
        raise MetricUnavailable("FID/KID need torchmetrics: pip install 'sdtune[metrics]'") from exc
    import os

    weights = os.path.join(
        torch.hub.get_dir(), "checkpoints", "pt_inception-2015-12-05-6726825d.pth"
    )
    if not os.path.isfile(weights):
        raise MetricUnavailable(
            f"FID/KID need the Inception weights file {weights} (sdtune never downloads)"
        )
    to_rgb = (lambda x: x.expand(-1, 3, -1, -1)) if real.shape[1] == 1 else (lambda x: x)
    fid, kid = (
        FrechetInceptionDistance(normalize=True),
        KernelInceptionDistance(normalize=True, subset_size=min(50, len(fake))),
    )
    for metric in (fid, kid):
        metric.update(to_rgb(real), real=True)
        metric.update(to_rgb(fake), real=False)
    return {"fid": float(fid.compute()), "kid": float(kid.compute()[0])}


FEW_REFERENCE = 50  # held-out images below which precision/recall are only a rough sign


@dataclass
class GeneratorReport:
    values: dict[str, float]
    notes: list[str]


def generator_metrics(
    fake: torch.Tensor, real: torch.Tensor, train: torch.Tensor, k: int = 3, ratio: float = 0.5
) -> GeneratorReport:
    """Precision, recall, diversity and memorisation of `fake` against held-out `real` and `train`
    images (all N x C x H x W in [0, 1]); FID/KID when available, else a note saying why not."""
    f_fake, f_real, f_train = image_features(fake), image_features(real), image_features(train)
    precision, recall = precision_recall(f_real, f_fake, k)
    values = {
        "gen_precision": precision,
        "gen_recall": recall,
        "diversity": diversity(f_real, f_fake),
        "memorisation": memorisation(f_train, f_real, f_fake, ratio),
    }
    notes = []
    if len(real) < FEW_REFERENCE:  # k-NN balls around a handful of images cover everything
        notes.append(
            f"precision/recall: few reference images ({len(real)} held out, k={k} nearest "
            f"neighbours): the numbers mean little below {FEW_REFERENCE}; hold out more "
            "images (data.val_fraction or data.val_path)"
        )
    try:
        values.update(fid_kid(real, fake))
    except MetricUnavailable as exc:
        notes.append(f"FID/KID skipped: {exc}")
    return GeneratorReport(values, notes)


def judged_metrics(judge, images: torch.Tensor, labels) -> dict[str, float]:
    """judged_accuracy and macro precision/recall/F1 from a classifier's reading of `images`."""
    result = judge.judge(images, labels)
    return {
        "judged_accuracy": result.accuracy,
        "judged_precision": float(np.mean(result.precision)),
        "judged_recall": float(np.mean(result.recall)),
        "judged_f1": float(np.mean(result.f1)),
    }
