"""What a training checkpoint holds, how it is saved, found, verified and restored.

The keys are named constants (one file each); the frozen base weights are referenced by
their sha256, never copied, so a partial or LoRA checkpoint stays small.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdtune.checkpoint.store import (
    LATEST,
    MANIFEST,
    TMP_PREFIX,
    CheckpointError,
    Ranks,
    verify_checkpoint,
    write_checkpoint,
    write_sharded_checkpoint,
)
from sdtune.data.order import DataPosition

MODEL_KEY = "model.safetensors"
EMA_KEY = "ema.safetensors"
TRAIN_WEIGHTS_KEY = "train_weights.safetensors"
"""Schedule-free optimizers only: the weights training goes on from (model.safetensors holds
the evaluated average, which export, eval and sample read)."""
OPT_KEY = "optimizer.pt"
LR_KEY = "lr_scheduler.pt"
SCALER_KEY = "grad_scaler.pt"
PROGRESS_KEY = "progress.json"
CONFIG_KEY = "config.toml"
ARCH_KEY = "architecture.json"
RNG_KEY = "rng-{rank}.safetensors"
OLD_RNG_KEY = "rng-{rank}.pt"  # before 0.1.1: pickled, read only through torch's safe loader
SHARDED_META = "sharded"
"""The manifest's record of a sharded checkpoint ({"processes": N, "by": "fsdp"}): its
weights, EMA and optimizer state are torch.distributed.checkpoint files (`.metadata` and a
`__R_0.distcp` per process) in place of model/ema.safetensors and optimizer.pt. By
"deepspeed": model/ema.safetensors as one process writes them, and DeepSpeed's own folder
(`DEEPSPEED_TAG`) in place of optimizer.pt, with each process's optimizer partition."""
DEEPSPEED_TAG = "deepspeed"
"""The folder in a checkpoint that DeepSpeed's `save_checkpoint` writes (its "tag")."""


@dataclass
class TrainingProgress:
    """Where the run is: the optimizer step done last, the data position after it, and the
    counters and metric history that the rest of the run depends on."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    skipped_steps: int = 0
    window_loss: float = 0.0
    """Sum of step losses since the last metrics row (so a resumed row averages the same steps)."""
    window_steps: int = 0
    window_preserve: float = 0.0
    """Sum of step output-preservation losses (lora.preserve_prompts) since the last metrics row."""
    ema_steps: int = 0
    eval_loss_sum: float = 0.0
    """Sum of step losses since the last evaluation (its train_loss, for the overfitting check)."""
    eval_loss_steps: int = 0
    stop_reason: str | None = None
    """Why training stopped early (early stopping), or None."""
    recent_losses: list[float] = field(default_factory=list)
    """The last train.spike_window step losses (the spike check's running median)."""
    bad_streak: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0
    """Product of the rollback LR factors applied so far."""
    evaluations: list[dict] = field(default_factory=list)
    """Every evaluation row so far (step, val_loss, ...): early stopping and best tracking."""
    curriculum_stage: int = -1
    """The curriculum stage `position` counts in (-1: none entered yet)."""
    curriculum_subsets: dict[str, list[int]] = field(default_factory=dict)
    """Each scored stage's chosen examples (curriculum.stages[].easiest), by stage index."""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["position"] = self.position.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainingProgress:
        data = dict(data)
        data["position"] = DataPosition(**data["position"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def frozen_fingerprint(named: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and bytes of the frozen weights (the base they came from)."""
    digest = hashlib.sha256()
    for name in sorted(named):
        tensor = named[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def architecture_record(
    bundle, trainable: dict[str, torch.nn.Parameter], frozen_sha: str, base: str
) -> dict:
    """The architecture a checkpoint belongs to: configs, trainable names and shapes, base hash."""
    record = {
        "base": base,
        "family": bundle.family,
        "denoiser": bundle.arch.denoiser,
        **bundle.arch.architecture(bundle),  # the components' configs, by component name
        "trainable": {name: list(p.shape) for name, p in sorted(trainable.items())},
        "frozen_sha256": frozen_sha,
    }
    return json.loads(json.dumps(record, default=str))  # tuples -> lists, as saved


def check_architecture(saved: dict, current: dict, where: Path) -> None:
    """Refuse (never partially load) a checkpoint of another architecture or trainable set."""
    if saved.get("trainable") != current["trainable"]:
        ours, theirs = set(current["trainable"]), set(saved.get("trainable", {}))
        diff = (
            sorted(ours ^ theirs)[:3]
            or [n for n in ours if current["trainable"][n] != saved["trainable"].get(n)][:3]
        )
        raise CheckpointError(
            f"{where}: its trainable parameters differ from this config's "
            f"({len(theirs)} vs {len(ours)}, e.g. {', '.join(diff)}); check model.trainable/model.frozen"
        )
    if saved.get("family", current["family"]) != current["family"]:
        raise CheckpointError(
            f"{where}: a {saved.get('family')} model's checkpoint, but this config trains a "
            f"{current['family']} model"
        )
    component = current["denoiser"]  # the text encoders' weights are in the frozen hash
    theirs, ours = saved.get(component) or {}, current[component]
    if theirs != ours:
        keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        name = "UNet" if component == "unet" else component
        raise CheckpointError(
            f"{where}: {name} architecture differs from this config's ({', '.join(keys[:4])})"
        )
    if saved.get("frozen_sha256") != current["frozen_sha256"]:
        raise CheckpointError(
            f"{where}: the frozen base weights differ from those it was trained on "
            f"(model.base {saved.get('base')!r} then, {current['base']!r} now)"
        )


def crash_point(
    kind: str, step: int, files_written: int | None = None, rank: int | None = None
) -> None:
    """Test hook: SDTUNE_CRASH_AT=step:N (after step N), save:N:K (after the K-th file of the
    save of step N; save:N:K:R on process R alone, for a sharded save) or end:N (after the
    final evaluation) kills this process with SIGKILL."""
    spec = os.environ.get("SDTUNE_CRASH_AT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] == kind and int(parts[1]) == step:
        if kind == "save" and len(parts) > 3 and rank is not None and int(parts[3]) != rank:
            return
        if kind != "save" or (files_written is not None and int(parts[2]) == files_written):
            os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_state(path: Path) -> None:
    """The RNG states as tensors plus JSON numbers in one safetensors file: loading it runs no
    code (a pickle would, and checkpoints get handed around)."""
    state = rng_state()
    version, words, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {
        "python": torch.tensor(words, dtype=torch.int64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "torch": state["torch"],
        **{f"cuda.{i}": t for i, t in enumerate(state.get("cuda", []))},
    }
    numbers = {
        "python": [version, gauss],
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "cuda": len(state.get("cuda", [])),
    }
    save_file(tensors, str(path), metadata={"sdtune.rng": json.dumps(numbers)})


def load_rng_state(path: Path) -> dict:
    """What `save_rng_state` wrote, as `set_rng_state` takes it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        numbers = json.loads(fh.metadata()["sdtune.rng"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    version, gauss = numbers["python"]
    kind, pos, has_gauss, cached = numbers["numpy"]
    state = {
        "python": (version, tuple(int(w) for w in tensors["python"].tolist()), gauss),
        "numpy": (kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
        "torch": tensors["torch"],
    }
    if numbers["cuda"]:
        state["cuda"] = [tensors[f"cuda.{i}"] for i in range(numbers["cuda"])]
    return state


def _load_old_rng_state(path: Path) -> dict:
    """An RNG file of an older sdtune (a pickle), through torch's weights-only loader with only
    numpy's array types allowed: data, never code. Anything else in it is refused."""
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: an RNG state that does not load safely (it holds more than numbers: "
            f"{str(exc).strip().splitlines()[0][:80]}); resume from a checkpoint you trust"
        ) from None


def save_training_state(
    root: Path, progress: TrainingProgress, objects, config_toml: str, rank: int = 0
) -> Path:
    """Write checkpoint `progress.step` under `root` atomically (see store.write_checkpoint):
    the training objects (train/step.py's TrainingObjects), the progress and the config."""
    trainable, optimizer, lr_scheduler = objects.trainable, objects.optimizer, objects.lr_scheduler
    ema, scaler, architecture = objects.ema, objects.scaler, objects.architecture
    from sdtune.train.optim import evaluation_weights, is_schedule_free

    def copy(own: bool = False) -> dict[str, torch.Tensor]:  # own: not the parameters' memory
        return {
            n: (p.detach().cpu().clone() if own else p.detach().cpu()).contiguous()
            for n, p in trainable.items()
        }

    weights, train_weights = copy(), None
    if is_schedule_free(optimizer):
        train_weights = copy(own=True)
        with evaluation_weights(optimizer):
            weights = copy(own=True)
    writers = {
        MODEL_KEY: lambda path: save_file(weights, str(path)),
        OPT_KEY: lambda path: torch.save(optimizer.state_dict(), path),
        LR_KEY: lambda path: torch.save(lr_scheduler.state_dict(), path),
        RNG_KEY.format(rank=rank): save_rng_state,
        **_record_writers(progress, architecture, config_toml),
    }
    if ema is not None:
        shadow = {n: s.detach().cpu().contiguous() for n, s in zip(trainable, ema.shadow_params)}
        writers[EMA_KEY] = lambda path: save_file(shadow, str(path))
    if train_weights is not None:
        writers[TRAIN_WEIGHTS_KEY] = lambda path: save_file(train_weights, str(path))
    if scaler is not None:
        writers[SCALER_KEY] = lambda path: torch.save(scaler.state_dict(), path)
    hooked = _crash_hooked(progress.step)
    writers = {name: hooked(w) for name, w in writers.items()}
    return write_checkpoint(root, progress.step, writers, {"kind": "training"})


def _record_writers(progress: TrainingProgress, architecture: dict, config_toml: str) -> dict:
    """The writers of the run's record in a checkpoint: progress, config, architecture."""
    return {
        PROGRESS_KEY: lambda path: path.write_text(json.dumps(progress.to_dict(), indent=2) + "\n"),
        CONFIG_KEY: lambda path: path.write_text(config_toml),
        ARCH_KEY: lambda path: path.write_text(
            json.dumps(architecture, indent=2, default=str) + "\n"
        ),
    }


def _crash_hooked(step: int, rank: int | None = None):
    """A writer wrapper that counts the files a save has written, for `crash_point`."""
    counter = {"n": 0}

    def hooked(write):
        def run(path: Path) -> None:
            write(path)
            counter["n"] += 1
            crash_point("save", step, counter["n"], rank)

        return run

    return hooked


def _sharded_state(objects, model) -> dict:
    """What torch.distributed.checkpoint saves and loads in place: every process's shard of the
    trainable weights, of EMA's average and of the optimizer state (keyed by parameter name,
    so a checkpoint reshards onto another number of processes)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {
        "model": {n: p.detach() for n, p in objects.trainable.items()},
        "optim": get_optimizer_state_dict(model, objects.optimizer),
    }
    if objects.ema is not None:
        state["ema"] = dict(zip(objects.trainable, objects.ema.shadow_params))
    return state


def save_sharded_state(
    root: Path, progress: TrainingProgress, objects, config_toml: str, ranks: Ranks, model
) -> Path:
    """Checkpoint `progress.step` written by every process together (store.
    write_sharded_checkpoint): each process's shard through torch.distributed.checkpoint, never
    gathered on one process; the main process's progress, config, architecture and schedule;
    every process's RNG state."""
    import torch.distributed.checkpoint as dcp

    hooked = _crash_hooked(progress.step, ranks.rank)
    own: dict = {}
    if ranks.main:
        own = {
            **_record_writers(progress, objects.architecture, config_toml),
            LR_KEY: lambda path: torch.save(objects.lr_scheduler.state_dict(), path),
        }
    own[RNG_KEY.format(rank=ranks.rank)] = save_rng_state
    state = _sharded_state(objects, model)
    collective = hooked(lambda folder: dcp.save(state, checkpoint_id=str(folder)))
    meta = {"kind": "training", SHARDED_META: {"processes": ranks.world, "by": "fsdp"}}
    own = {name: hooked(w) for name, w in own.items()}
    return write_sharded_checkpoint(root, progress.step, ranks, collective, own, meta)


def save_deepspeed_state(
    root: Path,
    progress: TrainingProgress,
    objects,
    config_toml: str,
    ranks: Ranks,
    engine,
    parts=None,
) -> Path:
    """Checkpoint `progress.step` of a DeepSpeed run, written by every process together
    (store.write_sharded_checkpoint): DeepSpeed's `save_checkpoint` (a collective: each
    process's optimizer partition, with its float32 master weights, and the trained weights
    it tracks; frozen weights left out); the main process's trainable weights, EMA, progress,
    config, architecture and schedule as one process writes them, so exports read the
    checkpoint without DeepSpeed; every process's RNG state. Under ZeRO-2 every process holds
    the weights whole; under ZeRO-3 (`parts`: train/shard.py `Zero3Parts`) each holds a
    partition, and every process gathers them into the main process's files, one tensor at a
    time."""
    hooked = _crash_hooked(progress.step, ranks.rank)
    weights, shadow, failed = _whole_weights(objects, parts, ranks.main)

    def write_weights(path: Path) -> None:
        if failed is not None:  # raised in the store's phase, which tells every process
            raise failed
        save_file(weights, str(path))

    own: dict = {}
    if ranks.main:
        own = {
            **_record_writers(progress, objects.architecture, config_toml),
            MODEL_KEY: write_weights,
            LR_KEY: lambda path: torch.save(objects.lr_scheduler.state_dict(), path),
        }
        if shadow is not None:
            own[EMA_KEY] = lambda path: save_file(shadow, str(path))
    own[RNG_KEY.format(rank=ranks.rank)] = save_rng_state

    def collective(folder: Path) -> None:
        with _failures_held(engine.checkpoint_engine) as failed:
            engine.save_checkpoint(
                str(folder), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True
            )
        if failed:
            raise failed[0]

    stage = 3 if parts is not None else 2
    record = {"processes": ranks.world, "by": "deepspeed", "zero_stage": stage}
    meta = {"kind": "training", SHARDED_META: record}
    own = {name: hooked(w) for name, w in own.items()}
    return write_sharded_checkpoint(root, progress.step, ranks, hooked(collective), own, meta)


def _whole_weights(objects, parts, main: bool):
    """The trainable weights and EMA's average whole on the host of the main process (empty
    elsewhere), and what failed keeping them there; ZeRO-3 (`parts`): gathered from every
    process's partitions (a collective every process goes through to the end, whatever
    failed on the main process: it raises in the store's phase, not here)."""
    ema = objects.ema
    weights: dict = {}
    shadow: dict | None = {} if ema is not None else None
    failed = None
    for i, (name, param) in enumerate(objects.trainable.items()):
        if parts is None:
            value = param.detach()
            average = ema.shadow_params[i] if ema is not None else None
        else:
            value = parts.whole_weight(param)
            average = parts.whole(param, ema.shadow_params[i]) if ema is not None else None
        if not main or failed is not None:
            continue
        try:  # the host's memory may run out
            weights[name] = value.cpu().contiguous()
            if shadow is not None:
                shadow[name] = average.detach().cpu().contiguous()
        except Exception as exc:  # noqa: BLE001 - the other processes must not wait on it
            failed = exc
    return weights, shadow, failed


@contextmanager
def _failures_held(checkpoint_engine):
    """DeepSpeed's `save_checkpoint` waits for every process at barriers between its writes:
    a process whose write raised (a full disk) would leave the others waiting there. So its
    writes' failures are held (yielded list) until `save_checkpoint` has returned on every
    process, and raised then, where the store's phases tell every process about them."""
    failed: list[Exception] = []
    originals = {name: getattr(checkpoint_engine, name) for name in ("save", "makedirs")}

    def held(write):
        def run(*args, **kwargs):
            if failed:
                return None  # the checkpoint is lost already: write nothing more
            try:
                return write(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - raised after the barriers
                failed.append(exc)
                return None

        return run

    for name, write in originals.items():
        setattr(checkpoint_engine, name, held(write))
    try:
        yield failed
    finally:
        for name, write in originals.items():
            setattr(checkpoint_engine, name, write)


def deepspeed_universal(path: Path, out: Path) -> Path:
    """DeepSpeed's universal checkpoint of checkpoint `path`'s DeepSpeed folder, written into
    `out` (DeepSpeed's ds_to_universal, in this process): every weight's float32 master and
    optimizer moments whole, which DeepSpeed partitions anew for any number of processes.
    Returns the folder to load with the tag `DEEPSPEED_TAG`."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(path / DEEPSPEED_TAG),
        output_folder=str(out / DEEPSPEED_TAG),
        num_extract_workers=1,  # in this process: no pool forked from a training process
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # what Megatron records and a diffusion model has not
    )
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        ds_to_universal.main(args)
    return out


def after_universal_load(engine, optimizer, groups: list[dict], lrs: list[float]) -> None:
    """What DeepSpeed 0.19's universal load leaves to its caller under ZeRO-3: each param
    group's own settings (it gives every group the first group's; `groups` as they were
    before the load, `lrs` the schedule's last rates), and one step counter per optimizer
    state (it shares one tensor among a process's sub-groups, which Adam would then count
    once per sub-group at every step)."""
    for group, before, lr in zip(optimizer.param_groups, groups, lrs, strict=True):
        group.update({k: v for k, v in before.items() if k != "params"})
        group["lr"] = lr
    base = getattr(engine.optimizer, "optimizer", None)
    for state in getattr(base, "state", {}).values():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = step.clone()


def load_deepspeed_state(
    path: Path, objects, engine, ranks: Ranks, parts=None, universal: Path | None = None
) -> TrainingProgress:
    """Restore what `save_deepspeed_state` wrote, on as many processes as wrote it (each
    process reads its own optimizer partition, and under ZeRO-3, `parts`, its partition of
    EMA's average; every process calls it), or on any number from its `universal` checkpoint
    (`deepspeed_universal`)."""
    check_architecture(json.loads((path / ARCH_KEY).read_text()), objects.architecture, path)
    if objects.ema is not None and not (path / EMA_KEY).is_file():
        raise CheckpointError(f"{path}: has no EMA weights but train.ema is on")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.load's weights_only
        # the engine reads its universal-checkpoint setting at each load (a rollback in the
        # same run loads its own checkpoints as they are)
        config, before = engine._config, engine._config.load_universal_checkpoint
        config.load_universal_checkpoint = universal is not None
        groups = [dict(g) for g in objects.optimizer.param_groups]
        try:
            loaded, _ = engine.load_checkpoint(
                str(universal or path),
                tag=DEEPSPEED_TAG,
                load_module_strict=False,  # the frozen weights were left out
                load_optimizer_states=True,
                load_lr_scheduler_states=False,  # sdtune's schedule, below
            )
        finally:
            config.load_universal_checkpoint = before
    if loaded is None:
        raise CheckpointError(f"{path}: DeepSpeed could not read its folder {DEEPSPEED_TAG}/")
    objects.lr_scheduler.load_state_dict(torch.load(path / LR_KEY, weights_only=True))
    if universal is not None:
        after_universal_load(engine, objects.optimizer, groups, objects.lr_scheduler.get_last_lr())
    progress = TrainingProgress.from_dict(json.loads((path / PROGRESS_KEY).read_text()))
    _load_ema(path, objects, progress, parts)
    _load_rng(path, ranks.rank)
    return progress


def _load_ema(path: Path, objects, progress: TrainingProgress, parts=None) -> None:
    """EMA's average from the checkpoint's whole tensors, into each average kept (ZeRO-3,
    `parts`: into this process's partition of it)."""
    ema = objects.ema
    if ema is None:
        return
    shadow = load_file(str(path / EMA_KEY))
    with torch.no_grad():
        for (name, param), s in zip(objects.trainable.items(), ema.shadow_params):
            value = shadow[name] if parts is None else parts.split(param, shadow[name])
            s.copy_(value.to(s.device, s.dtype))
    ema.optimization_step = progress.ema_steps


def _load_rng(path: Path, rank: int) -> None:
    """This process's random state as the checkpoint saved it (a process the checkpoint's run
    did not have keeps its own)."""
    rng_file, old_rng_file = path / RNG_KEY.format(rank=rank), path / OLD_RNG_KEY.format(rank=rank)
    if rng_file.is_file():
        set_rng_state(load_rng_state(rng_file))
    elif old_rng_file.is_file():
        set_rng_state(_load_old_rng_state(old_rng_file))


def _by_torch_dcp(path: Path) -> bool:
    """Whether checkpoint `path`'s weights are torch.distributed.checkpoint files (FSDP)."""
    info = sharded_info(path)
    return info is not None and info.get("by") != "deepspeed"


def sharded_info(path: Path) -> dict | None:
    """The manifest's sharding record of checkpoint `path`, or None (one process wrote it)."""
    try:
        return json.loads((path / MANIFEST).read_text()).get(SHARDED_META)
    except (OSError, ValueError):
        return None


def load_sharded_state(path: Path, objects, model, rank: int, sharded: bool) -> TrainingProgress:
    """Restore what `save_sharded_state` wrote: into this process's shards (`sharded`, any
    number of processes: the files reshard), or into whole tensors (one process)."""
    import torch.distributed.checkpoint as dcp

    check_architecture(json.loads((path / ARCH_KEY).read_text()), objects.architecture, path)
    if objects.ema is not None and not _has_ema(path):
        raise CheckpointError(f"{path}: has no EMA weights but train.ema is on")
    state = _sharded_state(objects, model)
    with warnings.catch_warnings():  # one process: "assuming ... a single process", it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=not sharded)
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, objects.optimizer, state["optim"])
    objects.lr_scheduler.load_state_dict(torch.load(path / LR_KEY, weights_only=True))
    progress = TrainingProgress.from_dict(json.loads((path / PROGRESS_KEY).read_text()))
    if objects.ema is not None:
        objects.ema.optimization_step = progress.ema_steps
    _load_rng(path, rank)
    return progress


def _has_ema(path: Path) -> bool:
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return any(k.startswith("ema.") for k in keys)


def sharded_weights(path: Path, which: str = "model") -> dict[str, torch.Tensor]:
    """The whole trainable weights (`which` = "model") or EMA's ("ema") of a sharded
    checkpoint, read in one process (torch.distributed.checkpoint reshards them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    prefix = f"{which}."
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    wanted = {
        key[len(prefix) :]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for key, md in metadata.items()
        if key.startswith(prefix) and hasattr(md, "size")
    }
    if not wanted:
        raise CheckpointError(f"{path}: holds no {which} weights")
    state = {which: wanted}
    with warnings.catch_warnings():  # "assuming ... a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state[which]


def checkpoint_weights(path: Path, which: str = "model") -> dict[str, torch.Tensor]:
    """The trainable weights ("model") or EMA's ("ema") a verified checkpoint holds, whether
    one process or several (sharded) wrote it."""
    if _by_torch_dcp(path):
        return sharded_weights(path, which)
    return load_file(str(path / (EMA_KEY if which == "ema" else MODEL_KEY)))


def checkpoint_has_ema(path: Path) -> bool:
    return _has_ema(path) if _by_torch_dcp(path) else (path / EMA_KEY).is_file()


def load_training_state(path: Path, objects, rank: int = 0) -> TrainingProgress:
    """Restore everything `save_training_state` wrote into the training objects (the
    checkpoint was verified already); returns the progress."""
    trainable, optimizer, lr_scheduler = objects.trainable, objects.optimizer, objects.lr_scheduler
    ema, scaler, architecture = objects.ema, objects.scaler, objects.architecture
    saved_arch = json.loads((path / ARCH_KEY).read_text())
    check_architecture(saved_arch, architecture, path)
    from sdtune.train.optim import is_schedule_free

    weights_key = TRAIN_WEIGHTS_KEY if is_schedule_free(optimizer) else MODEL_KEY
    if not (path / weights_key).is_file():
        raise CheckpointError(
            f"{path}: has no {weights_key}: it was saved with another train.optimizer than "
            "this config's (schedule-free AdamW's checkpoints keep its training weights too); "
            "resume with the optimizer it was trained with"
        )
    weights = load_file(str(path / weights_key))
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(path / OPT_KEY, weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / LR_KEY, weights_only=True))
    progress = TrainingProgress.from_dict(json.loads((path / PROGRESS_KEY).read_text()))
    if ema is not None and not (path / EMA_KEY).is_file():
        raise CheckpointError(f"{path}: has no EMA weights but train.ema is on")
    _load_ema(path, objects, progress)
    if scaler is not None and (path / SCALER_KEY).is_file():
        scaler.load_state_dict(torch.load(path / SCALER_KEY, weights_only=True))
    _load_rng(path, rank)
    return progress


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def clean_temporaries(root: Path, say) -> None:
    """Remove half-written checkpoints left by a crash during a save."""
    if not root.is_dir():
        return
    for tmp in root.iterdir():
        if tmp.name.startswith(TMP_PREFIX) or tmp.name == f"{LATEST}.tmp":
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            say(f"checkpoint: removed {tmp.name}, left by an interrupted save")


def find_checkpoint(root: Path, say, fast: bool = False) -> Path | None:
    """The checkpoint `latest` names if it verifies; else the newest one that does (said)."""
    candidates = checkpoint_dirs(root)
    pointer = root / LATEST
    named = None
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        named = root / name if name.startswith("step-") and "/" not in name else None
        if named is None:
            say(f"checkpoint: {pointer} is damaged; looking for the newest checkpoint instead")
    order = ([named] if named is not None and named.is_dir() else []) + [
        p for p in reversed(candidates) if p != named
    ]
    for i, path in enumerate(order):
        try:
            verify_checkpoint(path, fast=fast)
        except CheckpointError as exc:
            say(f"checkpoint: refusing {path.name}: {exc}")
            continue
        if i > 0:
            say(f"checkpoint: falling back to {path.name}, the newest checkpoint that verifies")
        return path
    return None


# Keys a resumed run may change: they alter when things happen or are shown, not the maths.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.log_every",
    "train.log_update_ratio",
    "output_dir",
    "checkpoint.",
    "evaluate.",
    "data.num_workers",
    "data.pin_memory",
)


def check_resume_config(saved_toml: str, current: dict, where: Path) -> list[str]:
    """Keys whose change is allowed on resume (returned); any other change is refused."""
    import tomllib

    def flat(node: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in node.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    from sdtune.config import to_dict, validate_config

    before, now = flat(tomllib.loads(saved_toml)), flat(current)
    # a key the checkpoint's config lacks (written before the key existed, or left out as
    # unset) had its default then: only a value other than the default is a change
    defaults = flat(to_dict(validate_config({})))
    for key in set(now) - set(before):
        if key in defaults and now[key] == defaults[key]:
            before[key] = now[key]
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    refused = [
        k
        for k in changed
        if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)
    ]
    if refused:
        raise CheckpointError(
            f"--resume: the config differs from the one {where.name} was trained with in "
            f"{', '.join(refused[:5])}; resume with the same settings or start a new run"
        )
    return changed


def resolve_resume(run_dir: Path, spec: str, fast: bool, say) -> Path | None:
    """The verified checkpoint `--resume SPEC` means, or None to start from scratch (said)."""
    if spec != "latest":
        path = Path(spec)
        if (path / "checkpoints").is_dir():
            path = path / "checkpoints"
        if path.name == "checkpoints" or (path / LATEST).is_file():
            found = find_checkpoint(path, say, fast)
            if found is None:
                raise CheckpointError(f"--resume {spec}: no checkpoint there verifies")
            return found
        verify_checkpoint(path, fast=fast)
        return path
    root = run_dir / "checkpoints"
    clean_temporaries(root, say)
    if not checkpoint_dirs(root):
        say(f"--resume latest: no checkpoint in {run_dir} yet; starting from scratch")
        return None
    found = find_checkpoint(root, say, fast)
    if found is None:
        raise CheckpointError(
            f"--resume latest: no checkpoint in {root} verifies; inspect them with `sdtune inspect`, "
            "or start again with --overwrite"
        )
    return found
