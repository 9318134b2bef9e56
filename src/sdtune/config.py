"""The one typed configuration schema, its loading from TOML/YAML and `--set` overrides.

Every key is typed, defaulted and documented once: the attribute docstring is the help text
that `sdtune config show` prints. Unknown keys, wrong types and out-of-range values fail
before any work starts, naming the key (and the closest valid one for a typo).
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal

import tomllib
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from sdtune.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """`max_steps = true` is a mistake, not 1 (pydantic's lax mode would take it as 1)."""
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _numeric(field.annotation):
            raise PydanticCustomError("number_not_bool", "expected a number, not a boolean")
        return value


def _numeric(annotation: Any) -> bool:
    """Whether a field's type is a number (int, float, or optional/union ones) and not bool."""
    if annotation in (int, float):
        return True
    args = getattr(annotation, "__args__", ())
    return bool(args) and bool not in args and any(a in (int, float) for a in args)


class ModelConfig(Section):
    base: str = "preset:tiny-sd"
    """Base model: a diffusers folder, a hub id (local cache only), a single .safetensors/.ckpt file, or preset:NAME."""
    config_source: str | None = None
    """For a single-file base: a diffusers folder or cached hub id holding its component configs and tokenizer."""
    trainable: list[str] = ["unet.*"]
    """Parameters to train, as globs (or 're:' regexes) over names prefixed by component: unet., text_encoder., vae. (unet. also names SD3's transformer.)"""
    frozen: list[str] = []
    """Parameters to freeze even when `trainable` matches them (same pattern syntax)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability inside the UNet's residual blocks (0 keeps the base model's setting)."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass: less memory, about 30% more compute."""
    text_encoder_3: bool = True
    """SD 3.x: false leaves T5 out: not loaded (T5-XXL's 4.76B weights, 9.5 GB in bf16), its part of the conditioning zeros, as diffusers' pipeline without it; prompts then speak through the two CLIP encoders only (77 tokens)."""


class DatasetEntry(Section):
    """One of several image folders trained together ([[data.datasets]]); unset caption
    options take data.*'s."""

    path: Path
    """Image folder with same-stem captions or a metadata file, as data.path."""
    repeats: float = Field(1.0, gt=0.0, le=10000.0)
    """How many times each image counts per epoch; a fraction takes a fixed (seeded) share, e.g. 0.5 half of them, 1.5 all once and half twice."""
    caption_prefix: str = ""
    """Put before every caption of this folder, e.g. 'sks dog, '."""
    caption_suffix: str = ""
    """Put after every caption of this folder."""
    kohya_folders: bool = False
    """Read the folder as kohya-ss lays it out: subfolders 'N_text' (e.g. '10_sks dog') hold images repeated N times with 'text' before their captions (an image without a caption file is captioned 'text')."""
    caption_extension: str | None = Field(None, pattern=r"^\.[^./\\]+$")
    caption_column: str | None = Field(None, min_length=1)
    caption_template: str | None = None
    shuffle_tags: bool | None = None
    keep_tokens: int | None = Field(None, ge=0)
    tag_dropout: float | None = Field(None, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _template(self) -> DatasetEntry:
        if self.caption_template is not None and "{caption}" not in self.caption_template:
            raise ValueError(
                f"data.datasets: {self.path}: caption_template must hold '{{caption}}' "
                f"(got {self.caption_template!r})"
            )
        return self


class DataConfig(Section):
    source: Literal["folder", "digits"] = "digits"
    """Where the images come from: 'folder' (data.path; the default when data.path is set) or 'digits' (bundled UCI handwritten digits)."""
    path: Path | None = None
    """Image folder with same-stem .txt captions, or holding metadata.jsonl / metadata.csv (file_name, text)."""
    kohya_folders: bool = False
    """Read data.path as kohya-ss lays it out: subfolders 'N_text' (e.g. '10_sks dog') of images repeated N times with 'text' before their captions."""
    datasets: list[DatasetEntry] = []
    """Several image folders in one run, each with its repeats, caption prefix/suffix and caption options ([[data.datasets]] tables; instead of data.path)."""
    val_path: Path | None = None
    """Held-out folder for validation; when unset, data.val_fraction of the training data is held out."""
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of the data held out for validation when data.val_path is unset (split fixed by seed)."""
    split_seed: int | None = Field(None, ge=0, le=2**32 - 1)
    """Seed of the train/validation split and of fractional repeats (default: seed), so runs of several seeds (an ensemble's members) hold out the same images."""
    resolution: int = Field(512, ge=8, le=4096)
    """Training size: images are trained at about resolution x resolution pixels (the square itself without data.buckets)."""
    buckets: bool | list[tuple[int, int]] = True
    """Aspect-ratio buckets: each image is trained at the size of about data.resolution² pixels nearest its aspect ratio (every batch one size), instead of a centre square of it; or a list of [width, height] sizes; false: square crops."""
    max_aspect: float = Field(2.5, ge=1.0, le=8.0)
    """Most elongated bucket (long side / short side); wider images go to it and are cropped."""
    bucket_no_upscale: bool = False
    """Never upscale: an image smaller than its bucket gets a bucket of its own size (in multiples of the step)."""
    bucket_step: int | None = Field(None, ge=1, le=512)
    """Bucket sides are multiples of this (unset: the model's, 64 px for SD and SDXL at 256 px and above)."""
    center_crop: bool = True
    """Crop the centre after resizing (to the square or the bucket); false crops at a random (seeded) position."""
    masks: bool = False
    """Masked training: an image's mask (same stem + '_mask', e.g. cat_mask.png beside cat.png, or the same name in data.mask_path) weights its loss per pixel, white learned, black ignored (the subject without its background); images without one count whole."""
    mask_path: Path | None = None
    """Folder of masks named as the images (their relative paths) when they are not beside them; implies data.masks."""
    background: tuple[int, int, int] = (255, 255, 255)
    """RGB colour (0-255 each) that transparent pixels are composited onto: white by default, [0, 0, 0] for black."""
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    """Probability of a horizontal flip (keep 0 for text, digits or asymmetric subjects)."""
    rotation: float = Field(0.0, ge=0.0, le=45.0)
    """Maximum random rotation, in degrees."""
    color_jitter: float = Field(0.0, ge=0.0, le=1.0)
    """Strength of random brightness/contrast/saturation changes (0 disables)."""
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    """Probability of replacing a caption by the empty string (trains classifier-free guidance)."""
    caption_extension: str = Field(".txt", pattern=r"^\.[^./\\]+$")
    """Extension of the same-stem caption files in a folder dataset."""
    caption_column: str = Field("text", min_length=1)
    """The column of metadata.jsonl / metadata.csv that holds the captions (e.g. 'tags')."""
    caption_template: str | None = None
    """Each caption put into this text at '{caption}', e.g. 'a photo of {caption}, sks style' (unset: the caption as written)."""
    shuffle_tags: bool = False
    """Captions as comma-separated tags: shuffle their order for every example and epoch (seeded), after the first data.keep_tokens."""
    keep_tokens: int = Field(0, ge=0)
    """Leading tags that keep their place (and are never dropped): the trigger word and class, e.g. 'sks dog, ...' with 1."""
    tag_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Probability of leaving out each tag after the first data.keep_tokens, for every example and epoch (seeded)."""
    on_bad_file: Literal["skip", "error"] = "error"
    """What to do with an unreadable image or a missing caption: 'error' stops, 'skip' leaves it out (both name the file)."""
    num_workers: int = Field(0, ge=0, le=64)
    """DataLoader worker processes (0 loads in the training process); they are kept alive across epochs."""
    pin_memory: bool = True
    """Put batches in page-locked memory so that their copy to the GPU overlaps compute (GPU only)."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N training examples (after the split): for small experiments."""
    labels: list[int] | None = None
    """Keep only examples with these class labels (data.source='digits'), e.g. [9] or [0, 1, 2]."""
    cache_latents: bool = False
    """Encode every training image with the VAE once into data.cache_dir and train from the cached latent distributions (no random crop, rotation or colour jitter; flips are cached both ways)."""
    cache_text: bool = False
    """Encode every caption (and the empty one) with the frozen text encoder once into data.cache_dir."""
    cache_dir: Path | None = None
    """Folder of the latent/text cache; unset uses $XDG_CACHE_HOME/sdtune (~/.cache/sdtune). Entries are keyed by content, so runs can share it."""

    @model_validator(mode="before")
    @classmethod
    def _folder_when_path(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and "source" not in data
            and (data.get("path") is not None or data.get("datasets"))
        ):
            return {**data, "source": "folder"}
        return data

    @property
    def uses_masks(self) -> bool:
        """Whether loss masks are read (data.masks, or data.mask_path, which implies it)."""
        return self.masks or self.mask_path is not None

    @model_validator(mode="after")
    def _captions(self) -> DataConfig:
        if self.caption_template is not None and "{caption}" not in self.caption_template:
            raise ValueError(
                "data.caption_template must hold '{caption}' where the caption goes, "
                f"e.g. 'a photo of {{caption}}' (got {self.caption_template!r})"
            )
        if self.cache_text and (self.shuffle_tags or self.tag_dropout > 0):
            raise ValueError(
                "data.cache_text: data.shuffle_tags / data.tag_dropout change the captions every "
                "epoch, so their text states cannot be computed once; set data.cache_text=false"
            )
        return self

    @model_validator(mode="after")
    def _path_matches_source(self) -> DataConfig:
        if self.source == "folder" and self.path is None and not self.datasets:
            raise ValueError("data.path is required when data.source = 'folder'")
        if self.path is not None and self.datasets:
            raise ValueError(
                "data.path and data.datasets are both set: list every folder in data.datasets, "
                "or use data.path alone"
            )
        if self.datasets and self.source != "folder":
            raise ValueError("data.datasets are image folders: data.source must be 'folder'")
        if self.kohya_folders and self.datasets:
            raise ValueError(
                "data.kohya_folders: with data.datasets, set kohya_folders in each [[data.datasets]]"
            )
        if self.source == "digits" and self.path is not None:
            raise ValueError(
                "data.path is not used when data.source = 'digits': remove one of them"
            )
        if self.labels is not None and self.source != "digits":
            raise ValueError("data.labels filters the digits source only (data.source = 'digits')")
        if self.cache_latents:
            check_cacheable(self)
        if self.labels is not None and not all(0 <= k <= 9 for k in self.labels):
            raise ValueError(f"data.labels: digit labels are 0..9 (got {self.labels})")
        return self


def check_cacheable(spec) -> None:
    """Raise ConfigError when a random transform would make cached latents wrong (`spec`: the
    data section, or the transform built from it).

    A flip has two outcomes, so both orientations are cached; a random crop, rotation or
    colour jitter has a new outcome every epoch, so its latents cannot be computed once.
    """
    random = []
    if not spec.center_crop:
        random.append("data.center_crop=false (random crop)")
    if spec.rotation > 0:
        random.append(f"data.rotation={spec.rotation:g}")
    if spec.color_jitter > 0:
        random.append(f"data.color_jitter={spec.color_jitter:g}")
    if random:
        raise ConfigError(
            f"data.cache_latents: {' and '.join(random)} changes every image each epoch, so its "
            "latents cannot be cached; turn that augmentation off or set data.cache_latents=false"
        )


class DiffusionConfig(Section):
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """What the UNet predicts: the noise or the velocity; unset keeps the base model's choice."""
    noise_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] | None = None
    """Beta schedule of the forward process; unset keeps the base model's schedule."""
    num_train_timesteps: int = Field(1000, ge=10, le=10000)
    """Number of diffusion timesteps T (used only when the schedule is set here or for presets)."""
    min_snr_gamma: float | None = Field(None, gt=0.0)
    """Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's choice, unset disables."""
    noise_offset: float = Field(0.0, ge=0.0, le=1.0)
    """Offset noise strength: adds a per-channel constant to the noise (helps very dark/bright images)."""
    timestep_sampling: Literal["uniform", "low_discrepancy", "logit_normal"] = "uniform"
    """How a batch's timesteps are drawn: 'uniform' (each on its own), 'low_discrepancy' (spread evenly over [0, T) from one random offset, Kingma et al. 2021: steadier gradients for small batches and few images) or 'logit_normal' (t / T the sigmoid of a normal of diffusion.timestep_logit_mean/std: most training at mid noise, as SD3 trains)."""
    timestep_logit_mean: float = Field(0.0, ge=-10.0, le=10.0)
    """timestep_sampling = 'logit_normal': the normal's mean (above 0 trains noisier timesteps more)."""
    timestep_logit_std: float = Field(1.0, gt=0.0, le=10.0)
    """timestep_sampling = 'logit_normal': the normal's standard deviation."""
    timestep_bias: Literal["none", "earlier", "later", "range"] = "none"
    """Make some timesteps diffusion.timestep_bias_multiplier times as likely: 'earlier' (the least noisy timestep_bias_portion: fine detail), 'later' (the noisiest portion: composition, colour) or 'range' (the fractions diffusion.timestep_bias_range of the schedule)."""
    timestep_bias_portion: float = Field(0.25, gt=0.0, lt=1.0)
    """timestep_bias = 'earlier' / 'later': the fraction of the schedule favoured."""
    timestep_bias_multiplier: float = Field(2.0, gt=0.0, le=100.0)
    """How many times as likely the favoured timesteps are (below 1 makes them rarer)."""
    timestep_bias_range: tuple[float, float] | None = None
    """timestep_bias = 'range': [low, high) as fractions of the schedule, e.g. [0.6, 1.0] for the noisiest 40%."""
    loss: Literal["mse", "huber", "pseudo_huber"] = "mse"
    """Training loss on the prediction's error r: 'mse' (r²), 'huber' (r² below diffusion.huber_delta, linear above) or 'pseudo_huber' (its smooth form, 2 delta (sqrt(r² + delta²) - delta)): the Huber losses let outlying images pull less (Khrapov & Lu 2024). The validation loss stays plain MSE, comparable across runs."""
    huber_delta: float = Field(0.1, gt=0.0, le=10.0)
    """loss = 'huber' / 'pseudo_huber': the error beyond which the loss grows linearly (0.1 as kohya-ss's huber_c)."""
    input_perturbation: float = Field(0.0, ge=0.0, le=1.0)
    """Input perturbation (Ning et al. 2023): the input is noised with eps + this x a second noise while the target stays eps; 0.1 is the paper's choice, 0 disables."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule so its last timestep is pure noise (Lin et al. 2024): a model then learns to make very dark or bright images; needs v-prediction (diffusion.prediction_type = 'v_prediction'), and samplers use trailing timesteps. Sample with evaluate.guidance_rescale = 0.7."""
    flow_sampling: Literal["logit_normal", "uniform", "mode"] = "logit_normal"
    """Flow-matching models (SD3): how the noise levels are drawn before the shift: 'logit_normal' (the sigmoid of a normal, SD3's default: most training in the middle), 'uniform', or 'mode' (SD3's mode sampling, diffusion.flow_mode_scale)."""
    flow_logit_mean: float = Field(0.0, ge=-10.0, le=10.0)
    """flow_sampling = 'logit_normal': the normal's mean (above 0 trains noisier levels more)."""
    flow_logit_std: float = Field(1.0, gt=0.0, le=10.0)
    """flow_sampling = 'logit_normal': the normal's standard deviation."""
    flow_mode_scale: float = Field(1.29, ge=-1.0, le=1.5)
    """flow_sampling = 'mode': SD3's scale (0 is uniform; 1.29 SD3's choice)."""
    flow_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """Flow-matching models: per-example loss weights: 'none', 'sigma_sqrt' (1/s², SD3's) or 'cosmap' (the cosine map of Esser et al. 2024)."""
    flow_shift: float | None = Field(None, gt=0.0, le=100.0)
    """Flow-matching models: shift the noise levels toward the noise, s' = a s / (1 + (a - 1) s), in training and sampling alike (SD3 uses 3.0 at 1024 px); unset: the model scheduler's shift."""
    flow_shift_resolution: int | None = Field(None, ge=8, le=8192)
    """Flow-matching models: scale the training shift with the image side, a x side / this (SD3's resolution-dependent shift, e.g. 1024 with flow_shift 3.0); unset: one shift for every size."""

    @model_validator(mode="after")
    def _bias_range(self) -> DiffusionConfig:
        span = self.timestep_bias_range
        if span is not None and not 0.0 <= span[0] < span[1] <= 1.0:
            raise ValueError(
                f"diffusion.timestep_bias_range = {list(span)}: give [low, high) with "
                "0 <= low < high <= 1 (fractions of the schedule)"
            )
        if (self.timestep_bias == "range") != (span is not None):
            raise ValueError(
                "diffusion.timestep_bias = 'range' and diffusion.timestep_bias_range go "
                "together: set both (e.g. timestep_bias_range = [0.6, 1.0]) or neither"
            )
        return self


class TrainConfig(Section):
    max_steps: int = Field(1000, ge=1)
    """Number of optimizer steps to train."""
    max_epochs: float | None = Field(None, gt=0.0, le=1e6)
    """Train this many passes over the training images instead of train.max_steps (which is then ceil(epochs x images / global batch), said at start; unset: train.max_steps)."""
    batch_size: int = Field(8, ge=1)
    """Micro-batch size per process; the global batch is batch_size x grad_accum x processes."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0)
    """Peak learning rate."""
    text_encoder_lr: float | None = Field(None, gt=0.0, le=1.0)
    """Learning rate for text-encoder parameters when they are trainable (unset: learning_rate)."""
    text_encoder_2_lr: float | None = Field(None, gt=0.0, le=1.0)
    """Learning rate for the second text encoder (SDXL's OpenCLIP bigG) when it trains (unset: text_encoder_lr)."""
    text_encoder_steps: int | None = Field(None, ge=0)
    """Stop training the text encoder (weights or LoRA) after this many steps; the UNet goes on (unset: never)."""
    optimizer: Literal[
        "adamw", "adam", "rmsprop", "sgd", "adamw8bit", "adafactor", "prodigy", "lion",
        "adamw_schedulefree",
    ] = "adamw"  # fmt: skip
    """Optimizer: AdamW (decoupled weight decay), Adam, RMSprop, SGD with momentum, AdamW with 8-bit states (bitsandbytes: pip install 'sdtune[bnb]'; a quarter of AdamW's state memory), Adafactor (factored second moments, about no state memory; at train.learning_rate, not its own relative step size), Prodigy (estimates its own step size: set train.learning_rate = 1.0, which scales it), Lion (sign of the momentum: one state per weight; about 3-10x lower learning rate and higher weight decay than AdamW), or schedule-free AdamW (no schedule: train.lr_schedule stays 'constant', train.warmup_steps is its warmup; evaluations, samples and exports use its averaged weights)."""
    lion_betas: tuple[float, float] = (0.9, 0.99)
    """Lion's beta1 (the update's interpolation) and beta2 (the momentum's decay)."""
    prodigy_d_coef: float = Field(1.0, gt=0.0, le=100.0)
    """Prodigy: multiplies its estimated step size (below 1 damps it, e.g. 0.5 when it overshoots)."""
    fused_optimizer: bool = True
    """Use PyTorch's fused AdamW/Adam/SGD kernel (CPU and GPU): faster, and AdamW/Adam skip a bad step on the device, without a host-device sync (not under fp16's loss scaler)."""
    weight_decay: float = Field(1e-2, ge=0.0, le=1.0)
    """Weight decay (decoupled for AdamW, L2 for the others)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW beta1 and beta2."""
    adam_eps: float = Field(1e-8, gt=0.0)
    """Adam/AdamW/RMSprop epsilon."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """Momentum for SGD and RMSprop."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps from 0 to learning_rate."""
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """Clip the global gradient norm to this value (unset disables clipping)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision on GPU (bf16 on Ampere and newer; fp16 adds a loss scaler); CPU always trains in float32."""
    tf32: bool = True
    """Let float32 matmuls and convolutions use TF32 tensor cores (Ampere and newer GPUs; no effect on CPU)."""
    attention: Literal["sdpa", "flash", "efficient", "cudnn", "math", "xformers"] = "sdpa"
    """Attention kernel: 'sdpa' lets PyTorch pick (flash where available); flash, efficient, cudnn or math force one SDPA backend; xformers needs pip install xformers."""
    channels_last: bool = False
    """Keep the UNet's activations in channels-last memory order (often faster convolutions on GPU tensor cores)."""
    compile: bool = False
    """torch.compile the UNet: faster steps after a compilation of a minute or more at the first step."""
    ema: bool = True
    """Keep an exponential moving average of the trainable weights (used for samples and export)."""
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0)
    """EMA decay per optimizer step."""
    spike_factor: float | None = Field(None, gt=1.0)
    """Roll back when a step's loss exceeds this multiple of the running median (unset: no spike check)."""
    spike_window: int = Field(50, ge=5)
    """Steps in the running median of the spike check (it starts once the window is full)."""
    max_bad_steps: int = Field(5, ge=1)
    """Roll back after this many non-finite steps in a row (each one is skipped)."""
    rollback_lr_factor: float = Field(0.5, gt=0.0, lt=1.0)
    """Multiply the learning rate by this at each rollback to the last verified checkpoint."""
    max_rollbacks: int = Field(3, ge=0)
    """Stop with an error after this many rollbacks (0: never roll back, stop at once)."""
    log_every: int = Field(10, ge=1)
    """Write metrics (loss, lr, grad norm, images/s) every N steps."""
    log_update_ratio: bool = True
    """Also log |update| / |weights| on those steps (from a copy of at most 64 MiB of the weights, taken before the step: all of them when they fit, else an evenly strided sample)."""

    @model_validator(mode="after")
    def _optimizer_settings(self) -> TrainConfig:
        if self.optimizer == "prodigy" and self.learning_rate < 0.1:
            raise ValueError(
                f"train.learning_rate = {self.learning_rate:g} with Prodigy, which estimates its "
                "own step size and multiplies it by this: set train.learning_rate = 1.0 "
                "(train.prodigy_d_coef damps it)"
            )
        if self.optimizer == "adamw_schedulefree" and self.lr_schedule != "constant":
            raise ValueError(
                f"train.lr_schedule = '{self.lr_schedule}' with schedule-free AdamW, which "
                "replaces the schedule by averaging: leave train.lr_schedule = 'constant'"
            )
        return self


class CheckpointConfig(Section):
    every_steps: int = Field(0, ge=0)
    """Save a checkpoint every N steps (0: only at the end of training, on a signal, or by time)."""
    every_epochs: float | None = Field(None, gt=0.0)
    """Save every N passes over the training images instead (the step count said at start)."""
    every_minutes: float | None = Field(None, gt=0.0)
    """Also save when this many minutes have passed since the last save (unset disables)."""
    keep_last: int | None = Field(3, ge=1)
    """Keep the N newest checkpoints (unset keeps all); older ones are deleted after a successful save."""
    keep_every: int = Field(0, ge=0)
    """Also keep every checkpoint whose step is a multiple of this (0 disables)."""
    keep_best: str | None = None
    """Also keep the best checkpoint by this evaluation metric (e.g. 'val_loss'); a new best is saved at once."""
    keep_best_mode: Literal["min", "max"] = "min"
    """Whether the keep_best metric is better when lower ('min') or higher ('max')."""


class EarlyStopConfig(Section):
    metric: str | None = None
    """Evaluation metric to watch, e.g. 'val_loss_ema' or 'val_loss'; unset disables early stopping."""
    mode: Literal["min", "max"] = "min"
    """Whether the metric is better when lower ('min') or higher ('max')."""
    patience: int = Field(3, ge=1)
    """Stop after this many evaluations in a row without improvement."""
    min_delta: float = Field(0.0, ge=0.0)
    """An evaluation improves only when it beats the best so far by more than this."""


class EvaluateConfig(Section):
    every_steps: int = Field(0, ge=0)
    """Validation loss and a sample grid every N steps (0: only at the end)."""
    every_epochs: float | None = Field(None, gt=0.0)
    """Evaluate every N passes over the training images instead (the step count said at start)."""
    before_training: bool | None = None
    """Validation loss and the sample grid of the base model before the first step (samples/step-0000000.png), to compare with the end (unset: when fine-tuning a trained base, i.e. model.base is not a preset)."""
    prompts: list[str] = []
    """Prompts for the sample grid; empty uses the ten digit prompts for data.source='digits'."""
    sample_size: tuple[int, int] | None = None
    """[width, height] of the sample grid's images, e.g. [768, 512] for a set of landscapes (unset: the data.resolution square)."""
    num_per_prompt: int = Field(2, ge=1, le=64)
    """Images per prompt in the sample grid."""
    seed: int = Field(1234, ge=0, le=2**32 - 1)
    """Seed of the sample grid's noise (fixed, so grids over time are comparable)."""
    sample_steps: int = Field(25, ge=1, le=1000)
    """Denoising steps when sampling."""
    guidance_scale: float = Field(3.0, ge=0.0)
    """Classifier-free guidance scale when sampling (1 disables guidance)."""
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0)
    """Rescale the guided prediction toward the conditional one's standard deviation (Lin et al. 2024, sec. 3.4): over-exposure at high guidance goes; 0.7 is the paper's choice with diffusion.zero_terminal_snr, 0 disables."""
    scheduler: Literal["ddim", "euler", "dpm++"] = "ddim"
    """Sampler used for grids and judging."""
    val_batches: int = Field(4, ge=0)
    """Batches of the held-out split used for the validation loss (0 skips it)."""
    judge: bool = False
    """At the end, generate judge_per_class images per digit and print judged_accuracy (digits source only)."""
    judge_per_class: int = Field(20, ge=1, le=1000)
    """Images per digit generated for the judge."""
    metrics_every: int = Field(0, ge=0)
    """Generator metrics (precision/recall, diversity, memorisation, judged accuracy) every N steps (0: off)."""
    metrics_images: int = Field(100, ge=10, le=10000)
    """Images generated for the generator metrics."""
    early_stop: EarlyStopConfig = EarlyStopConfig()
    overfit_patience: int = Field(3, ge=0)
    """Warn when validation loss rises this many evaluations in a row while training loss falls (0: never)."""


class StageConfig(Section):
    until_step: int = Field(ge=1)
    """The stage lasts until this optimizer step (exclusive of the next stage's first); stages in increasing order."""
    resolution: int | None = Field(None, ge=8, le=4096)
    """Train at this resolution during the stage (low first, as SD was trained 256 then 512); unset: data.resolution."""
    timesteps: tuple[float, float] | None = None
    """The stage's timestep range as fractions [low, high) of the schedule (e.g. [0.5, 1.0]: the noisier half); unset: all."""
    labels: list[int] | None = None
    """Train on these labels only (the digits' labels); unset: every example."""
    caption_contains: str | None = None
    """Train on the examples whose caption holds this text (case-insensitive); unset: every example."""
    difficulty: tuple[float, float] | None = None
    """Train on the examples whose difficulty score (the 'difficulty' column of the folder's metadata.jsonl / metadata.csv) lies in [low, high], e.g. [0, 0.5] for the easier half of a 0-1 score; unset: every example."""
    easiest: float | None = Field(None, gt=0.0, le=1.0)
    """Train on this fraction of the examples the current model finds easiest (lowest loss at fixed noise, scored at the stage's start and saved in RUN/curriculum/); unset: all."""
    lr_scale: float = Field(1.0, gt=0.0, le=100.0)
    """The learning rate times this during the stage."""

    @model_validator(mode="after")
    def _range(self) -> StageConfig:
        if self.timesteps is not None and not 0.0 <= self.timesteps[0] < self.timesteps[1] <= 1.0:
            raise ValueError(
                f"curriculum.stages: timesteps {list(self.timesteps)} must be [low, high) with "
                "0 <= low < high <= 1 (fractions of the noise schedule)"
            )
        if self.difficulty is not None and not self.difficulty[0] <= self.difficulty[1]:
            raise ValueError(
                f"curriculum.stages: difficulty {list(self.difficulty)} must be [low, high] "
                "with low <= high"
            )
        if self.labels is not None and not self.labels:
            raise ValueError("curriculum.stages: labels is empty; leave it out to use every label")
        return self


class CurriculumConfig(Section):
    stages: list[StageConfig] = []
    """[[curriculum.stages]]: each with its until_step and what differs in it (resolution, timesteps, data subset by labels / caption / difficulty score or easiest first, lr_scale); after the last stage, training goes on as the rest of the config says."""

    @model_validator(mode="after")
    def _increasing(self) -> CurriculumConfig:
        ends = [s.until_step for s in self.stages]
        if any(b <= a for a, b in zip(ends, ends[1:])):
            raise ValueError(
                f"curriculum.stages: until_step must increase stage by stage (got {ends})"
            )
        return self


class MonitorConfig(Section):
    trackers: list[Literal["wandb", "mlflow"]] = []
    """Extra experiment trackers through Accelerate (TensorBoard and metrics.jsonl are always written)."""
    project: str = "sdtune"
    """Project (W&B) or experiment (MLflow) name for the trackers."""


class ParamGroup(Section):
    params: list[str]
    """Globs (or 're:' regexes) over trainable parameter names, as in model.trainable."""
    lr: float | None = Field(None, gt=0.0, le=1.0)
    """Learning rate of this group (unset: the component's default)."""
    weight_decay: float | None = Field(None, ge=0.0, le=1.0)
    """Weight decay of this group (unset: train.weight_decay)."""


class OptimizerConfig(Section):
    param_groups: list[ParamGroup] = []
    """Per-group settings; a parameter joins the first group whose pattern matches it, the rest keep the defaults."""


class LoraConfig(Section):
    enabled: bool = False
    """Train low-rank adapters (peft LoRA) instead of the base weights, which stay frozen."""
    variant: Literal["lora", "dora", "loha", "lokr"] = "lora"
    """The adapter, as peft implements it: 'lora' (B A), 'dora' (LoRA plus a learned magnitude per output channel, Liu et al. 2024), 'loha' (Hadamard product of two low-rank products) or 'lokr' (Kronecker product of a small and a low-rank factor). ComfyUI and AUTOMATIC1111 load LoRA, LoHa and LoKr from RUN/model/lora_kohya.safetensors; DoRA's magnitude they read differently from peft, so for them export the merged model."""
    rank: int = Field(16, ge=1, le=1024)
    """Rank r of each adapter."""
    lokr_factor: int = Field(-1, ge=-1)
    """LoKr: the size of the small Kronecker factor's sides (it must divide the weight's sides; -1: as near a square split as the sides allow)."""
    alpha: float | None = Field(None, gt=0.0)
    """Scale numerator: the update is (alpha / rank) * B A (unset: alpha = rank)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    unet_targets: list[str] | None = Field(None, min_length=1)
    """Denoiser module names (suffixes) that get adapters (unset: the family's default, for SD and SDXL the attention and feed-forward projections: to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2)."""
    text_encoder: bool = False
    """Also put adapters on the text encoder (its learning rate is train.text_encoder_lr)."""
    text_encoder_targets: list[str] | None = Field(None, min_length=1)
    """Text-encoder module names (suffixes) that get adapters (unset: the family's default, for CLIP q_proj, k_proj, v_proj, out_proj, fc1, fc2)."""
    preserve_prompts: list[str] = []
    """Output preservation: prompts whose images must not change, e.g. ['a photo of a dog'] or the other subjects the model draws. Each step the frozen base predicts the batch's noisy latents under them and the adapted model is pulled towards it: prior preservation without class images."""
    preserve_weight: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    """Weight of the output-preservation loss (lora.preserve_prompts) next to the instance loss."""

    @model_validator(mode="after")
    def _variant_settings(self) -> LoraConfig:
        if self.variant in ("loha", "lokr") and self.dropout > 0:
            raise ValueError(
                f"lora.dropout = {self.dropout:g}: peft's LoHa and LoKr have no input dropout; "
                "leave lora.dropout at 0 with lora.variant = '" + self.variant + "'"
            )
        if self.lokr_factor == 0 or (self.lokr_factor != -1 and self.variant != "lokr"):
            raise ValueError(
                "lora.lokr_factor: -1 or a side length of at least 1, with lora.variant = 'lokr'"
            )
        return self


class TextualInversionConfig(Section):
    token: str | None = None
    """The new token to learn, e.g. '<my-cat>' (unset disables textual inversion)."""
    init_word: str = "a"
    """Word whose embedding initialises the new vectors (a single token, e.g. the class: 'cat')."""
    num_vectors: int = Field(1, ge=1, le=64)
    """Embedding vectors behind the token (more vectors, more capacity)."""


class DreamBoothConfig(Section):
    instance_prompt: str | None = None
    """Prompt of every instance image, with the identifier, e.g. 'a photo of sks dog' (unset disables DreamBooth)."""
    class_prompt: list[str] = []
    """Prompt(s) of the class images, e.g. ['a photo of a dog']; several are cycled."""
    class_path: Path | None = None
    """Folder of class images; unset uses RUN/class_images. Missing images are generated from the base model."""
    num_class_images: int = Field(100, ge=0)
    """Class images wanted; fewer on disk are topped up by sampling the base model (kept for resume)."""
    prior_loss_weight: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    """Weight of the prior-preservation loss on class images (0 disables prior preservation)."""
    class_guidance_scale: float = Field(5.0, ge=0.0)
    """Guidance scale for generating class images."""
    class_sample_steps: int = Field(25, ge=1, le=1000)
    """Denoising steps for generating class images (the sampler is evaluate.scheduler)."""
    prior_target: Literal["noise", "base"] = "noise"
    """What the class images' prior loss pulls toward: 'noise' (DreamBooth's: their true noise, so the model also learns the class images' own flaws, which for generated ones are the base's sampling errors) or 'base' (with LoRA: what the frozen base predicts for them, so the prior loss is zero until the adapters change the class and counts only that change)."""


class RunConfig(Section):
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed of every random draw: data order, augmentations, noise, timesteps, dropout."""
    output_dir: Path = Path("runs/run")
    """Run directory (config, metrics, samples, checkpoints, final model); --output overrides it."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    monitor: MonitorConfig = MonitorConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    lora: LoraConfig = LoraConfig()
    textual_inversion: TextualInversionConfig = TextualInversionConfig()
    dreambooth: DreamBoothConfig = DreamBoothConfig()
    curriculum: CurriculumConfig = CurriculumConfig()

    @model_validator(mode="before")
    @classmethod
    def _adapters_freeze_the_base(cls, data: Any) -> Any:
        """LoRA and textual inversion train their own parameters: model.trainable defaults to []."""
        if not isinstance(data, dict):
            return data
        lora = data.get("lora") or {}
        ti = data.get("textual_inversion") or {}
        model = data.get("model") or {}
        adapted = (isinstance(lora, dict) and lora.get("enabled")) or (
            isinstance(ti, dict) and ti.get("token")
        )
        if adapted and isinstance(model, dict) and "trainable" not in model:
            return {**data, "model": {**model, "trainable": []}}
        return data

    @model_validator(mode="after")
    def _curriculum_fits_the_run(self) -> RunConfig:
        stages = self.curriculum.stages
        if stages and stages[-1].until_step > self.train.max_steps:
            raise ValueError(
                f"curriculum.stages: the last stage lasts until step {stages[-1].until_step}, "
                f"past train.max_steps = {self.train.max_steps}"
            )
        return self

    @model_validator(mode="after")
    def _dreambooth_needs_class_prompts(self) -> RunConfig:
        db = self.dreambooth
        if db.instance_prompt is not None and db.prior_loss_weight > 0 and db.num_class_images:
            if not db.class_prompt:
                raise ValueError(
                    "dreambooth.class_prompt is required for prior preservation "
                    "(or set dreambooth.prior_loss_weight = 0)"
                )
        if db.prior_target == "base" and (not self.lora.enabled or self.model.trainable):
            raise ValueError(
                "dreambooth.prior_target = 'base' needs LoRA with every base weight frozen "
                "(lora.enabled = true, model.trainable = []): the base without the adapters "
                "gives the class images' target"
            )
        return self

    @model_validator(mode="after")
    def _preservation_needs_lora(self) -> RunConfig:
        if self.lora.preserve_prompts and not self.lora.enabled:
            raise ValueError(
                "lora.preserve_prompts needs lora.enabled = true (the base without the "
                "adapters gives the predictions to preserve)"
            )
        if self.lora.preserve_prompts and self.model.trainable:
            raise ValueError(
                "lora.preserve_prompts needs every base weight frozen (its predictions are the "
                f"target), but model.trainable = {self.model.trainable}; set it to [] or drop "
                "lora.preserve_prompts"
            )
        # a textual-inversion token's vectors may train alongside (pivotal tuning): the
        # preserved prompts must not read them
        token = self.textual_inversion.token
        using = [p for p in self.lora.preserve_prompts if token is not None and token in p]
        if using:
            raise ValueError(
                f"lora.preserve_prompts: {using[0]!r} uses the new token {token}, which trains "
                "(textual_inversion.token); preserve prompts without it"
            )
        return self

    @model_validator(mode="after")
    def _metrics_are_measured(self) -> RunConfig:
        from sdtune.evaluate.names import measured_metrics

        measured = measured_metrics(self)
        for key, metric in (
            ("checkpoint.keep_best", self.checkpoint.keep_best),
            ("evaluate.early_stop.metric", self.evaluate.early_stop.metric),
        ):
            if metric is None or metric in measured:
                continue
            close = difflib.get_close_matches(metric, measured, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            known = (
                ", ".join(measured) if measured else "nothing (no held-out data, or no evaluation)"
            )
            raise ValueError(
                f"{key}: '{metric}' is not a metric this config measures{hint}; it measures {known}"
            )
        return self

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> RunConfig:
        for section, steps, epochs in (
            ("train", "max_steps", "max_epochs"),
            ("checkpoint", "every_steps", "every_epochs"),
            ("evaluate", "every_steps", "every_epochs"),
        ):
            part = getattr(self, section)
            if getattr(part, epochs) is not None and steps in part.model_fields_set:
                raise ValueError(
                    f"{section}.{steps} and {section}.{epochs} are both set; keep one of them"
                )
        return self

    @model_validator(mode="after")
    def _judge_needs_digits(self) -> RunConfig:
        if self.evaluate.judge and self.data.source != "digits":
            raise ValueError("evaluate.judge needs data.source = 'digits' (it judges digit images)")
        return self


def in_steps(cfg: RunConfig, images: int, processes: int) -> tuple[RunConfig, list[str]]:
    """`cfg` with every *_epochs key turned into its step count for `images` training images
    over `processes` processes (an epoch is images / global batch steps), and what was done."""
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * processes
    per_epoch = images / global_batch
    said, update = [], {}
    if cfg.train.max_epochs is not None:
        steps = max(1, math.ceil(cfg.train.max_epochs * per_epoch - 1e-9))
        update["train"] = cfg.train.model_copy(update={"max_steps": steps})
        said.append(
            f"train.max_epochs={cfg.train.max_epochs:g}: {steps} steps ({images} images, "
            f"global batch {global_batch}: {per_epoch:.4g} steps an epoch)"
        )
    for section in ("checkpoint", "evaluate"):
        part = getattr(cfg, section)
        if part.every_epochs is not None:
            every = max(1, round(part.every_epochs * per_epoch))
            update[section] = part.model_copy(update={"every_steps": every})
            said.append(f"{section}.every_epochs={part.every_epochs:g}: every {every} steps")
    return (cfg.model_copy(update=update) if update else cfg), said


# --------------------------------------------------------------------------- loading


class _YamlLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false, so `mixed_precision: no` stays the
    string 'no' (YAML 1.1, PyYAML's default, reads no/yes/on/off as booleans)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _read_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the .toml or .yaml file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"{path}: config files must end in .toml, .yaml or .yml")
    from sdtune.files import read_user_text

    text = read_user_text(path)
    if not text.strip() or all(
        not line.strip() or line.lstrip().startswith("#") for line in text.splitlines()
    ):
        raise ConfigError(
            f"{path}: the config file is empty; set at least the keys you mean to "
            "(examples/quickstart.toml shows a complete one)"
        )
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else _yaml(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {first}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of keys")
    return data


def _section_fields(path: tuple[str, ...]) -> dict[str, Any]:
    """The fields of the (nested) section at `path`, or {} if it is not a section."""
    model: type[BaseModel] = RunConfig
    for part in path:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return {}
        model = ann
    return model.model_fields


def _unknown_key_message(loc: tuple[str, ...]) -> str:
    key = ".".join(loc)
    fields = _section_fields(loc[:-1])
    close = difflib.get_close_matches(loc[-1], list(fields), n=1, cutoff=0.6)
    if not close:  # a key in the wrong section, e.g. max_steps at top level
        everywhere = [".".join(p) for p in all_keys()]
        close = [k for k in everywhere if k.split(".")[-1] == loc[-1]][:1]
        hint = f" (did you mean '{close[0]}'?)" if close else ""
    else:
        hint = f" (did you mean '{'.'.join(loc[:-1] + (close[0],))}'?)"
    return f"unknown key '{key}'{hint}"


def all_keys() -> list[tuple[str, ...]]:
    """Every leaf key of the schema as a path tuple."""
    out: list[tuple[str, ...]] = []

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, prefix + (name,))
            else:
                out.append(prefix + (name,))

    walk(RunConfig, ())
    return out


def _format_errors(exc: ValidationError, where: str) -> str:
    parts = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
        if err["type"] == "extra_forbidden":
            parts.append(_unknown_key_message(loc))
            continue
        key = ".".join(loc) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, dict) or err["type"] == "value_error" else f" (got {got!r})"
        parts.append(msg if err["type"] == "value_error" else f"{key}: {msg}{shown}")
    return f"{where}: " + "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `--set a.b=value`; the value is read as a YAML scalar/list (1, 0.5, true, [a, b])."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=100")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: the key is empty")
    if any(not part.strip() for part in key.split(".")):
        raise ConfigError(
            f"--set {item!r}: '{key}' has an empty part; keys look like train.max_steps"
        )
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(data: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item}: '{'.'.join(path[: i + 1])}' is not a section")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a config file (TOML or YAML; None for defaults), apply `--set` overrides, validate."""
    data = _read_file(Path(path)) if path is not None else {}
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(data, keys, value, item)
    where = str(path) if path is not None else "config"
    if overrides:
        where += " (with --set overrides)"
    return validate_config(data, where)


def validate_config(data: dict[str, Any], where: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, where)) from None


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data (paths as strings, no None: TOML has no null)."""

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items() if v is not None}
        if isinstance(node, list | tuple):
            return [clean(v) for v in node]
        return node

    return clean(cfg.model_dump(mode="json"))


def to_toml(cfg: RunConfig, with_help: bool = False) -> str:
    """Render the resolved config as TOML, optionally with each key's help text as a comment."""
    import tomli_w

    data = to_dict(cfg)
    if not with_help:
        return tomli_w.dumps(data)
    lines: list[str] = []

    def emit(model: type[BaseModel], values: dict[str, Any], prefix: str) -> None:
        subs = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                subs.append((name, ann))
                continue
            if field.description:
                lines.append(f"# {field.description}")
            if name in values:
                lines.append(tomli_w.dumps({name: values[name]}).strip())
            else:
                lines.append(f"# {name} = (unset)")
        for name, ann in subs:
            lines.append("")
            lines.append(f"[{prefix}{name}]")
            emit(ann, values.get(name, {}), f"{prefix}{name}.")

    emit(RunConfig, data, "")
    return "\n".join(lines) + "\n"
