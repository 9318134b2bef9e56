"""Fine-tuning methods end to end on tiny presets: LoRA, textual inversion, DreamBooth and
partial fine-tuning, with their exports loaded back by diffusers."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.cli import main
from tests.e2e.test_resume import (
    _assert_identical,
    _assert_resume_is_exact,
    _final_state,
    _train,
)

BASE = """
seed = 3
[model]
base = "preset:tiny-sd"
{model_extra}
[data]
path = "{images}"
val_fraction = 0.34
resolution = 32
[train]
max_steps = 6
batch_size = 2
learning_rate = 0.01
log_every = 1
[checkpoint]
every_steps = 3
[evaluate]
sample_steps = 2
num_per_prompt = 1
val_batches = 1
"""

LORA = """
[lora]
enabled = true
rank = 4
alpha = 8
text_encoder = true
"""


def _config(tmp_path, images, extra: str, model_extra: str = ""):
    path = tmp_path / "cfg.toml"
    path.write_text(BASE.format(images=images, model_extra=model_extra) + extra)
    return path


def _base_pipeline(tmp_path):
    """diffusers' own pipeline for the base model the runs start from (preset, seed 3)."""
    from diffusers import StableDiffusionPipeline

    from sdtune.models import save_bundle
    from sdtune.models.presets import build_preset

    folder = tmp_path / "base"
    if not folder.exists():
        save_bundle(build_preset("tiny-sd", 3), folder)
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def _outputs(unet, text_encoder, tokenizer, prompt="a photo of a red square number 1"):
    """The UNet's prediction for fixed inputs and the text states of `prompt`."""
    ids = tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 16, 16, generator=gen)
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        return unet(x, torch.tensor([500]), encoder_hidden_states=hidden).sample, hidden


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_image_folder_module):
    root = tmp_path_factory.mktemp("lora")
    config = _config(root, tiny_image_folder_module, LORA)
    assert main(["train", str(config), "--output", str(root / "run")]) == 0
    return root, config


def test_lora_checkpoint_holds_only_the_adapter(lora_run):
    root, _ = lora_run
    ckpt = root / "run" / "checkpoints" / "step-0000006"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert any(k.startswith("text_encoder.") for k in weights)
    arch = json.loads((ckpt / "architecture.json").read_text())
    assert len(arch["frozen_sha256"]) == 64  # the base is referenced, not copied
    assert sum(v.numel() for v in weights.values()) < 30_000
    table = (root / "run" / "trainable.txt").read_text()
    assert "total" in table and "text_encoder.encoder" in table


def test_lora_exports_load_in_diffusers_and_change_outputs(lora_run, tmp_path):
    root, _ = lora_run
    run = root / "run"
    for fmt, out in [
        ("lora", tmp_path / "lora.safetensors"),
        ("kohya", tmp_path / "kohya.safetensors"),
        ("merged", tmp_path / "merged"),
    ]:
        assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0

    from sdtune.checkpoint.export import load_checkpoint_model, resolve_checkpoint

    ours, _ = load_checkpoint_model(resolve_checkpoint(run, print), "ema")
    want_pred, want_hidden = _outputs(ours.unet, ours.text_encoder, ours.tokenizer)

    pipe = _base_pipeline(tmp_path)
    base_pred, base_hidden = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (base_pred - want_pred).abs().max() > 1e-3  # training moved the outputs
    assert (base_hidden - want_hidden).abs().max() > 1e-3

    for name in ("lora.safetensors", "kohya.safetensors"):
        pipe = _base_pipeline(tmp_path)
        pipe.load_lora_weights(str(tmp_path / name))
        pred, hidden = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
        torch.testing.assert_close(hidden, want_hidden, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(pred, want_pred, atol=1e-5, rtol=1e-4, msg=name)

    from diffusers import StableDiffusionPipeline

    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged", safety_checker=None)
    pred, hidden = _outputs(merged.unet, merged.text_encoder, merged.tokenizer)
    torch.testing.assert_close(pred, want_pred, atol=1e-5, rtol=1e-4)

    with safe_open(str(tmp_path / "kohya.safetensors"), framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
        alpha = fh.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
    assert float(alpha) == 8.0  # the trained alpha, not the rank
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["sdtune.steps"] == "6"


def test_lora_run_model_and_sample_cli(lora_run, tmp_path):
    root, _ = lora_run
    run = root / "run"
    info = json.loads((run / "model" / "sdtune_model.json").read_text())
    assert info["kind"] == "adapters" and (run / "model" / info["lora"]).is_file()
    assert (run / "model" / "lora_kohya.safetensors").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red square number 1\na photo of a red square number 2\n")
    kohya = tmp_path / "k.safetensors"
    assert main(["export", str(run), "--format", "kohya", "--out", str(kohya)]) == 0
    common = ["--prompt-file", str(prompts), "--num", "2", "--steps", "2", "--seed", "5"]
    common += ["--scheduler", "euler", "--negative-prompt", "blurry", "--guidance", "4"]
    grids = {}
    for name, extra in [
        ("base", []),
        ("off", ["--lora", f"{kohya}:0"]),
        ("on", ["--lora", f"{kohya}:1.0"]),
    ]:
        out = tmp_path / f"{name}.png"
        args = ["sample", "preset:tiny-sd", *common, *extra, "--out", str(out)]
        assert main(args + ["--images-dir", str(tmp_path / name)]) == 0
        grids[name] = out.read_bytes()
        assert len(list((tmp_path / name).glob("*.png"))) == 4
    assert grids["off"] == grids["base"]  # scale 0 is the base model
    assert grids["on"] != grids["base"]
    # the run directory samples with its adapters applied
    assert main(["sample", str(run), "--prompt", "a photo", "--num", "1", "--steps", "2",
                 "--out", str(tmp_path / "run.png")]) == 0  # fmt: skip


def test_lora_resume_is_bit_identical(tmp_path, tiny_image_folder):
    config = _config(tmp_path, tiny_image_folder, LORA)
    _assert_resume_is_exact(config, tmp_path, crash="step:4")


PRESERVE = """
preserve_prompts = ["a photo of a blue circle", "a photo of a green triangle"]
preserve_weight = 2.0
"""


def _drift(run, prompt="a photo of a blue circle"):
    """How far the run's adapters moved the prediction for `prompt` from the base's."""
    from sdtune.checkpoint.export import load_checkpoint_model, resolve_checkpoint
    from sdtune.train.preserve import adapters_off

    bundle, _ = load_checkpoint_model(resolve_checkpoint(run, print))
    adapted, _ = _outputs(bundle.unet, bundle.text_encoder, bundle.tokenizer, prompt)
    with adapters_off(bundle.unet, bundle.text_encoder):
        base, _ = _outputs(bundle.unet, bundle.text_encoder, bundle.tokenizer, prompt)
    return (adapted - base).pow(2).mean().item()


@pytest.mark.slow  # over 40 s: run with -m slow
def test_lora_output_preservation_resumes_exactly_and_keeps_other_prompts(
    lora_run, tmp_path, tiny_image_folder, capsys
):
    # the text encoder's adapters train too: its ids and the UNet's inputs are both doubled
    config = _config(tmp_path, tiny_image_folder, LORA + PRESERVE)
    # a metrics row every 2 steps, a checkpoint every 3: the row of step 4 sums a step from
    # before the kill (in the checkpoint) and one after
    config.write_text(config.read_text().replace("log_every = 1", "log_every = 2"))
    _assert_resume_is_exact(config, tmp_path, crash="step:4")
    # its own metric, the same after a resume (the window's sum is in the checkpoint)
    rows = {}
    for run in ("a", "b"):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        rows[run] = [(r["step"], r["preserve_loss"]) for r in map(json.loads, lines) if "loss" in r]
    assert [step for step, _ in rows["a"]] == [2, 4, 6]
    assert all(0 <= kept < 1 for _, kept in rows["a"]) and rows["a"][-1][1] > 0
    assert rows["a"] == rows["b"]
    root, _ = lora_run  # the same run without preservation
    free, kept = _drift(root / "run"), _drift(tmp_path / "a")
    assert kept < 0.5 * free, (kept, free)

    # with cached text states (a frozen text encoder): the preserved prompts' states are the base's
    cached = tmp_path / "cached"
    args = ["--set", "lora.text_encoder=false", "--set", "data.cache_text=true"]
    assert main(["train", str(config), "--output", str(cached), *args]) == 0
    assert "lora: output preservation on 2 prompt(s), weight 2" in capsys.readouterr().out
    assert _drift(cached) < 0.5 * free


def test_textual_inversion_trains_only_its_vectors_and_loads_in_diffusers(
    tmp_path, tiny_image_folder
):
    extra = """
[textual_inversion]
token = "<sq>"
init_word = "square"
num_vectors = 2
"""
    config = _config(tmp_path, tiny_image_folder, extra)
    run = tmp_path / "run"
    assert main(["train", str(config), "--output", str(run), "--set", "train.ema=false"]) == 0
    weights = load_file(str(run / "checkpoints" / "step-0000006" / "model.safetensors"))
    assert list(weights) == ["text_encoder.embeddings.token_embedding.vectors"]
    assert weights[next(iter(weights))].shape == (2, 32)
    emb = tmp_path / "sq.safetensors"
    assert main(["export", str(run), "--format", "embedding", "--out", str(emb)]) == 0
    assert load_file(str(emb))["emb_params"].shape == (2, 32)

    from sdtune.checkpoint.export import load_checkpoint_model, resolve_checkpoint

    ours, _ = load_checkpoint_model(resolve_checkpoint(run, print))
    prompt = "a photo of <sq>"
    ids = ours.tokenize([prompt])
    with torch.no_grad():
        want = ours.text_encoder(ids)[0]
    pipe = _base_pipeline(tmp_path)
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    pipe.load_textual_inversion(str(emb), token="<sq>")
    _, hidden = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer, "a photo of <sq> <sq>_1")
    torch.testing.assert_close(hidden, want, atol=1e-5, rtol=1e-4)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table[: before.shape[0]], before)  # the base table never moved
    init = before[pipe.tokenizer.convert_tokens_to_ids("square")]
    assert (table[-2:] - init).abs().max() > 1e-3  # the vectors did

    # the run's model folder holds the embedding; sample with it from the run and from the file
    assert (run / "model" / "embedding.safetensors").is_file()
    args = ["--prompt", prompt, "--num", "1", "--steps", "2", "--seed", "1"]
    assert main(["sample", str(run), *args, "--out", str(tmp_path / "a.png")]) == 0
    assert (
        main(
            ["sample", "preset:tiny-sd", *args, "--seed", "1", "--embedding", f"{emb}:<sq>"]
            + ["--out", str(tmp_path / "b.png")]
        )
        == 0
    )


def test_dreambooth_with_prior_generates_class_images_once(tmp_path, tiny_image_folder):
    extra = """
[dreambooth]
instance_prompt = "a photo of sks square"
class_prompt = ["a photo of a square", "a photo of a circle"]
num_class_images = 10
prior_loss_weight = 0.5
class_sample_steps = 2
"""
    config = _config(tmp_path, tiny_image_folder, extra + LORA)
    straight = _train(config, tmp_path / "a")
    assert straight.returncode == 0, straight.stderr
    classes = tmp_path / "a" / "class_images"
    assert len(list(classes.glob("*.png"))) == 10
    assert (classes / "class-00001.txt").read_text().strip() == "a photo of a circle"
    assert "4 instance images x3" in straight.stdout  # 4 instances repeated to balance 10 classes

    killed = _train(config, tmp_path / "b", crash="step:4")
    assert killed.returncode != 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "b" / "class_images").glob("*.png")}
    resumed = _train(config, tmp_path / "b", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert "generating" not in resumed.stdout  # reused, not regenerated
    again = {p.name: p.read_bytes() for p in (tmp_path / "b" / "class_images").glob("*.png")}
    assert again == first
    _assert_identical(_final_state(tmp_path / "a"), _final_state(tmp_path / "b"))


def test_class_image_generation_resumes_identically(tmp_path, tiny_image_folder):
    from sdtune.config import load_config
    from sdtune.models import load_model
    from sdtune.train.dreambooth import ensure_class_images

    config = _config(
        tmp_path,
        tiny_image_folder,
        '[dreambooth]\ninstance_prompt = "sks"\nclass_prompt = ["a square"]\n'
        "num_class_images = 11\nclass_sample_steps = 2\n",
    )
    cfg = load_config(config)
    bundle = load_model(cfg.model, cfg.diffusion, cfg.seed)
    folder = ensure_class_images(cfg, bundle, tmp_path / "run", "cpu", lambda _: None)
    whole = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    for name in ("class-00009.png", "class-00010.png", "class-00006.png"):
        (folder / name).unlink()  # as if killed part-way (and one lost from an earlier batch)
    ensure_class_images(cfg, bundle, tmp_path / "run", "cpu", lambda _: None)
    assert {p.name: p.read_bytes() for p in folder.glob("*.png")} == whole


def test_partial_finetune_param_groups_and_text_encoder_stop(tmp_path, tiny_image_folder):
    model_extra = """trainable = ["unet.up_blocks.*", "text_encoder.encoder.*"]
frozen = ["unet.up_blocks.0.*"]"""
    extra = """
[[optimizer.param_groups]]
params = ["unet.up_blocks.1.attentions.*"]
lr = 0.002
weight_decay = 0.0
"""
    config = _config(tmp_path, tiny_image_folder, extra, model_extra)
    run = tmp_path / "run"
    overrides = ["--set", "train.text_encoder_steps=3", "--set", "train.ema=false"]
    assert main(["train", str(config), "--output", str(run), *overrides]) == 0
    step3 = load_file(str(run / "checkpoints" / "step-0000003" / "model.safetensors"))
    step6 = load_file(str(run / "checkpoints" / "step-0000006" / "model.safetensors"))
    te = [k for k in step6 if k.startswith("text_encoder.")]
    up1 = [k for k in step6 if k.startswith("unet.up_blocks.1.")]
    assert te and up1 and not any(k.startswith("unet.up_blocks.0.") for k in step6)
    assert all(torch.equal(step3[k], step6[k]) for k in te)  # stopped after 3 steps
    assert not all(torch.equal(step3[k], step6[k]) for k in up1)
    opt = torch.load(run / "checkpoints" / "step-0000006" / "optimizer.pt", weights_only=True)
    groups = {g["name"]: g for g in opt["param_groups"]}
    assert set(groups) == {"group0", "unet", "text_encoder"}
    assert groups["group0"]["weight_decay"] == 0.0
    assert groups["group0"]["initial_lr"] == 0.002 and groups["unet"]["initial_lr"] == 0.01
    table = (run / "trainable.txt").read_text()
    assert "unet.up_blocks.0" in table and "unet.down_blocks.0" in table


def test_fine_tuning_config_errors(tmp_path, tiny_image_folder, capsys):
    cases = [
        (["lora.enabled=true", "lora.unet_targets=[nothing_here]"], "'nothing_here' match no"),
        (
            ["textual_inversion.token=<x>", "textual_inversion.init_word=qqqzzz"],
            "textual_inversion.init_word: 'qqqzzz' is",
        ),
        (["textual_inversion.token=square"], "'square' is already in the tokenizer"),
        (["dreambooth.instance_prompt=sks"], "dreambooth.class_prompt is required"),
        (["optimizer.param_groups=[{params: [unet.nope.*]}]"], "match no trainable parameter"),
        (["model.trainable=[]"], "no parameter is trainable"),
    ]
    config = _config(tmp_path, tiny_image_folder, "")
    for i, (overrides, message) in enumerate(cases):
        args = [a for o in overrides for a in ("--set", o)]
        code = main(["train", str(config), "--output", str(tmp_path / f"run{i}"), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
