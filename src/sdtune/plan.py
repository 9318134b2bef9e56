"""`sdtune plan CONFIG`: what a run will need, before anything is downloaded or trained.

The model is built from its configs alone on the meta device (shapes, no weights: a diffusers
folder, a cached hub id, a single file through its config source, a preset), made into what the
config trains (freezing, LoRA, a token), and then:

- **parameters** per component, and how many train;
- **FLOPs per step**, counted by torch's FlopCounterMode on one simulated step (VAE encoding
  unless latents are cached, the text encoders unless their states are, the denoiser's forward
  and the backward) at this batch and resolution; matmuls, convolutions and attention, not
  elementwise work;
- **peak memory**, broken down: the weights (sdtune keeps them in float32), the optimizer's
  state (per optimizer), the EMA, mixed precision's cached half-precision copies of trainable
  weights, and the activations and gradients of one step, measured by following every tensor's
  lifetime through the same simulated forward and backward (with and without gradient
  checkpointing; on a GPU with the fused attention kernels, which keep no attention matrix);
- **time**: FLOPs over the device's peak at a stated utilisation (this project's benchmark
  records for that GPU, a default otherwise), or measured with a few real steps here
  (`--measure`); the total for train.max_steps, and the cost at `--price` per hour;
- whether it fits `--memory` (or the `--gpu`'s), and the cheapest changes that make it fit.

It says how sure it is: the memory is a simulation of the allocations (not the allocator's
caching, the CUDA context or kernel workspaces), the time an assumption unless measured.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from sdtune.errors import UserError

GiB = 2**30

# dense bf16/fp16 tensor-core peak (TFLOP/s, no sparsity) and memory (GiB) of common cards
GPUS = {
    "h200": (989.0, 141),
    "h100": (989.0, 80),
    "a100-80gb": (312.0, 80),
    "a100": (312.0, 40),
    "l40s": (362.0, 48),
    "a10g": (125.0, 24),
    "l4": (121.0, 24),
    "rtx4090": (165.0, 24),
    "rtx3090": (71.0, 24),
    "rtx4080": (97.0, 16),
    "v100": (125.0, 16),
    "t4": (65.0, 16),
}
DEFAULT_UTILISATION = 0.35
"""Of the device's peak, when this project has no record for it: a typical share for diffusion
training steps (many small kernels besides the matmuls)."""


def optimizer_state_bytes(name: str, params: list[torch.Tensor], momentum: float) -> int:
    """Bytes of optimizer state for these trainable tensors (float32 states)."""
    n = sum(p.numel() for p in params)
    if name in ("adamw", "adam", "adamw_schedulefree"):
        return 8 * n  # two moments (schedule-free: z and the second moment)
    if name == "adamw8bit":  # bitsandbytes: 8-bit moments in blocks of 2048 with a float absmax
        big = sum(p.numel() for p in params if p.numel() >= 4096)
        return 2 * big + 2 * 4 * math.ceil(big / 2048) + 8 * (n - big)
    if name == "lion":
        return 4 * n
    if name == "prodigy":
        return 16 * n  # exp_avg, exp_avg_sq, s and the initial weights p0
    if name == "rmsprop":
        return (8 if momentum > 0 else 4) * n
    if name == "sgd":
        return 4 * n if momentum > 0 else 0
    if name == "adafactor":  # factored second moments over the last two dimensions
        total = 0
        for p in params:
            if p.dim() >= 2:
                rows = math.prod(p.shape[:-1])
                cols = math.prod(p.shape[:-2]) * p.shape[-1]
                total += 4 * (rows + cols)
            else:
                total += 4 * p.numel()
        return total
    raise UserError(f"train.optimizer: {name} has no memory model in sdtune plan")


class LiveTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Follows every tensor storage created under it until it is freed: the live bytes and
    their peak (floating-point storages scaled by `float_scale`, e.g. 0.5 for bf16)."""

    def __init__(self, float_scale: float = 1.0) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.float_scale = float_scale
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._sharded: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        n = storage.nbytes()
        if t.is_floating_point():
            n = int(n * self.float_scale)
        self._seen[storage] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def full_size(self, t: torch.Tensor) -> None:
        """Count `t` (a weight's gradient, float32 whatever autocast does) at its full size."""
        storage = t.untyped_storage()
        extra = storage.nbytes() - self._seen.get(storage, storage.nbytes())
        if extra > 0:
            self._seen[storage] += extra
            self.live += extra
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, extra)

    def shard_of(self, t: torch.Tensor, shards: int) -> None:
        """Count `t` (a whole gradient) at 1/shards of what it is counted at: FSDP keeps
        only this process's shard once the gradient is reduce-scattered."""
        storage = t.untyped_storage()
        counted = self._seen.get(storage)
        if counted is None or shards <= 1 or storage in self._sharded:
            return
        self._sharded[storage] = True
        drop = counted - counted // shards
        self._seen[storage] = counted - drop
        self.live -= drop
        weakref.finalize(storage, self._free, -drop)  # the storage's own _free counts it whole

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


class _FusedAttention(torch.autograd.Function):
    """Attention as the GPU's fused kernels keep it for the backward: q, k, v, the output and
    one float per row (no attention matrix). Shapes only: for the meta device."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(*q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def fused_attention():
    """scaled_dot_product_attention as a fused kernel's memory (see _FusedAttention)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def attention(q, k, v, *args, **kwargs):
        return _FusedAttention.apply(q, k, v)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def shapes_bundle(cfg):
    """The model `cfg` trains, built from configs on the meta device, adapted as configured."""
    from sdtune.errors import ModelError
    from sdtune.models import load_model
    from sdtune.models.adapt import prepare_model
    from sdtune.models.families.sd import shapes_only

    try:
        with shapes_only():
            bundle = load_model(cfg.model, cfg.diffusion, cfg.seed)
            freeze = prepare_model(bundle, cfg)
    except ModelError:
        raise
    except Exception as exc:  # a layout the shapes-only path cannot build
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"sdtune plan: cannot build {cfg.model.base} from its configs alone ({first})"
        ) from None
    return bundle, freeze


def _step(bundle, cfg, batch: int, checkpointing: bool, train_text: bool, cached: tuple):
    """One training step's work on the meta device: encode (unless cached), condition,
    predict, backward. Returns nothing: what it allocates and computes is what is counted."""
    arch = bundle.arch
    cached_latents, cached_text = cached
    side = cfg.data.resolution
    denoiser = bundle.denoiser
    denoiser.train()
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    elif getattr(denoiser, "is_gradient_checkpointing", False):
        denoiser.disable_gradient_checkpointing()
    factor = arch.downsample_factor(bundle)
    if cached_latents:
        latents = torch.zeros(
            batch, arch.latent_channels(bundle), side // factor, side // factor, device="meta"
        )
    else:
        pixels = torch.zeros(batch, bundle.image_channels, side, side, device="meta")
        with torch.no_grad():
            latents = arch.encode_images(bundle, pixels, None)
    ids = arch.tokenize(bundle, ["a photo"] * batch).to("meta")
    with nullcontext() if train_text and not cached_text else torch.no_grad():
        text = arch.encode(bundle, ids)
    cond = arch.condition(bundle, text, {"target_size": (side, side)})
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    pred = arch.predict(bundle, latents, timesteps, cond)
    loss = pred.float().pow(2).mean()
    if loss.requires_grad:
        loss.backward()
    for p in [p for m in bundle.components().values() for p in m.parameters()]:
        p.grad = None


@dataclass
class Plan:
    base: str
    components: dict[str, dict[str, int]]
    flops: dict[str, int]
    memory: dict[str, int]
    activations: dict[str, int | None]
    step_seconds: float | None
    utilisation: float | None
    time_source: str
    total_seconds: float | None
    cost: float | None
    budget: float | None
    budget_source: str
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: int = 1
    """FSDP's processes the memory is per process of (1: unsharded)."""

    @property
    def peak(self) -> int:
        return self.memory["total"]

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak <= self.budget * GiB


def fsdp_unit_bytes(bundle, mixed: bool) -> int:
    """The weights of the largest unit FSDP gathers whole, in the precision it computes in.
    The units are the denoiser's blocks its model names unsplittable (as Accelerate's
    TRANSFORMER_BASED_WRAP wraps them) and the root; each holds the weights that no unit
    inside it holds."""
    names = set(getattr(bundle.denoiser, "_no_split_modules", None) or [])
    units = [bundle.denoiser] + [m for m in bundle.denoiser.modules() if type(m).__name__ in names]
    owner: dict[int, int] = {}  # a weight belongs to the innermost unit holding it
    for i, unit in enumerate(units):  # outer units come first in modules()
        for param in unit.parameters():
            owner[id(param)] = i
    sizes = [0] * len(units)
    for param in bundle.denoiser.parameters():
        sizes[owner[id(param)]] += param.numel()
    return (2 if mixed else 4) * max(sizes)


def measure_memory(bundle, cfg, mixed: bool, gpu: bool, shards: int = 1) -> dict[str, int]:
    """The memory breakdown of `cfg` on `bundle` (meta), in bytes; with `shards` > 1, of one
    process when FSDP shards the denoiser over that many."""
    from sdtune.train.optim import param_groups

    params = {
        f"{c}.{n}": p for c, m in bundle.components().items() for n, p in m.named_parameters()
    }
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    groups = param_groups(trainable, cfg, bundle.arch)
    tensors = [p for g in groups for p in g["params"]]
    denoiser = 4 * sum(p.numel() for p in bundle.denoiser.parameters())
    weights = 4 * sum(p.numel() for p in params.values()) - denoiser + -(-denoiser // shards)
    memory = {
        "weights": weights,
        "optimizer": optimizer_state_bytes(cfg.train.optimizer, tensors, cfg.train.momentum)
        // shards,
        "ema": 4 * sum(p.numel() for p in tensors) // shards if cfg.train.ema else 0,
    }
    if mixed and shards == 1:  # autocast keeps half copies of trainable weights it casts
        memory["autocast_copies"] = 2 * sum(p.numel() for p in tensors if p.dim() >= 2)
    if shards > 1:  # a block's whole weights while it computes, and the next one prefetched
        memory["fsdp_whole_blocks"] = 2 * fsdp_unit_bytes(bundle, mixed)
    if cfg.train.log_update_ratio:  # the sample of the weights before a logged step
        memory["update_ratio_sample"] = min(4 * sum(p.numel() for p in tensors), 64 * 2**20)
    return memory


def step_activations(
    bundle, cfg, checkpointing: bool, mixed: bool, gpu: bool, shards: int = 1
) -> int:
    """Peak bytes of one step's activations and gradients, as the simulated step allocates
    (with `shards` > 1, each weight's gradient kept as its shard once it is whole)."""
    train_text = any(p.requires_grad for e in bundle.text_encoders.values() for p in e.parameters())
    cached = (cfg.data.cache_latents, cfg.data.cache_text)
    tracker = LiveTensors(0.5 if mixed else 1.0)
    fused = cfg.train.attention != "math"  # CPU and GPU SDPA kernels keep no attention matrix
    params = [p for m in bundle.components().values() for p in m.parameters() if p.requires_grad]

    def counted(p: torch.Tensor) -> None:
        tracker.full_size(p.grad)
        tracker.shard_of(p.grad, shards)

    hooks = [p.register_post_accumulate_grad_hook(counted) for p in params]
    try:
        with fused_attention() if fused else nullcontext(), tracker:
            _step(bundle, cfg, cfg.train.batch_size, checkpointing, train_text, cached)
    finally:
        for hook in hooks:
            hook.remove()
    return tracker.peak


def step_flops(bundle, cfg) -> dict[str, int]:
    """FLOPs of one optimizer step (all micro-batches), by part."""
    from torch.utils.flop_counter import FlopCounterMode

    train_text = any(p.requires_grad for e in bundle.text_encoders.values() for p in e.parameters())
    cached = (cfg.data.cache_latents, cfg.data.cache_text)
    with FlopCounterMode(display=False) as counter:
        _step(bundle, cfg, cfg.train.batch_size, False, train_text, cached)
    total = counter.get_total_flops() * cfg.train.grad_accum
    if cfg.model.gradient_checkpointing:  # the forward once more, in the backward
        with FlopCounterMode(display=False) as forward:
            with torch.no_grad():
                _step(bundle, cfg, cfg.train.batch_size, False, False, (True, True))
        total += forward.get_total_flops() * cfg.train.grad_accum
    return {
        "per_step": int(total),
        "per_image": int(total / cfg.train.batch_size / cfg.train.grad_accum),
    }


SMALL_STEP_FLOPS = 1e12  # below this a GPU step is launch-bound: FLOPs do not predict it

MEASURED_UTILISATION = {
    # achieved / peak TFLOP/s of this project's own throughput runs (benchmarks/results), with
    # the peak those runs used: SD 1.5, 512 px, batch 16, bf16, cached latents and text, on an
    # H100 80GB HBM3 (2026-11-23): eager 178 TFLOP/s, torch.compile 259 TFLOP/s
    "h100": {"eager": 178.4 / 989.0, "compile": 259.4 / 989.0},
}


def _component_counts(bundle) -> dict[str, dict[str, int]]:
    return {
        name: {
            "parameters": sum(p.numel() for p in module.parameters()),
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        }
        for name, module in bundle.components().items()
    }


def _device(gpu: str | None, memory: float | None) -> tuple[str, float | None, float | None]:
    """(the device's key, its memory in GiB, its peak TFLOP/s) for --gpu / --memory."""
    if gpu is None:
        return "", memory, None
    key = gpu.lower().replace(" ", "").replace("nvidia", "").replace("_", "-")
    if key not in GPUS:
        raise UserError(f"--gpu {gpu}: unknown; known: {', '.join(GPUS)} (or give --memory GiB)")
    peak, gib = GPUS[key]
    return key, memory if memory is not None else float(gib), peak


def make_plan(
    cfg,
    gpu: str | None = None,
    memory: float | None = None,
    price: float | None = None,
    measured_step: float | None = None,
    variants: bool = True,
    shards: int = 1,
) -> Plan:
    """The plan of `cfg` (see the module docstring); `measured_step` in seconds when measured;
    `shards` > 1: per process, with FSDP sharding the denoiser over that many processes."""
    key, budget, peak_tflops = _device(gpu, memory)
    on_gpu = bool(key)
    mixed = on_gpu and cfg.train.mixed_precision != "no"
    bundle, _ = shapes_bundle(cfg)
    if shards > 1:
        from sdtune.train.shard import check_sharded

        named = {
            f"{c}.{n}": p for c, m in bundle.components().items() for n, p in m.named_parameters()
        }
        check_sharded(
            cfg, {n: p for n, p in named.items() if p.requires_grad}, bundle.arch.denoiser
        )
    memory_parts = measure_memory(bundle, cfg, mixed, on_gpu, shards)
    ckpt = cfg.model.gradient_checkpointing
    used = step_activations(bundle, cfg, ckpt, mixed, on_gpu, shards)
    other = step_activations(bundle, cfg, not ckpt, mixed, on_gpu, shards) if variants else None
    with_ckpt, without = (used, other) if cfg.model.gradient_checkpointing else (other, used)
    memory_parts["activations_and_gradients"] = used
    memory_parts["total"] = sum(memory_parts.values())
    flops = step_flops(bundle, cfg)
    notes = [
        "memory: a simulation of one step's allocations on the meta device; the CUDA context "
        "(about 0.5 GiB), the allocator's cache and kernel workspaces come on top (+5 to 15%)",
    ]
    if shards > 1:
        notes.append(
            f"memory: per process, FSDP sharding the {bundle.arch.denoiser} over {shards} "
            "processes (weights, optimizer state, EMA and gradients split; the text encoders "
            "and VAE whole on each); not yet checked against a sharded run on GPUs; "
            "evaluation needs one more float32 copy of it on the main process's device"
        )
    if mixed:
        notes.append(
            "memory: activations in half precision counted as 2 bytes a value (normalisations "
            "that autocast keeps in float32 are counted so too)"
        )
    utilisation = step = None
    source = "no device given (--gpu NAME, or --measure for this machine)"
    if not on_gpu:
        notes.append(
            "time: on a CPU the fixed cost of a step (the optimizer, Python) weighs as much as "
            "its FLOPs for small models, so no time is predicted from FLOPs: --measure times it"
        )
    if measured_step is not None:
        step, source = measured_step, "measured here (--measure)"
    elif on_gpu:
        mode = "compile" if cfg.train.compile else "eager"
        if key in MEASURED_UTILISATION:
            utilisation = MEASURED_UTILISATION[key][mode]
            source = f"at {utilisation:.0%} of its peak, as this project measured an SD 1.5 step on it ({mode})"
        else:
            utilisation = DEFAULT_UTILISATION
            source = f"at an assumed {utilisation:.0%} of its peak (no benchmark record for {key}: unsure, 2x either way)"
        step = flops["per_step"] / (peak_tflops * 1e12 * utilisation)
        if flops["per_step"] < SMALL_STEP_FLOPS:
            notes.append(
                f"time: {flops['per_step'] / 1e9:.3g} GFLOPs a step is too little work for a "
                "GPU to run at that utilisation (kernel launches and Python bound it instead): "
                "the time is a lower bound; --measure on the card times it"
            )
    total = step * cfg.train.max_steps if step is not None else None
    cost = total / 3600 * price if total is not None and price is not None else None
    plan = Plan(
        cfg.model.base,
        _component_counts(bundle),
        flops,
        memory_parts,
        {"with_checkpointing": with_ckpt, "without_checkpointing": without},
        step,
        utilisation,
        source,
        total,
        cost,
        budget,
        f"--gpu {gpu}" if gpu else ("--memory" if memory is not None else ""),
        notes=notes,
        shards=shards,
    )
    if variants and plan.fits is False:
        plan.suggestions = suggestions(cfg, gpu, memory, plan, shards)
    return plan


def _changed(cfg, sets: list[str]):
    """`cfg` with `--set` lines applied (validated as a config file would be)."""
    from sdtune.config import _apply_override, parse_override, to_dict, validate_config

    data = to_dict(cfg)
    for item in sets:
        keys, value = parse_override(item)
        _apply_override(data, keys, value, item)
    return validate_config(data, "sdtune plan")


def suggestions(cfg, gpu, memory, plan: Plan, shards: int = 1) -> list[str]:
    """The cheapest changes that make the run fit, each with its predicted peak: one at a
    time, in order of what they cost the run (speed, then quality), then combined."""
    options = []
    if not cfg.model.gradient_checkpointing:
        options.append(("model.gradient_checkpointing=true", "about 30% slower steps"))
    if cfg.train.optimizer in ("adamw", "adam"):
        options.append(
            ("train.optimizer=adamw8bit", "8-bit optimizer states (pip install 'sdtune[bnb]')")
        )
    if cfg.train.ema:
        options.append(("train.ema=false", "no EMA weights"))
    if not cfg.lora.enabled:
        options.append(("lora.enabled=true", "train a LoRA instead of every weight"))
    if cfg.train.batch_size > 1:
        half = max(1, cfg.train.batch_size // 2)
        accum = cfg.train.grad_accum * (cfg.train.batch_size // half)
        options.append(
            (
                f"train.batch_size={half},train.grad_accum={accum}",
                "the same global batch in smaller micro-batches",
            )
        )
    found, combined = [], []
    for sets, why in options:
        try:
            changed = _changed(cfg, sets.split(","))
            peak = make_plan(changed, gpu, memory, variants=False, shards=shards).peak
        except UserError:
            continue
        if peak <= plan.budget * GiB:
            found.append(f"--set {' --set '.join(sets.split(','))}: {_gib(peak)} ({why})")
    if not found:  # one change is not enough: add them up in order
        for sets, _ in options:
            combined += sets.split(",")
            try:
                changed = _changed(cfg, combined)
                peak = make_plan(changed, gpu, memory, variants=False, shards=shards).peak
            except UserError:
                continue
            if peak <= plan.budget * GiB:
                found.append(f"--set {' --set '.join(combined)}: {_gib(peak)} (together)")
                break
    return found or [
        "nothing sdtune can switch makes it fit: a larger card, or a smaller model or resolution"
    ]


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def render(plan: Plan, cfg) -> str:
    lines = [
        f"plan: {cfg.model.base}, {cfg.data.resolution} px, batch {cfg.train.batch_size} x grad_accum {cfg.train.grad_accum}, {cfg.train.max_steps} steps"
    ]
    lines.append("parameters:")
    for name, c in plan.components.items():
        lines.append(
            f"  {name:<16} {_count(c['parameters']):>10}   trains {_count(c['trainable'])}"
        )
    lines.append(
        f"FLOPs per step: {plan.flops['per_step'] / 1e12:.3g} TFLOP ({plan.flops['per_image'] / 1e9:.3g} GFLOP an image)"
    )
    lines.append("peak memory, per process (FSDP):" if plan.shards > 1 else "peak memory:")
    for name, value in plan.memory.items():
        if name != "total":
            lines.append(f"  {name.replace('_', ' '):<28} {_gib(value):>11}")
    a = plan.activations
    if a["with_checkpointing"] is not None and a["without_checkpointing"] is not None:
        lines.append(
            f"  (activations and gradients: {_gib(a['with_checkpointing'])} with gradient "
            f"checkpointing, {_gib(a['without_checkpointing'])} without; this config "
            f"{'checkpoints' if cfg.model.gradient_checkpointing else 'does not checkpoint'})"
        )
    lines.append(f"  {'total':<28} {_gib(plan.peak):>11}")
    if plan.step_seconds is not None:
        lines.append(
            f"time: {plan.step_seconds:.3g} s a step ({plan.time_source}); {plan.total_seconds / 3600:.3g} h for {cfg.train.max_steps} steps"
        )
    else:
        lines.append(f"time: {plan.time_source}")
    if plan.cost is not None:
        lines.append(f"cost: {plan.cost:.2f} at the price given per hour")
    if plan.fits is not None:
        verdict = "fits" if plan.fits else "does not fit"
        lines.append(f"{verdict} in {plan.budget:g} GiB ({plan.budget_source})")
        for s in plan.suggestions:
            lines.append(f"  to fit: {s}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


@dataclass
class Measured:
    """What a few real steps of the config took here."""

    step_seconds: float
    memory: dict[str, int]
    device: str

    @property
    def peak(self) -> int:
        return self.memory["total"]


def measure(cfg, steps: int = 3, say=print) -> Measured:
    """A few real training steps of `cfg` on this machine (weights loaded, a temporary run
    directory): the median step time, and the memory the run's own objects hold (weights,
    optimizer state, EMA) plus the peak one step allocates on top (followed tensor by tensor on
    a CPU; torch.cuda.max_memory_allocated on a GPU)."""
    import statistics
    import tempfile
    import time
    from pathlib import Path

    from sdtune.rundir import prepare_run_dir
    from sdtune.train.setup import setup
    from sdtune.train.step import train_step

    cfg = _changed(
        cfg,
        [
            f"train.max_steps={steps + 2}",
            "checkpoint.every_steps=0",
            "evaluate.every_steps=0",
            "evaluate.val_batches=0",
            "evaluate.judge=false",
            f"train.log_every={steps + 2}",
        ],
    )
    with tempfile.TemporaryDirectory(prefix="sdtune-plan-") as scratch:
        run_dir = prepare_run_dir(Path(scratch) / "run", False)
        run = setup(cfg, run_dir, None, lambda *_: None)
        device = run.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        train_step(run.ctx, run.state, False)  # the first: lazy state, kernels chosen
        times = []
        for _ in range(steps):
            sync()
            start = time.perf_counter()
            train_step(run.ctx, run.state, False)
            sync()
            times.append(time.perf_counter() - start)
        objects = run.objects
        params = [p for m in run.bundle.components().values() for p in m.parameters()]
        held = {
            "weights": _bytes(params),
            "optimizer": _bytes(
                [
                    v
                    for s in objects.optimizer.state.values()
                    for v in s.values()
                    if torch.is_tensor(v)
                ]
            ),
            "ema": _bytes(objects.ema.shadow_params) if objects.ema is not None else 0,
        }
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            train_step(run.ctx, run.state, True)  # a logged step: the update ratio's sample too
            step_peak = torch.cuda.max_memory_allocated() - base
        else:
            tracker = LiveTensors()
            with tracker:
                train_step(run.ctx, run.state, True)
            step_peak = tracker.peak
        held["step"] = step_peak
        held["total"] = sum(held.values())
        run.accelerator.end_training()
        if run.log is not None:
            run.log.close()
        run.progress.close()
    return Measured(statistics.median(times), held, str(device))


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
