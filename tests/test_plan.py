"""`sdtune plan`: its predictions against what was measured, on a GPU (this project's SD 1.5
memory recipes, from benchmarks/README.md) and on this CPU (real steps of tiny presets)."""

import json

import pytest
import torch

from sdtune.cli import main
from sdtune.config import load_config
from sdtune.plan import make_plan, measure, optimizer_state_bytes
from tests.cores import cores

# benchmarks/results: torch.cuda.max_memory_allocated of the two SD 1.5 recipes on one H100
LORA_RECIPE_BYTES = 5_010_561_536  # 4.67 GiB: LoRA, bf16, checkpointing, cached latents/text
FULL_RECIPE_BYTES = 16_528_838_144  # 15.39 GiB: full UNet, 8-bit AdamW, EMA, the same switches


@pytest.fixture(scope="module")
def sd15_configs(tmp_path_factory):
    """A folder holding only SD 1.5's component configs (no weights): what plan reads."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from benchmarks.models import CLIP_L, SD15_UNET, SD_VAE, _clip_config
    from sdtune.diffusion.schedules import make_noise_scheduler
    from sdtune.models.tokenizer import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("sd15") / "sd15"
    tokenizer = build_tiny_tokenizer(77)
    with torch.device("meta"):
        UNet2DConditionModel.from_config(SD15_UNET).save_config(out / "unet")
        AutoencoderKL.from_config(SD_VAE).save_config(out / "vae")
    _clip_config(CLIP_L, tokenizer).save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    make_noise_scheduler(1000, "scaled_linear", "epsilon").save_pretrained(out / "scheduler")
    return out


RECIPE = [
    "data.resolution=512",
    "train.batch_size=1",
    "train.mixed_precision=bf16",
    "model.gradient_checkpointing=true",
    "data.cache_latents=true",
    "data.cache_text=true",
]


def test_gpu_memory_recipes_are_predicted_within_20_percent(sd15_configs):
    base = [f"model.base={sd15_configs}", *RECIPE]
    lora = make_plan(load_config(None, [*base, "lora.enabled=true"]), gpu="h100")
    full = make_plan(
        load_config(
            None,
            [
                *base,
                "model.trainable=['unet.*']",
                "train.optimizer=adamw8bit",
                "train.ema=true",
                "train.log_update_ratio=false",
            ],
        ),
        gpu="h100",
    )
    assert lora.peak / LORA_RECIPE_BYTES == pytest.approx(1.0, abs=0.2)
    assert full.peak / FULL_RECIPE_BYTES == pytest.approx(1.0, abs=0.2)
    # where it goes, as benchmarks/README.md says: 3.2 GiB of UNet weights, 1.6 of 8-bit moments
    assert full.memory["optimizer"] / 2**30 == pytest.approx(1.6, abs=0.05)
    assert full.memory["ema"] / 2**30 == pytest.approx(3.2, abs=0.05)
    assert full.components["unet"]["parameters"] == 859_520_964
    assert lora.components["unet"]["trainable"] < 1e7 and lora.fits


def test_what_does_not_fit_gets_the_changes_that_make_it(sd15_configs):
    cfg = load_config(
        None,
        [f"model.base={sd15_configs}", "data.resolution=512", "train.batch_size=1",
         "train.mixed_precision=bf16", "model.trainable=['unet.*']", "train.ema=true"],
    )  # fmt: skip
    plan = make_plan(cfg, gpu="t4")  # 16 GiB: AdamW's moments and the EMA do not fit
    assert plan.fits is False
    assert any("adamw8bit" in s or "lora.enabled" in s for s in plan.suggestions)
    assert all("GiB" in s for s in plan.suggestions)


CPU_RUNS = {
    "full": ["model.base=preset:tiny-sd", "data.resolution=64", "train.batch_size=4"],
    "lora+ema": [
        "model.base=preset:tiny-sd",
        "data.resolution=64",
        "train.batch_size=4",
        "lora.enabled=true",
        "train.ema=true",
    ],
    "checkpointed": [
        "model.base=preset:tiny-digits",
        "data.source=digits",
        "data.resolution=16",
        "train.batch_size=64",
        "train.ema=true",
        "model.gradient_checkpointing=true",
    ],
}


@pytest.mark.parametrize("name", list(CPU_RUNS))
def test_cpu_memory_is_predicted_within_20_percent_of_real_steps(name, tiny_image_folder):
    sets = [*CPU_RUNS[name], "data.val_fraction=0"]
    if "data.source=digits" not in sets:
        sets += [f"data.path={tiny_image_folder}", "data.source=folder"]
    cfg = load_config(None, sets)
    plan = make_plan(cfg)
    real = measure(cfg, steps=1)
    assert plan.peak / real.peak == pytest.approx(1.0, abs=0.2), (plan.memory, real.memory)
    for part in ("weights", "optimizer", "ema"):  # what the run's own objects hold
        assert plan.memory[part] == pytest.approx(real.memory[part], rel=0.05, abs=4096)


def test_measured_step_time_predicts_a_real_run_within_20_percent(tmp_path):
    """plan --measure's step time (a few steps, set up apart) against the steps of a real
    `sdtune train` of the same config (data loading, logging and all), run after it. Wall
    clock: the test has the cores to itself against the tests that start several processes
    (tests.cores), and a second pair is measured when the first is off (a test on the other
    core may have slowed one of the two; three pairs at most)."""
    sets = [*CPU_RUNS["checkpointed"], "data.val_fraction=0", "train.max_steps=14"]
    config = tmp_path / "cfg.toml"
    config.write_text("seed = 0\n")
    cfg = load_config(config, sets)
    with cores():
        ratios = _measured_and_real(cfg, config, sets, tmp_path)
    assert abs(ratios[-1] - 1.0) <= 0.2, ratios


def _measured_and_real(cfg, config, sets, tmp_path) -> list[float]:
    batch = cfg.train.batch_size
    ratios = []
    for attempt in range(3):
        plan = make_plan(cfg, measured_step=measure(cfg, steps=5).step_seconds, variants=False)
        run = tmp_path / f"run-{attempt}"
        args = ["train", str(config), "--output", str(run)]
        for item in [*sets, "train.log_every=7", "checkpoint.every_steps=0",
                     "evaluate.every_steps=0", "evaluate.val_batches=0", "evaluate.judge=false",
                     "evaluate.num_per_prompt=1", "evaluate.sample_steps=1"]:  # fmt: skip
            args += ["--set", item]
        assert main(args) == 0
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        real = batch / [r["images_per_s"] for r in rows if "images_per_s" in r][-1]  # steps 8-14
        ratios.append(plan.step_seconds / real)
        assert plan.total_seconds == pytest.approx(plan.step_seconds * 14)
        if abs(ratios[-1] - 1.0) <= 0.2:
            break
    return ratios


def test_optimizer_states_by_optimizer():
    weights = [torch.empty(64, 128, device="meta"), torch.empty(128, device="meta")]
    n = 64 * 128 + 128
    assert optimizer_state_bytes("adamw", weights, 0.9) == 8 * n
    assert optimizer_state_bytes("lion", weights, 0.9) == 4 * n
    assert optimizer_state_bytes("sgd", weights, 0.0) == 0
    assert optimizer_state_bytes("adafactor", weights, 0.9) == 4 * (64 + 128) + 4 * 128
    assert optimizer_state_bytes("adamw8bit", weights, 0.9) < 3 * 64 * 128 + 8 * 128


def test_plan_cli(tmp_path, capsys):
    config = tmp_path / "cfg.toml"
    config.write_text('[model]\nbase = "preset:tiny-digits"\n[data]\nresolution = 16\n')
    out = tmp_path / "plan.json"
    assert main(["plan", str(config), "--gpu", "h100", "--price", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FLOPs per step" in text and "fits in 80 GiB" in text and "cost:" in text
    assert "the time is a lower bound" in text  # a tiny model's GPU step is launch-bound
    record = json.loads(out.read_text())
    assert record["fits"] is True and record["memory"]["total"] > 0
    assert main(["plan", str(config), "--memory", "0.001"]) == 3  # does not fit: exit 3
    assert "does not fit in 0.001 GiB" in capsys.readouterr().out
    assert main(["plan", str(config), "--gpu", "abacus"]) == 2
    assert "--gpu abacus: unknown" in capsys.readouterr().err
    assert main(["plan", str(config), "--gpu", "h100", "--memory", "40"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["plan", str(config), "--price", "3"]) == 2
    assert "--price: " in capsys.readouterr().err


def test_fsdp_plan_splits_the_denoisers_state_per_process(tmp_path, capsys):
    config = tmp_path / "cfg.toml"
    config.write_text(
        '[model]\nbase = "preset:tiny-sd"\n[data]\nresolution = 32\n[train]\nema = true\n'
    )
    cfg = load_config(config)
    whole, sharded = make_plan(cfg, "h100"), make_plan(cfg, "h100", shards=4)
    unet = 4 * 792_964  # preset:tiny-sd's UNet, float32
    # the UNet's weights, optimizer state and EMA split four ways; the rest whole on each
    assert whole.memory["weights"] - sharded.memory["weights"] == unet - unet // 4
    assert sharded.memory["optimizer"] == whole.memory["optimizer"] // 4 == 2 * unet // 4
    assert sharded.memory["ema"] == unet // 4
    assert "autocast_copies" not in sharded.memory  # FSDP casts each block as it computes
    assert 0 < sharded.memory["fsdp_whole_blocks"] < unet
    # the gradients are kept as shards: less held at the peak of the step
    assert sharded.memory["activations_and_gradients"] < whole.memory["activations_and_gradients"]
    assert sharded.peak < whole.peak
    assert main(["plan", str(config), "--gpu", "h100", "--fsdp", "4"]) == 0
    text = capsys.readouterr().out
    assert "peak memory, per process (FSDP):" in text and "FSDP sharding the unet over 4" in text
    with pytest.raises(SystemExit):  # one process shards nothing
        main(["plan", str(config), "--fsdp", "1"])
    assert "--fsdp: 1 is below the smallest allowed value, 2" in capsys.readouterr().err
    config.write_text(config.read_text() + "[lora]\nenabled = true\ntext_encoder = true\n")
    assert main(["plan", str(config), "--fsdp", "2"]) == 2
    assert "FSDP: only the unet trains when sharded" in capsys.readouterr().err
