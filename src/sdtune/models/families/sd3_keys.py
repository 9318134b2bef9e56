"""SD3's MMDiT under its two sets of names: diffusers' `SD3Transformer2DModel` and the original
one of Stability's reference code, which SD 3.x single files hold under
`model.diffusion_model.` and kohya's sd-scripts name its LoRAs by (`lora_unet_joint_blocks_...`).

Written from reading the two readers of the original names, which convert only towards
diffusers: diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`
(loaders/single_file_utils.py) and ComfyUI's `MMDIT_MAP_BASIC`/`MMDIT_MAP_BLOCK`/
`mmdit_to_diffusers` (comfy/utils.py). What the map has to know:
- the image stream is `x_block`, the text stream `context_block`; each block's attention keeps
  q, k and v in one `attn.qkv` (stacked on the output axis, in that order), its QK-norms as
  `ln_q`/`ln_k`, its output projection as `attn.proj`; SD 3.5's second (image-only) attention
  is `x_block.attn2`;
- the adaptive norms are `adaLN_modulation.1`, the feed-forwards `mlp.fc1`/`mlp.fc2`;
- the last block's text stream is "pre-only" (no output projection, no feed-forward) and its
  adaptive norm, like the final layer's, orders its two outputs shift, scale where diffusers'
  AdaLayerNormContinuous orders them scale, shift;
- the embedders: `x_embedder.proj` (patches), `pos_embed` (the position table itself),
  `t_embedder.mlp.0/2` (timestep), `y_embedder.mlp.0/2` (pooled text), `context_embedder`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

POS_EMBED = ("pos_embed.pos_embed", "pos_embed")
"""The position table: a tensor of its own in both layouts, not a module's weight."""


@dataclass(frozen=True)
class Slot:
    """Where a diffusers module's weights sit in the original MMDiT."""

    original: str
    """The original module's name (no `model.diffusion_model.`)."""
    index: int = 0
    """Which part of it along the output axis (q 0, k 1, v 2 of a fused qkv)."""
    parts: int = 1
    """How many diffusers modules it is made of (3 for a qkv, else 1)."""
    swap: bool = False
    """Its two output halves are in the other order (shift, scale against scale, shift)."""


_EMBEDDERS = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
# per block, both streams: diffusers' module -> the original's, under joint_blocks.N.
_BLOCK = {
    "norm1.linear": "x_block.adaLN_modulation.1",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
}
_CONTEXT_OUT = {  # the text stream's output side, which the last block does not have
    "attn.to_add_out": "context_block.attn.proj",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
_DUAL = {  # SD 3.5's second attention of the image stream
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
}
QKV_PARTS = ("q", "k", "v")
_QKV = {  # fused original -> its three diffusers projections, in order
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_DUAL_QKV = {"x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


def module_map(config) -> dict[str, Slot]:
    """Every diffusers module of an SD3Transformer2DModel of this config (num_layers,
    dual_attention_layers) with weights, and its slot in the original MMDiT."""
    layers = int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ())
    slots = {name: Slot(original) for name, original in _EMBEDDERS.items()}
    slots["norm_out.linear"] = Slot("final_layer.adaLN_modulation.1", swap=True)
    for i in range(layers):
        last = i == layers - 1
        names = {**_BLOCK, **({} if last else _CONTEXT_OUT), **(_DUAL if i in dual else {})}
        for name, original in names.items():
            slots[f"transformer_blocks.{i}.{name}"] = Slot(f"joint_blocks.{i}.{original}")
        slots[f"transformer_blocks.{i}.norm1_context.linear"] = Slot(
            f"joint_blocks.{i}.context_block.adaLN_modulation.1", swap=last
        )
        for original, parts in {**_QKV, **(_DUAL_QKV if i in dual else {})}.items():
            for index, name in enumerate(parts):
                slots[f"transformer_blocks.{i}.{name}"] = Slot(
                    f"joint_blocks.{i}.{original}", index, len(parts)
                )
    return slots


def original_modules(config) -> dict[str, dict[int, tuple[str, Slot]]]:
    """The inverse: original module -> {part index: (diffusers module, its slot)}."""
    out: dict[str, dict[int, tuple[str, Slot]]] = {}
    for name, slot in module_map(config).items():
        out.setdefault(slot.original, {})[slot.index] = (name, slot)
    return out


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """The two halves along the output axis in the other order (its own inverse)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _split(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def transformer_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel state dict under the original names (no prefix):
    q, k, v concatenated into each qkv, the shift/scale halves reordered where they differ."""
    slots = module_map(config)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key == POS_EMBED[0]:
            out[POS_EMBED[1]] = tensor
            continue
        module, param = _split(key)
        slot = slots.get(module)
        if slot is None:
            raise ValueError(f"no original SD3 name for transformer parameter {key}")
        name = f"{slot.original}.{param}"
        tensor = swap_halves(tensor) if slot.swap else tensor
        if slot.parts == 1:
            out[name] = tensor
        else:
            fused.setdefault(name, {})[slot.index] = tensor
    for name, pieces in fused.items():
        if len(pieces) != len(QKV_PARTS):
            raise ValueError(f"{name}: the transformer lacks some of its q, k and v projections")
        out[name] = torch.cat([pieces[i] for i in range(len(QKV_PARTS))], dim=0)
    return out


def transformer_from_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The inverse of transformer_to_original: original names (no prefix) to diffusers'."""
    modules = original_modules(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == POS_EMBED[1]:
            out[POS_EMBED[0]] = tensor
            continue
        module, param = _split(key)
        targets = modules.get(module)
        if targets is None:
            raise ValueError(f"no diffusers SD3 name for original transformer tensor {key}")
        pieces = tensor.chunk(len(targets), dim=0)
        for index, (name, slot) in targets.items():
            piece = pieces[index]
            out[f"{name}.{param}"] = swap_halves(piece) if slot.swap else piece
    return out


# ---------------------------------------------------------------------- LoRA under the original names

FACTOR_PAIRS = {
    "lora": (("lora_down.weight", "lora_up.weight"),),
    "loha": (("hada_w1_b", "hada_w1_a"), ("hada_w2_b", "hada_w2_a")),
}
"""Per variant, its factor pairs (input side r x in, output side out x r): an update whose
output side is reordered or stacked by rows is reordered or stacked alike (LoHa's Hadamard
product of its two pairs' products too)."""


def exact_on(slot: Slot, variant: str) -> bool:
    """Whether an update of `variant` has an exact form on the original module of `slot`: any
    on a module of the same rows, a LoRA or LoHa where rows are stacked or reordered."""
    return (slot.parts == 1 and not slot.swap) or variant in FACTOR_PAIRS


def _rows_swapped(weights: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    outputs = {up for _, up in FACTOR_PAIRS[variant]}
    return {k: swap_halves(v) if k in outputs else v for k, v in weights.items()}


def _stack(pieces: dict[int, tuple[torch.Tensor, torch.Tensor]], parts: int):
    """One factor pair of a fused module from its parts' pairs {index: (r_i x in, out x r_i)}:
    the input sides stacked, the output sides block-diagonal with part i's rows at i x out (an
    absent part's rows zero), so that the product is each part's update in its own rows."""
    downs = [pieces[i][0] for i in sorted(pieces)]
    out = next(iter(pieces.values()))[1].shape[0]
    up = downs[0].new_zeros(parts * out, sum(d.shape[0] for d in downs))
    column = 0
    for i in sorted(pieces):
        piece = pieces[i][1]
        up[i * out : (i + 1) * out, column : column + piece.shape[1]] = piece
        column += piece.shape[1]
    return torch.cat(downs, dim=0), up


def lora_to_original(
    modules: dict[str, dict[str, torch.Tensor]], config, alpha: float, variant: str
) -> dict[str, tuple[dict[str, torch.Tensor], float]]:
    """A transformer's adapter weights by diffusers module ({kohya kind: tensor}, all of one
    rank at `alpha`) under the original module names, each with its alpha: the q, k and v
    updates of an attention become one update of its qkv, of rank parts x rank at parts x
    alpha (so that alpha / rank, and the update, are unchanged); shift/scale halves reordered
    where they differ. A module this config lacks, or an update with no exact form there
    (exact_on), is a ValueError."""
    slots = module_map(config)
    out: dict[str, tuple[dict[str, torch.Tensor], float]] = {}
    fused: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, weights in modules.items():
        slot = slots.get(name)
        if slot is None:
            raise ValueError(f"no original SD3 name for transformer module {name}")
        if not exact_on(slot, variant):
            raise ValueError(f"a {variant} update of {name} has no exact form on {slot.original}")
        if slot.parts > 1:
            fused.setdefault(slot.original, {})[slot.index] = weights
        else:
            out[slot.original] = (_rows_swapped(weights, variant) if slot.swap else weights, alpha)
    for original, parts in fused.items():
        weights: dict[str, torch.Tensor] = {}
        for down, up in FACTOR_PAIRS[variant]:
            pieces = {i: (w[down], w[up]) for i, w in parts.items()}
            weights[down], weights[up] = _stack(pieces, len(QKV_PARTS))
        out[original] = (weights, alpha * len(parts))
    return out


def _block_diagonal(up: torch.Tensor, parts: int) -> bool:
    """Whether `up` is as _stack writes all `parts` parts: each part's rows nonzero only in
    its own equal share of the columns."""
    rows, rank = up.shape[0] // parts, up.shape[1] // parts
    if rank * parts != up.shape[1]:
        return False
    outside = torch.ones_like(up, dtype=torch.bool)
    for i in range(parts):
        outside[i * rows : (i + 1) * rows, i * rank : (i + 1) * rank] = False
    return not bool(up[outside].any())


def lora_from_original(
    down: torch.Tensor, up: torch.Tensor, original: str, config
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The inverse for one LoRA on an original module (its alpha / rank folded into `up`):
    the diffusers modules it updates, each with its (down, up). A qkv's update splits by rows:
    when block-diagonal (as lora_to_original writes it) into each part's own rank, else each
    part keeps the whole down and its rows of up (exact for any qkv LoRA, kohya sd-scripts'
    too; a part whose rows are zero gets none). KeyError: no such module in this config."""
    targets = original_modules(config)[original]
    if len(targets) == 1:
        name, slot = targets[0]
        return {name: (down, swap_halves(up) if slot.swap else up)}
    parts = len(targets)
    rows, rank = up.shape[0] // parts, up.shape[1] // parts
    compact = _block_diagonal(up, parts)
    out = {}
    for i, (name, _) in sorted(targets.items()):
        piece = up[i * rows : (i + 1) * rows]
        if compact:
            out[name] = (down[i * rank : (i + 1) * rank], piece[:, i * rank : (i + 1) * rank])
        elif piece.any():
            out[name] = (down, piece)
    return out


# ---------------------------------------------------------------------- the files' prefixes

SINGLE_FILE_PREFIXES = {
    "transformer": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
"""Where an SD 3.x single file keeps each component ("incl_clips" files, which ComfyUI's SD3
model (text_encoder_key_prefix) and diffusers' from_single_file (CHECKPOINT_KEY_NAMES clip_sd3,
open_clip_sd3, is_t5_in_single_file) read): the transformer under the original names, the VAE
under LDM's, the three text encoders under transformers' own (text_model.*, T5's shared/encoder)."""

_CLIP_MODULES = {  # kohya's CLIP LoRA module names (ComfyUI's LORA_CLIP_MAP) -> transformers'
    "self_attn_q_proj": "self_attn.q_proj",
    "self_attn_k_proj": "self_attn.k_proj",
    "self_attn_v_proj": "self_attn.v_proj",
    "self_attn_out_proj": "self_attn.out_proj",
    "mlp_fc1": "mlp.fc1",
    "mlp_fc2": "mlp.fc2",
}
_CLIP_LAYER = re.compile(r"text_model_encoder_layers_(\d+)_(\w+)")
_KOHYA_KINDS = {"lora_down.weight", "lora_up.weight", "alpha"}


def _clip_module(name: str) -> str | None:
    """A CLIP text encoder's module from its kohya name (text_model_encoder_layers_N_...)."""
    found = _CLIP_LAYER.fullmatch(name)
    if found is None or found.group(2) not in _CLIP_MODULES:
        return None
    return f"text_model.encoder.layers.{found.group(1)}.{_CLIP_MODULES[found.group(2)]}"


def _uniform_rank(pieces: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Every (down, up) zero-padded to the largest rank among them (exact: the padding adds
    nothing), so that a loader giving every module alpha = rank scales each by 1."""
    rank = max(down.shape[0] for down, _ in pieces.values())
    out = {}
    for name, (down, up) in pieces.items():
        extra = rank - down.shape[0]
        if extra:
            down = torch.cat([down, down.new_zeros(extra, *down.shape[1:])], dim=0)
            up = torch.cat([up, up.new_zeros(up.shape[0], extra, *up.shape[2:])], dim=1)
        out[name] = (down, up)
    return out


def kohya_lora_to_peft(
    state: dict[str, torch.Tensor], config, prefixes: dict[str, str], where: str
) -> dict[str, torch.Tensor]:
    """An SD3 LoRA in kohya's names (lora_unet_<original MMDiT module>, lora_te1_/lora_te2_
    <CLIP module>, each with lora_down, lora_up and alpha: sd-scripts' and sdtune's --format
    kohya) as peft's `<component>.<module>.lora_A/lora_B.weight` of the diffusers modules, each
    update's alpha / rank folded into lora_B (so alpha = rank reads it exactly). `prefixes` is
    component -> kohya prefix; `where` names the file in errors."""
    from sdtune.errors import UserError

    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, kind = key.partition(".")
        if kind not in _KOHYA_KINDS:
            raise UserError(
                f"{where}: {key}: sdtune reads kohya LoRA weights (lora_down, lora_up, alpha), "
                "not LoCon mid weights, DoRA scales or LyCORIS factors"
            )
        modules.setdefault(module, {})[kind] = tensor
    originals = {name.replace(".", "_"): name for name in original_modules(config)}
    by_length = sorted(prefixes.items(), key=lambda item: -len(item[1]))
    per_component: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, weights in modules.items():
        component, rest = next(
            ((c, module[len(p) + 1 :]) for c, p in by_length if module.startswith(p + "_")),
            (None, module),
        )
        if "lora_down.weight" not in weights or "lora_up.weight" not in weights:
            raise UserError(f"{where}: {module} has no lora_down and lora_up weights")
        down, up = weights["lora_down.weight"], weights["lora_up.weight"]
        alpha = weights.get("alpha")
        if alpha is not None:
            up = up * (float(alpha) / down.shape[0])
        if component == "transformer" and rest in originals:
            pieces = lora_from_original(down, up, originals[rest], config)
        elif component in ("text_encoder", "text_encoder_2") and _clip_module(rest):
            pieces = {_clip_module(rest): (down, up)}
        else:
            raise UserError(
                f"{where}: {module} names no module sdtune loads a LoRA into (the SD3 "
                "transformer's original modules, lora_unet_joint_blocks_N_...; the CLIP "
                "encoders' attention and MLP, lora_te1_/lora_te2_text_model_encoder_layers_...)"
            )
        per_component.setdefault(component, {}).update(pieces)
    out: dict[str, torch.Tensor] = {}
    for component, pieces in per_component.items():
        for name, (down, up) in _uniform_rank(pieces).items():
            out[f"{component}.{name}.lora_A.weight"] = down.contiguous()
            out[f"{component}.{name}.lora_B.weight"] = up.contiguous()
    return out
