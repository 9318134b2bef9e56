"""SD3 exports end to end: a LoRA run on tiny-sd3 (transformer and CLIP encoders, alpha !=
rank) exported through the CLI as an SD3 single file (.safetensors and .ckpt), which sdtune
samples and trains from by itself (the file names its base, whose configs it takes), and as
the kohya-named LoRA (ComfyUI's lora_unet_<original module>), which `sdtune sample --lora`
reads back as the diffusers LoRA of the same run. (tests/test_sd3_files.py checks the same
files without the CLI, against diffusers and ComfyUI.)"""

import pytest
import torch

from tests.e2e.conftest import run_cli
from tests.e2e.test_sd3_train import LORA

pytestmark = (
    pytest.mark.slow
)  # about 90 s: a LoRA run, then exports, sampling and a run from the file

RUN = LORA.replace("rank = 4\n", "rank = 4\nalpha = 2.0\ntext_encoder = true\n").replace(
    "cache_text = true",
    "cache_text = false",  # the CLIP encoders train
)
FROM_FILE = """
seed = 4
[model]
base = "{base}"
[data]
path = "{images}"
val_fraction = 0
resolution = 32
[lora]
enabled = true
rank = 2
[train]
max_steps = 1
batch_size = 2
[evaluate]
sample_steps = 1
num_per_prompt = 1
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_image_folder_module):
    root = tmp_path_factory.mktemp("sd3-exports")
    config = root / "cfg.toml"
    config.write_text(RUN.format(images=tiny_image_folder_module, cache=root / "cache"))
    run_cli("train", config, "--output", root / "run")
    return root / "run"


def _model(base: str):
    from sdtune.config import load_config
    from sdtune.models.loading import load_model

    cfg = load_config(None, [f"model.base={base}"])
    return load_model(cfg.model, cfg.diffusion, cfg.seed)


def _prediction(bundle):
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = bundle.arch.conditioning(bundle, ["a red square"], "cpu")
        return bundle.arch.predict(bundle, x, torch.tensor([500.0]), cond)


def test_single_files_load_sample_and_train(run, tmp_path, tiny_image_folder_module):
    merged = tmp_path / "merged"
    files = {"single-file": tmp_path / "m.safetensors", "ckpt": tmp_path / "m.ckpt"}
    for fmt, out in {"diffusers": merged, **files}.items():
        run_cli("export", run, "--format", fmt, "--out", out, "--weights", "raw")
    expected = _prediction(_model(str(merged)))
    for path in files.values():  # model.config_source from the file's sdtune.base_model
        torch.testing.assert_close(_prediction(_model(str(path))), expected, atol=1e-5, rtol=1e-4)
    single = files["single-file"]
    proc = run_cli("sample", single, "--prompt", "a red square", "--out", tmp_path / "g.png",
                   "--steps", "2", "--num", "1")  # fmt: skip
    assert (tmp_path / "g.png").is_file(), proc.stdout
    config = tmp_path / "from_file.toml"
    config.write_text(FROM_FILE.format(base=single, images=tiny_image_folder_module))
    proc = run_cli("train", config, "--output", tmp_path / "run2")
    assert "family sd3-custom" in proc.stdout, proc.stdout[-2000:]
    assert (tmp_path / "run2" / "model" / "lora_kohya.safetensors").is_file()


def test_kohya_file_has_comfyuis_names_and_reads_back_as_the_lora(run, tmp_path):
    from safetensors import safe_open

    from sdtune.models.lora import load_lora_files
    from sdtune.models.presets import build_preset

    kohya, lora = tmp_path / "k.safetensors", tmp_path / "l.safetensors"
    for fmt, out in (("kohya", kohya), ("lora", lora)):
        run_cli("export", run, "--format", fmt, "--out", out, "--weights", "raw")
    with safe_open(str(kohya), framework="pt") as fh:
        keys, metadata = set(fh.keys()), fh.metadata()
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert not any("transformer_blocks" in k for k in keys)
    assert metadata["ss_base_model_version"] == "sd3" and metadata["ss_network_alpha"] == "2.0"
    with safe_open(str(run / "model" / "lora_kohya.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == keys  # the run's own kohya file is the same
    outputs = []
    for path in (kohya, lora):
        base = build_preset("tiny-sd3", 3)  # the run's base (seed 3)
        load_lora_files(base, [(path, 1.0)])
        outputs.append(_prediction(base))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(outputs[0], _prediction(build_preset("tiny-sd3", 3)), atol=1e-5)
    run_cli("sample", "preset:tiny-sd3", "--lora", f"{kohya}:0.5", "--prompt", "a red square",
            "--out", tmp_path / "g.png", "--steps", "2", "--num", "1")  # fmt: skip
    assert (tmp_path / "g.png").is_file()
