"""DoRA, LoHa and LoKr (lora.variant) end to end: trained through peft, resumed bit for bit,
sampled from RUN/model, merged; LoHa and LoKr exported under LyCORIS's kohya names with the
weight change ComfyUI's and AUTOMATIC1111's loaders compute from them (their formulas, written
out below), DoRA in the diffusers file diffusers loads; the exports they have no format for
are one-line errors."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.cli import main
from tests.e2e.test_finetune import BASE, _base_pipeline, _outputs
from tests.e2e.test_resume import CONFIG, _assert_resume_is_exact

VARIANT = """
[lora]
enabled = true
variant = "{variant}"
rank = 4
alpha = 8
text_encoder = true
unet_targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]
"""


@pytest.fixture(scope="module", params=["dora", "loha", "lokr"])
def variant_run(request, tmp_path_factory, tiny_image_folder_module):
    root = tmp_path_factory.mktemp(request.param)
    config = root / "cfg.toml"
    text = BASE.format(images=tiny_image_folder_module, model_extra="")
    config.write_text(text + VARIANT.format(variant=request.param))
    assert main(["train", str(config), "--output", str(root / "run")]) == 0
    return request.param, root / "run"


def _trained(run):
    from sdtune.checkpoint.export import load_checkpoint_model, resolve_checkpoint

    bundle, _ = load_checkpoint_model(resolve_checkpoint(run, print), "ema")
    return bundle


def test_variant_trains_only_its_adapter_and_samples_from_the_run(variant_run, tmp_path):
    variant, run = variant_run
    weights = load_file(str(run / "checkpoints" / "step-0000006" / "model.safetensors"))
    marker = {"dora": ".lora_", "loha": ".hada_", "lokr": ".lokr_"}[variant]
    assert weights and all(marker in k for k in weights)
    if variant == "dora":
        assert any("lora_magnitude_vector" in k for k in weights)  # the learned magnitude
    assert any(k.startswith("text_encoder.") for k in weights)
    info = json.loads((run / "model" / "sdtune_model.json").read_text())
    assert info["lora_variant"] == variant
    files = {p.name for p in (run / "model").iterdir()}
    if variant == "dora":
        assert info["lora"] == "pytorch_lora_weights.safetensors"
        assert "lora_kohya.safetensors" not in files
    else:
        assert info["lora"] == "adapters_peft.safetensors" and "lora_kohya.safetensors" in files
    # RUN/model loads back (its base with the adapter) to the trained model's outputs
    from sdtune.config import DiffusionConfig
    from sdtune.models.loading import load_adapter_folder

    loaded = load_adapter_folder(run / "model", DiffusionConfig())
    ours = _trained(run)
    want_pred, want_hidden = _outputs(ours.unet, ours.text_encoder, ours.tokenizer)
    pred, hidden = _outputs(loaded.unet, loaded.text_encoder, loaded.tokenizer)
    torch.testing.assert_close(hidden, want_hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pred, want_pred, atol=1e-5, rtol=1e-4)
    base = _base_pipeline(tmp_path)
    base_pred, _ = _outputs(base.unet, base.text_encoder, base.tokenizer)
    assert (base_pred - want_pred).abs().max() > 1e-4  # the adapter changes the model
    out = tmp_path / "s.png"
    args = ["sample", str(run), "--prompt", "a photo", "--num", "1", "--steps", "2"]
    assert main([*args, "--out", str(out)]) == 0 and out.is_file()
    merged = tmp_path / "merged"
    assert main(["export", str(run), "--format", "merged", "--out", str(merged)]) == 0
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(merged, safety_checker=None)
    pred, hidden = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    torch.testing.assert_close(pred, want_pred, atol=1e-5, rtol=1e-4)


def _comfy_delta(variant: str, w: dict, shape) -> torch.Tensor:
    """The weight change ComfyUI computes from one module's LyCORIS weights at strength 1
    (comfy/weight_adapter/loha.py and lokr.py, calculate_weight; AUTOMATIC1111's network_hada
    and network_lokr agree): alpha / rank where the file has an alpha, else 1."""
    if variant == "loha":
        scale = float(w["alpha"]) / w["hada_w1_b"].shape[0] if "alpha" in w else 1.0
        diff = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
        return (diff * scale).reshape(shape)
    dim = None
    w1 = w.get("lokr_w1")
    if w1 is None:
        dim, w1 = w["lokr_w1_b"].shape[0], w["lokr_w1_a"] @ w["lokr_w1_b"]
    w2 = w.get("lokr_w2")
    if w2 is None:
        dim, w2 = w["lokr_w2_b"].shape[0], w["lokr_w2_a"] @ w["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = float(w["alpha"]) / dim if "alpha" in w and dim is not None else 1.0
    return scale * torch.kron(w1, w2).reshape(shape)


def _refused(args, capsys, message: str) -> None:
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_variant_exports_as_comfyui_and_automatic1111_read_them(variant_run, tmp_path, capsys):
    variant, run = variant_run
    kohya, lora = tmp_path / "k.safetensors", tmp_path / "l.safetensors"
    fmt_kohya = ["export", str(run), "--format", "kohya", "--out", str(kohya)]
    fmt_lora = ["export", str(run), "--format", "lora", "--out", str(lora)]
    if variant == "dora":
        _refused(fmt_kohya, capsys, "a DoRA has no kohya file that reads as trained")
        assert main(fmt_lora) == 0  # diffusers loads a DoRA UNet: the same denoiser
        ours = _trained(run)
        want_pred, want_hidden = _outputs(ours.unet, ours.text_encoder, ours.tokenizer)
        pipe = _base_pipeline(tmp_path)
        pipe.load_lora_weights(str(lora))
        # (not its text encoder: transformers 5.23's load_adapter drops peft's DoRA
        # magnitudes, `lora_magnitude_vector` without `.weight`, and says UNEXPECTED/MISSING)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=gen)
        with torch.no_grad():
            pred = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=want_hidden).sample
        torch.testing.assert_close(pred, want_pred, atol=1e-5, rtol=1e-4)
        return
    _refused(fmt_lora, capsys, "diffusers' LoRA loader reads LoRA and DoRA, not Lo")
    assert main(fmt_kohya) == 0
    capsys.readouterr()
    assert main(["inspect", str(kohya)]) == 0
    name = {"loha": "LoHa", "lokr": "LoKr"}[variant]
    assert f"kohya {name}" in capsys.readouterr().out
    with safe_open(str(kohya), framework="pt") as fh:
        meta = fh.metadata()
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == variant
    modules: dict[str, dict] = {}
    for key, value in state.items():
        name, _, kind = key.partition(".")
        modules.setdefault(name, {})[kind] = value
    # every adapted base weight plus ComfyUI's change equals the merged export's weight
    merged = tmp_path / "merged"
    assert main(["export", str(run), "--format", "merged", "--out", str(merged)]) == 0
    from diffusers import StableDiffusionPipeline

    base = _base_pipeline(tmp_path)
    after = StableDiffusionPipeline.from_pretrained(merged, safety_checker=None)
    checked = 0
    for component, prefix, inner in (
        ("unet", "lora_unet", ""),
        ("text_encoder", "lora_te", "text_model."),
    ):
        before = dict(getattr(base, component).named_modules())
        merged_weights = dict(getattr(after, component).named_parameters())
        for name, module in before.items():
            kohya_name = f"{prefix}_{(inner + name.removeprefix('text_model.')).replace('.', '_')}"
            if kohya_name not in modules or not hasattr(module, "weight"):
                continue
            delta = _comfy_delta(variant, modules[kohya_name], module.weight.shape)
            torch.testing.assert_close(
                module.weight + delta, merged_weights[f"{name}.weight"], atol=1e-6, rtol=1e-5
            )
            checked += 1
    assert checked == len(modules) and checked > 10


@pytest.mark.parametrize(
    "variant",
    # every variant's resume with -m slow (each over 40 s); the variants train in the default
    [
        pytest.param("dora", marks=pytest.mark.slow),
        pytest.param("loha", marks=pytest.mark.slow),
        pytest.param("lokr", marks=pytest.mark.slow),
    ],
)
def test_variant_resumes_bit_for_bit(tmp_path, variant):
    config = tmp_path / "cfg.toml"
    lora = VARIANT.format(variant=variant).replace('"conv1"', '"conv1", "conv2"')
    config.write_text(CONFIG + lora)
    a = _assert_resume_is_exact(config, tmp_path, crash="step:3")
    assert a[0] and all(".lora_" in k or ".hada_" in k or ".lokr_" in k for k in a[0])


def test_variant_settings_are_checked(tmp_path):
    from sdtune.config import load_config
    from sdtune.errors import ConfigError

    with pytest.raises(ConfigError, match="peft's LoHa and LoKr have no input dropout"):
        load_config(None, ["lora.enabled=true", "lora.variant=loha", "lora.dropout=0.1"])
    with pytest.raises(ConfigError, match="lora.lokr_factor: -1 or a side length"):
        load_config(None, ["lora.enabled=true", "lora.lokr_factor=4"])
    cfg = load_config(None, ["lora.enabled=true", "lora.variant=lokr", "lora.lokr_factor=4"])
    assert cfg.lora.lokr_factor == 4


def test_another_adapter_on_a_trained_run_loads_quietly(variant_run, tmp_path, capfd):
    """`sdtune sample RUN --lora FILE` on a run that has adapters already: the second one goes
    in beside them with no peft/diffusers warning (and a LyCORIS kohya file is one line)."""
    import warnings

    variant, run = variant_run
    own = json.loads((run / "model" / "sdtune_model.json").read_text())["lora"]
    args = ["sample", str(run), "--prompt", "a photo", "--num", "1", "--steps", "2"]
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(
            [*args, "--lora", f"{run / 'model' / own}:0.5", "--out", str(tmp_path / "a.png")]
        )
    out, err = capfd.readouterr()
    assert code == 0, err
    noisy = [
        str(w.message)
        for w in caught
        if "peft" in str(w.filename) or "diffusers" in str(w.filename)
    ]
    assert not noisy, noisy
    lines = (out + err).splitlines()  # (bitsandbytes' CPU-kernel notice included: none)
    assert lines == [f"wrote 1 image(s) as a grid to {tmp_path / 'a.png'}"], lines
    if variant != "dora":
        code = main(
            [
                *args,
                "--lora",
                str(run / "model" / "lora_kohya.safetensors"),
                "--out",
                str(tmp_path / "b.png"),
            ]
        )
        err = capfd.readouterr().err.strip()
        assert code == 2 and "a LyCORIS LoHa/LoKr file in kohya's layout" in err
        assert len(err.splitlines()) == 1
    # a damaged adapter (a NaN in it) would turn every image into NaN: one line instead
    with safe_open(str(run / "model" / own), framework="pt") as fh:
        meta, state = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    first = sorted(state)[0]
    state[first] = state[first].clone().fill_(float("nan"))
    bad = tmp_path / "nan.safetensors"
    from safetensors.torch import save_file

    save_file(state, str(bad), metadata=meta)
    capfd.readouterr()
    code = main([*args, "--lora", str(bad), "--out", str(tmp_path / "c.png")])
    err = capfd.readouterr().err.strip()
    assert code == 2 and f"{first} holds NaN or infinite values" in err, err
    assert len(err.splitlines()) == 1
