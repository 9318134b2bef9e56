"""FSDP2 through Accelerate on two CPU processes (gloo), started as the README says:
`accelerate launch --config_file examples/accelerate/fsdp.yaml -m sdtune train CONFIG`. Each
process holds a shard of the UNet, its gradients, optimizer state and EMA; checkpoints are
written by both (torch.distributed.checkpoint) under the store's manifest, and a run killed
anywhere, during a save too, resumes to the same bits as one that was not killed."""

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.cores import cores, free_port
from tests.e2e.test_distributed import DISTRIBUTED, launch_env

ROOT = Path(__file__).resolve().parents[2]
FSDP_CONFIG = ROOT / "examples" / "accelerate" / "fsdp.yaml"


def accelerate_train(launch_config, config, run, *extra, crash=None, spike=None, processes=2):
    """`accelerate launch --config_file LAUNCH_CONFIG -m sdtune train CONFIG` on CPU processes
    as the example configs say, or with `processes=1` a plain process without Accelerate."""
    env = launch_env(crash, spike)
    if processes == 1:  # a plain, unsharded process
        command = [sys.executable, "-m", "sdtune"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        command += [str(launch_config), "--num_processes", str(processes)]
        command += ["--mixed_precision", "no", "--main_process_port", str(free_port())]
        command += ["-m", "sdtune"]
    command += ["train", str(config), "--output", str(run)]
    with cores():  # two processes
        return subprocess.run(
            [*command, *extra], capture_output=True, text=True, env=env, timeout=600, check=False
        )


def _launch(config, run, *extra, crash=None, spike=None, processes=2):
    return accelerate_train(
        FSDP_CONFIG, config, run, *extra, crash=crash, spike=spike, processes=processes
    )


def sdtune_cli(*args):
    """A quick sdtune command (inspect, export) in a plain subprocess."""
    command = [sys.executable, "-m", "sdtune", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def assert_export_is_the_final_model(run: Path, out: Path) -> None:
    """`sdtune export` of the run's last checkpoint gives the final model's UNet (EMA's)."""
    proc = sdtune_cli(
        "export", run / "checkpoints" / "step-0000010", "--format", "diffusers", "--out", out
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    final = UNet2DConditionModel.from_pretrained(run / "model" / "unet").state_dict()
    assert all(torch.equal(exported[k], final[k]) for k in final)  # both EMA's, whole


def _checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, whole (weights, EMA, optimizer moments, steps)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    tensors = {
        k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for k, md in metadata.items()
        if hasattr(md, "size")
    }
    with warnings.catch_warnings():  # "assuming ... a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(tensors, checkpoint_id=str(ckpt), no_dist=True)
    return tensors


def _state(run: Path, step: int):
    ckpt = run / "checkpoints" / f"step-{step:07d}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("images_per_s", None)
    return _checkpoint_tensors(ckpt), rows


def _assert_same(a, b):
    (ta, ra), (tb, rb) = a, b
    assert ta.keys() == tb.keys()
    assert any(k.startswith("optim.state.") for k in ta) and any(k.startswith("ema.") for k in ta)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"differ: {different[:5]}"
    assert ra == rb, "metrics.jsonl differs (duplicated, missing or different rows)"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    config = root / "cfg.toml"
    # the base evaluated first too: the whole copy is gathered at step 0 as well
    config.write_text(DISTRIBUTED.replace("[evaluate]\n", "[evaluate]\nbefore_training = true\n"))
    proc = _launch(config, root / "a", spike="8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, root / "a", proc


def test_fsdp_shards_and_guards_as_ddp_does(straight):
    config, run, proc = straight
    assert proc.stdout.count("trained to step 10") == 1  # one voice
    assert "processes: 2; global batch 4 images per step" in proc.stdout
    # the guard decides on the whole gradient norm and rolls every process back together
    assert "diverged at step 8: rolled back to step-0000006" in proc.stdout
    assert "before training: step 0: samples" in proc.stdout
    ckpt = run / "checkpoints" / "step-0000010"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["sharded"] == {"processes": 2, "by": "fsdp"}
    # each process wrote its own shard and RNG; no whole copy of the weights was made
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "__0_0.distcp",
        "__1_0.distcp",
        ".metadata",
        "rng-0.safetensors",
        "rng-1.safetensors",
    } <= names
    assert not (ckpt / "model.safetensors").exists()
    assert set(manifest["files"]) == names - {"manifest.json"}
    # the final model is gathered whole into the usual folder, and samples from it
    assert (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    tensors = _checkpoint_tensors(ckpt)
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(run / "model" / "unet")
    ema = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
    saved = {f"unet.{n}": p for n, p in unet.state_dict().items()}
    assert ema.keys() == weights.keys() and all(torch.equal(saved[k], ema[k]) for k in ema)
    assert json.loads((run / "run_summary.json").read_text())["steps"] == 10


def killed_in_a_save_and_in_a_step_then_resumed(launch, config, run: Path) -> None:
    """Process 1 dies in the save of step 6 (after its files, before the manifest), the
    resumed run is killed in step 7, and the next resume finishes (from step-0000006)."""
    # process 1 dies after writing its files of the save of step 6, before the manifest
    killed = launch(config, run, crash="save:6:2:1", spike="8")
    assert killed.returncode != 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    killed = launch(config, run, "--resume", "latest", crash="step:7", spike="8")
    assert killed.returncode != 0
    assert "left by an interrupted save" in killed.stdout
    assert "resumed from" in killed.stdout and "step-0000003" in killed.stdout
    resumed = launch(config, run, "--resume", "latest", spike="8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step-0000006" in resumed.stdout


def test_fsdp_killed_in_a_step_and_in_a_save_resumes_exactly(straight, tmp_path):
    config, reference, _ = straight
    killed_in_a_save_and_in_a_step_then_resumed(_launch, config, tmp_path / "b")
    _assert_same(_state(reference, 10), _state(tmp_path / "b", 10))


def test_fsdp_corrupt_shard_falls_back_and_one_process_resumes(straight, tmp_path):
    config, reference, _ = straight
    import shutil

    run = tmp_path / "c"
    shutil.copytree(reference, run)
    flip_a_byte(run / "checkpoints" / "step-0000010" / "__1_0.distcp")
    inspect = sdtune_cli("inspect", run / "checkpoints" / "step-0000010")
    assert inspect.returncode != 0 and "__1_0.distcp: sha256 does not match" in inspect.stdout
    intact = sdtune_cli("inspect", run / "checkpoints" / "step-0000009")
    assert intact.returncode == 0 and "sharded (fsdp) by 2 processes" in intact.stdout
    # another number of processes (one, unsharded): the shards are read whole
    resumed = _launch(config, run, "--resume", "latest", "--set", "train.max_steps=11", processes=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "refusing step-0000010" in resumed.stdout
    assert "falling back to step-0000009" in resumed.stdout
    assert "trained to step 11" in resumed.stdout
    final = run / "checkpoints" / "step-0000011"
    assert (final / "model.safetensors").is_file()  # one process: the unsharded layout


def test_fsdp_export_reads_a_sharded_checkpoint(straight, tmp_path):
    _, run, _ = straight
    assert_export_is_the_final_model(run, tmp_path / "export")


def lora_resumes_exactly_and_refuses_a_text_encoder(launch, same, tmp_path, by: str):
    """A LoRA run killed in a step resumes to the bits of one that was not (`same` compares
    two runs' step 10); a text-encoder LoRA is refused in one line naming the backend `by`."""
    config = tmp_path / "cfg.toml"
    config.write_text(DISTRIBUTED + "[lora]\nenabled = true\nrank = 4\n")
    straight = launch(config, tmp_path / "a", spike="8")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = launch(config, tmp_path / "b", crash="step:5", spike="8")
    assert killed.returncode == -signal.SIGKILL or killed.returncode != 0
    resumed = launch(config, tmp_path / "b", "--resume", "latest", spike="8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "model" / "pytorch_lora_weights.safetensors").is_file()

    config.write_text(DISTRIBUTED + "[lora]\nenabled = true\nrank = 4\ntext_encoder = true\n")
    refused = launch(config, tmp_path / "te")
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert f"sdtune: error: {by}: only the unet trains when sharded" in said
    assert "sdtune/train" not in said  # no traceback from sdtune (the launcher prints its own)


@pytest.mark.slow
def test_fsdp_lora_resumes_exactly_and_refuses_a_text_encoder(tmp_path):
    def same(a, b):
        _assert_same(_state(a, 10), _state(b, 10))

    lora_resumes_exactly_and_refuses_a_text_encoder(_launch, same, tmp_path, "FSDP")


@pytest.mark.slow
def test_fsdp_sigterm_saves_every_shard_and_keep_best_rotates(tmp_path):
    import time

    config = tmp_path / "cfg.toml"
    config.write_text(
        DISTRIBUTED.replace("max_steps = 10", "max_steps = 400")
        .replace("spike_factor = 3.0", "")
        .replace("keep_last = 2", 'keep_last = 1\nkeep_best = "val_loss"')
    )
    out = tmp_path / "out.txt"
    with out.open("w") as sink:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        command += [str(FSDP_CONFIG), "--num_processes", "2", "--mixed_precision", "no"]
        command += ["--main_process_port", str(free_port()), "-m", "sdtune", "train"]
        command += [str(config), "--output", str(tmp_path / "run")]
        proc = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=launch_env(),
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while "step 10/" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler stops a job: every process
        proc.wait(timeout=300)
    said = out.read_text()
    assert "stopped by SIGTERM after step" in said, said[-3000:]
    root = tmp_path / "run" / "checkpoints"
    stopped = int(said.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert (root / "latest").read_text().strip() == f"step-{stopped:07d}"
    assert json.loads((root / f"step-{stopped:07d}" / "manifest.json").read_text())["sharded"]
    # rotation keeps the newest and the best by val_loss, whatever the shards
    kept = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert 1 <= len(kept) <= 2 and kept[-1] == f"step-{stopped:07d}"
    resumed = _launch(config, tmp_path / "run", "--resume", "latest", "--set",
                      f"train.max_steps={stopped + 2}")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {root / f'step-{stopped:07d}'}" in resumed.stdout
