"""SD 3.x files in the ecosystem's layouts: the single file (original MMDiT names, LDM VAE, the
three text encoders as ComfyUI's "incl_clips" files hold them) read back by diffusers'
from_single_file and by sdtune, and kohya-named LoRAs (ComfyUI's lora_unet_<original module>,
q/k/v fused into qkv) that merge, ComfyUI's way, into the merged model's single file.

With SDTUNE_COMFYUI set to a ComfyUI checkout (and its light dependencies, einops, importable),
ComfyUI's own key detection, MMDiT, LoRA key map and patcher check the same files."""

import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtune.checkpoint.adapters import kohya_state, merged_copy, save_lora_kohya
from sdtune.checkpoint.convert import bundle_to_single_file
from sdtune.config import LoraConfig, load_config
from sdtune.errors import ModelError, UserError
from sdtune.models.bundle import save_bundle
from sdtune.models.families.sd3_keys import (
    lora_from_original,
    module_map,
    transformer_from_original,
    transformer_to_original,
)
from sdtune.models.loading import load_model
from sdtune.models.lora import add_lora, load_lora_files
from sdtune.models.presets import build_preset

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
PREFIX = "model.diffusion_model."


def sd3_like(seed: int = 0):
    """preset:tiny-sd3 with CLIP-L unprojected (an identity text_projection), as SD3's own."""
    bundle = build_preset("tiny-sd3", seed)
    projection = bundle.modules["text_encoder"].text_projection.weight
    with torch.no_grad():
        projection.copy_(torch.eye(projection.shape[0]))
    return bundle


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """An SD3-like bundle, its diffusers folder (the configs) and its single file."""
    root = tmp_path_factory.mktemp("sd3-files")
    bundle = sd3_like()
    save_bundle(bundle, root / "folder")
    save_file(bundle_to_single_file(bundle), str(root / "model.safetensors"))
    return bundle, root / "folder", root / "model.safetensors"


def _assert_same(ours: torch.nn.Module, theirs: torch.nn.Module, what: str):
    mine, other = ours.state_dict(), theirs.state_dict()
    assert set(mine) == set(other), what
    for key, tensor in mine.items():
        assert torch.equal(tensor, other[key]), f"{what}: {key}"


def _prediction(bundle, seed: int = 0):
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        cond = bundle.arch.conditioning(bundle, ["a red square"], "cpu")
        return bundle.arch.predict(bundle, x, torch.tensor([500.0]), cond)


def test_the_map_is_diffusers_converters_inverse():
    """transformer_to_original then diffusers' own convert_sd3_transformer_checkpoint_to_
    diffusers is the identity, every tensor (dual attention, QK-norm, the pre-only last block
    and the final layer's shift/scale order included); and our inverse is too."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    transformer = build_preset("tiny-sd3", 0).denoiser
    state, config = transformer.state_dict(), transformer.config
    original = transformer_to_original(state, config)
    assert "joint_blocks.0.x_block.attn2.qkv.weight" in original
    assert "joint_blocks.1.context_block.attn.ln_q.weight" in original
    assert "joint_blocks.1.context_block.attn.proj.weight" not in original  # pre-only
    back = convert_sd3_transformer_checkpoint_to_diffusers(
        {PREFIX + k: v for k, v in original.items()}
    )
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    ours = transformer_from_original(original, config)
    assert set(ours) == set(state) and all(torch.equal(ours[k], state[k]) for k in state)


def test_diffusers_from_single_file_reads_every_tensor_exactly(written):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    bundle, folder, path = written
    keys = set(load_file(str(path)))
    for key in (
        PREFIX + "joint_blocks.0.x_block.attn.qkv.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight",
        "text_encoders.clip_g.transformer.text_projection.weight",
        "text_encoders.t5xxl.transformer.shared.weight",
    ):
        assert key in keys, key
    transformer = SD3Transformer2DModel.from_single_file(
        str(path), config=str(folder), subfolder="transformer", local_files_only=True
    )
    _assert_same(bundle.denoiser, transformer, "transformer")
    pipe = StableDiffusion3Pipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True
    )
    for name in COMPONENTS:
        _assert_same(bundle.modules[name], getattr(pipe, name), name)


def test_a_clip_l_projection_is_folded_into_the_transformer(tmp_path):
    """Readers of SD3 single files use CLIP-L unprojected: a model with a projection (the raw
    preset's random one) is written with it folded into the pooled-text embedder, and reads
    back (diffusers, sdtune) as the same model."""
    from diffusers import StableDiffusion3Pipeline

    bundle = build_preset("tiny-sd3", 0)
    save_bundle(bundle, tmp_path / "folder")
    state = bundle_to_single_file(bundle)
    eye = state["text_encoders.clip_l.transformer.text_projection.weight"]
    assert torch.equal(eye, torch.eye(32))
    save_file(state, str(tmp_path / "m.safetensors"))
    pipe = StableDiffusion3Pipeline.from_single_file(
        str(tmp_path / "m.safetensors"), config=str(tmp_path / "folder"), local_files_only=True
    )
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds, _, pooled, _ = pipe.encode_prompt(
        "a red square", None, None, do_classifier_free_guidance=False, max_sequence_length=16
    )
    with torch.no_grad():
        theirs = pipe.transformer(
            hidden_states=x,
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
        ).sample
    torch.testing.assert_close(theirs, _prediction(bundle), atol=1e-5, rtol=1e-4)
    cfg = load_config(
        None, [f"model.base={tmp_path / 'm.safetensors'}", f"model.config_source={tmp_path}/folder"]
    )
    loaded = load_model(cfg.model, cfg.diffusion, 0)
    torch.testing.assert_close(_prediction(loaded), _prediction(bundle), atol=1e-5, rtol=1e-4)


def test_sdtune_reads_its_single_file_back_exactly(written, tmp_path):
    bundle, folder, path = written
    cfg = load_config(None, [f"model.base={path}", f"model.config_source={folder}"])
    loaded = load_model(cfg.model, cfg.diffusion, 0)
    assert loaded.family == bundle.family == "sd3-custom"
    for name in COMPONENTS:
        _assert_same(bundle.modules[name], loaded.modules[name], name)
    # equal weights; the kernels may round differently on other memory alignment
    torch.testing.assert_close(_prediction(loaded), _prediction(bundle), atol=1e-6, rtol=1e-5)
    assert float(loaded.noise_scheduler.config.shift) == 3.0
    state = load_file(str(path))  # a file of the transformer alone: the rest from the configs
    save_file(
        {k: v for k, v in state.items() if k.startswith(PREFIX)}, str(tmp_path / "t.safetensors")
    )
    alone = bundle.arch.load_single_file(tmp_path / "t.safetensors", folder, "t")
    for name in COMPONENTS:
        _assert_same(bundle.modules[name], alone.modules[name], name)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
    broken = f"model.base={tmp_path / 'broken.safetensors'}"
    cfg = load_config(None, [broken, f"model.config_source={folder}"])
    with pytest.raises(ModelError, match="^model.base: cannot load SD3 single-file checkpoint"):
        load_model(cfg.model, cfg.diffusion, 0)


def test_a_pixel_space_model_has_no_single_file(tmp_path):
    pixel = build_preset("tiny-digits-sd3", 0)
    with pytest.raises(UserError, match="pixel-space model .* has no SD3 single-file layout"):
        pixel.arch.check_export(pixel, "single-file", "preset:tiny-digits-sd3")
    save_bundle(pixel, tmp_path / "pixel")
    with pytest.raises(ModelError, match="pixel-space model .* no SD3 single-file layout"):
        pixel.arch.load_single_file(tmp_path / "x.safetensors", tmp_path / "pixel", "x")


# ---------------------------------------------------------------------- kohya-named LoRA


def with_adapters(variant: str = "lora", targets=None, seed: int = 1):
    """tiny-sd3 with adapters (rank 4, alpha 2) on the transformer (its default targets, or
    `targets`) and both CLIP encoders, their weights drawn at random (a trained adapter's,
    not peft's zero start)."""
    bundle = sd3_like()
    settings = LoraConfig(
        enabled=True, rank=4, alpha=2.0, variant=variant, text_encoder=True, unet_targets=targets
    )
    add_lora(bundle, settings)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in bundle.components().values():
            for name, param in module.named_parameters():
                if any(m in name for m in (".lora_", ".hada_", ".lokr_")):
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return bundle


def _comfy_merge(base: dict, kohya: dict, variant: str) -> dict:
    """ComfyUI's arithmetic (comfy/weight_adapter lora.py, loha.py) on the single file's keys,
    through its key names (comfy/lora.py): lora_unet_<module> is model.diffusion_model.<module>
    with dots for underscores; lora_te1_/lora_te2_<module> are clip_l's / clip_g's; the update,
    times alpha / rank (the rank: lora_down's or hada_w1_b's rows), is added to the weight."""
    targets = {
        k.removeprefix(PREFIX).removesuffix(".weight").replace(".", "_"): k
        for k in base
        if k.startswith(PREFIX)
    }
    for prefix, encoder in (("lora_te1_", "clip_l"), ("lora_te2_", "clip_g")):
        head = f"text_encoders.{encoder}.transformer."
        targets.update(
            {
                prefix[:-1]
                + "_"
                + k.removeprefix(head).removesuffix(".weight").replace(".", "_"): k
                for k in base
                if k.startswith(head)
            }
        )
    for k in list(targets):
        if not k.startswith("lora_"):
            targets["lora_unet_" + k] = targets.pop(k)
    merged = dict(base)
    modules = {k.rpartition(".")[0] if k.endswith(".alpha") else k.split(".", 1)[0] for k in kohya}
    for module in modules:
        key = targets[module]
        alpha = float(kohya[f"{module}.alpha"])
        if variant == "lora":
            down, up = kohya[f"{module}.lora_down.weight"], kohya[f"{module}.lora_up.weight"]
            delta = up.flatten(1) @ down.flatten(1) * (alpha / down.shape[0])
        else:
            w1 = kohya[f"{module}.hada_w1_a"] @ kohya[f"{module}.hada_w1_b"]
            w2 = kohya[f"{module}.hada_w2_a"] @ kohya[f"{module}.hada_w2_b"]
            delta = w1 * w2 * (alpha / kohya[f"{module}.hada_w1_b"].shape[0])
        merged[key] = base[key] + delta.reshape(base[key].shape)
    return merged


@pytest.mark.parametrize("variant", ["lora", "loha"])
def test_kohya_file_merges_comfyuis_way_into_the_merged_single_file(variant):
    bundle = with_adapters(variant)
    kohya = kohya_state(bundle)
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    down, up = (
        ("lora_down.weight", "lora_up.weight") if variant == "lora" else ("hada_w1_b", "hada_w1_a")
    )
    assert kohya[f"{qkv}.{down}"].shape == (12, 64) and kohya[f"{qkv}.{up}"].shape == (192, 12)
    assert float(kohya[f"{qkv}.alpha"]) == 6.0  # 3 x 2: alpha / rank stays 1/2
    for name in (
        "lora_unet_joint_blocks_1_context_block_attn_qkv",  # add_q/k/v_proj
        "lora_unet_joint_blocks_0_x_block_attn2_qkv",  # SD 3.5's second attention
        "lora_unet_joint_blocks_0_context_block_attn_proj",  # to_add_out
        "lora_unet_joint_blocks_1_x_block_mlp_fc2",  # ff.net.2
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",  # CLIP-L
        "lora_te2_text_model_encoder_layers_1_mlp_fc1",  # CLIP-G
    ):
        assert f"{name}.alpha" in kohya, name
    assert not any("to_q" in k or "transformer_blocks" in k for k in kohya)
    base = bundle_to_single_file(sd3_like())
    expected = bundle_to_single_file(merged_copy(bundle))
    merged = _comfy_merge(base, kohya, variant)
    assert set(merged) == set(expected)
    changed = [k for k in base if not torch.equal(base[k], expected[k])]
    assert any(k.endswith("attn.qkv.weight") for k in changed)
    assert any(k.startswith("text_encoders.clip_g.") for k in changed)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)


def test_kohya_file_loads_back_as_trained(tmp_path):
    """sdtune's --lora reads SD3 kohya files (diffusers' SD3 loader reads no kohya names): the
    base with the file predicts as the adapted model did."""
    bundle = with_adapters()
    path = save_lora_kohya(bundle, tmp_path / "k.safetensors", {"base_model": "preset:tiny-sd3"})
    base = sd3_like()
    load_lora_files(base, [(path, 1.0)])
    torch.testing.assert_close(_prediction(base), _prediction(bundle), atol=1e-6, rtol=1e-5)
    half = sd3_like()
    load_lora_files(half, [(path, 0.0)])
    assert torch.equal(_prediction(half), _prediction(sd3_like()))
    state = load_file(str(path))
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"  # sd-scripts' T5 LoRA
    state[f"{t5}.lora_down.weight"], state[f"{t5}.lora_up.weight"] = (
        torch.ones(1, 64),
        torch.ones(64, 1),
    )
    save_file(state, str(tmp_path / "t5.safetensors"))
    with pytest.raises(UserError, match="lora_te3_encoder_block_0.* names no module sdtune loads"):
        load_lora_files(sd3_like(), [(tmp_path / "t5.safetensors", 1.0)])


def test_a_lora_on_some_of_q_k_v_fuses_and_reads_back_exactly(tmp_path):
    """Only q and v adapted (and the adaptive norms, whose last-block and final halves are
    reordered): q's and v's rows of the fused update, k's zero; read back as trained."""
    bundle = with_adapters(targets=["to_q", "to_v", "norm1_context.linear", "norm_out.linear"])
    kohya = kohya_state(bundle)
    qkv = "lora_unet_joint_blocks_1_x_block_attn_qkv"
    assert kohya[f"{qkv}.lora_up.weight"].shape == (192, 8) and float(kohya[f"{qkv}.alpha"]) == 4
    assert not kohya[f"{qkv}.lora_up.weight"][64:128].any()  # k
    merged = _comfy_merge(bundle_to_single_file(sd3_like()), kohya, "lora")
    for key, value in bundle_to_single_file(merged_copy(bundle)).items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=1e-5, msg=key)
    path = save_lora_kohya(bundle, tmp_path / "k.safetensors", {})
    base = sd3_like()
    load_lora_files(base, [(path, 1.0)])
    torch.testing.assert_close(_prediction(base), _prediction(bundle), atol=1e-6, rtol=1e-5)


def test_a_general_qkv_lora_splits_exactly():
    """kohya sd-scripts trains one LoRA of any rank on the fused qkv: each of q, k, v keeps
    the whole down and its rows of up, so that the three updates are the fused one's rows."""
    config = build_preset("tiny-sd3", 0).denoiser.config
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(5, 64, generator=gen), torch.randn(192, 5, generator=gen)
    parts = lora_from_original(down, up, "joint_blocks.1.context_block.attn.qkv", config)
    assert list(parts) == [f"transformer_blocks.1.attn.add_{p}_proj" for p in "qkv"]
    rows = torch.cat([u @ d for d, u in parts.values()])
    torch.testing.assert_close(rows, up @ down)
    norm = lora_from_original(down[:, :64], up[:128], "final_layer.adaLN_modulation.1", config)
    ((name, (_, swapped)),) = norm.items()
    assert name == "norm_out.linear" and torch.equal(swapped[:64], up[64:128])
    assert module_map(config)["norm_out.linear"].swap


def test_lokr_on_the_fused_qkv_is_refused_and_left_out_of_the_adapter_folder(tmp_path):
    from sdtune.checkpoint.adapters import KOHYA_FILE, write_adapter_folder

    bundle = with_adapters("lokr")
    with pytest.raises(UserError, match="SD3 lokr on transformer_blocks.0.attn.add_k_proj has"):
        kohya_state(bundle)
    write_adapter_folder(bundle, tmp_path / "model", "preset:tiny-sd3", None, 0, None, {})
    assert not (tmp_path / "model" / KOHYA_FILE).exists()
    assert (tmp_path / "model" / "adapters_peft.safetensors").is_file()


def test_export_writes_the_sd3_files_that_load_back(tmp_path):
    """export_model (what `sdtune export` runs): the single file and the .ckpt of the merged
    model load through the base their metadata names; the kohya file beside them."""
    from sdtune.checkpoint.export import export_model

    bundle = with_adapters()
    expected = _prediction(merged_copy(bundle))
    meta = {"base_model": "preset:tiny-sd3", "steps": "1"}
    for fmt, name in (("single-file", "m.safetensors"), ("ckpt", "m.ckpt")):
        path = export_model(bundle, meta, fmt, tmp_path / name)
        cfg = load_config(None, [f"model.base={path}"])
        loaded = load_model(cfg.model, cfg.diffusion, 0)
        torch.testing.assert_close(_prediction(loaded), expected, atol=1e-5, rtol=1e-4)
    kohya = export_model(bundle, meta, "kohya", tmp_path / "k.safetensors")
    assert "lora_unet_joint_blocks_1_x_block_attn_qkv.alpha" in load_file(str(kohya))


# ---------------------------------------------------------------------- ComfyUI itself

COMFYUI = os.environ.get("SDTUNE_COMFYUI")


@pytest.fixture(scope="module")
def comfy():
    if not COMFYUI:
        pytest.skip("set SDTUNE_COMFYUI to a ComfyUI checkout to check with ComfyUI's own code")
    sys.path.insert(0, COMFYUI)
    import comfy.options

    comfy.options.enable_args_parsing()
    argv, sys.argv = sys.argv, ["comfyui", "--cpu"]
    try:
        import comfy.lora
        import comfy.model_detection
        import comfy.model_patcher
    finally:
        sys.argv = argv
    return comfy


def comfy_shaped(adapters: bool):
    """An SD3-like bundle whose MMDiT ComfyUI's detection can size (its depth is the width /
    64, the number of heads and of blocks, as SD3's: here 2 blocks of 2 heads of 64), dual
    attention and QK-norm as SD 3.5's."""
    from diffusers import SD3Transformer2DModel

    bundle = sd3_like()
    config = {k: v for k, v in dict(bundle.denoiser.config).items() if not k.startswith("_")}
    config.update(attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bundle.modules["transformer"] = SD3Transformer2DModel(**config)
        if adapters:
            add_lora(bundle, LoraConfig(enabled=True, rank=4, alpha=2.0))
            with torch.no_grad():
                for name, param in bundle.denoiser.named_parameters():
                    if ".lora_" in name:
                        param.normal_(0, 0.05)
    return bundle


def _comfy_model(comfy, state):
    config = comfy.model_detection.model_config_from_unet(state, PREFIX)
    assert type(config).__name__ == "SD3", config
    model = config.get_model(state, PREFIX, device="cpu")
    missing, unexpected = model.diffusion_model.load_state_dict(
        {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}, strict=False
    )
    assert not missing and not unexpected, (missing, unexpected)
    return model.to(torch.float32).eval()


def test_comfyui_detects_loads_and_runs_the_transformer(comfy):
    bundle = comfy_shaped(False)
    state = bundle_to_single_file(bundle)
    model = _comfy_model(comfy, state)
    unet = comfy.model_detection.detect_unet_config(state, PREFIX)
    assert unet["x_block_self_attn_layers"] == [0] and unet["qk_norm"] == "rms"
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(1, 96, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500.0])
    with torch.no_grad():
        theirs = model.diffusion_model(x, t, context=context, y=pooled)
        ours = bundle.denoiser(
            hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled
        ).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_comfyui_applies_the_kohya_file_as_sdtune_merges_it(comfy):
    bundle = comfy_shaped(True)
    kohya = kohya_state(bundle)
    base = bundle_to_single_file(comfy_shaped(False))
    model = _comfy_model(comfy, base)
    keys = comfy.lora.model_lora_keys_unet(model, {})
    unet_part = {k: v for k, v in kohya.items() if k.startswith("lora_unet_")}
    patches = comfy.lora.load_lora(unet_part, keys, log_missing=False)
    assert len(patches) == len({k.split(".")[0] for k in unet_part})  # every module found
    patcher = comfy.model_patcher.ModelPatcher(model, "cpu", "cpu")
    patcher.add_patches(patches, 1.0)
    patcher.patch_model()
    expected = bundle_to_single_file(merged_copy(bundle))
    for key, value in model.diffusion_model.state_dict().items():
        torch.testing.assert_close(value, expected[PREFIX + key], atol=1e-6, rtol=1e-5, msg=key)


def test_comfyui_reads_the_vae_and_the_clip_encoders_and_their_lora(comfy):
    """ComfyUI's SD3 VAE (an AutoencodingEngine: no quant convs) loads the first_stage_model
    part strictly and decodes as diffusers' VAE does; its CLIP text model has the names of the
    clip_l/clip_g parts; its CLIP LoRA key map (model_lora_keys_clip) and LoRA arithmetic put
    lora_te1_/lora_te2_ where sdtune's merge does."""
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    bundle = with_adapters()
    base, merged = bundle_to_single_file(sd3_like()), bundle_to_single_file(merged_copy(bundle))
    layout = {"double_z": True, "z_channels": 16, "resolution": 32, "in_channels": 3,
              "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1,
              "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
    vae = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={
            "target": "comfy.ldm.modules.diffusionmodules.model.Encoder",
            "params": layout,
        },
        decoder_config={
            "target": "comfy.ldm.modules.diffusionmodules.model.Decoder",
            "params": layout,
        },
    )
    head = "first_stage_model."
    vae.load_state_dict({k.removeprefix(head): v for k, v in base.items() if k.startswith(head)})
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            vae.decode(z), sd3_like().vae.decode(z).sample, atol=1e-5, rtol=1e-4
        )

    class Encoders(torch.nn.Module):  # ComfyUI's SD3ClipModel's names: clip_l/clip_g.transformer
        def __init__(self):
            super().__init__()
            for name, component in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
                config = bundle.modules[component].config
                holder = torch.nn.Module()
                holder.transformer = CLIPTextModel(
                    {"num_hidden_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                     "num_attention_heads": config.num_attention_heads, "hidden_act": config.hidden_act,
                     "intermediate_size": config.intermediate_size, "eos_token_id": config.eos_token_id,
                     "max_position_embeddings": config.max_position_embeddings},
                    torch.float32, "cpu", comfy.ops.disable_weight_init,
                )  # fmt: skip
                setattr(self, name, holder)

    encoders = Encoders()
    ours = {
        k.removeprefix("text_encoders."): v
        for k, v in base.items()
        if k.startswith("text_encoders.clip")
    }
    theirs = encoders.state_dict()
    assert set(theirs) == set(ours)
    vocab = ("clip_l.transformer.text_model.embeddings.token_embedding.weight",
             "clip_g.transformer.text_model.embeddings.token_embedding.weight")  # fmt: skip
    assert all(theirs[k].shape == ours[k].shape for k in theirs if k not in vocab)
    encoders.load_state_dict({k: v for k, v in ours.items() if k not in vocab}, strict=False)
    keys = comfy.lora.model_lora_keys_clip(encoders, {})
    kohya = {k: v for k, v in kohya_state(bundle).items() if k.startswith("lora_te")}
    patches = comfy.lora.load_lora(kohya, keys, log_missing=False)
    assert len(patches) == len({k.split(".")[0] for k in kohya})
    patcher = comfy.model_patcher.ModelPatcher(encoders, "cpu", "cpu")
    patcher.add_patches(patches, 1.0)
    patcher.patch_model()
    for key, value in encoders.state_dict().items():
        if key not in vocab:
            torch.testing.assert_close(
                value, merged["text_encoders." + key], atol=1e-6, rtol=1e-5, msg=key
            )
