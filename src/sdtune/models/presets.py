"""Tiny presets (`model.base = "preset:NAME"`): complete models built from configs with
seeded random weights, nothing downloaded. Each family module lists its own (PRESETS):
`tiny-sd` (every SD component at toy size, for the latent path and exports) and `tiny-digits`
(the CPU quickstart's pixel-space model)."""

from __future__ import annotations

import torch

from sdtune.errors import ModelError
from sdtune.models.bundle import ModelBundle
from sdtune.models.families import PRESETS


def build_preset(name: str, seed: int, dropout: float = 0.0) -> ModelBundle:
    """Build preset `name` with weights drawn from `seed` (the global RNG is left untouched)."""
    if name not in PRESETS:
        known = ", ".join(f"preset:{k}" for k in PRESETS)
        raise ModelError(f"model.base: unknown preset 'preset:{name}' (known: {known})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PRESETS[name](dropout=dropout)
