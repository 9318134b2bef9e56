"""DeepSpeed ZeRO stage 2 through Accelerate on two CPU processes (gloo), started as the README
says: `accelerate launch --config_file examples/accelerate/deepspeed.yaml -m sdtune train
CONFIG`. Each process holds the whole UNet and its part of the gradients and of the optimizer
state (with the float32 master weights); checkpoints are written by both (DeepSpeed's own
folder, each process's optimizer partition) under the store's manifest, and a run killed
anywhere, during a save too, resumes to the same bits as one that was not killed."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.test_distributed import DISTRIBUTED
from tests.e2e.test_sharded import (
    accelerate_train,
    assert_export_is_the_final_model,
    flip_a_byte,
    killed_in_a_save_and_in_a_step_then_resumed,
    lora_resumes_exactly_and_refuses_a_text_encoder,
    sdtune_cli,
)

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")

ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED_CONFIG = ROOT / "examples" / "accelerate" / "deepspeed.yaml"
CONFIG = DISTRIBUTED


def _launch(config, run, *extra, crash=None, spike=None, processes=2):
    return accelerate_train(
        DEEPSPEED_CONFIG, config, run, *extra, crash=crash, spike=spike, processes=processes
    )


def _state(run: Path, step: int):
    """Every tensor of a DeepSpeed checkpoint (weights, EMA, each process's optimizer
    partition with its master weights and moments), and the metrics rows."""
    ckpt = run / "checkpoints" / f"step-{step:07d}"
    tensors = {f"model.{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    if (ckpt / "ema.safetensors").is_file():
        tensors.update({f"ema.{k}": v for k, v in load_file(str(ckpt / "ema.safetensors")).items()})
    for part in sorted((ckpt / "deepspeed").glob("zero_pp_rank_*_optim_states.pt")):
        saved = torch.load(part, weights_only=False, map_location="cpu")

        def walk(prefix, node):
            if isinstance(node, torch.Tensor):
                tensors[prefix] = node
            elif isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}.{k}", v)
            elif isinstance(node, (list, tuple)):
                for i, v in enumerate(node):
                    walk(f"{prefix}.{i}", v)

        walk(part.name, saved["optimizer_state_dict"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("images_per_s", None)
    return tensors, rows


def _assert_same(a, b):
    (ta, ra), (tb, rb) = a, b
    assert ta.keys() == tb.keys()
    assert any("exp_avg" in k for k in ta) and any(k.startswith("ema.") for k in ta)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"differ: {different[:5]}"
    assert ra == rb, "metrics.jsonl differs (duplicated, missing or different rows)"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    config = root / "cfg.toml"
    config.write_text(CONFIG)
    proc = _launch(config, root / "a", spike="8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, root / "a", proc


def test_deepspeed_trains_guards_and_saves_every_partition(straight):
    config, run, proc = straight
    assert proc.stdout.count("trained to step 10") == 1  # one voice
    assert "processes: 2; global batch 4 images per step" in proc.stdout
    # the guard decides before the update; DeepSpeed discards it; every process rolls back
    assert "step 8: loss spike" in proc.stdout and "update skipped" in proc.stdout
    assert "diverged at step 8: rolled back to step-0000006" in proc.stdout
    ckpt = run / "checkpoints" / "step-0000010"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["sharded"] == {"processes": 2, "by": "deepspeed"}
    names = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    # each process wrote its optimizer partition and RNG; all of them are in the manifest
    assert {
        "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "model.safetensors",
        "ema.safetensors",
        "rng-0.safetensors",
        "rng-1.safetensors",
    } <= names
    assert set(manifest["files"]) == names - {"manifest.json"}
    # the final model is the EMA's weights, as without DeepSpeed
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(run / "model" / "unet")
    ema = load_file(str(ckpt / "ema.safetensors"))
    saved = {f"unet.{n}": p for n, p in unet.state_dict().items()}
    assert ema and all(torch.equal(saved[k], ema[k]) for k in ema)
    assert json.loads((run / "run_summary.json").read_text())["steps"] == 10


def test_deepspeed_killed_in_a_step_and_in_a_save_resumes_exactly(straight, tmp_path):
    config, reference, _ = straight
    killed_in_a_save_and_in_a_step_then_resumed(_launch, config, tmp_path / "b")
    _assert_same(_state(reference, 10), _state(tmp_path / "b", 10))


def test_deepspeed_corrupt_partition_falls_back_and_other_counts_are_refused(straight, tmp_path):
    config, reference, _ = straight
    import shutil

    run = tmp_path / "c"
    shutil.copytree(reference, run)
    part = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip_a_byte(run / "checkpoints" / "step-0000010" / part)
    inspect = sdtune_cli("inspect", run / "checkpoints" / "step-0000010")
    assert inspect.returncode != 0 and f"{part}: sha256 does not match" in inspect.stdout
    intact = sdtune_cli("inspect", run / "checkpoints" / "step-0000009")
    assert intact.returncode == 0 and "sharded (deepspeed) by 2 processes" in intact.stdout
    # each process holds its own optimizer partition: one process without DeepSpeed cannot
    one = _launch(config, run, "--resume", "latest", "--set", "train.max_steps=11", processes=1)
    assert one.returncode == 2
    said = one.stdout + one.stderr
    assert "saved by DeepSpeed on 2 processes" in said and "--num_processes 2" in said
    assert "Traceback" not in said
    resumed = _launch(config, run, "--resume", "latest", "--set", "train.max_steps=11")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "refusing step-0000010" in resumed.stdout
    assert "falling back to step-0000009" in resumed.stdout
    assert "trained to step 11" in resumed.stdout
    manifest = json.loads((run / "checkpoints" / "step-0000011" / "manifest.json").read_text())
    assert manifest["sharded"] == {"processes": 2, "by": "deepspeed"}


def test_deepspeed_export_reads_its_checkpoint(straight, tmp_path):
    _, run, _ = straight
    assert_export_is_the_final_model(run, tmp_path / "export")


@pytest.mark.slow
def test_deepspeed_lora_resumes_exactly_and_refuses_a_text_encoder(tmp_path):
    def same(a, b):
        _assert_same(_state(a, 10), _state(b, 10))

    lora_resumes_exactly_and_refuses_a_text_encoder(_launch, same, tmp_path, "DeepSpeed")


@pytest.mark.slow
def test_deepspeed_trains_as_ddp_does(straight, tmp_path):
    """The same run under DDP (torchrun): the same losses and gradient norms, weights within
    float32 reduction noise (the two sum the processes' gradients in other orders)."""
    from tests.e2e.test_distributed import _launch as ddp_launch

    config, run, _ = straight
    ddp = ddp_launch(config, tmp_path / "ddp", spike="8")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    rows = {}
    for name, where in (("ds", run), ("ddp", tmp_path / "ddp")):
        lines = (where / "metrics.jsonl").read_text().splitlines()
        rows[name] = [json.loads(line) for line in lines]
    for a, b in zip(rows["ds"], rows["ddp"], strict=True):
        for key in ("loss", "grad_norm", "lr", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4), key
    ds = load_file(str(run / "checkpoints" / "step-0000010" / "model.safetensors"))
    other = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-0000010" / "model.safetensors"))
    assert max((ds[k] - other[k]).abs().max().item() for k in ds) < 1e-3
