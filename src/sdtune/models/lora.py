"""LoRA adapters through peft: add them for training, load trained ones for sampling, merge.

Adapters are injected with the libraries' own `add_adapter` (diffusers for the UNet,
transformers for the text encoder), so names, scaling and dropout are peft's; parameter names
look like `unet.<module>.lora_A.default.weight`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sdtune.config import LoraConfig as LoraSettings
from sdtune.errors import ConfigError, UserError
from sdtune.models.bundle import ModelBundle

ADAPTER = "default"


def _peft():
    try:
        import peft
    except ImportError as exc:  # a core dependency; say so rather than fail deep inside
        raise UserError("LoRA needs peft: pip install 'peft>=0.13'") from exc
    return peft


def _target_regex(module: torch.nn.Module, targets: list[str], key: str) -> str:
    """A full-name regex for the Linear/Conv modules whose names end in one of `targets`."""
    names = [
        n
        for n, m in module.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        and any(n == t or n.endswith("." + t) for t in targets)
    ]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(
            f"{key}: {', '.join(repr(t) for t in missing)} match no Linear or Conv2d module "
            "(e.g. to_q, to_k, to_v, to_out.0, ff.net.0.proj for the UNet; q_proj, fc1 for CLIP)"
        )
    return "|".join(re.escape(n) for n in names)


def add_lora(bundle: ModelBundle, settings: LoraSettings) -> None:
    """Inject trainable LoRA adapters into the UNet (and the text encoder when asked)."""
    peft = _peft()
    alpha = settings.alpha if settings.alpha is not None else float(settings.rank)

    def config(module, targets, key):
        return peft.LoraConfig(
            r=settings.rank,
            lora_alpha=alpha,
            lora_dropout=settings.dropout,
            init_lora_weights="gaussian",
            target_modules=_target_regex(module, targets, key),
        )

    bundle.unet.add_adapter(config(bundle.unet, settings.unet_targets, "lora.unet_targets"))
    if settings.text_encoder:
        te_config = config(
            bundle.text_encoder, settings.text_encoder_targets, "lora.text_encoder_targets"
        )
        bundle.text_encoder.add_adapter(te_config, adapter_name=ADAPTER)


def has_lora(module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of `module` in peft's saved layout (`<module>.lora_A.weight`)."""
    from peft.utils import get_peft_model_state_dict

    return {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER).items()
    }


def lora_alpha_rank(module: torch.nn.Module) -> tuple[float, int]:
    config = module.peft_config[ADAPTER]
    return float(config.lora_alpha), int(config.r)


def merge_lora(bundle: ModelBundle, scale: float = 1.0) -> None:
    """Bake every adapter into its base weight, times `scale`, and remove the adapter layers."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in (bundle.unet, bundle.text_encoder):
        if not has_lora(module):
            continue
        with torch.no_grad():
            for layer in module.modules():
                if isinstance(layer, BaseTunerLayer):
                    layer.scale_layer(scale)
                    layer.merge(safe_merge=True)
        recurse_remove_peft_layers(module)
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if hasattr(module, attr):
                try:
                    delattr(module, attr)
                except AttributeError:
                    setattr(module, attr, None if attr == "peft_config" else False)


def load_lora_files(bundle: ModelBundle, files: list[tuple[Path, float]]) -> None:
    """Load trained LoRAs (diffusers/peft or kohya format) into the bundle with their scales."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    names, scales = [], []
    taken = set(getattr(bundle.unet, "peft_config", {}) or {})
    for path, scale in files:
        if not path.is_file():
            raise UserError(f"--lora {path}: no such file")
        name = next(f"lora{i}" for i in range(len(taken) + 1) if f"lora{i}" not in taken)
        taken.add(name)
        try:  # diffusers reads both layouts (kohya keys are converted) and the peft metadata
            state, alphas, metadata = Loader.lora_state_dict(str(path), return_lora_metadata=True)
        except Exception as exc:
            raise UserError(f"--lora {path}: not a LoRA file diffusers can read ({exc})") from None
        if not any(k.startswith(("unet.", "text_encoder.")) for k in state):
            raise UserError(f"--lora {path}: holds no UNet or text-encoder LoRA weights")
        try:
            Loader.load_lora_into_unet(
                state, alphas, bundle.unet, adapter_name=name, metadata=metadata
            )
            if any(k.startswith("text_encoder.") for k in state):
                Loader.load_lora_into_text_encoder(
                    state,
                    alphas,
                    bundle.text_encoder,
                    prefix="text_encoder",
                    adapter_name=name,
                    metadata=metadata,
                )
        except (ValueError, RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--lora {path}: does not fit this model ({first})") from None
        names.append(name)
        scales.append(scale)
    previous = [n for n in getattr(bundle.unet, "peft_config", {}) if n not in names]
    if previous:  # adapters loaded before (a trained LoRA run's own) stay at full strength
        names, scales = previous + names, [1.0] * len(previous) + scales
    bundle.unet.set_adapters(names, weights=scales)
    if has_lora(bundle.text_encoder):
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        loaded = [n for n in names if n in getattr(bundle.text_encoder, "peft_config", {})]
        set_weights_and_activate_adapters(
            bundle.text_encoder, loaded, [scales[names.index(n)] for n in loaded]
        )
