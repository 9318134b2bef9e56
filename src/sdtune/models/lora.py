"""LoRA adapters through peft: add them for training, load trained ones for sampling, merge.

The UNet's adapters go in through diffusers' `add_adapter` (so that its `set_adapters` can mix
several LoRAs when sampling); the text encoder's through peft's own `inject_adapter_in_model`,
never through transformers' adapter mixin, whose peft version gate is one coupling fewer to
break an install. Either way names, scaling and dropout are peft's; parameter names look like
`unet.<module>.lora_A.default.weight`.
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


ADAPTER_MARKS = {"lora": ".lora_", "dora": ".lora_", "loha": ".hada_", "lokr": ".lokr_"}
"""Where peft keeps each variant's weights: `<module>.lora_...` and so on (DoRA's magnitude
is `lora_magnitude_vector`)."""


def is_adapter_weight(name: str) -> bool:
    """Whether a parameter name is an adapter's (any variant) rather than the base model's."""
    return any(mark in name for mark in ADAPTER_MARKS.values())


def adapter_config(settings: LoraSettings, target_modules: str):
    """peft's config of the variant `lora.variant` names, at `lora.rank` and `lora.alpha`."""
    peft = _peft()
    alpha = settings.alpha if settings.alpha is not None else float(settings.rank)
    if settings.variant in ("lora", "dora"):
        return peft.LoraConfig(
            r=settings.rank,
            lora_alpha=alpha,
            lora_dropout=settings.dropout,
            init_lora_weights="gaussian",
            use_dora=settings.variant == "dora",
            target_modules=target_modules,
        )
    if settings.variant == "loha":  # Hyeon-Woo et al. 2022, as in LyCORIS
        return peft.LoHaConfig(r=settings.rank, alpha=alpha, target_modules=target_modules)
    return peft.LoKrConfig(  # Yeh et al. 2024, as in LyCORIS
        r=settings.rank,
        alpha=alpha,
        decompose_factor=settings.lokr_factor,
        target_modules=target_modules,
    )


def add_lora(bundle: ModelBundle, settings: LoraSettings) -> None:
    """Inject trainable adapters (the lora.variant) into the denoiser (and the text encoders
    when asked)."""

    def config(module, targets, key):
        return adapter_config(settings, _target_regex(module, targets, key))

    defaults = bundle.arch.lora_targets  # the family's, unless the config names them
    denoiser = bundle.denoiser
    targets = settings.unet_targets or defaults["denoiser"]
    denoiser.add_adapter(config(denoiser, targets, "lora.unet_targets"))
    if settings.text_encoder:  # the family's text encoders (SD3: the CLIP ones, not T5)
        targets = settings.text_encoder_targets or defaults["text_encoder"]
        names = bundle.arch.lora_text_encoders or tuple(bundle.text_encoders)
        for name in names:
            encoder = bundle.modules[name]
            inject(encoder, config(encoder, targets, "lora.text_encoder_targets"), ADAPTER)


def inject(module: torch.nn.Module, config, name: str) -> None:
    """Add adapter `name` to `module` with peft itself, keeping the configs of earlier ones in
    `module.peft_config` (peft records only the newest)."""
    peft = _peft()
    earlier = dict(getattr(module, "peft_config", None) or {})
    peft.inject_adapter_in_model(config, module, adapter_name=name)
    module.peft_config = {**earlier, name: config}


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
    alpha = config.lora_alpha if hasattr(config, "lora_alpha") else config.alpha
    return float(alpha), int(config.r)


def adapter_variant(module: torch.nn.Module) -> str:
    """'lora', 'dora', 'loha' or 'lokr': the variant of `module`'s trained adapter."""
    config = module.peft_config[ADAPTER]
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if kind == "lora":
        return "dora" if config.use_dora else "lora"
    return kind


def merge_lora(bundle: ModelBundle, scale: float = 1.0) -> None:
    """Bake every adapter into its base weight, times `scale`, and remove the adapter layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in bundle.components().values():
        if not has_lora(module):
            continue
        with torch.no_grad():
            for layer in module.modules():
                if isinstance(layer, BaseTunerLayer):
                    layer.scale_layer(scale)
                    layer.merge(safe_merge=True)
        _strip(module)


def remove_adapters(bundle: ModelBundle) -> None:
    """Take every adapter out, unmerged: the base model as it was loaded."""
    for module in bundle.components().values():
        if has_lora(module):
            _strip(module)


def _strip(module: torch.nn.Module) -> None:
    """Replace each adapter layer by its base layer and forget the adapters' configs."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(module)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(module, attr):
            try:
                delattr(module, attr)
            except AttributeError:
                setattr(module, attr, None if attr == "peft_config" else False)


def load_lora_files(bundle: ModelBundle, files: list[tuple[Path, float]]) -> None:
    """Load trained LoRAs (diffusers/peft or kohya format) into the bundle with their scales."""
    denoiser, encoders = bundle.denoiser, bundle.text_encoders
    prefixes = (f"{bundle.arch.denoiser}.", *(f"{n}." for n in encoders))
    names, scales = [], []
    taken = set(getattr(denoiser, "peft_config", {}) or {})
    for path, scale in files:
        if not path.is_file():
            raise UserError(f"--lora {path}: no such file")
        name = next(f"lora{i}" for i in range(len(taken) + 1) if f"lora{i}" not in taken)
        taken.add(name)
        peft_type, keys, configs = _peft_file_type(path)
        if peft_type is None and any(".hada_" in k or ".lokr_" in k for k in keys):
            raise UserError(
                f"--lora {path}: a LyCORIS LoHa/LoKr file in kohya's layout, which diffusers' "
                "loader does not read; sdtune loads LoRA files (diffusers or kohya) and the "
                "LoHa/LoKr it trained itself (RUN/model/adapters_peft.safetensors)"
            )
        if peft_type in ("LOHA", "LOKR"):  # sdtune's own LoHa/LoKr file (peft's layout)
            _load_peft_file(bundle, path, name, configs)
            names.append(name)
            scales.append(scale)
            continue
        try:  # diffusers reads both layouts (kohya keys are converted) and the peft metadata
            state, alphas, metadata = bundle.arch.read_lora_file(str(path), bundle)
        except UserError:  # the family's own one-line reason
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            first = first if len(first) <= 160 else first[:160] + "..."
            raise UserError(
                f"--lora {path}: not a LoRA file diffusers can read ({first})"
            ) from None
        _check_finite(path, state, alphas)
        if not any(k.startswith(prefixes) for k in state):
            raise UserError(f"--lora {path}: holds no LoRA weights for this model's components")
        try:
            bundle.arch.load_denoiser_lora(bundle, state, alphas, metadata, name)
            for component, encoder in encoders.items():
                if any(k.startswith(f"{component}.") for k in state):
                    _load_text_encoder_lora(state, alphas, metadata, encoder, name, component)
        except (ValueError, RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--lora {path}: does not fit this model ({first})") from None
        names.append(name)
        scales.append(scale)
    previous = [n for n in getattr(denoiser, "peft_config", {}) if n not in names]
    if previous:  # adapters loaded before (a trained LoRA run's own) stay at full strength
        names, scales = previous + names, [1.0] * len(previous) + scales
    denoiser.set_adapters(names, weights=scales)
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters  # peft layers only

    for encoder in encoders.values():
        if has_lora(encoder):
            loaded = [n for n in names if n in getattr(encoder, "peft_config", {})]
            weights = [scales[names.index(n)] for n in loaded]
            set_weights_and_activate_adapters(encoder, loaded, weights)


def _check_finite(path: Path, state: dict, alphas: dict | None) -> None:
    """A LoRA file whose weights or alphas hold NaN/inf would turn every image into NaN."""
    for name, value in [*state.items(), *(alphas or {}).items()]:
        tensor = torch.as_tensor(value)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(
                f"--lora {path}: {name} holds NaN or infinite values; the file is damaged "
                "(re-export it, or take an earlier checkpoint's)"
            )


def _peft_file_type(path: Path) -> tuple[str | None, list[str], dict]:
    """The peft type sdtune recorded in a LoRA file's header ('LORA', 'LOHA', ...), if any,
    the file's tensor names and the recorded adapter configs (none where it is not a
    readable .safetensors)."""
    import json

    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return None, [], {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            configs = json.loads((fh.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
    except Exception:  # noqa: BLE001 - diffusers' loader says what is wrong with the file
        return None, [], {}
    kinds = {str(v) for k, v in configs.items() if k.endswith(".peft_type")}
    return (kinds.pop() if len(kinds) == 1 else None), keys, configs


def _load_peft_file(bundle: ModelBundle, path: Path, name: str, configs: dict) -> None:
    """An adapter file in peft's layout with its configs in the header (sdtune's LoHa/LoKr):
    each component's adapter injected as peft configured it, then its weights set."""
    import dataclasses

    from peft import set_peft_model_state_dict
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from safetensors.torch import load_file

    state = load_file(str(path))
    _check_finite(path, state, None)
    found = False
    for component, module in bundle.components().items():
        prefix = f"{component}."
        weights = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if not weights:
            continue
        kwargs = {k.removeprefix(prefix): v for k, v in configs.items() if k.startswith(prefix)}
        try:
            cls = PEFT_TYPE_TO_CONFIG_MAPPING[kwargs["peft_type"]]
            fields = {f.name for f in dataclasses.fields(cls)} - {"peft_type"}
            config = cls(**{k: v for k, v in kwargs.items() if k in fields})
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"--lora {path}: its {component} adapter config is damaged ({exc})"
            ) from None
        if hasattr(module, "get_input_embeddings") and not hasattr(module, "text_model"):
            weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
        if component == bundle.arch.denoiser:
            module.add_adapter(config, adapter_name=name)  # diffusers' bookkeeping too
        else:
            inject(module, config, name)
        result = set_peft_model_state_dict(module, weights, adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        if unexpected:
            raise UserError(
                f"--lora {path}: {component} weights with no matching layer, e.g. {unexpected[0]}"
            )
        found = True
    if not found:
        raise UserError(f"--lora {path}: holds no adapter weights for this model's components")


def _load_text_encoder_lora(state, alphas, metadata, text_encoder, name: str, component: str):
    """The `<component>.` part of a LoRA file (as diffusers' loader has read it) into that text
    encoder as adapter `name`, through peft itself."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        get_peft_kwargs,
    )
    from peft import LoraConfig, set_peft_model_state_dict

    prefix = f"{component}."
    te_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    te_state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_state))
    if not hasattr(text_encoder, "text_model"):  # transformers 5 dropped that level
        te_state = {k.removeprefix("text_model."): v for k, v in te_state.items()}
    if metadata:  # the LoraConfig the file was saved with
        kwargs = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    else:  # ranks from the weights, alphas from the file (kohya) or = rank
        ranks = {k: v.shape[1] for k, v in te_state.items() if k.endswith("lora_B.weight")}
        te_alphas = {
            k.removeprefix(prefix): v for k, v in (alphas or {}).items() if k.startswith(prefix)
        }
        kwargs = get_peft_kwargs(ranks, te_alphas or None, te_state, is_unet=False)
    inject(text_encoder, LoraConfig(**kwargs), name)
    result = set_peft_model_state_dict(text_encoder, te_state, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
    if unexpected:
        raise KeyError(f"text-encoder LoRA weights with no matching layer, e.g. {unexpected[0]}")
