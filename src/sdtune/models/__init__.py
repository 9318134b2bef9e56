"""Models: loading (presets, diffusers folders, hub cache, single files), bundles and freezing."""

from sdtune.models.bundle import ModelBundle, save_bundle
from sdtune.models.freezing import FreezeReport, apply_freezing
from sdtune.models.loading import describe, load_model

__all__ = ["FreezeReport", "ModelBundle", "apply_freezing", "describe", "load_model", "save_bundle"]
