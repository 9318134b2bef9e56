"""Choose trainable parameters by name pattern and report trainable vs frozen counts."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from sdtune.errors import ConfigError
from sdtune.models.bundle import ModelBundle


def compile_pattern(pattern: str, key: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"{key}: bad regular expression {pattern!r}: {exc}") from exc
    return re.compile(fnmatch.translate(pattern))


@dataclass
class FreezeReport:
    rows: list[tuple[str, int, int]] = field(default_factory=list)
    """(group, trainable count, frozen count), one row per top-level block."""

    @property
    def trainable(self) -> int:
        return sum(r[1] for r in self.rows)

    @property
    def frozen(self) -> int:
        return sum(r[2] for r in self.rows)

    def table(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [len("group")])
        lines = [f"{'group':<{width}}  {'trainable':>12}  {'frozen':>12}"]
        for name, t, f in self.rows:
            lines.append(f"{name:<{width}}  {t:>12,}  {f:>12,}")
        lines.append(f"{'total':<{width}}  {self.trainable:>12,}  {self.frozen:>12,}")
        return "\n".join(lines)


def _group(name: str) -> str:
    parts = name.split(".")
    # unet.down_blocks.0.x -> unet.down_blocks.0 ; text_encoder.text_model.encoder.layers.1 -> ..layers
    depth = 3 if len(parts) > 3 and parts[2].isdigit() else 2
    return ".".join(parts[:depth])


def apply_freezing(bundle: ModelBundle, trainable: list[str], frozen: list[str]) -> FreezeReport:
    """Set requires_grad from the patterns; the VAE always stays frozen. Returns the count table."""
    train_res = [(p, compile_pattern(p, "model.trainable")) for p in trainable]
    frozen_res = [(p, compile_pattern(p, "model.frozen")) for p in frozen]
    used: set[str] = set()
    groups: dict[str, list[int]] = {}
    denoiser = bundle.arch.denoiser
    examples: list[str] = []
    for component, module in bundle.components().items():
        for pname, param in module.named_parameters():
            name = f"{component}.{pname}"
            if not examples or (component != "vae" and examples[-1].split(".")[0] != component):
                examples.append(name)
            # "unet." names the denoiser whatever the family calls it (SD3's transformer), as
            # kohya's lora_unet_ does: the default ["unet.*"] trains every family's denoiser
            names = (name, f"unet.{pname}") if component == denoiser != "unet" else (name,)
            hits = [p for p, rx in train_res if any(rx.fullmatch(n) for n in names)]
            blocks = [p for p, rx in frozen_res if any(rx.fullmatch(n) for n in names)]
            used.update(hits, blocks)
            is_trainable = bool(hits) and not blocks
            if is_trainable and component == "vae":
                raise ConfigError(
                    f"model.trainable: {hits[0]!r} selects VAE parameters ({name}); the VAE stays frozen"
                )
            param.requires_grad_(is_trainable)
            counts = groups.setdefault(_group(name), [0, 0])
            counts[0 if is_trainable else 1] += param.numel()
    for pattern in list(trainable) + list(frozen):
        if pattern not in used:
            key = "model.trainable" if pattern in trainable else "model.frozen"
            raise ConfigError(
                f"{key}: pattern {pattern!r} matches no parameter (this model's names look "
                f"like {' or '.join(examples[:3])})"
            )
    return FreezeReport([(g, c[0], c[1]) for g, c in groups.items()])


def count_parameters(bundle: ModelBundle) -> FreezeReport:
    """The trainable/frozen table as the parameters' requires_grad flags stand now."""
    groups: dict[str, list[int]] = {}
    for component, module in bundle.components().items():
        for pname, param in module.named_parameters():
            counts = groups.setdefault(_group(f"{component}.{pname}"), [0, 0])
            counts[0 if param.requires_grad else 1] += param.numel()
    return FreezeReport([(g, c[0], c[1]) for g, c in groups.items()])
