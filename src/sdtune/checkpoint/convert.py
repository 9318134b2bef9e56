"""Diffusers -> original Stable Diffusion (LDM) key names, for single-file checkpoints.

The single-file layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`) is what AUTOMATIC1111, ComfyUI and diffusers'
`from_single_file` read. diffusers converts only in the other direction at run time, so the
forward map is written here, generalised over layers_per_block and the number of levels.
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]
_VAE_ATTN = [
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
]


def _unet_prefix_map(config: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for the UNet's blocks."""
    per = int(config["layers_per_block"]) + 1  # LDM rows per level: resnets (+ sampler)
    levels = len(config["block_out_channels"])
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i in range(levels):
        for j in range(per - 1):
            row = i * per + j + 1
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{row}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{row}.1."))
        if i < levels - 1:
            pairs.append(
                (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * per}.0.op.")
            )
        for j in range(per):
            row = i * per + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{row}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{row}.1."))
    return pairs


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict under LDM names (prefix model.diffusion_model.)."""
    pairs = sorted(_unet_prefix_map(config), key=lambda p: -len(p[0]))
    per = int(config["layers_per_block"]) + 1
    up_types = list(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        new = None
        if ".upsamplers.0.conv." in name:  # after the level's last resnet (and its attention)
            i = int(name.split(".")[1])
            slot = 2 if "CrossAttn" in up_types[i] else 1
            new = f"output_blocks.{i * per + per - 1}.{slot}.conv." + name.split(".conv.", 1)[1]
        else:
            for src, dst in pairs:
                if name.startswith(src):
                    rest = name[len(src) :]
                    if ".resnets." in src or src.startswith("mid_block.resnets"):
                        for a, b in _RESNET:
                            if rest.startswith(a + "."):
                                rest = b + rest[len(a) :]
                                break
                    new = dst + rest
                    break
        if new is None:
            raise ValueError(f"no LDM name for UNet parameter {name}")
        out[UNET_PREFIX + new] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict under LDM names (prefix first_stage_model.)."""
    levels = len(config["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        new = name
        parts = name.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2])
            level = i if parts[1] == "down_blocks" else levels - 1 - i
            kind = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                new = f"{parts[0]}.{kind}.{level}.block.{parts[4]}." + ".".join(parts[5:])
            else:  # downsamplers.0.conv / upsamplers.0.conv
                sampler = "downsample" if kind == "down" else "upsample"
                new = f"{parts[0]}.{kind}.{level}.{sampler}." + ".".join(parts[5:])
        elif parts[0] in ("encoder", "decoder") and parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
            else:
                rest = ".".join(parts[4:])
                for a, b in _VAE_ATTN:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a) :]
                        break
                new = f"{parts[0]}.mid.attn_1.{rest}"
                if tensor.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                    tensor = tensor[:, :, None, None]
        elif parts[0] in ("encoder", "decoder") and parts[1] in ("conv_norm_out",):
            new = f"{parts[0]}.norm_out." + ".".join(parts[2:])
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[VAE_PREFIX + new] = tensor
    return out


def _text_model_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's state under `text_model.*` names: transformers >= 5.6 flattened
    CLIPTextModel (no `text_model.`), while the original layouts keep it."""
    return {
        k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
        for k, v in state.items()
        if not k.endswith("position_ids")
    }


def text_encoder_to_ldm(
    state: dict[str, torch.Tensor], prefix: str = TEXT_PREFIX
) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict under SD 1.x names (prefix cond_stage_model.transformer.;
    SDXL's first encoder: conditioner.embedders.0.transformer.)."""
    return {prefix + k: v for k, v in _text_model_names(state).items()}


_OPEN_CLIP_BLOCK = [
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
]


def text_encoder_to_open_clip(
    state: dict[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state dict in OpenCLIP's layout (SD 2.x's and SDXL's
    second encoder): q, k and v in one in_proj, the projection as a matrix applied on the
    right, the position embedding a bare tensor."""
    state = _text_model_names(state)
    out = {
        "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
        "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
        "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state.pop("text_projection.weight").T.contiguous()
    layers = "text_model.encoder.layers."
    count = len({k[len(layers) :].split(".")[0] for k in state if k.startswith(layers)})
    for i in range(count):
        src, dst = f"{layers}{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            )
        for a, b in _OPEN_CLIP_BLOCK:
            for kind in ("weight", "bias"):
                out[f"{dst}{b}{kind}"] = state.pop(f"{src}{a}{kind}")
    if state:
        raise ValueError(f"no OpenCLIP name for text-encoder parameters {sorted(state)[:3]}")
    return {prefix + k: v for k, v in out.items()}


def bundle_to_single_file(bundle) -> dict[str, torch.Tensor]:
    """The whole model as one state dict under its family's original key names."""
    return bundle.arch.single_file_state(bundle)
