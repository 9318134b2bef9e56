"""The throughput benchmark: a real (short) run on the tiny preset, its result file, its errors.

The side-by-side tests need diffusers' examples/text_to_image/train_text_to_image.py,
train_text_to_image_sdxl.py and examples/dreambooth/train_dreambooth_lora_sd3.py, which are
not part of this repository: set SDTUNE_PEER_SCRIPT, SDTUNE_PEER_SCRIPT_SDXL and
SDTUNE_PEER_SCRIPT_SD3 to their paths to run them.
"""

import importlib.util
import json
import os
import statistics
from pathlib import Path

import pytest

from benchmarks import throughput
from benchmarks.models import ARCHS, parameter_counts, step_flops
from benchmarks.peer import BenchmarkError, check_peer
from benchmarks.report import BEGIN, END, update_readme

SHORT = ["--resolution", "16", "--batch-size", "4", "--warmup", "1", "--steps", "2"]
SHORT += ["--images", "16", "--threads", "1", "--cpu", "--no-readme"]


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "out"
    argv = [*SHORT, "--work", str(tmp_path / "work"), "--out", str(out), *extra]
    assert throughput.main(argv) == 0
    (found,) = out.glob("throughput-*.json")
    assert found.with_suffix(".md").is_file()
    return json.loads(found.read_text())


def test_tiny_preset_run_writes_a_complete_result(tmp_path):
    result = _run(tmp_path, "--repeats", "1", "--peak-tflops", "0.5")
    assert result["benchmark"] == "throughput"
    assert result["command"].startswith("python -m benchmarks.throughput --resolution 16")
    assert result["machine"]["device"] == "cpu" and result["machine"]["torch_threads"] == 1
    assert result["versions"]["torch"] and result["versions"]["sdtune"]
    setup = result["setup"]
    assert (setup["model"], setup["resolution"], setup["batch_size"]) == ("tiny-sd", 16, 4)
    assert setup["sdtune_config"]["train"]["log_every"] == 10
    (run,) = result["runs"]
    assert run["trainer"] == "sdtune" and len(run["step_s"]) == 2
    assert all(s > 0 for s in run["step_s"]) and len(run["load_average_start"]) == 3
    flops = result["flops_per_step"]
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total") > 0
    mine = result["summary"]["sdtune"]
    median = statistics.median(run["step_s"])
    assert mine["images_per_s"] == pytest.approx(4 / median)
    assert mine["step_s_p25"] <= mine["step_s_median"] <= mine["step_s_p75"]
    assert mine["peak_rss_bytes"] > 100 * 2**20 and mine["cuda_max_allocated_bytes"] is None
    assert mine["mfu"] == pytest.approx(flops["total"] / median / 1e12 / 0.5)
    assert "ratio" not in result["summary"]

    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\n{BEGIN}\nold table\n{END}\n\nmore text\n")
    update_readme(readme, tmp_path / "out")
    text = readme.read_text()
    assert "old table" not in text and text.endswith(f"{END}\n\nmore text\n")
    assert "| CPU, 1 thread | tiny-sd 16 px ×4 no |" in text


@pytest.mark.slow  # over 40 s: run with -m slow
def test_compare_runs_variants_alternated_and_reports_their_ratio(tmp_path):
    result = _run(
        tmp_path, "--repeats", "1", "--compare", "train.fused_optimizer=false", "--profile"
    )
    assert [r["trainer"] for r in result["runs"]] == [  # the profiled runs are not timings
        "sdtune",
        "sdtune+train.fused_optimizer=false",
    ]
    profiles = sorted((tmp_path / "out").glob("throughput-*.profile-*.txt"))
    assert [p.name.rsplit(".", 2)[1] for p in profiles] == ["profile-sdtune", "profile-variant1"]
    for path in profiles:  # CPU: host operators only (the kernel table needs a GPU)
        text = path.read_text()
        assert "2 steps" in text and "ms per step" in text
        assert "top host operators" in text and "aten::" in text
    (variant,) = result["summary"]["variants"].values()
    assert variant["overrides"] == ["train.fused_optimizer=false"]
    base = result["summary"]["sdtune"]["images_per_s"]
    name = "sdtune+train.fused_optimizer=false"
    assert variant["vs_sdtune"] == pytest.approx(result["summary"][name]["images_per_s"] / base)
    assert variant["vs_peer"] is None
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    update_readme(readme, tmp_path / "out")
    assert "tiny-sd 16 px ×4 no + train.fused_optimizer=false |" in readme.read_text()


def test_a_benchmark_stopped_short_keeps_its_complete_rounds(tmp_path, monkeypatch):
    real_run = throughput._run

    def run(trainer, repeat, *args, **kwargs):
        if repeat == 1:  # the second round dies (a time limit, a crash)
            raise BenchmarkError(f"{trainer} run 2 failed: killed")
        return real_run(trainer, repeat, *args, **kwargs)

    monkeypatch.setattr(throughput, "_run", run)
    out = tmp_path / "out"
    argv = [*SHORT, "--work", str(tmp_path / "work"), "--out", str(out), "--repeats", "2"]
    assert throughput.main(argv) != 0
    (found,) = out.glob("throughput-*.json")
    result = json.loads(found.read_text())
    assert result["complete"] is False and len(result["runs"]) == 1
    assert (result["setup"]["repeats"], result["setup"]["repeats_asked"]) == (1, 2)
    assert result["summary"]["sdtune"]["images_per_s"] > 0
    assert "stopped short: 1 of 2 round(s)" in found.with_suffix(".md").read_text()


def test_profile_sorts_kernels_by_kind():
    from benchmarks.worker import kernel_kind

    kinds = {
        "pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_params>": "attention",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
        "sm90_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32": "convolution",
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>": "normalisation",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": (
            "optimizer / foreach"
        ),
        "triton_poi_fused_add_silu_3": "fused (triton)",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>": "layout transpose",
        "void at::native::reduce_kernel<512, 1, ReduceOp<float, NormTwoOps<float>>>": "reduction",
        "void at::native::vectorized_elementwise_kernel<4, BUnaryFunctor<broadcast>>": (
            "elementwise / other"
        ),
        "void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>": (
            "copy / dtype conversion"
        ),
        "triton_per_fused_native_group_norm_12": "normalisation",
        "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>": (
            "elementwise / other"
        ),
    }
    assert {name: kernel_kind(name) for name in kinds} == kinds


def test_profile_report_counts_kernels_once():
    """The device table: kernels by kind, per step; an annotation's device span (which covers
    kernels listed on their own) is not counted again."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.worker import profile_report

    def event(key, device_us=0.0, cpu_us=0.0, count=2, cuda=True, annotation=False):
        return SimpleNamespace(
            key=key,
            device_type=DeviceType.CUDA if cuda else DeviceType.CPU,
            self_device_time_total=device_us,
            self_cpu_time_total=cpu_us,
            count=count,
            is_user_annotation=annotation,
        )

    events = [
        event("sm90_xmma_fprop_implicit_gemm_bf16", 60_000),
        event("pytorch_flash::flash_fwd_kernel", 30_000),
        event("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 10_000),
        event("Optimizer.step#AdamW.step", 12_000, annotation=True),
        event("aten::mm", cpu_us=8_000, cuda=False),
    ]
    profiler = SimpleNamespace(key_averages=lambda: events)
    text = profile_report(profiler, 2, [0.06, 0.06], "sdtune")
    assert "2 steps, 60.0 ms per step (wall)" in text
    assert "device busy 50.0 ms per step in kernels = 83%" in text
    rows = {line.rsplit(None, 2)[0]: line.split()[-2:] for line in text.splitlines()[4:7]}
    assert rows == {
        "convolution": ["30.00", "60.0%"],
        "attention": ["15.00", "30.0%"],
        "optimizer / foreach": ["5.00", "10.0%"],
    }
    assert "Optimizer.step#AdamW.step" not in text.split("top host operators")[0]
    assert "aten::mm" in text.split("top host operators")[1]


def test_flop_count_and_full_size_configs():
    tiny = step_flops(ARCHS["tiny-sd"], 32, 2, train_text=False)
    assert 1.9 < tiny["backward"] / tiny["unet_forward"] <= 2.0  # no input gradient at the UNet
    assert step_flops(ARCHS["tiny-sd"], 32, 4, False)["total"] == 2 * tiny["total"]
    counts = parameter_counts(ARCHS["sd15"])  # the published SD 1.5 sizes
    assert counts == {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
    assert parameter_counts(ARCHS["sdxl"]) == {  # the published SDXL base 1.0 sizes
        "unet": 2_567_463_684,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
        "vae": 83_653_863,
    }
    xl = step_flops(ARCHS["tiny-sdxl"], 32, 2, train_text=False)  # both encoders, time ids
    assert xl["text_encoder"] > 0 and xl["unet_forward"] > 0
    assert step_flops(ARCHS["tiny-sdxl"], 32, 4, False)["total"] == 2 * xl["total"]


def test_sd35_sizes_and_flops():
    """--model sd35: SD 3.5 Medium's published component sizes, and a step's FLOPs as the
    transformer, the three encoders (77 tokens) and the VAE cost them."""
    import torch

    from benchmarks.models import register_presets
    from sdtune.models.families import PRESETS

    counts = parameter_counts(ARCHS["sd35"])
    assert counts == {
        "transformer": 2_243_171_520,
        "text_encoder": 123_650_304,  # CLIP-L with its projection
        "text_encoder_2": 694_659_840,  # CLIP-G (bigG) with its projection
        "text_encoder_3": 4_762_310_656,  # T5 v1.1 XXL's encoder
        "vae": 83_819_683,
    }
    one = step_flops(ARCHS["sd35"], 1024, 1, train_text=False)
    assert step_flops(ARCHS["sd35"], 1024, 2, False)["total"] == 2 * one["total"]
    # 4096 image tokens + 154 text tokens through 2.24B parameters: about 2 x 2.2e9 x 4250
    assert 1.0e13 < one["transformer_forward"] < 1.2e13
    assert 1.9 < one["backward"] / one["transformer_forward"] <= 2.0
    # T5-XXL dominates the text side: about 2 x 4.76e9 x 77
    assert 0.7e12 < one["text_encoder"] < 0.9e12
    register_presets()
    with torch.device("meta"):
        bundle = PRESETS[ARCHS["sd35"].base.removeprefix("preset:")]()
    assert bundle.family == "sd3"
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in bundle.modules.items()} == counts
    tiny = step_flops(ARCHS["tiny-sd3"], 32, 2, train_text=False)
    assert tiny["transformer_forward"] > 0 and tiny["text_encoder"] > 0


def test_full_size_sdxl_is_what_sdtune_loads():
    """`--model sdxl` trains through sdtune's preset table: the builder makes the published
    architecture (built on the meta device here: shapes only)."""
    import torch

    from benchmarks.models import register_presets
    from sdtune.models.families import PRESETS

    register_presets()
    with torch.device("meta"):
        bundle = PRESETS[ARCHS["sdxl"].base.removeprefix("preset:")]()
    assert bundle.family == "sdxl"
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in bundle.modules.items()}
    assert counts == parameter_counts(ARCHS["sdxl"])
    assert bundle.vae.config.scaling_factor == 0.13025 and bundle.vae.config.force_upcast


def test_peer_script_must_match_the_model(tmp_path, monkeypatch):
    sd = tmp_path / "train_text_to_image.py"
    sd.write_text('def main():\n    "--train_data_dir"\n')
    xl = tmp_path / "train_text_to_image_sdxl.py"
    xl.write_text('def main():\n    "--train_data_dir"\n    StableDiffusionXLPipeline\n')
    real = importlib.util.find_spec  # the peer's own requirements (datasets) count as found
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: real(name) or object())
    assert check_peer(xl, ARCHS["tiny-sdxl"])["example"].endswith("_sdxl.py")
    with pytest.raises(BenchmarkError, match="not diffusers' .*_sdxl.py, the peer for --model"):
        check_peer(sd, ARCHS["tiny-sdxl"])
    with pytest.raises(BenchmarkError, match="train_text_to_image.py, the peer for --model"):
        check_peer(xl, ARCHS["tiny-sd"])
    with pytest.raises(BenchmarkError, match="tiny-digits has no VAE"):
        check_peer(sd, ARCHS["tiny-digits"])
    sd3 = tmp_path / "train_dreambooth_lora_sd3.py"
    sd3.write_text(
        'def main():\n  "--instance_data_dir" "--dataset_name" StableDiffusion3Pipeline\n'
    )
    assert check_peer(sd3, ARCHS["tiny-sd3"])["example"].endswith("lora_sd3.py")
    with pytest.raises(BenchmarkError, match="train_dreambooth_lora_sd3.py, the peer for"):
        check_peer(xl, ARCHS["tiny-sd3"])
    with pytest.raises(BenchmarkError, match="train_text_to_image.py, the peer for"):
        check_peer(sd3, ARCHS["tiny-sd"])


def test_missing_peer_script_is_a_one_line_error(tmp_path, capsys):
    argv = [*SHORT, "--peer", str(tmp_path / "nope.py"), "--work", str(tmp_path)]
    assert throughput.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "examples/text_to_image/train_text_to_image.py" in err


def test_missing_peer_requirement_is_named(tmp_path, monkeypatch):
    script = tmp_path / "train_text_to_image.py"
    script.write_text('def main():\n    "--train_data_dir"\n')
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name)
    )
    with pytest.raises(BenchmarkError, match=r"needs datasets.*pip install datasets"):
        check_peer(script, ARCHS["tiny-sd"])


def test_bad_override_fails_before_any_run(tmp_path, capsys):
    argv = [*SHORT, "--set", "train.max_stepz=3", "--work", str(tmp_path)]
    assert throughput.main(argv) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err
    assert throughput.main([*SHORT, "--workers", "-1", "--work", str(tmp_path)]) == 2
    assert "--workers >= 0" in capsys.readouterr().err


def _needs_peer(variable: str, script: str):
    """Skip unless $variable names diffusers' `script` (never kept here) and `datasets` is in."""
    path = os.environ.get(variable)

    def mark(test):
        test = pytest.mark.skipif(
            not path or not Path(path).is_file(),
            reason=f"diffusers' {script} is not in this repository; set {variable}=PATH to "
            "run the side-by-side test",
        )(test)
        needs = importlib.util.find_spec("datasets") is None
        return pytest.mark.skipif(needs, reason="needs `datasets`")(test)

    return path, mark


PEER, needs_peer = _needs_peer("SDTUNE_PEER_SCRIPT", "train_text_to_image.py")
PEER_SDXL, needs_sdxl_peer = _needs_peer("SDTUNE_PEER_SCRIPT_SDXL", "train_text_to_image_sdxl.py")
PEER_SD3, needs_sd3_peer = _needs_peer("SDTUNE_PEER_SCRIPT_SD3", "train_dreambooth_lora_sd3.py")


@needs_peer
def test_side_by_side_with_the_peer(tmp_path):
    result = _run(tmp_path, "--repeats", "1", "--peer", PEER)
    assert [r["trainer"] for r in result["runs"]] == ["sdtune", "peer"]
    summary = result["summary"]
    ratio = summary["sdtune"]["images_per_s"] / summary["peer"]["images_per_s"]
    assert summary["ratio"] == pytest.approx(ratio)
    assert "--train_data_dir" in result["setup"]["peer_args"]


@needs_sdxl_peer
def test_sdxl_side_by_side_with_the_peer(tmp_path):
    """The SDXL peer encodes images and captions before training; sdtune then caches both."""
    result = _run(tmp_path, "--model", "tiny-sdxl", "--resolution", "32", "--repeats", "1",
                  "--peer", PEER_SDXL)  # fmt: skip
    assert [r["trainer"] for r in result["runs"]] == ["sdtune", "peer"]
    data = result["setup"]["sdtune_config"]["data"]
    assert data["cache_latents"] and data["cache_text"]
    flops, counted = result["flops_per_step"], result["flops_counted"]
    assert counted["peer"] == counted["sdtune"]
    assert counted["peer"] == flops["total"] - flops["vae_encode"] - flops["text_encoder"]


@needs_sd3_peer
def test_sd3_side_by_side_with_the_peer(tmp_path):
    """The SD3 peer trains LoRA on its attention projections at rank 4: so does sdtune."""
    result = _run(tmp_path, "--model", "tiny-sd3", "--resolution", "32", "--repeats", "1",
                  "--peer", PEER_SD3)  # fmt: skip
    assert [r["trainer"] for r in result["runs"]] == ["sdtune", "peer"]
    lora = result["setup"]["sdtune_config"]["lora"]
    assert lora["enabled"] and lora["rank"] == 4 and "attn.add_q_proj" in lora["unet_targets"]
    assert result["setup"]["trainable"] == "LoRA on the transformer"
    assert "--dataset_name" in result["setup"]["peer_args"]
    assert result["flops_counted"]["peer"] == result["flops_counted"]["sdtune"]


def test_fewshot_configs_validate_and_its_table_renders(tmp_path):
    from benchmarks import fewshot
    from sdtune.config import validate_config

    validate_config(fewshot.BASE)
    configs = fewshot.methods(tmp_path / "base" / "model")
    assert set(configs) == {
        "full",
        "lora",
        "lora-plain",
        "dreambooth-lora",
        "dreambooth-full",
        "textual-inversion",
        "lora-r8-constant",
    }
    for config in configs.values():
        validate_config({**config, "seed": 2})
    # the benchmark's recommended LoRA is the example users copy (less its toy-model lr)
    from pathlib import Path

    import tomllib

    example = tomllib.loads(
        (Path(__file__).parents[1] / "examples" / "lora_fewshot_sd15.toml").read_text()
    )
    lora = validate_config(configs["lora"])
    shipped = validate_config(example)
    for section, key in [
        ("lora", "rank"),
        ("lora", "alpha"),
        ("lora", "preserve_weight"),
        ("diffusion", "timestep_sampling"),
        ("train", "max_steps"),
        ("train", "lr_schedule"),
        ("train", "warmup_steps"),
        ("train", "ema"),
        ("train", "ema_decay"),
    ]:
        ours, theirs = getattr(getattr(lora, section), key), getattr(getattr(shipped, section), key)
        assert ours == theirs, f"{section}.{key}: benchmark {ours} vs example {theirs}"
    run = {"seed": 1, "nine_accuracy": 0.9, "others_after": 0.97, "forgetting_points": 2.3}
    row = {
        "method": "lora",
        "steps": 200,
        "nine_accuracy": 0.9,
        "others_before": 0.993,
        "others_after": 0.97,
        "forgetting_points": 2.3,
        "worst_nine_accuracy": 0.7,
        "worst_forgetting_points": 2.3,
        "meets_target": False,
        "targeted": True,
        "train_seconds": 12.0,
        "trainable_parameters": 1234,
        "runs": [run, {**run, "seed": 2, "nine_accuracy": 0.7}],
    }
    result = {
        "base": {"per_class": [1.0] * 9 + [0.0], "train_seconds": 130, "trainable_parameters": 9},
        "rows": [row],
        "seeds": [1, 2],
        "images_per_class": 50,
        "judge_seed": 7,
        "command": "python -m benchmarks.fewshot",
        "created": "2026-11-23T00:00:00",
        "machine": {"cpus": 2, "torch": "2.x"},
    }
    table = fewshot.markdown(result)
    assert (
        "| lora | 200 | 0.90 (0.70 to 0.90) | **0.70** | +2.3 (+2.3 to +2.3) | **+2.3** | no |"
        in table
    )
    assert "Target, on every seed: nine ≥ 0.90 and forgetting ≤ 1 point" in table
    assert "| base (pre-trained on 0–8) |" in table


@pytest.mark.slow  # over 40 s: run with -m slow
def test_wide_digits_benchmark_runs_end_to_end(tmp_path):
    """The buckets benchmark on a few steps: real pairs written, both variants trained through
    the CLI, every half judged, a table rendered (the numbers of a real run are in the README)."""
    from PIL import Image

    from benchmarks import buckets
    from sdtune.config import validate_config

    data = buckets.write_pairs(tmp_path / "data", count=80)
    first = Image.open(data / "pair-00000.png")
    assert first.size == (16, 8) and first.mode == "L"
    rows = (data / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 80 and json.loads(rows[0])["text"].startswith("the digits ")
    for flag in (False, True):
        validate_config(buckets.config(data, 1, 10, flag))
    result = buckets.run(tmp_path / "work", [1], 2, 1, 7, print, pairs=80)
    square, bucketed = result["rows"]
    assert square["variant"] == "square crops" and bucketed["variant"] == "buckets"
    for row in result["rows"]:
        assert 0.0 <= row["pair_accuracy"] <= min(row["left_accuracy"], row["right_accuracy"])
    report = json.loads((tmp_path / "work" / "buckets" / "seed-1" / "data_report.json").read_text())
    assert {(b["width"], b["height"]) for b in report["buckets"]["buckets"]} == {buckets.WIDE}
    assert "| buckets |" in buckets.table(result)


def test_ensembles_reuse_takes_earlier_rows_and_trains_only_the_missing(tmp_path, monkeypatch):
    import json

    from benchmarks import ensembles

    trained = []

    def fake_ensemble(config, out, seed, say=print):  # stands in for three real trainings
        trained.append((out.parent.name, seed))
        row = {k: float(seed) for k in ensembles.KEYS}
        return {"member-1": row, "member-2": row, "soup": row, "ensemble": row}, [1.0, 1.0]

    monkeypatch.setattr(ensembles, "_ensemble", fake_ensemble)
    (tmp_path / "base-0-8").mkdir()
    (tmp_path / "base-0-8" / "run_summary.json").write_text("{}")
    first = ensembles.run(tmp_path, [0], say=lambda *_: None)
    assert trained == [("from-scratch", 0), ("fine-tunes-of-one-base", 0)]
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(first))
    trained.clear()
    second = ensembles.run(tmp_path, [0, 10], say=lambda *_: None, reuse=earlier)
    assert trained == [("from-scratch", 10), ("fine-tunes-of-one-base", 10)]  # only the new
    assert len(second["reused"]) == 2 and "seeds 0-2" in second["reused"][0]
    runs = second["settings"]["from scratch"]["runs"]
    assert runs[0] == first["settings"]["from scratch"]["runs"][0] and len(runs) == 2
    assert "--reuse" in ensembles.markdown(second)


def test_fewshot_merge_replaces_the_rerun_rows_and_refuses_other_draws():
    import pytest

    from benchmarks import fewshot

    def row(method, nine):
        return {
            "method": method, "steps": 400, "nine_accuracy": nine, "others_after": 0.99,
            "forgetting_points": 0.5, "worst_nine_accuracy": nine, "meets_target": True,
            "worst_forgetting_points": 0.5, "targeted": True, "train_seconds": 1.0,
            "trainable_parameters": 9, "runs": [],
        }  # fmt: skip

    def result(rows, seeds=(1, 2, 3, 4, 5), per_class=None):
        return {
            "base": {"per_class": per_class or [1.0] * 9 + [0.0], "train_seconds": 1,
                     "trainable_parameters": 9},
            "rows": rows, "seeds": list(seeds), "images_per_class": 100, "judge_seed": 7,
            "command": "python -m benchmarks.fewshot", "created": "2026-12-01T00:00:00",
            "machine": {"cpus": 2, "torch": "2.x"},
        }  # fmt: skip

    recorded = result([row("full", 0.7), row("lora", 0.97), row("dreambooth-lora", 0.9)])
    fresh = result([row("dreambooth-lora", 0.96), row("lora-plain", 0.8)])
    fresh["command"] = "python -m benchmarks.fewshot --only dreambooth-lora --merge"
    fresh["created"] = "2026-12-02T10:00:00"
    merged = fewshot.merge(recorded, fresh)
    # replaced in place, a new method put where methods() has it, the others kept
    assert [r["method"] for r in merged["rows"]] == [
        "full",
        "lora",
        "lora-plain",
        "dreambooth-lora",
    ]
    assert [r["nine_accuracy"] for r in merged["rows"]] == [0.7, 0.97, 0.8, 0.96]
    assert recorded["rows"][2]["nine_accuracy"] == 0.9  # the recorded result is not changed
    table = fewshot.markdown(merged)
    assert "Re-run since, with the same base and draws: lora-plain from" in table
    assert (
        "dreambooth-lora from `python -m benchmarks.fewshot --only dreambooth-lora --merge` (2026-12-02)"
        in table
    )
    with pytest.raises(SystemExit, match="seeds"):
        fewshot.merge(recorded, result([], seeds=(21, 22)))
    with pytest.raises(SystemExit, match="base judges differently"):
        fewshot.merge(recorded, result([], per_class=[0.9] * 10))
