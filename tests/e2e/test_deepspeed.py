"""DeepSpeed ZeRO stages 2 and 3 through Accelerate on two CPU processes (gloo), started as
the README says: `accelerate launch --config_file examples/accelerate/deepspeed.yaml (or
deepspeed_zero3.yaml) -m sdtune train CONFIG`. Under ZeRO-2 each process holds the whole UNet
and its part of the gradients and of the optimizer state (with the float32 master weights);
under ZeRO-3 its part of the weights too, and of EMA's average. Checkpoints are written by
both (DeepSpeed's own folder, each process's optimizer partition) under the store's manifest,
and a run killed anywhere, during a save too, resumes to the same bits as one that was not."""

import json
import shutil
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
LAUNCH = {
    2: ROOT / "examples" / "accelerate" / "deepspeed.yaml",
    3: ROOT / "examples" / "accelerate" / "deepspeed_zero3.yaml",
}
CONFIG = DISTRIBUTED


def launcher(stage: int):
    def launch(config, run, *extra, crash=None, spike=None, processes=2):
        return accelerate_train(
            LAUNCH[stage], config, run, *extra, crash=crash, spike=spike, processes=processes
        )

    return launch


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


def _straight(tmp_path_factory, stage: int):
    root = tmp_path_factory.mktemp(f"zero{stage}")
    config = root / "cfg.toml"
    config.write_text(CONFIG)
    proc = launcher(stage)(config, root / "a", spike="8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, root / "a", proc


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return _straight(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return _straight(tmp_path_factory, 3)


def _assert_trained_guarded_and_saved(run: Path, said: str, stage: int) -> None:
    assert said.count("trained to step 10") == 1  # one voice
    assert "processes: 2; global batch 4 images per step" in said
    # the guard decides before the update; DeepSpeed discards it; every process rolls back
    assert "step 8: loss spike" in said and "update skipped" in said
    assert "diverged at step 8: rolled back to step-0000006" in said
    assert "OVERFLOW" not in said  # sdtune says the skipped step, DeepSpeed stays quiet
    # told the CPU by sdtune, DeepSpeed does not guess aloud in its processes (`accelerate
    # launch` itself imports DeepSpeed before any sdtune process starts, and says it once)
    assert said.count("Setting accelerator to CPU") <= 1
    ckpt = run / "checkpoints" / "step-0000010"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["sharded"] == {"processes": 2, "by": "deepspeed", "zero_stage": stage}
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
    if stage == 3:  # DeepSpeed's file of each process's partitioned module (ZeRO-3's alone)
        assert {f"deepspeed/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} <= names
    else:
        assert "deepspeed/mp_rank_00_model_states.pt" in names
    assert set(manifest["files"]) == names - {"manifest.json"}
    # the final model is the EMA's weights, whole, as without DeepSpeed
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(run / "model" / "unet")
    ema = load_file(str(ckpt / "ema.safetensors"))
    saved = {f"unet.{n}": p for n, p in unet.state_dict().items()}
    assert ema and all(torch.equal(saved[k], ema[k]) for k in ema)
    weights = load_file(str(ckpt / "model.safetensors"))
    assert weights.keys() == ema.keys()
    assert all(weights[k].shape == saved[k].shape for k in weights)
    assert json.loads((run / "run_summary.json").read_text())["steps"] == 10


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_zero2_trains_guards_and_saves_every_partition(zero2):
    _, run, proc = zero2
    _assert_trained_guarded_and_saved(run, proc.stdout + proc.stderr, 2)


def test_zero3_partitions_the_weights_and_trains_as_zero2_does(zero3, zero2):
    """ZeRO-3 keeps a partition of each weight (and of EMA's average) per process; gathered,
    its run is ZeRO-2's: the same losses, norms and validation, weights within float32
    reduction noise (the two reduce the gradients in other orders)."""
    _, run, proc = zero3
    _assert_trained_guarded_and_saved(run, proc.stdout + proc.stderr, 3)
    for a, b in zip(_rows(run), _rows(zero2[1]), strict=True):
        for key in ("loss", "grad_norm", "lr", "val_loss", "val_loss_ema"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4), key
    for which in ("model", "ema"):
        three, two = (
            load_file(str(r / "checkpoints" / "step-0000010" / f"{which}.safetensors"))
            for r in (run, zero2[1])
        )
        assert max((three[k] - two[k]).abs().max().item() for k in two) < 1e-3


def test_zero3_killed_in_a_step_and_in_a_save_resumes_exactly(zero3, tmp_path):
    config, reference, _ = zero3
    killed_in_a_save_and_in_a_step_then_resumed(launcher(3), config, tmp_path / "b")
    _assert_same(_state(reference, 10), _state(tmp_path / "b", 10))


@pytest.mark.slow
def test_zero2_killed_in_a_step_and_in_a_save_resumes_exactly(zero2, tmp_path):
    config, reference, _ = zero2
    killed_in_a_save_and_in_a_step_then_resumed(launcher(2), config, tmp_path / "b")
    _assert_same(_state(reference, 10), _state(tmp_path / "b", 10))


def _universal(ckpt: Path, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every trained weight's float32 master and Adam moments, whole, as DeepSpeed's own
    universal conversion reads them from a checkpoint's partitions."""
    from sdtune.checkpoint.state import deepspeed_universal

    folder = deepspeed_universal(ckpt, out) / "deepspeed" / "zero"

    def read(file: Path) -> torch.Tensor:
        saved = torch.load(file, weights_only=False)
        return saved["param"] if isinstance(saved, dict) else saved  # ZeRO-2's, ZeRO-3's

    kinds = ("fp32", "exp_avg", "exp_avg_sq")
    return {d.name: {k: read(d / f"{k}.pt") for k in kinds} for d in folder.iterdir() if d.is_dir()}


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_deepspeed_resumes_on_another_number_of_processes(request, tmp_path, stage):
    """Saved by 2 processes, resumed by 3 through DeepSpeed's universal checkpoint: each reads
    its new partition of Adam's moments (carried over, not restarted; under ZeRO-3 of the
    weights and of EMA's average too); the next checkpoint is the 3 processes'."""
    config, reference, _ = request.getfixturevalue(f"zero{stage}")
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    more = ("--resume", "latest", "--set", "train.max_steps=11")
    resumed = launcher(stage)(config, run, *more, processes=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stdout
    assert "saved by DeepSpeed on 2 processes; reading it on 3" in said
    assert "resumed from" in said and "step-0000010" in said and "trained to step 11" in said
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    ckpt = run / "checkpoints" / "step-0000011"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["sharded"] == {"processes": 3, "by": "deepspeed", "zero_stage": stage}
    before = _universal(reference / "checkpoints" / "step-0000010", tmp_path / "u10")
    after = _universal(ckpt, tmp_path / "u11")
    assert before.keys() == after.keys() and len(before) == 208
    for name, b in before.items():
        # one Adam step on: v' = 0.999 v + 0.001 g^2 >= 0.999 v, were v carried over
        a = after[name]
        assert (a["exp_avg_sq"] >= 0.999 * b["exp_avg_sq"] * (1 - 1e-5)).all(), name
        assert (a["fp32"] - b["fp32"]).abs().max() < 1e-2, name  # one small step
    # the whole EMA average was split among 3 and gathered back, one small step on
    ema10 = load_file(str(reference / "checkpoints" / "step-0000010" / "ema.safetensors"))
    ema11 = load_file(str(ckpt / "ema.safetensors"))
    assert max((ema11[k] - ema10[k]).abs().max().item() for k in ema10) < 1e-3


def test_deepspeed_corrupt_partition_is_named_by_inspect(zero2, tmp_path):
    _, reference, _ = zero2
    run = tmp_path / "c"
    shutil.copytree(reference, run)
    part = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip_a_byte(run / "checkpoints" / "step-0000010" / part)
    inspect = sdtune_cli("inspect", run / "checkpoints" / "step-0000010")
    assert inspect.returncode != 0 and f"{part}: sha256 does not match" in inspect.stdout
    intact = sdtune_cli("inspect", run / "checkpoints" / "step-0000009")
    assert intact.returncode == 0
    assert "sharded (deepspeed ZeRO-2) by 2 processes" in intact.stdout


@pytest.mark.slow
def test_deepspeed_corrupt_partition_falls_back_and_other_launches_are_refused(zero2, tmp_path):
    """The launches tests/test_launch.py refuses on a stand-in run, refused by the real CLI
    (one process without DeepSpeed, ZeRO-3 on a ZeRO-2 checkpoint); then the previous
    checkpoint resumes where the newest has a corrupt partition."""
    config, reference, _ = zero2
    run = tmp_path / "c"
    shutil.copytree(reference, run)
    flip_a_byte(
        run / "checkpoints" / "step-0000010" / "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    )
    more = ("--resume", "latest", "--set", "train.max_steps=11")
    # each process holds its own optimizer partition: one process without DeepSpeed cannot
    one = launcher(2)(config, run, *more, processes=1)
    assert one.returncode == 2
    said = one.stdout + one.stderr
    assert "saved by DeepSpeed on 2 processes" in said and "--num_processes 2" in said
    assert "Traceback" not in said
    # ZeRO-3 partitions the optimizer state otherwise
    other = launcher(3)(config, run, *more)
    assert other.returncode != 0
    said = other.stdout + other.stderr
    assert "saved by DeepSpeed ZeRO stage 2" in said and "resume it with zero_stage: 2" in said
    assert "sdtune/train" not in said  # no traceback from sdtune (the launcher prints its own)
    resumed = launcher(2)(config, run, *more)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "refusing step-0000010" in resumed.stdout
    assert "falling back to step-0000009" in resumed.stdout
    assert "trained to step 11" in resumed.stdout
    manifest = json.loads((run / "checkpoints" / "step-0000011" / "manifest.json").read_text())
    assert manifest["sharded"] == {"processes": 2, "by": "deepspeed", "zero_stage": 2}


def test_deepspeed_export_reads_its_checkpoint(zero2, zero3, tmp_path):
    for stage, (_, run, _) in ((2, zero2), (3, zero3)):
        assert_export_is_the_final_model(run, tmp_path / f"export-{stage}")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_lora_resumes_exactly_and_refuses_a_text_encoder(tmp_path, stage):
    def same(a, b):
        _assert_same(_state(a, 10), _state(b, 10))

    lora_resumes_exactly_and_refuses_a_text_encoder(launcher(stage), same, tmp_path, "DeepSpeed")


@pytest.mark.slow
def test_deepspeed_trains_as_ddp_does(zero2, tmp_path):
    """The same run under DDP (torchrun): the same losses and gradient norms, weights within
    float32 reduction noise (the two sum the processes' gradients in other orders)."""
    from tests.e2e.test_distributed import _launch as ddp_launch

    config, run, _ = zero2
    ddp = ddp_launch(config, tmp_path / "ddp", spike="8")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    for a, b in zip(_rows(run), _rows(tmp_path / "ddp"), strict=True):
        for key in ("loss", "grad_norm", "lr", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4), key
    ds = load_file(str(run / "checkpoints" / "step-0000010" / "model.safetensors"))
    other = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-0000010" / "model.safetensors"))
    assert max((ds[k] - other[k]).abs().max().item() for k in ds) < 1e-3
