"""The one eval-mode context: sampling, validation, class images and the base's predictions
run without dropout, and whatever mode each module was in comes back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def evaluating(*modules: torch.nn.Module) -> Iterator[None]:
    """`modules` in eval mode, each one's mode restored on exit."""
    modes = [(module, module.training) for module in modules]
    for module, _ in modes:
        module.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)
