"""What `accelerate launch` may ask of sdtune, refused in one line before anything starts."""

import importlib.util

import pytest

from sdtune.errors import UserError
from sdtune.train.shard import check_launch


def test_a_deepspeed_launch_without_deepspeed_installed_is_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name)
    )
    with pytest.raises(UserError, match=r"not installed \(pip install deepspeed\)"):
        check_launch()


def _deepspeed_launch(monkeypatch, stage: str) -> None:
    real = importlib.util.find_spec  # installed or not: the launch is checked the same
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "deepspeed" else real(name),
    )
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)


@pytest.mark.parametrize("stage", ["0", "1"])
def test_zero_stages_other_than_2_and_3_are_refused(monkeypatch, stage):
    _deepspeed_launch(monkeypatch, stage)
    with pytest.raises(UserError, match=f"ZeRO stage {stage} is not supported.*zero_stage: 2"):
        check_launch()


@pytest.mark.parametrize("what", ["OPTIMIZER", "PARAM"])
def test_deepspeed_offload_is_refused_in_one_line(monkeypatch, what):
    _deepspeed_launch(monkeypatch, "3")
    check_launch()  # ZeRO-3 itself is taken
    monkeypatch.setenv(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "cpu")
    with pytest.raises(UserError, match=f"offload_{what.lower()}_device: cpu is not supported"):
        check_launch()


def test_zero3_parts_split_and_gather_back_to_the_whole_weight(monkeypatch):
    """ZeRO-3's layout as sdtune reads it (a weight flattened, padded, cut into one equal
    partition per process): each process's part of a whole value, gathered, is that value.
    Here with one process and the other process's partition laid out by hand."""
    import torch
    import torch.distributed as dist

    from sdtune.train.shard import Zero3Parts

    weight = torch.arange(7.0).reshape(7, 1)

    class Param:  # what DeepSpeed puts on a partitioned weight, for process 1 of 2
        ds_numel, ds_shape, ds_process_group = 7, (7, 1), None

    param = Param()
    param.ds_tensor = torch.tensor([4.0, 5.0, 6.0, float("nan")])  # padded with garbage
    param.ds_tensor.ds_numel = 4
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    def all_gather(parts, part, group=None):  # process 0 holds 0..3
        parts[0].copy_(torch.arange(4.0))
        parts[1].copy_(part)

    monkeypatch.setattr(dist, "all_gather", all_gather)
    assert torch.equal(Zero3Parts.part(param), torch.tensor([4.0, 5.0, 6.0]))  # no padding
    assert torch.equal(Zero3Parts.split(param, weight), torch.tensor([4.0, 5.0, 6.0]))
    assert torch.equal(Zero3Parts.whole(param, Zero3Parts.part(param)), weight)
    param.ds_numel, param.ds_shape = 3, (3,)  # a weight shorter than one partition:
    assert Zero3Parts.part(param).numel() == 0  # process 1 holds only padding
    assert Zero3Parts.split(param, torch.zeros(3)).numel() == 0


def test_fsdp1_is_refused(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="fsdp_version: 2"):
        check_launch()


def test_a_deepspeed_write_that_fails_is_held_until_the_save_returns():
    """Every process must reach DeepSpeed's barriers inside save_checkpoint: a failed write is
    raised only after it returns (then the store tells every process), and nothing more is
    written once one has failed."""
    from sdtune.checkpoint.state import _failures_held

    class Writes:
        def __init__(self):
            self.done = []

        def makedirs(self, path, exist_ok=False):
            self.done.append(("dir", path))

        def save(self, state_dict, path):
            if path == "full":
                raise OSError(28, "No space left on device")
            self.done.append(("file", path))

    writes = Writes()
    with _failures_held(writes) as failed:
        writes.makedirs("d", exist_ok=True)
        writes.save({}, "a")
        writes.save(state_dict={}, path="full")  # DeepSpeed would wait at a barrier next
        writes.save({}, "b")
    assert [str(e) for e in failed] == ["[Errno 28] No space left on device"]
    assert writes.done == [("dir", "d"), ("file", "a")]
    writes.save({}, "c")  # restored after the save
    assert writes.done[-1] == ("file", "c")


@pytest.mark.parametrize(
    ("deepspeed", "processes", "stage", "saved", "said"),
    [
        (False, 1, None, {"by": "deepspeed", "processes": 2}, "--num_processes 2"),
        (True, 4, 3, {"by": "deepspeed", "processes": 2}, "resume it with zero_stage: 2"),
        (True, 2, 2, {"by": "fsdp", "processes": 2}, "not saved by a DeepSpeed run"),
        (True, 2, 3, {"by": "deepspeed", "processes": 2}, "resume it with zero_stage: 2"),
        (True, 2, 2, {"by": "deepspeed", "processes": 2, "zero_stage": 3}, "zero_stage: 3"),
    ],
)
def test_a_deepspeed_checkpoint_resumes_only_as_it_was_trained(
    deepspeed, processes, stage, saved, said
):
    """Each process holds its own partition of the optimizer state (ZeRO-3: of the weights
    too), laid out by the stage: a launch without DeepSpeed or with another stage is refused
    in one line naming the one to use (another number of processes is read through
    DeepSpeed's universal checkpoint: tests/e2e/test_deepspeed.py)."""
    from pathlib import Path
    from types import SimpleNamespace

    from sdtune.checkpoint.store import CheckpointError
    from sdtune.train.setup import Run

    run = SimpleNamespace(
        accelerator=SimpleNamespace(num_processes=processes), deepspeed=deepspeed, zero_stage=stage
    )
    with pytest.raises(CheckpointError, match=said) as refused:
        Run._restore_deepspeed(run, Path("step-0000010"), saved)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_a_deepspeed_config_with_its_own_optimizer_is_one_line(section):
    from sdtune.train.shard import check_deepspeed_config

    check_deepspeed_config({"zero_optimization": {"stage": 3}})
    with pytest.raises(UserError, match=f"remove its '{section}' section") as refused:
        check_deepspeed_config({section: {"type": "AdamW"}})
    assert "\n" not in str(refused.value)


def test_after_a_universal_load_each_group_and_state_is_its_own():
    """DeepSpeed 0.19's ZeRO-3 universal load gives every param group the first group's
    settings and one step tensor to all of a process's sub-groups: sdtune puts each group's
    own back (the rate from its schedule) and gives each state its own counter."""
    from types import SimpleNamespace

    import torch

    from sdtune.checkpoint.state import after_universal_load

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW(
        [{"params": [a], "lr": 1e-4, "weight_decay": 0.01}, {"params": [b], "lr": 5e-5}]
    )
    (a.sum() + b.sum()).backward()
    optimizer.step()
    groups = [dict(g) for g in optimizer.param_groups]
    for group in optimizer.param_groups:  # what the load leaves
        group.update(lr=1.0, weight_decay=0.01)
    shared = torch.tensor(10.0)
    for state in optimizer.state.values():
        state["step"] = shared
    engine = SimpleNamespace(optimizer=SimpleNamespace(optimizer=optimizer))  # ZeRO's, torch's
    after_universal_load(engine, optimizer, groups, [2e-4, 3e-5])
    assert [g["lr"] for g in optimizer.param_groups] == [2e-4, 3e-5]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, groups[1]["weight_decay"]]
    steps = [s["step"] for s in optimizer.state.values()]
    assert steps[0] is not steps[1] and all(float(s) == 10.0 for s in steps)
    optimizer.step()  # each counts its own step once
    assert [float(s["step"]) for s in optimizer.state.values()] == [11.0, 11.0]
