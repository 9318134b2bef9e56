"""The sharded checkpoint store on two real processes (gloo on CPU): each writes its shard
through torch.distributed.checkpoint, the manifest covers every file, `latest` moves only once
both have reported, and a process that fails or dies leaves the previous checkpoint in
charge. Fast: no model, a DTensor of 8 rows split across the two processes."""

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sdtune.checkpoint.state import (
    checkpoint_weights,
    clean_temporaries,
    find_checkpoint,
    sharded_info,
)
from sdtune.checkpoint.store import (
    CheckpointError,
    Ranks,
    verify_checkpoint,
    write_sharded_checkpoint,
)
from tests.cores import cores, free_port


def _worker(rank: int, world: int, port: int, root: str, plan: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    ranks = Ranks(rank, world)
    for step in (1, 2):
        full = torch.arange(16.0).reshape(8, 2) * step
        state = {"model": {"w": distribute_tensor(full, mesh, [Shard(0)])}}

        def own(path: Path, step=step) -> None:
            if plan == "full" and step == 2 and rank == 1:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            if plan == "die" and step == 2 and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            path.write_text(f"rank {rank} step {step}\n")

        def collective(folder: Path, state=state, step=step) -> None:
            if plan == "folder":  # as DeepSpeed writes: its own folder, a partition per process
                (folder / "deepspeed").mkdir(exist_ok=True)
                torch.save(state["model"]["w"].to_local(), folder / "deepspeed" / f"part-{rank}.pt")
                return
            dcp.save(state, checkpoint_id=str(folder))
            if plan == "collective" and step == 2 and rank == 0:  # as torch's writer reports it
                raise RuntimeError("CheckpointException: [Errno 28] No space left on device")

        try:
            write_sharded_checkpoint(
                Path(root),
                step,
                ranks,
                collective,
                {f"own-{rank}.txt": own},
                {"kind": "training", "sharded": {"processes": world, "by": "fsdp"}},
            )
        except Exception as exc:  # noqa: BLE001 - the test reads what each process raised
            Path(root, f"error-{rank}-{step}.txt").write_text(f"{type(exc).__name__}: {exc}")
    dist.destroy_process_group()


def _run(root: Path, plan: str) -> None:
    with cores():  # two processes
        context = mp.start_processes(
            _worker,
            args=(2, free_port(), str(root), plan),
            nprocs=2,
            join=False,
            start_method="spawn",
        )
        try:
            while not context.join(timeout=60):
                pass
        except mp.ProcessExitedException:
            # one process killed: the other waits at a collective until torch's store gives up
            for process in context.processes:
                if process.is_alive():
                    process.kill()


def test_every_process_writes_its_shard_under_one_manifest(tmp_path):
    _run(tmp_path, "ok")
    assert not list(tmp_path.glob("error-*"))
    assert (tmp_path / "latest").read_text().strip() == "step-0000002"
    ckpt = tmp_path / "step-0000002"
    manifest = verify_checkpoint(ckpt)
    names = {p.name for p in ckpt.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == names
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "own-0.txt", "own-1.txt"} <= names
    assert sharded_info(ckpt) == {"processes": 2, "by": "fsdp"}
    # read back whole, in this one process (the shards reassemble)
    assert torch.equal(checkpoint_weights(ckpt)["w"], torch.arange(16.0).reshape(8, 2) * 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("plan", ["full", "collective"])
def test_a_full_disk_on_one_process_keeps_the_previous_checkpoint(tmp_path, plan):
    _run(tmp_path, plan)
    # both processes learn of it: the one whose disk filled, and the other
    for rank in (0, 1):
        said = (tmp_path / f"error-{rank}-2.txt").read_text()
        assert said.startswith("NoSpaceError") and "step-0000002" in said
    assert (tmp_path / "latest").read_text().strip() == "step-0000001"
    assert not (tmp_path / "step-0000002").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_process_dying_mid_save_never_moves_latest(tmp_path):
    _run(tmp_path, "die")
    assert (tmp_path / "latest").read_text().strip() == "step-0000001"
    assert not (tmp_path / "step-0000002").exists()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert left  # the half-written save, which the next start removes
    said = []
    clean_temporaries(tmp_path, said.append)
    assert said and "left by an interrupted save" in said[0]
    assert find_checkpoint(tmp_path, said.append) == tmp_path / "step-0000001"


def test_a_corrupt_shard_is_refused_and_the_previous_checkpoint_used(tmp_path):
    _run(tmp_path, "ok")
    shard = tmp_path / "step-0000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="__0_0.distcp: sha256 does not match"):
        verify_checkpoint(tmp_path / "step-0000002")
    said = []
    assert find_checkpoint(tmp_path, said.append) == tmp_path / "step-0000001"
    assert any("falling back to step-0000001" in s for s in said)
    manifest = json.loads((tmp_path / "step-0000001" / "manifest.json").read_text())
    assert manifest["step"] == 1


def test_a_folder_of_partitions_is_in_the_manifest_and_verified(tmp_path):
    _run(tmp_path, "folder")
    assert not list(tmp_path.glob("error-*"))
    ckpt = tmp_path / "step-0000002"
    manifest = verify_checkpoint(ckpt)
    assert {"deepspeed/part-0.pt", "deepspeed/part-1.pt", "own-0.txt", "own-1.txt"} == set(
        manifest["files"]
    )
    rows = [torch.load(ckpt / "deepspeed" / f"part-{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(torch.cat(rows), torch.arange(16.0).reshape(8, 2) * 2)
    part = ckpt / "deepspeed" / "part-1.pt"
    data = bytearray(part.read_bytes())
    data[-3] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="deepspeed/part-1.pt: sha256 does not match"):
        verify_checkpoint(ckpt)
    (ckpt / "deepspeed" / "part-0.pt").unlink()
    with pytest.raises(CheckpointError, match="part-0.pt: missing"):
        verify_checkpoint(ckpt, fast=True)
    said = []
    assert find_checkpoint(tmp_path, said.append) == tmp_path / "step-0000001"


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a//b", "a/./b", "a/../../b", "", "a\\b"])
def test_a_manifest_naming_a_path_outside_the_checkpoint_is_malformed(tmp_path, name):
    ckpt = tmp_path / "step-0000001"
    ckpt.mkdir()
    manifest = {"files": {name: {"size": 1, "sha256": "0" * 64}}, "step": 1}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="malformed manifest"):
        verify_checkpoint(ckpt)
