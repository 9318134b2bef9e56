"""The digits judge: a classifier trained on the real scikit-learn digits that scores generated
digit images. `judged_accuracy` is the fraction of images generated for "digit k" that the
judge reads as k (chance is 0.10).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from sdtune.data.sources import digit_prompt


def to_judge_space(images: torch.Tensor) -> np.ndarray:
    """N x C x H x W images in [0, 1] to N x 64 features on the digits' 8x8, 0..16 scale."""
    grey = images.float().mean(dim=1, keepdim=True)
    small = F.adaptive_avg_pool2d(grey, 8) if grey.shape[-1] != 8 else grey
    return (small.flatten(1) * 16.0).numpy()


def _roundtrip(images_8x8: np.ndarray, resolution: int) -> np.ndarray:
    """The real 8x8 digits as the training pipeline shows them: upscaled, then back to 8x8."""
    x = torch.from_numpy(images_8x8 / 16.0).float().unsqueeze(1)
    if resolution != 8:
        x = F.interpolate(x, size=resolution, mode="bicubic", antialias=True, align_corners=False)
    return to_judge_space(x.clamp(0, 1))


@dataclass
class JudgeResult:
    accuracy: float
    per_class: list[float]
    predictions: np.ndarray
    precision: list[float]
    recall: list[float]
    f1: list[float]


class DigitsJudge:
    """An RBF-SVM on the scikit-learn digits (gamma 0.001 as in scikit-learn's digits example),
    seen through the same resize as the training data."""

    def __init__(self, resolution: int = 16, seed: int = 0) -> None:
        digits = load_digits()
        x = _roundtrip(digits.images, resolution)
        x_train, x_test, y_train, y_test = train_test_split(
            x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
        )
        # No feature standardisation: the always-blank border pixels would get a near-zero
        # scale and let a faint background haze dominate the kernel; the 0..16 scale is shared.
        self.model = SVC(C=10.0, gamma=0.001)
        self.model.fit(x_train, y_train)
        self.held_out_accuracy = float((self.model.predict(x_test) == y_test).mean())

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.model.predict(to_judge_space(images))

    def judge(self, images: torch.Tensor, labels: list[int] | np.ndarray) -> JudgeResult:
        from sklearn.metrics import precision_recall_fscore_support

        labels = np.asarray(labels)
        pred = self.predict(images)
        per_class = [
            float((pred[labels == k] == k).mean()) for k in range(10) if (labels == k).any()
        ]
        p, r, f, _ = precision_recall_fscore_support(
            labels, pred, labels=list(range(10)), zero_division=0
        )
        return JudgeResult(
            float((pred == labels).mean()), per_class, pred, p.tolist(), r.tolist(), f.tolist()
        )


def judge_prompts(per_class: int) -> tuple[list[str], list[int]]:
    """`per_class` prompts for each digit 0..9 and their labels."""
    labels = [k for k in range(10) for _ in range(per_class)]
    return [digit_prompt(k) for k in labels], labels


def run_judge(bundle, cfg, run_dir, device, say=print) -> float:
    """Generate judge_per_class images per digit from the prompts, judge them, save the evidence."""
    import json

    from sdtune.evaluate.sampling import generate_as_configured, save_grid

    judge = DigitsJudge(cfg.data.resolution, seed=cfg.seed)
    say(f"judge: SVM on the real digits, held-out accuracy {judge.held_out_accuracy:.4f}")
    prompts, labels = judge_prompts(cfg.evaluate.judge_per_class)
    images = generate_as_configured(bundle, cfg, prompts, 1, device)
    result = judge.judge(images, labels)
    per_class = " ".join(f"{k}:{a:.2f}" for k, a in enumerate(result.per_class))
    say(f"judge: {len(labels)} generated images, per-digit accuracy {per_class}")
    grid = save_grid(images, run_dir / "judge_samples.png", nrow=cfg.evaluate.judge_per_class)
    say(f"judge: images in {grid}")
    (run_dir / "judge.json").write_text(
        json.dumps(
            {
                "judged_accuracy": result.accuracy,
                "judge_held_out_accuracy": judge.held_out_accuracy,
                "per_class_accuracy": result.per_class,
                "precision": result.precision,
                "recall": result.recall,
                "f1": result.f1,
                "num_images": len(labels),
            },
            indent=2,
        )
        + "\n"
    )
    return result.accuracy
