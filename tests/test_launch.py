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


@pytest.mark.parametrize("stage", ["0", "1", "3"])
def test_zero_stages_other_than_2_are_refused(monkeypatch, stage):
    real = importlib.util.find_spec  # installed or not: the stage is refused first
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "deepspeed" else real(name),
    )
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
    with pytest.raises(UserError, match=f"ZeRO stage {stage} is not supported.*zero_stage: 2"):
        check_launch()


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
