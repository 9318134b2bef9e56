"""Write trained adapters in the files users load: LoRA for diffusers/peft and for kohya tools
(AUTOMATIC1111, ComfyUI), and textual-inversion embeddings (AUTOMATIC1111, ComfyUI, diffusers).

The kohya file is written by hand: diffusers' `convert_state_dict_to_kohya` stores
alpha = rank whatever the adapter's lora_alpha was, which changes the strength of any LoRA
trained with alpha != rank; and SD 1.x/2.x kohya files name the text encoder `lora_te_`.
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
from sdtune.models.lora import has_lora, lora_alpha_rank, lora_state

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


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


def kohya_state(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """LoRA weights under kohya's names: lora_unet_<module>.lora_down/.lora_up/.alpha."""
    _require_lora(bundle)
    out: dict[str, torch.Tensor] = {}
    for component, module in adapted(bundle).items():
        prefix = bundle.arch.kohya_prefixes[component]
        alpha, _ = lora_alpha_rank(module)
        for key, value in _standard_names(module).items():
            name, _, kind = key.rpartition(".lora_")
            kohya = f"{prefix}_{name.replace('.', '_')}"
            if kind == "A.weight":
                out[f"{kohya}.lora_down.weight"] = value
                out[f"{kohya}.alpha"] = torch.tensor(alpha)
            elif kind == "B.weight":
                out[f"{kohya}.lora_up.weight"] = value
            else:
                raise UserError(f"cannot write {key} in kohya format (only lora_A/lora_B)")
    return out


def save_lora_kohya(bundle: ModelBundle, path: Path, meta: dict) -> Path:
    """A kohya-format LoRA (.safetensors) with sd-scripts' ss_* metadata."""
    state = kohya_state(bundle)
    modules = adapted(bundle)
    alpha, rank = lora_alpha_rank(modules.get(bundle.arch.denoiser) or next(iter(modules.values())))
    text = any(bundle.arch.is_text_encoder(c) for c in modules)
    now = str(int(time.time()))
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_output_name": path.stem,
        "ss_sd_model_name": str(meta.get("base_model", "")),
        "ss_steps": str(meta.get("steps", "")),
        "ss_training_finished_at": now,
        "ss_network_args": json.dumps({"text_encoder": text}),
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
        ".lora_A." in n or ".lora_B." in n or n.endswith("token_embedding.vectors") for n in names
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
    from sdtune.models.bundle import MODEL_FILE, save_bundle

    meta = {"base_model": cfg.model.base, **meta}
    if not trains_adapters_only(bundle):
        save_bundle(merged_copy(bundle), directory, meta)
        return
    directory.mkdir(parents=True, exist_ok=True)
    base = Path(cfg.model.base).expanduser()
    info: dict = {
        "kind": "adapters",
        "family": bundle.family,
        "base": str(base.resolve()) if base.exists() else cfg.model.base,
        "config_source": cfg.model.config_source,
        "seed": cfg.seed,
        **meta,
    }
    if adapted(bundle):
        save_lora_diffusers(bundle, directory / LORA_FILE, meta)
        save_lora_kohya(bundle, directory / "lora_kohya.safetensors", meta)
        info["lora"] = LORA_FILE
    token = cfg.textual_inversion.token
    if token is not None:
        save_embedding(bundle, directory / "embedding.safetensors", token, meta)
        info["embedding"] = {"file": "embedding.safetensors", "token": token}
    (directory / MODEL_FILE).write_text(json.dumps(info, indent=2) + "\n")
