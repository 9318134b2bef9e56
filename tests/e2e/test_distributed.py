"""Two processes on CPU (gloo), launched by torchrun as `accelerate launch` would: each takes its
share of every global batch, they decide a loss spike together, and a run killed midway and
resumed ends bit-identical to one that was not."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.cores import cores
from tests.e2e.test_resume import CONFIG, _assert_identical, _final_state

DISTRIBUTED = (
    CONFIG.replace("batch_size = 4", "batch_size = 2")
    .replace("max_steps = 6", "max_steps = 10\nspike_factor = 3.0\nspike_window = 5")
    .replace("log_every = 1", "log_every = 5")  # the spike at 8 is read a step late, at 9
    .replace("every_steps = 2", "every_steps = 3")
)


def launch_env(crash=None, spike=None) -> dict:
    """The processes' environment: one thread each, and the fault hooks asked for."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SDTUNE_CRASH_AT", None)
    if crash:
        env["SDTUNE_CRASH_AT"] = crash
    if spike:
        env["SDTUNE_SPIKE_AT"] = spike
    return env


def _launch(config, run, *extra, crash=None, spike=None):
    env = launch_env(crash, spike)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", "-m", "sdtune", "train", str(config), "--output", str(run)]
    with cores():  # two processes
        return subprocess.run(
            [*command, *extra], capture_output=True, text=True, env=env, timeout=600, check=False
        )


def test_two_processes_train_shard_roll_back_and_resume_exactly(tmp_path):
    config = tmp_path / "cfg.toml"
    config.write_text(DISTRIBUTED)
    straight = _launch(config, tmp_path / "a", spike="8")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # one voice: the main process alone prints and writes the run directory
    assert straight.stdout.count("trained to step 10") == 1
    assert straight.stdout.count("processes: 2; global batch 4 images per step") == 1
    assert "diverged at step 8: rolled back to step-0000006" in straight.stdout
    events = [json.loads(line) for line in (tmp_path / "a" / "events.jsonl").open()]
    assert [e["event"] for e in events] == ["skipped_step", "rollback"]

    killed = _launch(config, tmp_path / "b", crash="step:4", spike="8")
    assert killed.returncode != 0
    resumed = _launch(config, tmp_path / "b", "--resume", "latest", spike="8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_identical(_final_state(tmp_path / "a", 10), _final_state(tmp_path / "b", 10))

    # each process trained on its own half of the global batch of 4: 10 steps cover 40 images
    final = tmp_path / "a" / "checkpoints" / "step-0000010"
    assert json.loads((final / "progress.json").read_text())["position"] == {
        "epoch": 0,
        "index": 40,
    }
    weights = _final_state(tmp_path / "a", 10)[0]
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_two_processes_lora_with_output_preservation_resume_exactly(tmp_path):
    # one UNet and one text-encoder call per micro-batch carry both halves, as DDP requires
    config = tmp_path / "cfg.toml"
    config.write_text(
        DISTRIBUTED
        + "[lora]\nenabled = true\nrank = 4\ntext_encoder = true\n"
        + 'preserve_prompts = ["a handwritten digit one", ""]\n'
    )
    straight = _launch(config, tmp_path / "a", spike="8")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "lora: output preservation on 2 prompt(s), weight 1" in straight.stdout
    assert "diverged at step 8: rolled back to step-0000006" in straight.stdout
    killed = _launch(config, tmp_path / "b", crash="step:4", spike="8")
    assert killed.returncode != 0
    resumed = _launch(config, tmp_path / "b", "--resume", "latest", spike="8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_identical(_final_state(tmp_path / "a", 10), _final_state(tmp_path / "b", 10))
