"""Write trained adapters in the files users load: LoRA for diffusers/peft and for kohya tools
(AUTOMATIC1111, ComfyUI), and textual-inversion embeddings (AUTOMATIC1111, ComfyUI, diffusers).

The kohya file is written by hand: diffusers' `convert_state_dict_to_kohya` stores
alpha = rank whatever the adapter's lora_alpha was, which changes the strength of any LoRA
trained with alpha != rank; and SD 1.x/2.x kohya files name the text encoder `lora_te_`.
LoHa and LoKr go in the same file under LyCORIS's names (hada_*, lokr_*), which ComfyUI and
AUTOMATIC1111 read; diffusers' LoRA loader reads neither, so their diffusers-side file is
peft's layout (PEFT_FILE), which sdtune loads back. DoRA has no kohya file: see kohya_state.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.errors import UserError
from sdtune.files import atomic_output
from sdtune.models.bundle import ModelBundle
from sdtune.models.embeddings import learned_vectors
from sdtune.models.lora import (
    ADAPTER_MARKS,
    adapter_variant,
    has_lora,
    is_adapter_weight,
    lora_alpha_rank,
    lora_state,
)

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
PEFT_FILE = "adapters_peft.safetensors"  # LoHa/LoKr in peft's layout: sdtune and peft read it
KOHYA_FILE = "lora_kohya.safetensors"
VARIANT_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


def _atomic_save(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return path


def _sdtune_metadata(meta: dict) -> dict[str, str]:
    return {f"sdtune.{k}": str(v) for k, v in meta.items()}


def adapted(bundle: ModelBundle) -> dict[str, torch.nn.Module]:
    """The components that carry LoRA adapters, by component name."""
    return {name: m for name, m in bundle.components().items() if has_lora(m)}


def _require_lora(bundle: ModelBundle) -> None:
    if not adapted(bundle):
        raise UserError(
            "this checkpoint has no LoRA adapters (it was not trained with lora.enabled); "
            "export it with --format diffusers or single-file"
        )


def _standard_names(module) -> dict[str, torch.Tensor]:
    """LoRA weights named as the ecosystem names them: transformers 5's CLIPTextModel dropped
    the `text_model.` level that LoRA files (and kohya's lora_te_text_model_...) carry."""
    state = lora_state(module)
    if hasattr(module, "get_input_embeddings") and not hasattr(module, "text_model"):
        state = {f"text_model.{k}": v for k, v in state.items()}
    return state


def save_lora_diffusers(bundle: ModelBundle, path: Path, meta: dict) -> Path:
    """The diffusers/peft LoRA file (`pipeline.load_lora_weights` loads it), with the adapters'
    LoraConfig in the header so rank and alpha survive the trip."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    _require_lora(bundle)
    state: dict[str, torch.Tensor] = {}
    configs: dict[str, object] = {}
    for prefix, module in adapted(bundle).items():  # diffusers names them by component
        state.update({f"{prefix}.{k}": v for k, v in _standard_names(module).items()})
        config = module.peft_config["default"].to_dict()
        for key, value in config.items():
            configs[f"{prefix}.{key}"] = sorted(value) if isinstance(value, set) else value
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(configs, sort_keys=True, default=str),
        **_sdtune_metadata(meta),
    }
    return _atomic_save(state, path, metadata)


def variant_of(bundle: ModelBundle) -> str:
    """The adapters' variant ('lora', 'dora', 'loha', 'lokr'), one for the whole model."""
    _require_lora(bundle)
    return adapter_variant(next(iter(adapted(bundle).values())))


DORA_REFUSAL = (
    "a DoRA has no kohya file that reads as trained: peft normalises its magnitude per output "
    "channel by the adapted weight, ComfyUI by the base weight and AUTOMATIC1111 per input "
    "channel; export the merged model for them (--format single-file) or the diffusers LoRA "
    "(--format lora)"
)


def kohya_refusal(bundle: ModelBundle) -> str | None:
    """Why the adapters have no kohya file (None: they have one): DoRA never does, and a
    family may not hold some variant in its kohya layout (SD3's fused qkv and LoKr)."""
    variant = variant_of(bundle)
    if variant == "dora":
        return DORA_REFUSAL
    return bundle.arch.kohya_refusal(bundle, variant)


def _kohya_kinds(
    state: dict[str, torch.Tensor], variant: str
) -> dict[str, dict[str, torch.Tensor]]:
    """peft's adapter weights of one component by module, under kohya's weight kinds
    (lora_down.weight / lora_up.weight; hada_w1_a, ...; lokr_w1, ...)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if variant == "lora":
            name, _, kind = key.rpartition(".lora_")
            kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}.get(kind)
        else:
            marker = ADAPTER_MARKS[variant]
            name, _, kind = key.rpartition(marker)
            kind = marker[1:] + kind if name else None
        if kind is None:
            raise UserError(f"cannot write {key} in kohya format")
        modules.setdefault(name, {})[kind] = value
    return modules


def kohya_state(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The adapters under kohya's names, lora_unet_<module>.<weight>: LoRA as lora_down,
    lora_up and alpha; LoHa as hada_w1_a/b, hada_w2_a/b and alpha; LoKr as lokr_w1(_a/_b),
    lokr_w2(_a/_b) with peft's alpha / rank folded into the first factor and no alpha (ComfyUI
    and AUTOMATIC1111 apply alpha / rank only to factored LoKr weights, peft to all). The
    family names the modules (kohya_modules: SD3's are the original MMDiT's)."""
    refusal = kohya_refusal(bundle)
    if refusal is not None:
        raise UserError(refusal)
    variant = variant_of(bundle)
    out: dict[str, torch.Tensor] = {}
    for component, module in adapted(bundle).items():
        prefix = bundle.arch.kohya_prefixes[component]
        alpha, rank = lora_alpha_rank(module)
        modules = _kohya_kinds(_standard_names(module), variant)
        named = bundle.arch.kohya_modules(bundle, component, modules, alpha, variant)
        for name, (weights, module_alpha) in named.items():
            kohya = f"{prefix}_{name.replace('.', '_')}"
            if variant != "lokr":
                out[f"{kohya}.alpha"] = torch.tensor(module_alpha)
            for kind, value in weights.items():
                if variant == "lokr" and kind in ("lokr_w1", "lokr_w1_a"):
                    value = value * (alpha / rank)  # the scale peft applies; see the docstring
                out[f"{kohya}.{kind}"] = value
    return out


def save_lora_kohya(bundle: ModelBundle, path: Path, meta: dict) -> Path:
    """A kohya-format LoRA (.safetensors) with sd-scripts' ss_* metadata."""
    state = kohya_state(bundle)
    modules = adapted(bundle)
    alpha, rank = lora_alpha_rank(modules.get(bundle.arch.denoiser) or next(iter(modules.values())))
    text = any(bundle.arch.is_text_encoder(c) for c in modules)
    now = str(int(time.time()))
    variant = variant_of(bundle)
    args: dict = {"text_encoder": text}
    if variant != "lora":  # named as LyCORIS names its networks
        args["algo"] = variant
    metadata = {
        "ss_network_module": "networks.lora" if variant == "lora" else "lycoris.kohya",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_output_name": path.stem,
        "ss_sd_model_name": str(meta.get("base_model", "")),
        "ss_steps": str(meta.get("steps", "")),
        "ss_training_finished_at": now,
        "ss_network_args": json.dumps(args),
        "sshs_model_hash": _hash_tensors(state),
        **bundle.arch.kohya_metadata(bundle),  # ss_base_model_version, ss_v2, modelspec.*
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        **_sdtune_metadata(meta),
    }
    return _atomic_save(state, path, metadata)


def _hash_tensors(state: dict[str, torch.Tensor]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].float().numpy().tobytes())
    return digest.hexdigest()


def save_embedding(bundle: ModelBundle, path: Path, token: str, meta: dict) -> Path:
    """The learned vectors as an AUTOMATIC1111/ComfyUI embedding (`emb_params`), which
    diffusers' `load_textual_inversion(path, token=...)` also reads."""
    vectors = learned_vectors(bundle)
    count = next(iter(vectors.values())).shape[0]
    metadata = {"sdtune.token": token, "sdtune.num_vectors": str(count)}
    state = bundle.arch.embedding_file(vectors)  # the family's layout (emb_params; clip_l/g)
    return _atomic_save(state, path, {**metadata, **_sdtune_metadata(meta)})


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def trains_adapters_only(bundle: ModelBundle) -> bool:
    """Whether every trainable parameter is a LoRA weight or a textual-inversion vector."""
    names = [
        n for m in bundle.components().values() for n, p in m.named_parameters() if p.requires_grad
    ]
    return bool(names) and all(
        is_adapter_weight(n) or n.endswith("token_embedding.vectors") for n in names
    )


def merged_copy(bundle: ModelBundle, lora_scale: float = 1.0) -> ModelBundle:
    """A copy of the bundle with its LoRA baked in (times lora_scale) and new tokens folded into
    a plain embedding table: an ordinary model any tool loads."""
    import copy

    from sdtune.models.embeddings import merge_tokens
    from sdtune.models.lora import merge_lora

    merged = copy.deepcopy(bundle)
    merge_lora(merged, lora_scale)
    merge_tokens(merged)
    merged.extra_tokens = dict(bundle.extra_tokens)
    return merged


def final_model_files(bundle: ModelBundle, directory: Path, cfg, meta: dict) -> None:
    """RUN/model: the adapters alone (small files users load beside their base), or a full
    diffusers folder when base weights were trained too."""
    from sdtune.models.bundle import save_bundle

    meta = {"base_model": cfg.model.base, **meta}
    if not trains_adapters_only(bundle):
        save_bundle(merged_copy(bundle), directory, meta)
        return
    base = Path(cfg.model.base).expanduser()
    base = str(base.resolve()) if base.exists() else cfg.model.base
    write_adapter_folder(
        bundle,
        directory,
        base,
        cfg.model.config_source,
        cfg.seed,
        cfg.textual_inversion.token,
        meta,
    )


def write_adapter_folder(
    bundle: ModelBundle,
    directory: Path,
    base: str,
    config_source: str | None,
    seed: int,
    token: str | None,
    meta: dict,
) -> None:
    """An adapters folder (sdtune_model.json kind "adapters", which `model.base`, `sdtune
    sample` and the merge read as `base` with these adapters): the LoRA in the diffusers/peft
    file and the kohya file, and the textual-inversion embedding of `token`."""
    from sdtune.models.bundle import MODEL_FILE

    directory.mkdir(parents=True, exist_ok=True)
    info: dict = {
        "kind": "adapters",
        "family": bundle.family,
        "base": base,
        "config_source": config_source,
        "seed": seed,
        **({"left_out": sorted(bundle.left_out)} if bundle.left_out else {}),  # e.g. no T5
        **meta,
    }
    if adapted(bundle):
        variant = variant_of(bundle)
        own = LORA_FILE if variant in ("lora", "dora") else PEFT_FILE
        save_lora_diffusers(bundle, directory / own, meta)
        if kohya_refusal(bundle) is None:  # see kohya_state
            save_lora_kohya(bundle, directory / KOHYA_FILE, meta)
        info["lora"] = own
        info["lora_variant"] = variant
    if token is not None:
        save_embedding(bundle, directory / "embedding.safetensors", token, meta)
        info["embedding"] = {"file": "embedding.safetensors", "token": token}
    (directory / MODEL_FILE).write_text(json.dumps(info, indent=2) + "\n")
