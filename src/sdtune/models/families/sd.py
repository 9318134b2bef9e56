"""Stable Diffusion 1.x and 2.x (epsilon and v-prediction), and the models of that layout:
one `UNet2DConditionModel` cross-attending to one CLIP text encoder's last hidden states, a
KL VAE (or none: pixel-space models such as the quickstart's), DDPM.

Variants differ only in what they are called and what their single files may hold:
`sd1` (768-wide cross-attention), `sd2` (1024), `custom` (another size of the same layout,
such as `preset:tiny-sd`) and `pixel` (no VAE, such as `preset:tiny-digits`).
"""

from __future__ import annotations

import contextvars
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdtune.errors import ConfigError, ModelError, UserError
from sdtune.models.families.base import Conditioning, Family

A1111_KEY = "emb_params"  # AUTOMATIC1111's safetensors embedding key; diffusers reads it too
KOHYA_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "custom": "sd_v1", "pixel": "sd_v1"}


def load_component(path: Path, name: str, load):
    """`load()` of component `name` of the folder at `path`, failures as one line."""
    try:
        return load()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model.base: cannot load {path / name}: {first}") from exc


_SHAPES_ONLY = contextvars.ContextVar("sdtune_shapes_only", default=False)


@contextmanager
def shapes_only():
    """Within it, components load as their architecture only: built from their configs on the
    meta device, no weight read (what `sdtune plan` counts before any download)."""
    token = _SHAPES_ONLY.set(True)
    try:
        with torch.device("meta"):
            yield
    finally:
        _SHAPES_ONLY.reset(token)


def shapes_only_active() -> bool:
    return _SHAPES_ONLY.get()


def load_weights(path: Path, name: str, cls):
    """Component `name` of the folder at `path` as `cls`, with every weight its architecture
    has: a weight missing from the files, or of another shape, is a one-line error (the
    libraries would leave it random, or on the meta device, and say so only in a log)."""
    if _SHAPES_ONLY.get():
        if hasattr(cls, "load_config"):  # diffusers
            return load_component(path, name, lambda: cls.from_config(cls.load_config(path / name)))
        return load_component(
            path, name, lambda: cls(cls.config_class.from_pretrained(path / name))
        )
    module, info = load_component(
        path, name, lambda: cls.from_pretrained(path, subfolder=name, output_loading_info=True)
    )
    for kind, what in (("missing_keys", "has no"), ("mismatched_keys", "has wrong shapes for")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or [])
        if keys:
            raise ModelError(
                f"model.base: {path / name} {what} {len(keys)} of its weights (e.g. {keys[0]}); "
                "the folder is incomplete or of another architecture: export or download it again"
            )
    return module


def load_parts(path: Path, encoders: dict):
    """(UNet, VAE or None, text encoders, tokenizers, scheduler) of a diffusers folder;
    `encoders` maps each text-encoder folder to (its class, its tokenizer's folder)."""
    unet = load_weights(path, "unet", UNet2DConditionModel)
    vae = None
    if (path / "vae" / "config.json").is_file():
        vae = load_weights(path, "vae", AutoencoderKL)
    modules, tokenizers = [], []
    for name, (cls, folder) in encoders.items():
        modules.append(load_weights(path, name, cls))
        tokenizer = load_component(
            path, folder, lambda f=folder: CLIPTokenizer.from_pretrained(path, subfolder=f)
        )
        check_tokenizer(tokenizer, path / folder)
        tokenizers.append(tokenizer)
    scheduler = load_component(
        path, "scheduler", lambda: DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    )
    return unet, vae, modules, tokenizers, scheduler


def check_tokenizer(tokenizer, where: Path) -> None:
    if not 0 < tokenizer.model_max_length <= 4096:  # an empty tokenizer/ gives 10**30
        raise ModelError(
            f"model.base: {where} gives no usable maximum length "
            f"({tokenizer.model_max_length}); is its tokenizer_config.json missing?"
        )


def tokenize_side_by_side(bundle, tokenizers, prompts: list[str]) -> torch.Tensor:
    """Several tokenizers' ids of `prompts` side by side in one row each (SDXL, SD3), a
    learned token expanded to its vectors first."""
    if bundle.extra_tokens:  # a multi-vector token stands for several tokens
        from sdtune.models.embeddings import expand_prompt

        prompts = [expand_prompt(p, bundle.extra_tokens) for p in prompts]
    return torch.cat([tokenize_with(t, prompts) for t in tokenizers], dim=1)


def most_tokens(tokenizers, prompts: list[str]) -> list[int]:
    """Tokens each prompt needs before truncation, the most any of `tokenizers` needs."""
    counts = [[len(ids) for ids in t(prompts, truncation=False).input_ids] for t in tokenizers]
    return [max(c) for c in zip(*counts)]


def tokenize_with(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


class StableDiffusion(Family):
    denoiser = "unet"
    text_encoders = ("text_encoder",)
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}
    # the UNet's attention and feed-forward projections (with the transformer blocks' in/out
    # projections); every projection of CLIP's attention and MLP. SDXL inherits them.
    lora_targets = {
        "denoiser": (
            "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"
        ),
        "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    }  # fmt: skip

    def __init__(self, name: str, label: str) -> None:
        self.name, self.label = name, label
        self.pipeline_class = "" if name == "pixel" else "StableDiffusionPipeline"

    # ------------------------------------------------------------ components

    def resolution_multiple(self, bundle) -> int:
        levels = len(bundle.unet.config.block_out_channels) - 1
        return self.downsample_factor(bundle) * 2**levels

    def default_resolution(self, bundle) -> int:
        return int(bundle.unet.config.sample_size) * self.downsample_factor(bundle)

    def architecture(self, bundle) -> dict:
        return {
            "unet": {k: v for k, v in dict(bundle.unet.config).items() if not k.startswith("_")},
            "text_encoder": bundle.text_encoder.config.to_diff_dict(),
        }

    def describe(self, bundle) -> str:
        space = (
            "pixel space" if bundle.vae is None else f"latents /{self.downsample_factor(bundle)}"
        )
        schedule = bundle.noise_scheduler.config
        return (
            f"model: {bundle.source} | family {self.name} | {space} | "
            f"prediction {schedule.prediction_type} | schedule {schedule.beta_schedule} | "
            f"cross-attention dim {bundle.unet.config.cross_attention_dim}"
        )

    # ------------------------------------------------------------ loading and saving

    def bundle(self, unet, text_encoder, tokenizer, scheduler, vae, source: str):
        from sdtune.models.bundle import ModelBundle

        modules = {"unet": unet, "text_encoder": text_encoder}
        if vae is not None:
            modules["vae"] = vae
        return ModelBundle(self.name, modules, {"text_encoder": tokenizer}, scheduler, source)

    def load_folder(self, path: Path, source: str, info: dict, without=frozenset()):
        missing = [c for c in ("text_encoder", "tokenizer", "scheduler") if not (path / c).is_dir()]
        if missing:
            raise ModelError(
                f"model.base: {path} has no {'/, '.join(missing)}/ folder; a Stable Diffusion "
                "pipeline folder holds unet/, text_encoder/, tokenizer/, scheduler/ (and vae/)"
            )
        unet, vae, encoders, tokenizers, scheduler = load_parts(
            path, {"text_encoder": (CLIPTextModel, "tokenizer")}
        )
        return self.bundle(unet, encoders[0], tokenizers[0], scheduler, vae, source)

    def load_single_file(self, path: Path, config_dir: Path, source: str, without=frozenset()):
        from diffusers import StableDiffusionPipeline

        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path),
                config=str(config_dir),
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
            )
        except Exception as exc:  # diffusers raises many types for unreadable or mismatched files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"model.base: cannot load single-file checkpoint {path}: {first}"
            ) from exc
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        return self.bundle(
            pipe.unet, pipe.text_encoder, pipe.tokenizer, scheduler, pipe.vae, source
        )

    tokenizer_folders = {"text_encoder": "tokenizer"}
    """Text-encoder component -> the folder of its tokenizer in a diffusers pipeline."""

    def pipeline_index(self) -> dict:
        """model_index.json's components (after _class_name and _diffusers_version)."""
        return {
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
        }

    # ------------------------------------------------------------ conditioning

    def tokenize(self, bundle, prompts: list[str]) -> torch.Tensor:
        if bundle.extra_tokens:  # a multi-vector token stands for several tokens
            from sdtune.models.embeddings import expand_prompt

            prompts = [expand_prompt(p, bundle.extra_tokens) for p in prompts]
        return tokenize_with(bundle.tokenizer, prompts)

    def max_tokens(self, bundle) -> int:
        return int(bundle.tokenizer.model_max_length)

    def token_counts(self, bundle, prompts: list[str]) -> list[int]:
        return [len(ids) for ids in bundle.tokenizer(prompts, truncation=False).input_ids]

    def encode(self, bundle, ids, encoders=None) -> Conditioning:
        encoder = (encoders or {}).get("text_encoder", bundle.text_encoder)
        return Conditioning(encoder(ids)[0])

    def predict(self, bundle, noisy, timesteps, cond, denoiser=None):
        unet = denoiser if denoiser is not None else bundle.unet
        return unet(noisy, timesteps, encoder_hidden_states=cond.hidden).sample

    # ------------------------------------------------------------ the objective

    def objective(self, bundle, diffusion, device):
        from sdtune.diffusion.objective import DDPM, timestep_density

        config = bundle.noise_scheduler.config
        scheduler = bundle.noise_scheduler
        density = timestep_density(
            int(scheduler.alphas_cumprod.shape[0]),
            diffusion.timestep_sampling,
            diffusion.timestep_logit_mean,
            diffusion.timestep_logit_std,
            diffusion.timestep_bias,
            diffusion.timestep_bias_portion,
            diffusion.timestep_bias_multiplier,
            diffusion.timestep_bias_range,
        )
        return DDPM(
            scheduler.alphas_cumprod,
            str(config.prediction_type),
            diffusion.min_snr_gamma,
            diffusion.noise_offset,
            device,
            diffusion.timestep_sampling,
            density,
        ).configure(diffusion)

    def apply_diffusion_settings(self, bundle, diffusion) -> None:
        """diffusion.noise_schedule / prediction_type / zero_terminal_snr rebuild the training
        schedule (unset ones keep the base model's); the samplers take it from there."""
        from sdtune.diffusion.schedules import make_noise_scheduler

        config = dict(bundle.noise_scheduler.config)
        zero_snr = {}
        if diffusion.zero_terminal_snr:  # SNR(T) = 0, sampled from the last timestep
            zero_snr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
        if diffusion.noise_schedule is not None:
            bundle.noise_scheduler = make_noise_scheduler(
                diffusion.num_train_timesteps,
                diffusion.noise_schedule,
                diffusion.prediction_type or config.get("prediction_type", "epsilon"),
                config.get("beta_start", 0.00085),
                config.get("beta_end", 0.012),
                **zero_snr,
            )
        elif diffusion.prediction_type is not None or zero_snr:
            changes = dict(zero_snr)
            if diffusion.prediction_type is not None:
                changes["prediction_type"] = diffusion.prediction_type
            bundle.noise_scheduler = DDPMScheduler.from_config(config, **changes)
        prediction = bundle.noise_scheduler.config.prediction_type
        if (
            bundle.noise_scheduler.config.get("rescale_betas_zero_snr")
            and prediction != "v_prediction"
        ):
            raise ConfigError(
                f"diffusion.zero_terminal_snr: {bundle.source} predicts {prediction}, which is "
                "undefined at zero SNR (the last timestep's input holds no image): set "
                "diffusion.prediction_type = 'v_prediction'"
            )

    def set_dropout(self, bundle, p: float) -> None:
        """Dropout probability `p` in every residual block of the UNet (and in its config)."""
        from diffusers.models.resnet import ResnetBlock2D

        for module in bundle.unet.modules():
            if isinstance(module, ResnetBlock2D):
                module.dropout.p = p
        bundle.unet.register_to_config(dropout=p)

    def make_sampler(self, bundle, name: str):
        """A sampler on the model's training schedule. In pixel space the predicted clean image
        is clipped to [-1, 1] (Ho et al. 2020); latents have no such range and are left alone."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

        config = dict(bundle.noise_scheduler.config)
        pixel = bundle.vae is None
        if name == "ddim":
            return DDIMScheduler.from_config(config, clip_sample=pixel, set_alpha_to_one=False)
        if name == "dpm++":
            return DPMSolverMultistepScheduler.from_config(
                config, algorithm_type="dpmsolver++", thresholding=pixel, sample_max_value=1.0
            )
        return EulerDiscreteScheduler.from_config(config)

    # ------------------------------------------------------------ file layouts

    def check_export(self, bundle, fmt: str, base: str) -> None:
        if fmt in ("single-file", "ckpt") and bundle.vae is None:
            raise UserError(
                f"--format {fmt}: {base} is a pixel-space model (no VAE) and has no "
                "Stable Diffusion single-file layout; export it with --format diffusers"
            )
        if fmt in ("single-file", "ckpt") and self.name == "sd2":
            raise UserError(
                f"--format {fmt}: SD 2.x single files keep the text encoder in OpenCLIP layout, "
                "which sdtune does not write yet; export with --format diffusers"
            )

    def single_file_state(self, bundle) -> dict[str, torch.Tensor]:
        """UNet + VAE + CLIP text encoder under the LDM names (model.diffusion_model.*, ...)."""
        from sdtune.checkpoint.convert import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

        if bundle.vae is None:
            raise ValueError("a pixel-space model has no Stable Diffusion single-file layout")
        state: dict[str, torch.Tensor] = {}
        state.update(unet_to_ldm(bundle.unet.state_dict(), dict(bundle.unet.config)))
        state.update(vae_to_ldm(bundle.vae.state_dict(), dict(bundle.vae.config)))
        state.update(text_encoder_to_ldm(bundle.text_encoder.state_dict()))
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def lora_loader(self):
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        return StableDiffusionLoraLoaderMixin

    def load_denoiser_lora(self, bundle, state, alphas, metadata, name: str) -> None:
        self.lora_loader().load_lora_into_unet(
            state, alphas, bundle.unet, adapter_name=name, metadata=metadata
        )

    def kohya_metadata(self, bundle) -> dict[str, str]:
        v2 = self.name == "sd2"
        return {
            "ss_base_model_version": KOHYA_BASE_VERSION.get(self.name, "sd_v1"),
            "ss_v2": str(v2),
            "modelspec.architecture": "stable-diffusion-v2-512/lora"
            if v2
            else "stable-diffusion-v1/lora",
        }

    def embedding_file(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {A1111_KEY: vectors["text_encoder"]}

    def read_embedding(self, state: dict, path: Path) -> dict[str, torch.Tensor]:
        if "string_to_param" in state:  # A1111 .pt
            state = state["string_to_param"]
        if A1111_KEY in state:
            state = {A1111_KEY: state[A1111_KEY]}
        if len(state) != 1:
            raise UserError(
                f"--embedding {path}: expected one tensor (emb_params, string_to_param or a "
                f"single token), found keys {sorted(state)[:4]}"
            )
        vectors = next(iter(state.values())).detach().float()
        return {"text_encoder": vectors.reshape(-1, vectors.shape[-1])}


def sd_variant(unet_config: dict, has_vae: bool) -> str:
    """sd1, sd2, pixel or custom, from the UNet's config and whether there is a VAE."""
    if not has_vae:
        return "pixel"
    cross = unet_config.get("cross_attention_dim")
    if unet_config.get("in_channels") == 4 and list(unet_config.get("block_out_channels", [])) == [
        320,
        640,
        1280,
        1280,
    ]:
        if cross == 768:
            return "sd1"
        if cross == 1024:
            return "sd2"
    return "custom"


def text_config(hidden: int, layers: int, heads: int, max_length: int, tokenizer, **extra):
    """A CLIP text encoder config at toy size, for the tiny presets."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden,
        **extra,
    )


def tiny_sd(dropout: float = 0.0):
    """Stable Diffusion 1.x layout at toy size: 32 px images, 4x16x16 latents."""
    from sdtune.diffusion.schedules import make_noise_scheduler
    from sdtune.models.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(max_length=77)
    text_encoder = CLIPTextModel(text_config(32, 2, 4, 77, tokenizer))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        dropout=dropout,
    )
    scheduler = make_noise_scheduler(1000, "scaled_linear", "epsilon")
    return CUSTOM.bundle(unet, text_encoder, tokenizer, scheduler, vae, "preset:tiny-sd")


def tiny_digits(dropout: float = 0.0):
    """Pixel-space, single-channel, text-conditioned model for 16x16 digits (the quickstart).
    At 16x16 pixels a VAE would only blur the strokes of a digit and cost time, while the UNet,
    text encoder, noise schedule, loss and samplers are exactly those of Stable Diffusion."""
    from sdtune.diffusion.schedules import make_noise_scheduler
    from sdtune.models.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(max_length=12)
    text_encoder = CLIPTextModel(text_config(64, 2, 4, 12, tokenizer))
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=16,
        norm_num_groups=16,
        dropout=dropout,
    )
    scheduler = make_noise_scheduler(1000, "squaredcos_cap_v2", "epsilon")
    return PIXEL.bundle(unet, text_encoder, tokenizer, scheduler, None, "preset:tiny-digits")


SD1 = StableDiffusion("sd1", "Stable Diffusion 1.x")
SD2 = StableDiffusion("sd2", "Stable Diffusion 2.x")
CUSTOM = StableDiffusion("custom", "a Stable Diffusion 1.x/2.x layout of another size")
PIXEL = StableDiffusion("pixel", "a pixel-space model of the Stable Diffusion layout")
FAMILIES = (SD1, SD2, CUSTOM, PIXEL)
PRESETS = {"tiny-sd": tiny_sd, "tiny-digits": tiny_digits}


def family_of_folder(path: Path, info: dict) -> Family | None:
    """The variant of a diffusers folder of this layout (None: not this family's layout)."""
    if (path / "text_encoder_2").is_dir():
        return None
    config_file = path / "unet" / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model.base: {config_file} is unreadable ({exc})") from None
    if not isinstance(config, dict) or config.get("addition_embed_type") == "text_time":
        return None
    recorded = info.get("family")
    if recorded in ("sd1", "sd2", "custom", "pixel"):
        return BY_NAME[recorded]
    return BY_NAME[sd_variant(config, (path / "vae" / "config.json").is_file())]


BY_NAME = {f.name: f for f in FAMILIES}
