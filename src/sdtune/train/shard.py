"""Sharded training through Accelerate: FSDP2 when `accelerate launch` is given an FSDP config,
DeepSpeed ZeRO stage 2 or 3 when it is given a DeepSpeed one.

DeepSpeed ZeRO-2 shards the gradients and the optimizer state, not the weights: every process
holds the whole denoiser, so evaluation, EMA and the final model read it as DDP's are read.
What sdtune does for it is `route_deepspeed` (the engine set up from sdtune's config, on CPU
processes too), the step's own calls of the engine (train/step.py: the guard decides before the
update), and checkpoints of every process's optimizer partition (checkpoint/state.py
`save_deepspeed_state`).

DeepSpeed ZeRO-3 shards the weights too: each process keeps a flat partition of every weight
(`param.ds_tensor`) and the engine's hooks gather a layer's whole weights while it computes.
sdtune adds what it adds for FSDP: EMA's average kept per partition (`Zero3Parts`), `Gathered`
for what the main process reads whole, and the checkpoint's weights and EMA gathered into the
usual files, one tensor at a time.

FSDP:

Every process holds a shard of the denoiser's weights, gradients and optimizer state; a
layer's whole weights exist only while it computes. What sdtune adds is what Accelerate leaves
to the training script:
- checkpoints written by every process together (checkpoint/state.py `save_sharded_state`):
  each process's shard through torch.distributed.checkpoint, never gathered on one process,
  under the store's manifest and `latest`;
- EMA's average kept sharded like the weights it follows (each process averages its shard:
  no process ever holds the whole average, and the update needs no communication);
- `Gathered`: the whole model on the main process for what reads it there (evaluation, the
  judge, the final model), its trained weights gathered from the shards when it is read;
- the numbers the guard and the logs read (gradient norm, update ratio) made whole first.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager, nullcontext

import torch

from sdtune.errors import ConfigError, UserError

SHARDED_OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")
"""torch's own optimizers: their state is per-parameter tensors shaped like the parameter,
which FSDP shards and torch.distributed.checkpoint saves and reshards."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


DEEPSPEED_STAGES = (2, 3)
"""The ZeRO stages sdtune trains with: 2 (gradients and optimizer state sharded) and 3 (the
weights too). Stages 0 and 1 save little over DDP for a denoiser: torchrun runs DDP."""


def check_launch() -> None:
    """Refuse, in one line, a launch sdtune cannot train as asked (before Accelerate starts)."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(
                "accelerate launch: DeepSpeed is asked for but not installed (pip install "
                "deepspeed), or shard with FSDP (examples/accelerate/fsdp.yaml)"
            )
        _check_stage(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"))
        for what in ("OPTIMIZER", "PARAM"):
            _check_offload(
                what.lower(), os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE")
            )
    if _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError(
            "accelerate launch: sdtune shards with FSDP2: set fsdp_version: 2 in the FSDP "
            "config (examples/accelerate/fsdp.yaml)"
        )


def _check_stage(stage) -> None:
    if stage is not None and str(stage) not in {str(s) for s in DEEPSPEED_STAGES}:
        raise UserError(
            f"accelerate launch: DeepSpeed ZeRO stage {stage} is not supported by sdtune; use "
            "zero_stage: 2 (examples/accelerate/deepspeed.yaml) or 3 (deepspeed_zero3.yaml), "
            "or plain DDP (torchrun)"
        )


def _check_offload(what: str, device) -> None:
    if device not in (None, "none"):
        raise UserError(
            f"accelerate launch: DeepSpeed's offload_{what}_device: {device} is not supported "
            f"by sdtune yet; set offload_{what}_device: none (examples/accelerate/"
            "deepspeed_zero3.yaml), or shard over more processes"
        )


def route_fsdp(accelerator) -> None:
    """Accelerate shards only on accelerators: given an FSDP config on CPU processes it runs
    DDP without saying so. There sdtune asks for Accelerate's own FSDP2 preparation, which
    torch's FSDP2 runs over gloo as well (how the CPU tests shard)."""
    from accelerate import FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    if (
        not _flag("ACCELERATE_USE_FSDP")
        or accelerator.distributed_type != DistributedType.MULTI_CPU
    ):
        return
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    # both shared states: a later AcceleratorState() copies the process state's over its own
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def route_deepspeed(accelerator, cfg) -> None:
    """DeepSpeed's engine set up from sdtune's config, when the launch asks for DeepSpeed.

    On CPU processes Accelerate runs DDP instead (as it does for FSDP): sdtune sets its state
    to DeepSpeed there, which ZeRO-2 runs over gloo (how the CPU tests shard). The micro-batch,
    accumulation, global batch and clipping are filled in from sdtune's `train.*`, over any
    value the DeepSpeed config gives. Precision stays sdtune's too: float32 weights and master weights, with
    `train.mixed_precision = bf16` an autocast around the forward (`autocast`), as without
    DeepSpeed; DeepSpeed's own bf16 (weights stored in bf16) is turned off."""
    from accelerate import DeepSpeedPlugin, PartialState
    from accelerate.utils import DistributedType

    if not _flag("ACCELERATE_USE_DEEPSPEED"):
        return
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision("no")
        plugin.select(_from_accelerator_state=True)
        accelerator.state.deepspeed_plugins = plugin
        # both shared states: a later AcceleratorState() copies the process state's over its own
        PartialState().distributed_type = DistributedType.DEEPSPEED
        accelerator.state.distributed_type = DistributedType.DEEPSPEED
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    plugin = accelerator.state.deepspeed_plugin
    _check_stage(plugin.zero_stage)
    config = plugin.deepspeed_config
    check_deepspeed_config(config)
    zero = config.setdefault("zero_optimization", {})
    for what in ("optimizer", "param"):
        _check_offload(what, (zero.get(f"offload_{what}") or {}).get("device"))
    if plugin.zero_stage == 3:
        _route_zero3(plugin, zero, cfg)
    t = cfg.train
    ours = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * accelerator.num_processes,
        "gradient_clipping": 0.0 if t.max_grad_norm is None else float(t.max_grad_norm),
    }
    config.update(ours)  # sdtune's config decides these, whatever the DeepSpeed config says
    for half in ("fp16", "bf16"):
        config[half] = {"enabled": False}
    if accelerator.device.type == "cuda" and t.mixed_precision == "bf16":
        # DeepSpeed runs the forward in its own autocast setting (off unless configured, which
        # would turn sdtune's off): bf16 compute, every gradient reduced in float32
        config["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        }
    # the guard's NaN-made bad step is discarded where DeepSpeed sees a non-finite norm
    zero["compute_grad_norm"] = True
    config.setdefault("zero_allow_untested_optimizer", True)  # torch's own optimizers
    config.setdefault("steps_per_print", 2**31 - 1)  # sdtune logs; DeepSpeed stays quiet
    accelerator.gradient_accumulation_steps = t.grad_accum
    if accelerator.device.type == "cpu":
        _without_shm_op()
    # sdtune says every skipped step itself; DeepSpeed's own line would call a loss spike the
    # guard discarded "non-finite gradients"
    from deepspeed.utils import logger as deepspeed_logger  # made (at INFO) on first import

    deepspeed_logger.setLevel(logging.ERROR)


def check_deepspeed_config(config: dict) -> None:
    """What a DeepSpeed config file may not hold: sdtune builds the optimizer and its schedule
    from `train.*` (Accelerate would refuse one given twice, with a traceback)."""
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise UserError(
                f"DeepSpeed config: remove its '{section}' section; sdtune builds the "
                f"{section} from the run's config (train.optimizer, train.learning_rate, "
                "train.lr_schedule)"
            )


def _without_shm_op() -> None:
    """On CPU processes DeepSpeed would compile its shared-memory all-reduce (a C++ build,
    about 30 s and a compiler, at the first launch on a machine); gloo's all-reduce serves."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def _route_zero3(plugin, zero: dict, cfg) -> None:
    """ZeRO-3 partitions the denoiser when it is prepared, nothing else: the frozen text
    encoders and VAE stay whole on every process (their forward runs outside the engine)."""
    from transformers.integrations import unset_hf_deepspeed_config

    if cfg.train.compile:
        raise ConfigError(
            "train.compile: torch.compile of the denoiser is not supported with DeepSpeed "
            "ZeRO-3 (its hooks gather each layer's weights); set train.compile = false, or use "
            "ZeRO-2"
        )
    # Accelerate's ZeRO-3 set-up makes transformers build every model it loads already
    # partitioned (zero.Init), text encoders included, which no engine would then gather
    plugin.zero3_init_flag = False
    plugin.dschf = None
    unset_hf_deepspeed_config()
    # sizes Accelerate fills in from a transformer's hidden size, which a UNet has not:
    # DeepSpeed's own defaults instead
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                "stage3_param_persistence_threshold"):  # fmt: skip
        if zero.get(key) == "auto":
            del zero[key]
    # sdtune gathers the weights into its own checkpoint files (Zero3Parts)
    zero["stage3_gather_16bit_weights_on_model_save"] = False
    # else ZeRO-3 replaces torch's F.linear for the whole process, the whole text encoders,
    # VAE and evaluation copy included
    zero["memory_efficient_linear"] = False


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage DeepSpeed trains with, or None when not under DeepSpeed."""
    if not is_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


class Zero3Parts:
    """What ZeRO-3 keeps of each weight on this process, and the whole value of one.

    DeepSpeed keeps every weight flattened, padded to a multiple of the process count and cut
    into equal partitions, the k-th on process k (`param.ds_tensor`). `part` is this process's
    partition without the padding (a view, read anew each time: DeepSpeed moves the partitions
    into its flat buffers); `whole` gathers such a part of the weight, or of a tensor kept like
    it (EMA's average), into the weight's shape (a collective); `split` takes this process's
    part of a whole value (resuming EMA)."""

    @staticmethod
    def _layout(param) -> tuple[int, int, int]:
        import torch.distributed as dist

        group = param.ds_process_group
        size = param.ds_tensor.ds_numel  # the partition's length, padding included
        start = size * dist.get_rank(group=group)
        return start, size, max(0, min(size, param.ds_numel - start))

    @classmethod
    def part(cls, param) -> torch.Tensor:
        _, _, valid = cls._layout(param)
        return param.ds_tensor.narrow(0, 0, valid)

    @classmethod
    def whole(cls, param, part: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        _, size, valid = cls._layout(param)
        padded = part.new_zeros(size)
        padded[:valid] = part.reshape(-1)
        parts = [
            torch.empty_like(padded) for _ in range(dist.get_world_size(param.ds_process_group))
        ]
        dist.all_gather(parts, padded, group=param.ds_process_group)
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)

    @classmethod
    def whole_weight(cls, param) -> torch.Tensor:
        """The weight itself, whole (a collective)."""
        return cls.whole(param, cls.part(param).detach())

    @classmethod
    def split(cls, param, value: torch.Tensor) -> torch.Tensor:
        start, _, valid = cls._layout(param)
        return value.reshape(-1).narrow(0, start, valid) if valid else value.reshape(-1)[:0]


def deepspeed_engine(accelerator):
    """The DeepSpeed engine `prepare` made, or None when not under DeepSpeed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.deepspeed_engine_wrapped.engine


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def autocast(accelerator, cfg):
    """The forward's autocast: Accelerate's, or under DeepSpeed (whose Accelerate state turns
    autocast off) torch's with `train.mixed_precision` on a GPU."""
    if not is_deepspeed(accelerator):
        return accelerator.autocast
    mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    if mixed is None or accelerator.device.type != "cuda":
        return nullcontext
    return lambda: torch.autocast("cuda", dtype=mixed)


def check_sharded(cfg, trainable: dict, denoiser_name: str, by: str = "FSDP") -> None:
    """What sharded training (`by`: FSDP or DeepSpeed) takes, refused in one line otherwise."""
    outside = sorted(n for n in trainable if not n.startswith(f"{denoiser_name}."))
    if outside:
        raise ConfigError(
            f"{by}: only the {denoiser_name} trains when sharded (Accelerate shards one model), "
            f"but {outside[0]} would train too; leave the text encoders frozen "
            "(lora.text_encoder = false, no textual-inversion token, model.trainable without "
            f"text_encoder*), or train without {by}"
        )
    if cfg.train.optimizer not in SHARDED_OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer: '{cfg.train.optimizer}' is not sharded by sdtune's {by} "
            f"checkpoints; use one of {', '.join(SHARDED_OPTIMIZERS)}"
        )
    if cfg.dreambooth.instance_prompt and cfg.dreambooth.prior_target == "base":
        raise ConfigError(
            f"dreambooth.prior_target: 'base' is not supported with {by} (its extra forward runs "
            "only on batches with class images, which the processes would not agree on); use "
            f"'noise', or train without {by}"
        )
    if cfg.train.mixed_precision == "fp16":
        raise ConfigError(
            f"train.mixed_precision: fp16 is not supported with {by} (its loss scaler would "
            "need a sharded one); use bf16"
        )


def same_start(trainable: dict) -> None:
    """Every process's trainable weights made the main process's, before FSDP shards each
    process's own copy: what DDP does when it wraps (a LoRA's random start is drawn per
    process). Every process calls it."""
    import torch.distributed as dist

    with torch.no_grad():
        for param in trainable.values():
            dist.broadcast(param.data, src=0)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every process calls it), a tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP) or its partition of a ZeRO-3 weight, a tensor
    as it is."""
    from torch.distributed.tensor import DTensor

    if getattr(t, "ds_tensor", None) is not None:
        return Zero3Parts.part(t)
    return t.to_local() if isinstance(t, DTensor) else t


def whole_numel(t: torch.Tensor) -> int:
    """The whole weight's size, whatever part of it this process holds."""
    return getattr(t, "ds_numel", None) or t.numel()


class Gathered:
    """The whole model on the main process, for evaluation, the judge and the final model: the
    trained bundle's own frozen components (not sharded) with an unsharded copy of its
    denoiser, made as set-up made the trained one (`build`, on the host, with its own random
    state), whose trainable weights and EMA average `refresh` gathers from every process's
    shards. It costs the main process one more float32 copy of the denoiser, on the host
    between reads and on the device while it is read (`on`)."""

    def __init__(self, build, live, trainable: dict, ema, decay: float, ranks, parts=None) -> None:
        self.build, self.live, self.trainable, self.ema, self.decay, self.ranks = (
            build, live, trainable, ema, decay, ranks
        )  # fmt: skip
        # the whole value of a weight, or of EMA's average kept like it (collectives): ZeRO-3's
        # partitions (`parts`: Zero3Parts), else FSDP's DTensor shards
        self.parts = parts
        self.bundle = None
        self.copy_ema = None
        self._params: dict[str, torch.nn.Parameter] = {}

    def _make(self) -> None:
        from sdtune.train.ema import EMA

        with torch.random.fork_rng(devices=[]):
            built = self.build()
        name = self.live.arch.denoiser
        # the frozen components are the live ones: only the denoiser is sharded
        built.modules = {
            c: built.modules[c] if c == name else m for c, m in self.live.modules.items()
        }
        built.tokenizers = self.live.tokenizers
        named = dict(built.denoiser.named_parameters())
        self._params = {n: named[n.removeprefix(f"{name}.")] for n in self.trainable}
        if self.ema is not None:
            self.copy_ema = EMA(list(self._params.values()), self.decay)
        self.bundle = built

    def refresh(self) -> None:
        """Gather the trained weights (and EMA's) into the copy: every process calls it."""
        failed = None
        if self.ranks.main and self.bundle is None:
            try:
                self._make()
            except Exception as exc:  # noqa: BLE001 - the other processes must not wait on
                failed = exc
        said = self.ranks.broadcast(None if failed is None else repr(failed))
        if said is not None:
            if failed is not None:
                raise failed
            raise UserError(f"sharded: the main process could not build the whole model: {said}")
        with torch.no_grad():
            for i, (name, param) in enumerate(self.trainable.items()):
                full = self.parts.whole_weight(param) if self.parts else whole(param.detach())
                if self.ranks.main:
                    self._params[name].copy_(full.to("cpu"))
                if self.ema is not None:
                    mine = self.ema.shadow_params[i]
                    shadow = self.parts.whole(param, mine) if self.parts else whole(mine)
                    if self.ranks.main:
                        self.copy_ema.shadow_params[i].copy_(shadow.to("cpu"))

    @contextmanager
    def on(self, device: torch.device):
        """The copy's denoiser on `device` while it is read, back on the host after."""
        moved = device.type != "cpu"
        if moved:
            self.bundle.denoiser.to(device)
            if self.copy_ema is not None:
                self.copy_ema.shadow_params = [s.to(device) for s in self.copy_ema.shadow_params]
        try:
            yield self.bundle
        finally:
            if moved:
                self.bundle.denoiser.to("cpu")
                if self.copy_ema is not None:
                    shadows = self.copy_ema.shadow_params
                    self.copy_ema.shadow_params = [s.to("cpu") for s in shadows]
                torch.cuda.empty_cache()
